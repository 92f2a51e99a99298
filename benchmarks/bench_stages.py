#!/usr/bin/env python
"""Every workflow stage's speed on CamVid day -> dusk, the streaming path against the in-memory path side by side, the
per-stage start-up overhead in-process against `accelerate launch`, and (with `--workflow`) the whole workflow at the
config's GPU scale with its per-stage split.

What is measured (all in one invocation, so that ratios compare runs on the same machine at the same time):

* **Throughput** of the training stages (`segmenter`, `base`, `control`) on each of `--paths`, alternating,
  `--repeats` times each: `stream` (`--dataset_placement stream`: per-sample decoding in DataLoader workers; for the
  diffusion scripts also the VAE encoding every batch), `device` (decoded once, augmentation and crops batched on the
  device; latents encoded once), `compiled` (`device` + `--torch_compile`) and `cudagraphs` (`compiled` with
  `--torch_compile_mode reduce-overhead`). The figure is the steady-state throughput the script itself writes to
  `throughput.json` (after warm-up, so without the compilation), the median over repeats; the stage time (with it)
  is reported beside it.
* **Uncertainty maps**: `compute_uncertainty.py` on `source/train` (305 images) and `target/train` (62), wall time of
  the stage run in-process (the model and data loading included, the process start-up not).
* **Per-stage overhead**: the wall time of a stage that trains one step (start-up, model building, data decoding,
  saving): in the workflow's process against a fresh `accelerate launch` process.
* **Workflow** (`--workflow`): `examples/configs/camvid_daydusk.yaml --scale gpu` end to end, with the report's
  stage-time table.

Every script runs in this process through the workflow's own stage runner (`diffusers_uncertainty.stage_runner`),
except the `accelerate launch` half of the overhead measurement.

    python benchmarks/bench_stages.py --device cuda --data_root data/camvid_daydusk --work_dir /tmp/bench_stages --workflow
    python benchmarks/bench_stages.py --device cuda --data_root data/camvid_daydusk --work_dir /tmp/bench_compile \
        --stages segmenter base control --paths device compiled cudagraphs
    OMP_NUM_THREADS=2 python benchmarks/bench_stages.py --device cpu --data_root data/camvid_daydusk --work_dir /tmp/bench_stages_cpu
"""

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from this checkout

from diffusers_uncertainty.stage_runner import run_in_process, run_subprocess, single_process_environment  # noqa: E402
from diffusers_uncertainty.workflow import example_script_path, load_config, run_workflow, to_flags  # noqa: E402


CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "camvid_daydusk.yaml"
# The paths a training stage can take, each a set of the scripts' flags: the DataLoader path, the data on the device,
# and the latter compiled (`--torch_compile`), with CUDA graphs on top (`reduce-overhead`).
PATHS = {
    "stream": {"dataset_placement": "stream"},
    "device": {"dataset_placement": "device"},
    "compiled": {"dataset_placement": "device", "torch_compile": True},
    "cudagraphs": {"dataset_placement": "device", "torch_compile": True, "torch_compile_mode": "reduce-overhead"},
}

# Steps per throughput run (enough for a steady state after the scripts' warm-up steps) and model sizes, per device.
SIZES = {
    "cuda": {"resolution": 128, "segmenter_steps": 300, "base_vae_steps": 10, "base_unet_steps": 200,
             "control_steps": 100, "batch": 32, "segmenter_batch": 16, "control_batch": 16,
             "base_channels": [64, 128, 256]},
    "cpu": {"resolution": 64, "segmenter_steps": 30, "base_vae_steps": 4, "base_unet_steps": 30,
            "control_steps": 20, "batch": 8, "segmenter_batch": 8, "control_batch": 4,
            "base_channels": [32, 64]},
}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data_root", required=True, help="The CamVid day -> dusk folder (source/, target/).")
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--stages", nargs="+", default=["segmenter", "uncertainty", "base", "control", "overhead"],
                        choices=["segmenter", "uncertainty", "base", "control", "overhead"])
    parser.add_argument("--paths", nargs="+", default=["stream", "device"], choices=list(PATHS),
                        help="The paths each training stage is run on, side by side (ratios against the first).")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per path (medians are reported).")
    parser.add_argument("--workflow", action="store_true", help="Also run the GPU-scale workflow end to end.")
    parser.add_argument("--workflow_scale", default="gpu", help="The config scale of --workflow.")
    args = parser.parse_args(input_args)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    root = Path(args.data_root)
    for split in ("source/train/images", "source/train/labels", "target/train/images"):
        if not (root / split).is_dir():
            parser.error(f"--data_root must hold {split}/, but {root / split} is missing")
    return args


def launch_args(device: str) -> list[str]:
    return ["--num_processes", "1", *(["--mixed_precision", "bf16"] if device == "cuda" else ["--cpu"])]


def run_script(script: str, flags: dict, device: str, log: Path, in_process: bool = True) -> float:
    """Run one example script; return its wall time in seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    start = time.perf_counter()
    if in_process:
        environment = single_process_environment(launch_args(device), example_script_path(script))
        run_in_process(example_script_path(script), to_flags(flags), environment, log)
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args(device), str(example_script_path(script)),
                   *to_flags(flags)]
        if run_subprocess(command, log) != 0:
            raise RuntimeError(f"{script} failed; see {log}")
    return time.perf_counter() - start


def read_throughput(output_dir: Path) -> dict:
    return json.loads((output_dir / "throughput.json").read_text())


def segmenter_flags(args, size: dict, output_dir: Path, steps: int) -> dict:
    root = Path(args.data_root)
    return {"train_data_dir": root / "source" / "train", "validation_data_dir": root / "source" / "val",
            "output_dir": output_dir, "num_classes": 11, "ignore_index": 11, "resolution": size["resolution"],
            "architecture": "unet", "encoder_name": "resnet18", "train_batch_size": size["segmenter_batch"],
            "max_train_steps": steps, "validation_steps": 10**6, "checkpointing_steps": 10**6,
            "photometric_augmentation": True, "seed": 0}


def side_by_side(name: str, script: str, make_flags, args, work: Path) -> dict:
    """Alternate the paths `args.repeats` times; return the medians, the ratios against the first path and every
    run (a compiled path's stage time includes its compilation; its throughput, measured after the warm-up steps,
    does not)."""
    runs = {path: [] for path in args.paths}
    for repeat in range(args.repeats):
        for path in args.paths:
            output_dir = work / name / f"{path}_{repeat}"
            shutil.rmtree(output_dir, ignore_errors=True)
            flags = dict(make_flags(output_dir), **PATHS[path])
            wall = run_script(script, flags, args.device, work / name / f"{path}_{repeat}.log")
            record = read_throughput(output_dir)
            record["wall_seconds"] = wall
            runs[path].append(record)
            print(f"  {name:<10} {path:<10} {record['steps_per_second']:.2f} it/s "
                  f"{record['samples_per_second']:.1f} samples/s (stage {wall:.1f} s)", flush=True)
    medians = {path: statistics.median(r["steps_per_second"] for r in runs[path]) for path in args.paths}
    first = args.paths[0]
    return {"runs": runs, "median_steps_per_second": medians,
            "ratio": {path: medians[path] / medians[first] for path in args.paths},
            "median_stage_seconds": {path: statistics.median(r["wall_seconds"] for r in runs[path]) for path in args.paths}}


def main(args):
    size = SIZES[args.device]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    root = Path(args.data_root)
    results = {"machine": {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
                           or platform.machine(), "torch": torch.__version__, "python": platform.python_version()},
               "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "sizes": size, "paths": args.paths}
    segmenter_dir = work / "segmenter_model"

    if "segmenter" in args.stages or "uncertainty" in args.stages or "control" in args.stages:
        results["segmenter"] = side_by_side(
            "segmenter", "train_segmentation.py",
            lambda out: segmenter_flags(args, size, out, size["segmenter_steps"]), args, work)
        shutil.copytree(work / "segmenter" / f"{args.paths[-1]}_0", segmenter_dir, dirs_exist_ok=True)

    maps = {}
    if "uncertainty" in args.stages or "control" in args.stages:
        results["uncertainty"] = {}
        for split in ("source/train", "target/train"):
            out = work / "uncertainty" / split.replace("/", "_")
            shutil.rmtree(out, ignore_errors=True)
            wall = run_script("compute_uncertainty.py", {"model": segmenter_dir, "data_dir": root / split,
                                                         "resolution": size["resolution"], "output_dir": out,
                                                         "batch_size": 32}, args.device, out.with_suffix(".log"))
            count = len(list((root / split / "images").iterdir()))
            results["uncertainty"][split] = {"images": count, "wall_seconds": wall}
            maps[split] = out / "maps"
            print(f"  uncertainty {split}: {count} images in {wall:.2f} s (in-process stage)", flush=True)

    base_dir = work / "base_model"
    if "base" in args.stages or "control" in args.stages:
        def base_flags(out):
            return {"train_data_dir": [root / "source" / "train", root / "target" / "train"], "output_dir": out,
                    "resolution": size["resolution"], "vae_train_steps": size["base_vae_steps"],
                    "unet_train_steps": size["base_unet_steps"], "train_batch_size": size["batch"],
                    "vae_block_out_channels": size["base_channels"], "unet_block_out_channels": size["base_channels"],
                    "default_prompt": "a street scene", "random_flip": True, "checkpointing_steps": 10**6,
                    "num_validation_images": 0, "seed": 0}

        results["base"] = side_by_side("base", "train_base_model.py", base_flags, args, work)
        shutil.copytree(work / "base" / f"{args.paths[-1]}_0", base_dir, dirs_exist_ok=True)

    if "control" in args.stages:
        def control_flags(out):
            return {"pretrained_model_name_or_path": base_dir, "train_data_dir": root / "source" / "train",
                    "uncertainty_dir": maps["source/train"], "unlabeled_data_dir": root / "target" / "train",
                    "unlabeled_uncertainty_dir": maps["target/train"], "output_dir": out, "num_classes": 11,
                    "ignore_index": 11, "resolution": size["resolution"], "train_branch": "joint",
                    "labeled_fraction": 0.6, "max_train_steps": size["control_steps"],
                    "train_batch_size": size["control_batch"], "learning_rate": 1e-4,
                    "default_prompt": "a street scene", "random_flip": True, "checkpointing_steps": 10**6,
                    "validation_steps": 10**6, "seed": 0}

        results["control"] = side_by_side("control", "train_uncertainty_controlnet.py", control_flags, args, work)

    if "overhead" in args.stages:
        results["overhead"] = {}
        for in_process in (True, False):
            how = "in_process" if in_process else "accelerate_launch"
            walls = []
            for repeat in range(args.repeats):
                out = work / "overhead" / f"{how}_{repeat}"
                shutil.rmtree(out, ignore_errors=True)
                flags = dict(segmenter_flags(args, size, out, 1), dataset_placement="device")
                walls.append(run_script("train_segmentation.py", flags, args.device, out.with_suffix(".log"), in_process))
            results["overhead"][how] = {"wall_seconds": walls, "median": statistics.median(walls)}
            print(f"  one-step segmenter stage, {how}: {statistics.median(walls):.2f} s", flush=True)

    if args.workflow:
        config = load_config(CONFIG, scale=args.workflow_scale,
                             overrides={"output_dir": str(work / "workflow"), "data": {"root": str(root.resolve())}})
        start = time.perf_counter()
        report = run_workflow(config)
        results["workflow"] = {"scale": args.workflow_scale, "wall_seconds": time.perf_counter() - start,
                               "report": str(report)}
        print(report.read_text(), flush=True)

    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(summary(results))
    (work / "results.md").write_text(summary(results))


def summary(results: dict) -> str:
    paths = results["paths"]
    lines = [f"{results['machine']['device']}, torch {results['machine']['torch']}, {results['date']}",
             f"`{results['command']}`", "",
             "| stage | " + " | ".join(f"{path} it/s (stage s)" for path in paths) + " | "
             + " | ".join(f"{path} / {paths[0]}" for path in paths[1:]) + " |",
             "|---|" + "---|" * (2 * len(paths) - 1)]
    for name in ("segmenter", "base", "control"):
        if name in results:
            medians, stage = results[name]["median_steps_per_second"], results[name]["median_stage_seconds"]
            lines.append(f"| {name} | " + " | ".join(f"{medians[path]:.2f} ({stage[path]:.0f})" for path in paths)
                         + " | " + " | ".join(f"{results[name]['ratio'][path]:.2f}x" for path in paths[1:]) + " |")
    empty = " |" * (2 * len(paths) - 2)
    for split, record in (results.get("uncertainty") or {}).items():
        lines.append(f"| uncertainty {split} ({record['images']} images) | stage {record['wall_seconds']:.2f} s |{empty}")
    if "overhead" in results:
        overhead = results["overhead"]
        lines.append(f"| one-step stage, in-process | {overhead['in_process']['median']:.2f} s |{empty}")
        lines.append(f"| one-step stage, accelerate launch | {overhead['accelerate_launch']['median']:.2f} s |{empty}")
    if "workflow" in results:
        lines.append(f"| workflow `--scale {results['workflow']['scale']}` | {results['workflow']['wall_seconds']:.0f} s |{empty}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(parse_args())
