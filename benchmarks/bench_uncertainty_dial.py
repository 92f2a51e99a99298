"""How far does each generation dial move the synthetic images toward the target look, and what does it cost in labels?

On a finished workflow run (its base, control, generated dataset, segmenters and synthetic evaluation), the first
`--samples` samples of the dataset are generated again at one constant uncertainty level under each setting given
(`name=value` pairs of the pipeline: `uncertainty_conditioning_scale`, `uncertainty_guidance_scale`,
`semantic_conditioning_scale`, `guidance_scale`; the rest as the dataset was generated), and measured as the
synthetic evaluation measures them: the share the run's domain classifier calls target, and label fidelity (mIoU of
the run's photometric segmenter on the images against their labels; the source-only segmenter's beside it). The
dataset's own settings come first as the reference row, so every row is paired with it (same labels, same seeds).

Writes `dial.json` and `dial.md` into `--output_dir`:

    python benchmarks/bench_uncertainty_dial.py --run_dir <workflow output_dir> --level 1.0 --samples 32 \\
        --settings uncertainty_conditioning_scale=2 uncertainty_guidance_scale=2 uncertainty_guidance_scale=4 \\
        --output_dir dial
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import datasets
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_uncertainty.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from diffusers_uncertainty.segmentation import load_segmenter  # noqa: E402
from diffusers_uncertainty.synthetic_evaluation import (  # noqa: E402
    CLASSIFIER_FOLDER,
    RESULTS_NAME,
    DomainClassifier,
    domain_images,
    domain_predictions,
    generate_level_sets,
    load_generation_pipeline,
    read_generation_settings,
    segment_samples,
)


DIALS = ("uncertainty_conditioning_scale", "uncertainty_guidance_scale", "semantic_conditioning_scale", "guidance_scale")


def parse_setting(text: str) -> dict:
    """`name=value[,name=value]` -> `{name: float(value)}`, names from `DIALS`."""
    setting = {}
    for part in text.split(","):
        name, separator, value = part.partition("=")
        if not separator or name not in DIALS:
            raise ValueError(f"`--settings` takes name=value pairs with a name among {DIALS}, but got {part!r}.")
        try:
            setting[name] = float(value)
        except ValueError:
            raise ValueError(f"`--settings`: {name} must be a number, but got {value!r}.") from None
    return setting


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="A workflow run's output_dir (one seed's folder).")
    parser.add_argument("--level", type=float, default=1.0, help="The constant uncertainty level of every row.")
    parser.add_argument("--samples", type=int, default=32, help="Samples per setting (the dataset's first ones).")
    parser.add_argument("--settings", nargs="+", default=[], help="Settings, e.g. uncertainty_guidance_scale=2.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per pipeline call.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Where the pipeline, classifier and segmenters run (default: cuda when available).")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    args.settings = [parse_setting(text) for text in args.settings]
    if not 0.0 <= args.level <= 1.0:
        raise ValueError(f"`--level` must lie in [0, 1], but got {args.level}.")
    if args.samples < 1 or args.batch_size < 1:
        raise ValueError(f"`--samples` and `--batch_size` must be at least 1, but got {args.samples} and {args.batch_size}.")
    run = Path(args.run_dir)
    needed = [run / "synthetic" / "generation_config.json", run / "segmenters" / "photometric",
              run / "segmenters" / "source_only", run / "synthetic_evaluation" / CLASSIFIER_FOLDER,
              run / "synthetic_evaluation" / RESULTS_NAME]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        raise ValueError(f"`--run_dir` {run} is not a finished workflow run with a synthetic evaluation: missing {missing}.")
    return args


def describe(setting: dict) -> str:
    return ", ".join(f"{name} {value:g}" for name, value in setting.items()) or "as the dataset was generated"


def main(args) -> list[dict]:
    run = Path(args.run_dir)
    evaluation = json.loads((run / "synthetic_evaluation" / RESULTS_NAME).read_text())
    settings = read_generation_settings(run / "synthetic")
    dataset = datasets.load_from_disk(str(run / "synthetic"))
    pipeline = load_generation_pipeline(settings, args.device)
    classifier = DomainClassifier.from_pretrained(run / "synthetic_evaluation" / CLASSIFIER_FOLDER).to(args.device).eval()
    segmenters = {name: load_segmenter(str(run / "segmenters" / name)).to(args.device).eval()
                  for name in ("photometric", "source_only")}
    config = segmenters["photometric"].config
    resolution, classifier_resolution = evaluation["resolution"], evaluation["domain_classifier"]["resolution"]
    rows = []
    for setting in [{}] + args.settings:
        start = time.perf_counter()
        (samples,) = generate_level_sets(
            pipeline, dataset, {**settings, **setting}, [args.level], args.samples, args.batch_size
        ).values()
        seconds = time.perf_counter() - start
        probabilities, _ = domain_predictions(classifier, domain_images([s["image"] for s in samples], classifier_resolution))
        fidelity = {
            name: segment_samples(model, samples, resolution, config.num_classes, config.ignore_index)["mIoU"]
            for name, model in segmenters.items()
        }
        row = {"setting": setting, "target_share": float((probabilities > 0.5).float().mean()),
               "mean_target_probability": float(probabilities.mean()), "fidelity": fidelity,
               "generation_seconds": round(seconds, 1)}
        rows.append(row)
        print(f"{describe(setting)}: classified target {100 * row['target_share']:.1f} %, fidelity (photometric) "
              f"{100 * fidelity['photometric']:.1f}, (source-only) {100 * fidelity['source_only']:.1f}, {seconds:.0f} s",
              flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    write_json_atomic(os.path.join(args.output_dir, "dial.json"),
                      {"run_dir": str(run), "level": args.level, "samples": args.samples, "rows": rows})
    lines = [f"Run `{run}`, {args.samples} samples at uncertainty level {args.level:g}; fidelity = mIoU (%) on the "
             "images against their labels.", "",
             "| setting | classified target | mean p(target) | fidelity, photometric seg. | fidelity, source-only seg. "
             "| generation s |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {describe(row['setting'])} | {100 * row['target_share']:.1f} % | "
                     f"{row['mean_target_probability']:.3f} | {100 * row['fidelity']['photometric']:.1f} | "
                     f"{100 * row['fidelity']['source_only']:.1f} | {row['generation_seconds']:.0f} |")
    write_text_atomic(os.path.join(args.output_dir, "dial.md"), "\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main(parse_args())
