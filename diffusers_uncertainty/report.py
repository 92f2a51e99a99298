"""The workflow's final report: a metrics table read back from the evaluations, and a picture of the idea."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .atomic import save_image_atomic, write_text_atomic
from .conditioning import label_maps_to_tensor, prepare_uncertainty_map


def _palette(num_classes: int) -> np.ndarray:
    """A fixed, distinguishable colour per class (golden-angle hues); unlabeled pixels are black."""
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    colours = []
    for hue in hues:
        # HSV -> RGB with full saturation and value.
        sector = int(hue * 6) % 6
        fraction = hue * 6 - int(hue * 6)
        rising, falling = fraction, 1 - fraction
        rgb = [(1, rising, 0), (falling, 1, 0), (0, 1, rising), (0, falling, 1), (rising, 0, 1), (1, 0, falling)][sector]
        colours.append([int(255 * c) for c in rgb])
    return np.array(colours, dtype=np.uint8)


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    r"""
    Colour an integer label map (pixels outside `[0, num_classes)` become black).

    Args:
        labels (`np.ndarray`):
            `(H, W)` integer labels.
        num_classes (`int`):
            Number of classes.
    """
    palette = _palette(num_classes)
    valid = (labels >= 0) & (labels < num_classes)
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[valid] = palette[labels[valid]]
    return rgb


def _read_metrics(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def metrics_table(evaluation_dir: Path, variants: list[str]) -> tuple[str, dict]:
    r"""
    The markdown table of the report, read from `<evaluation_dir>/<variant>/<split>/metrics.json`.

    Args:
        evaluation_dir (`Path`):
            The workflow's `evaluation` folder.
        variants (`list[str]`):
            Row order.

    Returns:
        `tuple(str, dict)`: the table, and `{variant: {split: metrics}}` as read.
    """
    from .segmentation.metrics import labeled_classes_mean_iou  # the segmentation extra, present once segmenters ran

    rows = [
        "| segmenter | target mIoU | target mIoU, labeled classes | target mDice | target pixel acc. | source mIoU | "
        "source mDice |",
        "|---|---|---|---|---|---|---|",
    ]
    read = {}
    for variant in variants:
        target = _read_metrics(evaluation_dir / variant / "target_val" / "metrics.json") or {}
        source = _read_metrics(evaluation_dir / variant / "source_val" / "metrics.json") or {}
        read[variant] = {"target_val": target, "source_val": source}
        labeled = labeled_classes_mean_iou(target) if target.get("per_class") else None
        rows.append(
            f"| {variant} | {_percent(target.get('mIoU'))} | {_percent(labeled)} | {_percent(target.get('mDice'))} | "
            f"{_percent(target.get('pixel_accuracy'))} | {_percent(source.get('mIoU'))} | {_percent(source.get('mDice'))} |"
        )
    return "\n".join(rows), read


def generation_grid(pipeline, label_paths: list[Path], uncertainty_paths: list[Path], levels: list[float], num_classes: int,
                    resolution: int, prompt: str, num_inference_steps: int, seed: int = 0) -> PIL.Image.Image:
    r"""
    One row per label map: label map | a real target uncertainty map | generated with that map | generated at each
    constant uncertainty level. All images of a row share the seed, so only the uncertainty differs.

    Args:
        pipeline (`StableDiffusionDualControlPipeline`):
            The trained pipeline.
        label_paths (`list[Path]`):
            Integer label PNGs.
        uncertainty_paths (`list[Path]`):
            Real uncertainty maps (PNG); one per row, reused cyclically.
        levels (`list[float]`):
            Constant uncertainty levels.
        num_classes (`int`):
            For the colours.
        resolution (`int`):
            Output size.
        prompt (`str`):
            The prompt.
        num_inference_steps (`int`):
            Denoising steps.
        seed (`int`, defaults to 0):
            Seed of every image.
    """
    rows = []
    for index, label_path in enumerate(label_paths):
        labels = label_maps_to_tensor(PIL.Image.open(label_path))
        uncertainty_image = PIL.Image.open(uncertainty_paths[index % len(uncertainty_paths)])
        real_map = prepare_uncertainty_map(uncertainty_image, 1, resolution, resolution)
        constant_maps = [torch.full_like(real_map, float(level)) for level in levels]
        # One call per row: the row's conditions form the batch, every image starting from the same noise.
        output = pipeline(
            prompt,
            semantic_map=labels,
            uncertainty_map=torch.cat([real_map, *constant_maps]),
            height=resolution,
            width=resolution,
            num_inference_steps=num_inference_steps,
            generator=[torch.Generator().manual_seed(seed) for _ in range(1 + len(levels))],
            output_type="np",
        )
        images = [(image * 255).round().astype(np.uint8) for image in output.images]
        label_rgb = colorize(output.semantic_maps[0], num_classes)
        uncertainty_rgb = np.repeat((real_map[0, 0].numpy() * 255).round().astype(np.uint8)[..., None], 3, axis=2)
        rows.append(np.concatenate([label_rgb, uncertainty_rgb, *images], axis=1))
    return PIL.Image.fromarray(np.concatenate(rows, axis=0))


def refinement_table(out: Path, variants: dict, rounds: int) -> str:
    r"""
    The synthetic variants' metrics round by round (round 1 is `<out>/evaluation`, round `r` is
    `<out>/rounds/round_<r>/evaluation`), as a markdown table.

    Args:
        out (`Path`):
            The workflow's output folder.
        variants (`dict`):
            The config's variants (only those with `synthetic: true` change between rounds).
        rounds (`int`):
            `refine_rounds`.
    """
    rows = ["| segmenter | round | target mIoU | target pixel acc. | source mIoU |", "|---|---|---|---|---|"]
    for name, variant in variants.items():
        if not (variant or {}).get("synthetic"):
            continue
        for round_index in range(1, rounds + 1):
            folder = out / "evaluation" if round_index == 1 else out / "rounds" / f"round_{round_index}" / "evaluation"
            target = _read_metrics(folder / name / "target_val" / "metrics.json") or {}
            source = _read_metrics(folder / name / "source_val" / "metrics.json") or {}
            rows.append(f"| {name} | {round_index} | {_percent(target.get('mIoU'))} | "
                        f"{_percent(target.get('pixel_accuracy'))} | {_percent(source.get('mIoU'))} |")
    return "\n".join(rows)


def stage_times_table(stages: list) -> str:
    r"""
    The markdown table of stage wall times (from each stage's completion marker) and steady-state training
    throughputs (from the `throughput.json` a training script writes into its output folder).

    Args:
        stages (`list[Stage]`):
            The workflow's stages, in order (see [`workflow.plan`]).
    """
    from .training.performance import THROUGHPUT_FILE
    from .workflow import MARKER

    rows = ["| stage | wall time (s) | steps/s | samples/s |", "|---|---|---|---|"]
    total = 0.0
    for stage in stages:
        marker = _read_metrics(stage.output / MARKER)
        if marker is None:
            continue  # not run (yet): the report itself, or stages left out with --only
        throughput = _read_metrics(stage.output / THROUGHPUT_FILE) or {}
        steps, samples = throughput.get("steps_per_second"), throughput.get("samples_per_second")
        total += marker["seconds"]
        rows.append(
            f"| {stage.name} | {marker['seconds']:.1f} | {'' if steps is None else f'{steps:.1f}'} | "
            f"{'' if samples is None else f'{samples:.0f}'} |"
        )
    rows.append(f"| **all stages above** | **{total:.1f}** | | |")
    return "\n".join(rows)


def write_report(
    config: dict, out: Path, root: Path, base_path: str, control: Path, maps: dict, stages: list | None = None
) -> Path:
    r"""
    Write `<out>/report/report.md` and `<out>/report/grid.png`.

    Args:
        config (`dict`):
            The workflow config.
        out (`Path`):
            The workflow's output folder.
        root (`Path`):
            The data root (`source/`, `target/`).
        base_path (`str`):
            The base model.
        control (`Path`):
            The trained dual control.
        maps (`dict`):
            `{"source/train": folder, "target/train": folder}` of the uncertainty stage outputs.
        stages (`list[Stage]`, *optional*):
            The workflow's stages: their wall times and throughputs become the report's last table.
    """
    from .models import UncertaintyControlNetModel
    from .pipelines import StableDiffusionDualControlPipeline

    data = config["data"]
    report_config = config.get("report") or {}
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    variants = list((config.get("variants") or {"source_only": {}}).keys())
    table, _ = metrics_table(out / "evaluation", variants)

    from .synthetic_evaluation import RESULTS_NAME, synthetic_evaluation_table

    synthetic_results = _read_metrics(out / "synthetic_evaluation" / RESULTS_NAME)
    synthetic_table = (
        synthetic_evaluation_table(synthetic_results) if synthetic_results is not None
        else "Not measured: the `synthetic_evaluation` stage has not written its results."
    )

    scores = {}
    for split, folder in maps.items():
        info = _read_metrics(Path(folder) / "scores.json") or {}
        scores[split] = info.get("mean_score")

    pipeline = StableDiffusionDualControlPipeline.from_pretrained(
        base_path, controlnet=UncertaintyControlNetModel.from_pretrained(control)
    )
    pipeline.set_progress_bar_config(disable=True)
    label_paths = sorted((root / "source" / "val" / "labels").glob("*.png"))[: report_config.get("rows", 3)]
    uncertainty_paths = sorted((Path(maps["target/train"]) / "maps").glob("*.png"))
    levels = report_config.get("uncertainty_levels", [0.0, 0.5, 1.0])
    grid = generation_grid(
        pipeline,
        label_paths,
        uncertainty_paths,
        levels,
        data["num_classes"],
        data["resolution"],
        report_config.get("prompt", (config.get("control", {}).get("args") or {}).get("default_prompt", "")),
        report_config.get("num_inference_steps", 20),
    )
    save_image_atomic(report_dir / "grid.png", grid)

    columns = ["label map", "target uncertainty map", "generated (that map)"] + [f"u = {level}" for level in levels]
    lines = [
        "# diffusers-uncertainty workflow report",
        "",
        f"Data: `{root}`; {data['num_classes']} classes; resolution {data['resolution']}; base model `{base_path}`.",
        "",
        "## Segmentation (evaluated on the labeled development splits, %)",
        "",
        table,
        "",
        "Labeled classes: the mean IoU over the classes with pixels in target/val's labels, the same classes for every "
        "row (mIoU leaves out a class absent from the labels only for a segmenter that never predicts it).",
        "",
        "## Uncertainty of the source-only segmenter (mean normalised map value)",
        "",
        "| split | mean uncertainty |",
        "|---|---|",
        *[f"| {split} | {'n/a' if value is None else f'{value:.4f}'} |" for split, value in scores.items()],
        "",
        "## Synthetic data: label fidelity, target likeness, uncertainty (per uncertainty level)",
        "",
        synthetic_table,
        "",
        "## Generated samples",
        "",
        "Columns: " + " | ".join(columns) + ". Each row shares one seed; only the uncertainty condition changes.",
        "",
        "![generated samples](grid.png)",
        "",
    ]
    from .workflow import refinement_variant

    rounds = config.get("refine_rounds", 1)
    if rounds > 1:
        lines += [
            "## Iterative refinement",
            "",
            "Each round re-estimates the uncertainty maps with the previous round's "
            f"`{refinement_variant(config)}` segmenter, fine-tunes the control on "
            "them, regenerates the synthetic data and retrains the synthetic variants (%).",
            "",
            refinement_table(out, config.get("variants") or {}, rounds),
            "",
        ]
    if stages:
        lines += [
            "## Stage times",
            "",
            "Wall time of each stage as it ran (a stage skipped as complete keeps its earlier time); steady-state "
            "training throughput after warm-up, where the stage trains.",
            "",
            stage_times_table(stages),
            "",
        ]
    write_text_atomic(report_dir / "report.md", "\n".join(lines))
    return report_dir / "report.md"
