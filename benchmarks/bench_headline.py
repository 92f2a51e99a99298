#!/usr/bin/env python
"""The headline experiment: does uncertainty-aware synthetic data beat the baselines on the target domain?

One command runs every row of the table for every seed by driving the workflow (`diffusers_uncertainty.workflow`),
with the same segmenter architecture, step budget, resolution and evaluation in every row (the config's `segmenter:`
section at the chosen scale):

| row | what the segmenter is trained on |
|---|---|
| source_only | labeled source images |
| photometric | + photometric augmentation |
| fda | + Fourier domain adaptation to the unlabeled target images |
| semantic_only | + synthetic data from a semantic-only control (trained with `--train_branch semantic`, generated with the uncertainty branch off): what the uncertainty control adds |
| synthetic | + synthetic data from the dual control (uncertainty bank of real target maps) |
| synthetic_photometric | the row above + photometric augmentation |
| synthetic_photometric_flexseg | the row above + FLEX-Seg losses |
| round 2 | iterative refinement (`refine_rounds: 2`): the round-1 `synthetic_photometric_flexseg` segmenter re-estimates the maps, the control is fine-tuned, the data regenerated, the synthetic rows retrained |
| iccld, iccld_adversarial | the latent-diffusion segmenter on the same base, without / with adversarial alignment (`--iccld`) |

Seeds vary the segmenter training and the generation. One base model, one dual control and one semantic-only control
serve every seed (the first seed trains them; later seeds link its finished folders, so the workflow skips them). All
of it is resumable: every stage that finished is skipped on a re-run, so the experiment can continue across sessions
from its work folder.

    python benchmarks/bench_headline.py --config examples/configs/camvid_daydusk.yaml --scale gpu \
        --data_root data/camvid_daydusk --work_dir runs/headline --seeds 0 1 2
    python benchmarks/bench_headline.py --work_dir /tmp/headline_toy --scale smoke --seeds 0 1   # embedded toy data

It writes `<work_dir>/results.md` (mean and sample standard deviation over the seeds of target/val mIoU, target
pixel accuracy and source/val mIoU per row, and per-class target IoU of source_only, photometric and the best
uncertainty-aware row) and `<work_dir>/results.json` (every seed's numbers).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from this checkout

from diffusers_uncertainty.workflow import MARKER, load_config, run_workflow  # noqa: E402


SYNTHETIC = {"synthetic": True, "synthetic_ratio": 0.5}
ROWS = {
    "source_only": {},
    "photometric": {"photometric_augmentation": True},
    "fda": {"fourier_domain_adaptation": True},
    "synthetic": dict(SYNTHETIC),
    "synthetic_photometric": dict(SYNTHETIC, photometric_augmentation=True),
    "synthetic_photometric_flexseg": dict(SYNTHETIC, photometric_augmentation=True, flexseg=True),
}
ICCLD_ROWS = {
    "iccld": {"model": "latent_diffusion", "adversarial_weight": 0},
    "iccld_adversarial": {"model": "latent_diffusion", "adversarial_weight": 0.2},
}
UNCERTAINTY_AWARE = ("synthetic", "synthetic_photometric", "synthetic_photometric_flexseg")
# Stages whose result every seed shares: trained once, by the first seed.
SHARED_STAGES = ("base", "control", "uncertainty/source_train", "uncertainty/target_train")  # (+ generated data)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="Workflow config (default: the embedded toy OCT example).")
    parser.add_argument("--scale", default=None, help="A named scale of the config (e.g. gpu, smoke).")
    parser.add_argument("--data_root", default=None, help="Overrides the config's data.root.")
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iccld", action="store_true", help="Add the latent-diffusion segmenter rows.")
    parser.add_argument("--no_fda", action="store_true", help="Leave out the Fourier domain adaptation row.")
    parser.add_argument("--refine_rounds", type=int, default=2, help="1 leaves out the refinement row.")
    parser.add_argument("--report_only", action="store_true", help="Only aggregate what has finished.")
    args = parser.parse_args(input_args)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    if args.refine_rounds < 1:
        parser.error(f"--refine_rounds must be >= 1, got {args.refine_rounds}")
    return args


def rows(args) -> dict:
    selected = {name: dict(flags) for name, flags in ROWS.items() if not (args.no_fda and name == "fda")}
    if args.iccld:
        selected.update(ICCLD_ROWS)
    return selected


def link_shared(first: Path, out: Path, stages=SHARED_STAGES) -> None:
    """Point `out`'s shared stage folders at the first seed's finished ones, so the workflow skips them."""
    if (first / "data" / MARKER).is_file():  # data generated by the workflow (the toy example): the same for all
        stages = ("data", *stages)
    for stage in stages:
        source, target = first / stage, out / stage
        if not (source / MARKER).is_file():
            raise RuntimeError(f"The first seed's {stage!r} stage has not finished ({source}); run the first seed first.")
        if target.is_symlink() or (target / MARKER).is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source.resolve(), target_is_directory=True)


def workflow_config(args, out: Path, seed: int, overrides: dict, variants: dict):
    config_overrides = {"output_dir": str(out), "seed": seed, **overrides}
    if args.data_root:
        config_overrides["data"] = {"root": str(Path(args.data_root).resolve())}
    config = load_config(args.config, scale=args.scale, overrides=config_overrides)
    config["variants"] = variants  # replace, not merge: exactly the rows of this run
    return config


def run(args) -> None:
    work = Path(args.work_dir)
    first = args.seeds[0]
    for seed in args.seeds:
        out = work / f"seed_{seed}"
        if seed != first:
            link_shared(work / f"seed_{first}", out)
        config = workflow_config(args, out, seed, {"refine_rounds": args.refine_rounds,
                                                   "refine": {"segmenter": "synthetic_photometric_flexseg"}}, rows(args))
        print(f"== seed {seed}: {out}", flush=True)
        run_workflow(config)

        # The semantic-only control: the same control recipe without the uncertainty branch, used with it off.
        semantic = work / f"semantic_only_seed_{seed}"
        if seed != first:
            link_shared(work / f"semantic_only_seed_{first}", semantic, ("control",))
        link_shared(out, semantic, ("base", "segmenters/source_only", "uncertainty/source_train", "uncertainty/target_train"))
        config = workflow_config(
            args, semantic, seed,
            {"control": {"args": {"train_branch": "semantic", "labeled_fraction": 1.0}},
             "generate": {"args": {"uncertainty_conditioning_scale": 0.0}}},
            {"source_only": {}, "semantic_only": dict(SYNTHETIC)},
        )
        print(f"== seed {seed}, semantic-only control: {semantic}", flush=True)
        run_workflow(config, only=["base", "segmenter", "uncertainty", "control", "generate", "evaluate:semantic_only"])


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(args) -> dict:
    """`{row: {seed: {"target": metrics, "source": metrics}}}` for every finished evaluation."""
    work = Path(args.work_dir)
    table = {}
    for seed in args.seeds:
        folders = {name: work / f"seed_{seed}" / "evaluation" / name for name in rows(args)}
        folders["semantic_only"] = work / f"semantic_only_seed_{seed}" / "evaluation" / "semantic_only"
        for round_index in range(2, args.refine_rounds + 1):
            for name in UNCERTAINTY_AWARE:
                folders[f"{name} (round {round_index})"] = (work / f"seed_{seed}" / "rounds" / f"round_{round_index}" /
                                                            "evaluation" / name)
        for name, folder in folders.items():
            target, source = read(folder / "target_val" / "metrics.json"), read(folder / "source_val" / "metrics.json")
            if target is not None and source is not None:
                table.setdefault(name, {})[seed] = {"target": target, "source": source}
    return table


def mean_spread(values: list[float]) -> str:
    values = [100 * value for value in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def summarize(args, table: dict) -> str:
    order = ["source_only", "photometric", "fda", "semantic_only", *UNCERTAINTY_AWARE,
             *[f"{name} (round {r})" for r in range(2, args.refine_rounds + 1) for name in UNCERTAINTY_AWARE],
             *ICCLD_ROWS]
    lines = [f"Seeds {args.seeds}; mean ± sample standard deviation over the seeds that finished (n per row).", "",
             "| row | n | target/val mIoU | target pixel acc. | source/val mIoU |", "|---|---|---|---|---|"]
    for name in order:
        if name not in table:
            continue
        runs = list(table[name].values())
        lines.append(
            f"| {name} | {len(runs)} | {mean_spread([r['target']['mIoU'] for r in runs])} | "
            f"{mean_spread([r['target']['pixel_accuracy'] for r in runs])} | "
            f"{mean_spread([r['source']['mIoU'] for r in runs])} |"
        )
    aware = [name for name in table if name.split(" (")[0] in UNCERTAINTY_AWARE]
    if aware and "source_only" in table and "photometric" in table:
        best = max(aware, key=lambda name: statistics.mean(r["target"]["mIoU"] for r in table[name].values()))
        shown = ["source_only", "photometric", best]
        classes = [entry["class"] for entry in next(iter(table["source_only"].values()))["target"]["per_class"]]
        lines += ["", f"Per-class target/val IoU (mean over seeds): source_only, photometric and the best "
                      f"uncertainty-aware row ({best}).", "",
                  "| class | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        for index, name in enumerate(classes):
            cells = []
            for row in shown:
                values = [r["target"]["per_class"][index]["IoU"] for r in table[row].values()]
                values = [value for value in values if value is not None]
                cells.append(f"{100 * statistics.mean(values):.1f}" if values else "n/a")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args):
    start = time.perf_counter()
    if not args.report_only:
        run(args)
    table = collect(args)
    text = summarize(args, table)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps({"command": " ".join(sys.argv), "seeds": args.seeds,
                                                   "table": table}, indent=2, default=str))
    (work / "results.md").write_text(text)
    print(text)
    print(f"Done in {time.perf_counter() - start:.0f} s; {work / 'results.md'}")


if __name__ == "__main__":
    main(parse_args())
