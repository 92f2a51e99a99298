#!/usr/bin/env python
"""The figures of the headline experiment, drawn from a work folder of `benchmarks/bench_headline.py`.

    python benchmarks/headline_figures.py --work_dir runs/headline            # into runs/headline/figures
    python benchmarks/headline_figures.py --work_dir /tmp/hl_smoke --seed 1 --rows 4 --output_dir figs

It reads `<work_dir>/results.json` (every seed's metrics, the best uncertainty-aware row, the sweep's rows and the
first seed's workflow config) and, for the grid, `<work_dir>/seed_<s>/{base,control,synthetic}` and the config's data
root, and writes into `--output_dir` (default `<work_dir>/figures`):

| file | what it shows |
|---|---|
| `grid.png`, `grid.json` | on the trained base and dual control of one seed, one row per source/val label map: the label map (coloured), the images generated from it at uniform uncertainty 0, 0.5 and 1 (one generator seed per row: the three share their noise), and the real source/train and target/train images nearest to the image at uncertainty 1 |
| `per_class_iou.png`, `per_class_iou.json` | target/val IoU per class of source_only, photometric, fda (where it ran) and the best uncertainty-aware row: mean over the seeds, error bars one sample standard deviation |
| `synthetic_count.png`, `synthetic_count.json` | target/val mIoU of the synthetic-count sweep (`bench_headline.py --synthetic_counts`) against the number of synthetic samples: mean, one sample standard deviation, each seed |
| `figures.md` | the numbers behind every figure drawn, as markdown tables (for RESULTS.md) |

The grid generates with the settings of the seed's generated dataset (its `generation_config.json`: prompt, steps,
guidance, conditioning scales, size), through the package's own generation call (`synthesis.generate_batch`).
Nearest real image: the smallest L2 distance between the generated image at uncertainty 1 and each real image, both
resized (bilinear, antialiased) to the generated image's aspect ratio with a 32-pixel short side (the whole frame, as
the pipeline resizes a label map to the output size), as RGB arrays in [0, 1].

A figure whose inputs are missing (a partly finished work folder) is skipped with a printed line; when none can be
drawn, the script stops with what each one lacks. The plots need matplotlib (`pip install ".[figures]"`).
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont


BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))  # the package from this checkout
sys.path.insert(0, str(BENCHMARKS))  # bench_headline: row names, the best-row rule

import bench_headline  # noqa: E402
from diffusers_uncertainty.atomic import atomic_write_path, save_image_atomic, write_json_atomic, write_text_atomic  # noqa: E402
from diffusers_uncertainty.workflow import MARKER  # noqa: E402


LEVELS = (0.0, 0.5, 1.0)
NEAREST_SHORT_SIDE = 32
NEAREST_METRIC = (
    "L2 distance between RGB arrays in [0, 1] of the generated image at uncertainty 1 and each real image, both resized "
    f"(bilinear, antialiased) to the generated image's aspect ratio with a {NEAREST_SHORT_SIDE}-pixel short side"
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", required=True, help="A work folder of benchmarks/bench_headline.py.")
    parser.add_argument("--output_dir", default=None, help="Where the figures go (default: <work_dir>/figures).")
    parser.add_argument("--seed", type=int, default=None,
                        help="Whose base, control and generation settings the grid uses (default: the first seed).")
    parser.add_argument("--rows", type=int, default=3, help="Label maps in the grid (evenly spaced over source/val).")
    parser.add_argument("--tile", type=int, default=128,
                        help="Smallest short side of a grid tile in pixels (small images are enlarged to it).")
    parser.add_argument("--device", default=None, help="Where the grid is generated (default: cuda if available).")
    args = parser.parse_args(input_args)
    if args.rows < 1:
        parser.error(f"--rows must be at least 1, got {args.rows}")
    if args.tile < 8:
        parser.error(f"--tile must be at least 8, got {args.tile}")
    return args


# ------------------------------------------------------------------------------------------------------ inputs
def load_results(work_dir: str | Path) -> dict:
    r"""
    `<work_dir>/results.json` as written by `bench_headline.py`, its seed keys turned back into integers.

    Raises:
        `ValueError`: when the file is missing or lacks the table.
    """
    path = Path(work_dir) / "results.json"
    if not path.is_file():
        raise ValueError(
            f"`--work_dir`: expected {path} (written by benchmarks/bench_headline.py), got no such file; run "
            "bench_headline.py on this folder first (`--report_only` aggregates what has finished)."
        )
    results = json.loads(path.read_text(encoding="utf-8"))
    if "table" not in results or "seeds" not in results:
        raise ValueError(f"`--work_dir`: expected `table` and `seeds` in {path}, got keys {sorted(results)}.")
    results["table"] = {row: {int(seed): run for seed, run in runs.items()} for row, runs in results["table"].items()}
    return results


def data_root(work_dir: Path, results: dict) -> Path:
    """The experiment's data root: the config's `data.root`, else the embedded toy data of the first seed."""
    root = ((results.get("config") or {}).get("data") or {}).get("root")
    return Path(root) if root else Path(work_dir) / f"seed_{results['seeds'][0]}" / "data"


def grid_inputs(work_dir: Path, results: dict, seed: int) -> tuple[dict | None, str | None]:
    r"""
    What the grid reads, or why it cannot be drawn: `({"base", "control", "settings", "root", "num_classes",
    "ignore_index"}, None)` or `(None, reason)`.
    """
    from diffusers_uncertainty.synthetic_evaluation import read_generation_settings

    config = results.get("config")
    if not config:
        return None, (f"{Path(work_dir) / 'results.json'} has no `config` (written by an older bench_headline.py); "
                      "rerun bench_headline.py with --report_only")
    out = Path(work_dir) / f"seed_{seed}"
    missing = [stage for stage in ("base", "control", "synthetic") if not (out / stage / MARKER).is_file()]
    if missing:
        return None, (f"expected finished {', '.join(missing)} stage(s) in {out} (their {MARKER}), got none; the grid "
                      "uses the seed's trained base and control with its generated dataset's settings")
    settings = read_generation_settings(out / "synthetic")
    if settings is None:
        return None, f"expected {out / 'synthetic' / 'generation_config.json'}, got no such file"
    root = data_root(work_dir, results)
    missing = [split for split in ("source/val", "source/train", "target/train") if not (root / split).is_dir()]
    if missing:
        return None, f"expected {', '.join(missing)} in the data root {root}, got no such folder"
    data = config["data"]
    return {"base": out / "base", "control": out / "control", "settings": settings, "root": root,
            "num_classes": data["num_classes"], "ignore_index": data.get("ignore_index")}, None


# ----------------------------------------------------------------------------------------------------- numbers
def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def per_class_summary(results: dict) -> tuple[dict | None, str | None]:
    r"""
    Per-class target/val IoU (%) of source_only, photometric, fda (where it ran) and the best uncertainty-aware row:
    `({"rows", "classes", "values": {row: [{"class", "mean", "sd", "n", "values"} ...]}}, None)`, or
    `(None, reason)`. A class a seed's evaluation has no IoU for (absent from target/val) is left out of that class's
    mean; with no IoU at all its mean and sd are `None`.
    """
    table = results["table"]
    best = results.get("best_uncertainty_aware") or bench_headline.best_uncertainty_aware(table)
    missing = [row for row in bench_headline.PER_CLASS_BASELINES if row not in table]
    if best is None or missing:
        return None, (f"expected finished evaluations of {', '.join(missing + ([] if best else ['an uncertainty-aware row']))} "
                      "in results.json, got none")
    rows = bench_headline.per_class_rows(table, best)
    classes = [entry["class"] for entry in next(iter(table[rows[0]].values()))["target"]["per_class"]]
    values = {}
    for row in rows:
        values[row] = []
        for index, name in enumerate(classes):
            ious = [100 * run["target"]["per_class"][index]["IoU"] for run in table[row].values()
                    if run["target"]["per_class"][index]["IoU"] is not None]
            entry = _mean_sd(ious) if ious else {"mean": None, "sd": None, "n": 0, "values": []}
            values[row].append({"class": str(name), **entry})
    return {"rows": rows, "classes": [str(name) for name in classes], "metric": "target/val IoU (%)",
            "spread": "sample standard deviation over the seeds", "values": values}, None


def synthetic_count_summary(results: dict) -> tuple[dict | None, str | None]:
    r"""
    The synthetic-count sweep's target/val mIoU (%): `({"recipe", "num_source_train", "points": [{"row",
    "multiple", "samples", "mean", "sd", "n", "values"} ...] sorted by multiple, "references": {row: {...}}}, None)`,
    or `(None, reason)` when results.json has no finished sweep row. The recipe's own row, which reads every generated
    sample, is one more point at that count (a reference line when a sweep row has the same count); source_only and
    photometric are references.
    """
    sweep = results.get("synthetic_counts")
    if not sweep:
        return None, "results.json has no synthetic-count sweep (bench_headline.py --synthetic_counts)"
    table = results["table"]
    points = []
    for row, info in sweep["rows"].items():
        if row in table:
            points.append({"row": row, "multiple": info["multiple"], "samples": info["samples"],
                           **_mean_sd([100 * run["target"]["mIoU"] for run in table[row].values()])})
    if not points:
        return None, f"none of the sweep rows {sorted(sweep['rows'])} has finished evaluations in results.json"
    references = {}
    for row in ("source_only", "photometric", sweep["recipe"]):
        if row in table:
            references[row] = _mean_sd([100 * run["target"]["mIoU"] for run in table[row].values()])
    full = sweep.get("generated_samples_per_seed")
    if sweep["recipe"] in references:
        # The recipe on every generated sample is the curve's point at that count, unless a sweep row has it.
        if full and full not in {point["samples"] for point in points}:
            points.append({"row": sweep["recipe"], "multiple": full / sweep["num_source_train"], "samples": full,
                           **references.pop(sweep["recipe"])})
        else:
            references[sweep["recipe"]]["samples"] = full
    return {"recipe": sweep["recipe"], "num_source_train": sweep["num_source_train"],
            "metric": "target/val mIoU (%)", "spread": "sample standard deviation over the seeds",
            "points": sorted(points, key=lambda point: point["multiple"]), "references": references}, None


# ------------------------------------------------------------------------------------------------------- plots
def _pyplot():
    """matplotlib's pyplot on the Agg backend, or an ImportError naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "The headline plots need matplotlib, which is not installed: run `pip install \".[figures]\"` in the "
            "repository (or `pip install matplotlib`)."
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure, path: Path, dpi: int) -> None:
    with atomic_write_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)


def plot_per_class_iou(summary: dict, path: str | Path, size: tuple[float, float] = (10, 4.5), dpi: int = 100) -> Path:
    r"""
    Grouped bars of [`per_class_summary`]: one group per class, one bar per row (mean), error bars one sample
    standard deviation. The PNG is `size` inches x `dpi` (1000 x 450 pixels by default).
    """
    plt = _pyplot()
    rows, classes = summary["rows"], summary["classes"]
    figure, axes = plt.subplots(figsize=size)
    width = 0.8 / len(rows)
    positions = np.arange(len(classes))
    for index, row in enumerate(rows):
        means = [np.nan if entry["mean"] is None else entry["mean"] for entry in summary["values"][row]]
        spreads = [0.0 if entry["sd"] is None else entry["sd"] for entry in summary["values"][row]]
        axes.bar(positions + (index - (len(rows) - 1) / 2) * width, means, width, yerr=spreads, capsize=2, label=row)
    axes.set_xticks(positions, classes, rotation=30 if max(len(name) for name in classes) > 6 else 0, ha="right"
                    if max(len(name) for name in classes) > 6 else "center")
    axes.set_ylabel(summary["metric"])
    axes.set_ylim(bottom=0)
    axes.set_title("Per-class target IoU: mean over seeds, error bars one standard deviation")
    axes.legend(fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    _save_figure(figure, Path(path), dpi)
    plt.close(figure)
    return Path(path)


def plot_synthetic_count(summary: dict, path: str | Path, size: tuple[float, float] = (7, 4.5), dpi: int = 100) -> Path:
    r"""
    Target mIoU against the number of synthetic samples ([`synthetic_count_summary`]): mean with one sample
    standard deviation, each seed as a dot, and source_only, photometric (the baseline to beat) and, when a sweep row
    has its sample count, the full-data row as horizontal references. The PNG is
    `size` inches x `dpi` (700 x 450 pixels by default).
    """
    plt = _pyplot()
    points = summary["points"]
    figure, axes = plt.subplots(figsize=size)
    samples = [point["samples"] for point in points]
    axes.errorbar(samples, [point["mean"] for point in points], yerr=[point["sd"] for point in points], marker="o",
                  capsize=4, label=f"{summary['recipe']} (mean ± sd)")
    for point in points:
        axes.scatter([point["samples"]] * len(point["values"]), point["values"], s=12, color="grey", alpha=0.6,
                     zorder=3)
    styles = {"source_only": ("--", "black"), "photometric": ("-.", "tab:red"), summary["recipe"]: (":", "tab:green")}
    for row, reference in summary["references"].items():
        label = f"{row} (all {reference['samples']} generated)" if reference.get("samples") else row
        linestyle, color = styles[row]
        axes.axhline(reference["mean"], linestyle=linestyle, color=color, label=label)
    if len(samples) > 1 and max(samples) / min(samples) >= 4:
        axes.set_xscale("log", base=2)
    axes.set_xticks(samples, [f"{point['samples']}\n({point['multiple']:g}x)" for point in points])
    axes.minorticks_off()
    axes.set_xlabel(f"synthetic samples (multiple of the {summary['num_source_train']} labeled source images)")
    axes.set_ylabel(summary["metric"])
    axes.set_title("Target mIoU against the number of synthetic samples (grey: each seed)")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    _save_figure(figure, Path(path), dpi)
    plt.close(figure)
    return Path(path)


# -------------------------------------------------------------------------------------------------------- grid
def thumbnail_size(width: int, height: int, short_side: int = NEAREST_SHORT_SIDE) -> tuple[int, int]:
    """(width, height) with the aspect ratio of `width` x `height` and `short_side` pixels on the shorter side."""
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _as_array(image: PIL.Image.Image, size: tuple[int, int]) -> np.ndarray:
    # Pillow's bilinear resize widens its filter when shrinking: antialiased.
    return np.asarray(image.convert("RGB").resize(size, PIL.Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def nearest_image(image: PIL.Image.Image, candidates: list[PIL.Image.Image],
                  short_side: int = NEAREST_SHORT_SIDE) -> tuple[int, float]:
    r"""
    The candidate nearest to `image`: every image resized to `image`'s aspect ratio with a `short_side`-pixel
    shorter side (bilinear, antialiased), compared as RGB arrays in [0, 1] by L2 distance.

    Returns:
        `tuple(int, float)`: the index of the nearest candidate and its distance.
    """
    if not candidates:
        raise ValueError("`candidates` must hold at least one image, got none.")
    size = thumbnail_size(*image.size, short_side)
    query = _as_array(image, size)
    distances = [float(np.linalg.norm(_as_array(candidate, size) - query)) for candidate in candidates]
    index = int(np.argmin(distances))
    return index, distances[index]


def evenly_spaced(count: int, total: int) -> list[int]:
    """`count` indices spread evenly over `range(total)` (all of them when `count >= total`)."""
    if count >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(count)})


def _title_band(titles: list[str], tile_width: int) -> PIL.Image.Image:
    font = PIL.ImageFont.load_default(size=max(12, tile_width // 10))
    measure = PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
    _, top, _, bottom = measure.textbbox((0, 0), "Ag", font=font)
    band = PIL.Image.new("RGB", (tile_width * len(titles), bottom + 10), "white")
    draw = PIL.ImageDraw.Draw(band)
    for index, title in enumerate(titles):
        left, _, right, _ = draw.textbbox((0, 0), title, font=font)
        draw.text((index * tile_width + (tile_width - (right - left)) / 2, 5), title, fill="black", font=font)
    return band


def headline_grid(pipeline, label_maps: list[np.ndarray], source_images: list[PIL.Image.Image],
                  target_images: list[PIL.Image.Image], settings: dict, num_classes: int, ignore_index: int | None,
                  row_seeds: list[int], levels=LEVELS, tile: int = 128,
                  init_images: list[PIL.Image.Image] | None = None) -> tuple[PIL.Image.Image, list[dict]]:
    r"""
    The grid: one row per label map, columns `label map | u = level ... | nearest source/train | nearest
    target/train`, titles drawn above.

    Args:
        pipeline ([`StableDiffusionDualControlPipeline`]):
            The trained base with its dual control.
        label_maps (`list[np.ndarray]`):
            `(H, W)` integer label maps, one per row.
        source_images, target_images (`list[PIL.Image.Image]`):
            The real images searched for the nearest one ([`nearest_image`] against the image at the last level).
        settings (`dict`):
            A generated dataset's `generation_config.json` settings: the rows are generated as the dataset was
            (`synthesis.dataset_generation_arguments`) at its `height` x `width`.
        num_classes (`int`), ignore_index (`int`, *optional*):
            The label space (for resizing and colouring).
        row_seeds (`list[int]`):
            One generator seed per row, shared by the row's levels.
        levels (`Sequence[float]`, defaults to `(0, 0.5, 1)`):
            Uniform uncertainty levels.
        tile (`int`, defaults to 128):
            Tiles whose short side is smaller are enlarged by a whole factor to reach it.
        init_images (`list[PIL.Image.Image]`, *optional*):
            The image of each label map, the starting image when the dataset was generated from source images
            (`source_image_strength` below 1); needed then.

    Returns:
        `tuple(PIL.Image.Image, list[dict])`: the grid and, per row, the indices and distances of the nearest images.
    """
    import torch

    from diffusers_uncertainty.conditioning import prepare_semantic_map
    from diffusers_uncertainty.report import colorize
    from diffusers_uncertainty.synthesis import WorkItem, dataset_generation_arguments, generate_batch, quantize_uncertainty

    height, width = settings["height"], settings["width"]
    factor = max(1, math.ceil(tile / min(height, width)))
    size = (width * factor, height * factor)
    generation = dataset_generation_arguments(settings)
    if generation["strength"] < 1.0 and (init_images is None or len(init_images) != len(label_maps)):
        raise ValueError(
            f"The dataset was generated from source images (strength {generation['strength']}): pass `init_images`, "
            f"one per label map ({len(label_maps)})."
        )
    rows, info = [], []
    for row, (label_map, seed) in enumerate(zip(label_maps, row_seeds)):
        _, labels = prepare_semantic_map(label_map, num_classes, height, width, ignore_index)
        uncertainty, _ = quantize_uncertainty(torch.stack([torch.full((1, height, width), float(u)) for u in levels]))
        items = [WorkItem(row, 0, seed)] * len(levels)  # one seed: the levels share their noise
        init = [init_images[row]] * len(levels) if generation["strength"] < 1.0 else None
        images, aligned = generate_batch(pipeline, items, labels.repeat(len(levels), 1, 1), uncertainty,
                                         init_images=init, **generation)
        source_index, source_distance = nearest_image(images[-1], source_images)
        target_index, target_distance = nearest_image(images[-1], target_images)
        label_tile = PIL.Image.fromarray(colorize(np.asarray(aligned[0]), num_classes))
        tiles = [label_tile.resize(size, PIL.Image.Resampling.NEAREST)]
        tiles += [image.convert("RGB").resize(size, PIL.Image.Resampling.BICUBIC) for image in images]
        tiles += [real.convert("RGB").resize(size, PIL.Image.Resampling.BICUBIC)
                  for real in (source_images[source_index], target_images[target_index])]
        rows.append(np.concatenate([np.asarray(t) for t in tiles], axis=1))
        info.append({"generator_seed": seed,
                     "nearest_source": {"index": source_index, "distance": source_distance},
                     "nearest_target": {"index": target_index, "distance": target_distance}})
    titles = ["label map", *[f"u = {u:g}" for u in levels], "nearest source", "nearest target"]
    body = PIL.Image.fromarray(np.concatenate(rows, axis=0))
    band = _title_band(titles, size[0])
    grid = PIL.Image.new("RGB", (body.width, band.height + body.height), "white")
    grid.paste(band, (0, 0))
    grid.paste(body, (0, band.height))
    return grid, info


def draw_grid(inputs: dict, rows: int, seed: int, tile: int, device: str | None) -> tuple[PIL.Image.Image, dict]:
    """Load the seed's pipeline and the data, draw [`headline_grid`]; returns the grid and its JSON record."""
    import torch

    from diffusers_uncertainty.data_reader import labeled_folder_records, load_image, load_label, unlabeled_folder_records
    from diffusers_uncertainty.synthesis import dataset_generation_arguments, sample_seed
    from diffusers_uncertainty.synthetic_evaluation import load_generation_pipeline

    root = inputs["root"]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # The generated dataset's settings, with the seed's own base and control folders (the work folder may have moved).
    pipeline = load_generation_pipeline({**inputs["settings"], "pretrained_model_name_or_path": str(inputs["base"]),
                                         "controlnet_model_name_or_path": str(inputs["control"])}, device)
    labeled = labeled_folder_records(root / "source" / "val", argument="source/val")
    chosen = [labeled[i] for i in evenly_spaced(rows, len(labeled))]
    label_maps = [load_label(record["label"], record["name"]) for record in chosen]
    reals = {}
    for split in ("source/train", "target/train"):
        records = unlabeled_folder_records(root / split, argument=split)
        reals[split] = (records, [load_image(record["image"], record["name"]) for record in records])
    row_seeds = [sample_seed(seed, index, 0) for index in range(len(chosen))]
    init_images = [load_image(record["image"], record["name"]) for record in chosen]
    grid, info = headline_grid(pipeline, label_maps, reals["source/train"][1], reals["target/train"][1],
                               inputs["settings"], inputs["num_classes"], inputs["ignore_index"], row_seeds, tile=tile,
                               init_images=init_images)
    for record, row in zip(chosen, info):
        row["label_map"] = str(record["label"])
        for key, split in (("nearest_source", "source/train"), ("nearest_target", "target/train")):
            row[key]["image"] = str(reals[split][0][row[key].pop("index")]["image"])
    settings = inputs["settings"]
    record = {
        "seed": seed, "base": str(inputs["base"]), "control": str(inputs["control"]),
        "columns": ["label map", *[f"u = {u:g}" for u in LEVELS], "nearest source/train", "nearest target/train"],
        "levels": list(LEVELS), "size": [settings["height"], settings["width"]],
        "generation": dataset_generation_arguments(settings),
        "nearest_metric": NEAREST_METRIC, "rows": info,
    }
    return grid, record


# ---------------------------------------------------------------------------------------------------- markdown
def _cell(entry: dict) -> str:
    if entry["mean"] is None:
        return "n/a"
    # One value has no spread: "± 0.0" would claim one.
    return f"{entry['mean']:.1f}" if entry["n"] < 2 else f"{entry['mean']:.1f} ± {entry['sd']:.1f}"


def figures_markdown(grid: dict | None, per_class: dict | None, sweep: dict | None) -> str:
    """The numbers behind the figures drawn, as markdown."""
    lines = ["# Headline figures: the numbers behind them", ""]
    if grid is not None:
        generation = grid["generation"]
        lines += ["## grid.png", "",
                  f"Seed {grid['seed']}; columns: {' | '.join(grid['columns'])}; generated at {grid['size'][0]}x"
                  f"{grid['size'][1]} (HxW) with the prompt {generation['prompt']!r}, {generation['num_inference_steps']} "
                  f"steps, guidance {generation['guidance_scale']:g}, conditioning scales semantic "
                  f"{generation['semantic_conditioning_scale']:g} / uncertainty "
                  f"{generation['uncertainty_conditioning_scale']:g}. Nearest: {grid['nearest_metric']}.", "",
                  "| row | label map | generator seed | nearest source/train (distance) | nearest target/train (distance) |",
                  "|---|---|---|---|---|"]
        for index, row in enumerate(grid["rows"], start=1):
            source, target = row["nearest_source"], row["nearest_target"]
            lines.append(f"| {index} | {Path(row['label_map']).name} | {row['generator_seed']} | "
                         f"{Path(source['image']).name} ({source['distance']:.3f}) | "
                         f"{Path(target['image']).name} ({target['distance']:.3f}) |")
        lines.append("")
    if per_class is not None:
        lines += ["## per_class_iou.png", "",
                  f"{per_class['metric']}, mean ± {per_class['spread']}.", "",
                  "| class | " + " | ".join(per_class["rows"]) + " |", "|---|" + "---|" * len(per_class["rows"])]
        for index, name in enumerate(per_class["classes"]):
            lines.append(f"| {name} | " + " | ".join(_cell(per_class["values"][row][index])
                                                      for row in per_class["rows"]) + " |")
        lines.append("")
    if sweep is not None:
        lines += ["## synthetic_count.png", "",
                  f"{sweep['recipe']} with the first n synthetic samples; {sweep['metric']}, mean ± {sweep['spread']}.",
                  "", "| multiple | synthetic samples | n | target/val mIoU | seeds |", "|---|---|---|---|---|"]
        for point in sweep["points"]:
            lines.append(f"| {point['multiple']:g}x | {point['samples']} | {point['n']} | {_cell(point)} | "
                         + ", ".join(f"{value:.1f}" for value in point["values"]) + " |")
        for row, reference in sweep["references"].items():
            lines.append(f"| reference: {row} | {reference.get('samples') or '-'} | {reference['n']} | "
                         f"{_cell(reference)} | " + ", ".join(f"{value:.1f}" for value in reference["values"]) + " |")
        lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main
def main(args) -> dict:
    r"""
    Draw every figure whose inputs exist; returns `{figure file: path}` of those written.

    Raises:
        `ValueError`: before any work when results.json is missing, `--seed` is not one of its seeds, or no figure
        can be drawn (each one's missing input named).
    """
    work = Path(args.work_dir)
    results = load_results(work)
    seed = results["seeds"][0] if args.seed is None else args.seed
    if seed not in results["seeds"]:
        raise ValueError(f"`--seed` must be one of the experiment's seeds {results['seeds']}, got {seed}.")
    output = Path(args.output_dir) if args.output_dir else work / "figures"

    grid_input, grid_reason = grid_inputs(work, results, seed)
    per_class, per_class_reason = per_class_summary(results)
    sweep, sweep_reason = synthetic_count_summary(results)
    reasons = {"grid.png": grid_reason, "per_class_iou.png": per_class_reason, "synthetic_count.png": sweep_reason}
    if all(reasons.values()):
        raise ValueError(f"`--work_dir` {work}: no figure can be drawn: "
                         + "; ".join(f"{name}: {reason}" for name, reason in reasons.items()) + ".")
    if per_class is not None or sweep is not None:
        _pyplot()  # a missing matplotlib stops here, before the grid's generation
    for name, reason in reasons.items():
        if reason:
            print(f"Skipped {name}: {reason}.", flush=True)

    written, grid_record = {}, None
    if grid_input is not None:
        grid, grid_record = draw_grid(grid_input, args.rows, seed, args.tile, args.device)
        save_image_atomic(output / "grid.png", grid)
        write_json_atomic(output / "grid.json", grid_record)
        written["grid.png"] = output / "grid.png"
    if per_class is not None:
        written["per_class_iou.png"] = plot_per_class_iou(per_class, output / "per_class_iou.png")
        write_json_atomic(output / "per_class_iou.json", per_class)
    if sweep is not None:
        written["synthetic_count.png"] = plot_synthetic_count(sweep, output / "synthetic_count.png")
        write_json_atomic(output / "synthetic_count.json", sweep)
    write_text_atomic(output / "figures.md", figures_markdown(grid_record, per_class, sweep))
    written["figures.md"] = output / "figures.md"
    for name, path in written.items():
        print(f"Wrote {path}", flush=True)
    return written


if __name__ == "__main__":
    main(parse_args())
