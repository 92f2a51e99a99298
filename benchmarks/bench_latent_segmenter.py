#!/usr/bin/env python
"""Target mIoU of the latent-diffusion segmenter (ICCLD) with and without adversarial alignment, against the
source-only U-Net, on CamVid day -> dusk.

Stages, each an example script run with `accelerate launch` exactly as a user would (logs in
`<output_dir>/logs/<stage>.log`):

1. a small Stable Diffusion-architecture base trained from scratch on the day (source/train) and dusk
   (target/train) images (`examples/train_base_model.py`), unless `--base_model` names an existing one;
2. three segmenters trained on the labeled day images with the same step budget, batch size, resolution and
   learning rate (`examples/train_segmentation.py`): the smp U-Net (ResNet-18, source only), the latent-diffusion
   segmenter on the frozen base, and the same with adversarial alignment on the unlabeled dusk images
   (`--adversarial_weight`, `--unlabeled_data_dir target/train`);
3. each evaluated on target/val (dusk, 20 labeled images) and source/val (day) (`examples/evaluate_segmentation.py`).

`--scale cpu` fits a 2-core CPU in about half an hour; `--scale gpu` is the same recipe at a larger resolution and
model size for one GPU (bf16 autocast), sized for about 6 minutes on one H200 (measured there: base training ~9
steps/s, segmenters 28 (U-Net), 11 (latent diffusion) and 7 (with adversarial alignment) steps/s, ~25 s per
evaluation process); it needs `diffusers` and `segmentation-models-pytorch` besides torch, accelerate,
transformers, timm and torchmetrics. The results table (markdown, with the exact command, machine and date) is
rewritten after every stage to `<output_dir>/results.md`, so a run cut short still reports what finished. A stage
whose output is complete is skipped on a re-run.

    OMP_NUM_THREADS=2 python benchmarks/bench_latent_segmenter.py --data_root data/camvid_daydusk \
        --output_dir /tmp/iccld_cpu --scale cpu
    python benchmarks/bench_latent_segmenter.py --data_root /path/to/camvid_daydusk --output_dir runs/iccld_gpu \
        --scale gpu
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(REPO))  # the package from this checkout, installed or not

SCALES = {
    "smoke": {  # a pipeline check of a minute or two, meaningless numbers
        "resolution": 32,
        "base": ["--vae_block_out_channels", "32", "64", "--unet_block_out_channels", "32", "64",
                 "--vae_train_steps", "2", "--unet_train_steps", "2", "--train_batch_size", "4",
                 "--num_validation_images", "1", "--num_inference_steps", "2", "--max_train_samples", "16"],
        "steps": 2,
        "batch_size": 4,
        "workers": 0,
        "mixed_precision": "no",
    },
    "cpu": {
        "resolution": 64,
        "base": ["--vae_block_out_channels", "32", "64", "--unet_block_out_channels", "32", "64",
                 "--vae_train_steps", "100", "--unet_train_steps", "200", "--train_batch_size", "8",
                 "--num_validation_images", "2", "--num_inference_steps", "10"],
        "steps": 300,
        "batch_size": 8,
        "workers": 0,
        "mixed_precision": "no",
    },
    "gpu": {
        "resolution": 128,
        "base": ["--vae_block_out_channels", "64", "128", "256", "--unet_block_out_channels", "64", "128", "256",
                 "--cross_attention_dim", "64", "--vae_train_steps", "300", "--unet_train_steps", "600",
                 "--train_batch_size", "32", "--vae_learning_rate", "5e-4", "--learning_rate", "3e-4",
                 "--num_validation_images", "4", "--num_inference_steps", "20"],
        "steps": 500,
        "batch_size": 16,
        "workers": 6,
        "mixed_precision": "bf16",
        # Each evaluation is a fresh process (~25 s on the H200, mostly start-up): target/val only by default.
        "eval_splits": ["target/val"],
    },
}
SEGMENTERS = {
    "unet_source_only": ("U-Net (smp, ResNet-18), source only",
                         ["--model", "smp", "--architecture", "unet", "--encoder_name", "resnet18"]),
    "latent_diffusion": ("latent diffusion (ICCLD), no alignment", ["--model", "latent_diffusion"]),
    "latent_diffusion_adversarial": ("latent diffusion (ICCLD) + adversarial alignment", ["--model", "latent_diffusion"]),
}


def parse_args(input_args=None):
    """Parses the command line.

    Args:
        input_args (`List[str]`, *optional*): Arguments to parse instead of `sys.argv`.
    """
    parser = argparse.ArgumentParser(description="ICCLD segmenter vs source-only U-Net on CamVid day -> dusk.")
    parser.add_argument("--data_root", type=str, required=True,
                        help="The camvid_daydusk folder (source/train, source/val, target/train, target/val).")
    parser.add_argument("--output_dir", type=str, required=True, help="Where models, logs and results.md go.")
    parser.add_argument("--scale", type=str, default="cpu", choices=sorted(SCALES))
    parser.add_argument("--base_model", type=str, default=None, help="Use this diffusers base instead of training one.")
    parser.add_argument("--max_train_steps", type=int, default=None, help="Segmenter steps (default: the scale's).")
    parser.add_argument("--adversarial_weight", type=float, default=0.2)
    parser.add_argument("--feature_timestep", type=int, default=50)
    parser.add_argument("--decoder_channels", type=int, default=64, help="Latent-diffusion decoder width.")
    parser.add_argument("--cpu", action="store_true", help="Force the CPU even where a GPU is visible.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="Default: the scale's (no on cpu, bf16 on gpu).")
    parser.add_argument("--eval_splits", type=str, nargs="+", default=None, choices=["target/val", "source/val"],
                        help="Splits to evaluate on (default: both on cpu, target/val on gpu).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(input_args)
    root = Path(args.data_root)
    for split in ("source/train", "source/val", "target/train", "target/val"):
        if not (root / split / "images").is_dir():
            raise ValueError(f"`--data_root` {args.data_root!r}: expected a folder {split}/images, found none.")
    return args


def machine() -> str:
    """One line describing the hardware and software."""
    import torch

    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} GPU"
    else:
        device = f"CPU only, {os.cpu_count()} cores"
    return (f"{device}; {platform.platform()}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def launch(script: str, flags: list, args, log: Path) -> list:
    """The `accelerate launch` command of one example script."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--dynamo_backend", "no", "--mixed_precision", args.mixed_precision]
    if args.cpu:
        command.append("--cpu")
    return command + [str(EXAMPLES / script)] + [str(f) for f in flags]


def run(name: str, command: list, done: Path, out: Path, timings: dict) -> None:
    """Runs a stage unless `done` exists; output to `<out>/logs/<name>.log`; raises with the log's tail on failure."""
    if done.exists():
        print(f"{name}: complete, skipped")
        return
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"{name}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(log, "w") as handle:
        handle.write(shlex.join(command) + "\n\n")
        handle.flush()
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if result.returncode:
        tail = "".join(log.read_text().splitlines(True)[-30:])
        raise RuntimeError(f"Stage {name} failed (exit {result.returncode}); last lines of {log}:\n{tail}")
    timings[name] = time.perf_counter() - start
    print(f"{name}: {timings[name]:.0f} s", flush=True)


def write_results(args, out: Path, commands: dict, timings: dict, started: str) -> None:
    """Writes `<out>/results.md` from the evaluations that exist so far."""
    from diffusers_uncertainty.atomic import write_text_atomic

    lines = [
        f"# Latent-diffusion segmenter (ICCLD) on CamVid day -> dusk, scale `{args.scale}`",
        "",
        f"Command: `{shlex.join([sys.executable.split('/')[-1]] + sys.argv)}`  ",
        f"Machine: {machine()}  ",
        f"Date: {started} (UTC)",
        "",
        "| segmenter (trained on labeled source/train) | target/val mIoU (%) | target/val pixel acc. (%) "
        "| source/val mIoU (%) | training time (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, (label, _) in SEGMENTERS.items():
        cells = []
        for split in ("target_val", "source_val"):
            path = out / "eval" / key / split / "metrics.json"
            metrics = json.loads(path.read_text()) if path.exists() else None
            cells.append(metrics)
        target, source = cells
        fmt = lambda m, k: f"{100 * m[k]:.2f}" if m else "-"  # noqa: E731
        seconds = f"{timings[key]:.0f}" if key in timings else "-"
        lines.append(f"| {label} | {fmt(target, 'mIoU')} | {fmt(target, 'pixel_accuracy')} | "
                     f"{fmt(source, 'mIoU')} | {seconds} |")
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), "", "Commands:", "",
              "```bash"]
    lines += [shlex.join(c) for c in commands.values()]
    lines += ["```", ""]
    write_text_atomic(out / "results.md", "\n".join(lines))


def main(args):
    """Runs the stages and writes the table.

    Args:
        args (`argparse.Namespace`): From [`parse_args`].
    """
    import torch

    scale = SCALES[args.scale]
    if not torch.cuda.is_available():
        args.cpu = True
    if args.mixed_precision is None:
        args.mixed_precision = "no" if args.cpu else scale["mixed_precision"]
    steps = args.max_train_steps or scale["steps"]
    root = Path(args.data_root).resolve()
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    commands, timings = {}, {}
    resolution = str(scale["resolution"])

    base = args.base_model
    if base is None:
        base = str(out / "base")
        commands["base"] = launch(
            "train_base_model.py",
            ["--train_data_dir", root / "source/train/images", root / "target/train/images", "--resolution", resolution,
             *scale["base"], "--default_prompt", "a street scene", "--random_flip", "--seed", args.seed,
             "--dataloader_num_workers", scale["workers"], "--report_to", "tensorboard", "--output_dir", base],
            args, out,
        )
        run("base", commands["base"], out / "base" / "model_index.json", out, timings)

    common = [
        "--train_data_dir", root / "source/train", "--num_classes", "11", "--ignore_index", "11",
        "--classes_json", root / "classes.json", "--resolution", resolution,
        "--train_batch_size", scale["batch_size"], "--max_train_steps", steps, "--learning_rate", "1e-3",
        "--lr_scheduler", "cosine", "--checkpointing_steps", "100000", "--validation_steps", "100000",
        "--dataloader_num_workers", scale["workers"], "--seed", args.seed, "--report_to", "none",
    ]
    latent = ["--base_model_name_or_path", base, "--feature_timestep", args.feature_timestep,
              "--decoder_channels", args.decoder_channels]
    extra = {
        "unet_source_only": ["--encoder_depth", "3", "--decoder_channels", "64", "32", "16"] if args.scale != "gpu" else [],
        "latent_diffusion": latent,
        "latent_diffusion_adversarial": latent + ["--adversarial_weight", args.adversarial_weight,
                                                  "--unlabeled_data_dir", root / "target/train"],
    }
    for key, (_, flags) in SEGMENTERS.items():
        folder = out / "segmenters" / key
        commands[key] = launch("train_segmentation.py", common + flags + extra[key] + ["--output_dir", folder], args, out)
        run(key, commands[key], folder / "diffusion_pytorch_model.safetensors", out, timings)
        for split in args.eval_splits or scale.get("eval_splits", ["target/val", "source/val"]):
            name = split.replace("/", "_")
            evaluation = out / "eval" / key / name
            commands[f"eval_{key}_{name}"] = launch(
                "evaluate_segmentation.py",
                ["--model", folder, "--data_dir", root / split, "--resolution", resolution, "--classes_json",
                 root / "classes.json", "--batch_size", "16", "--output_dir", evaluation],
                args, out,
            )
            run(f"eval_{key}_{name}", commands[f"eval_{key}_{name}"], evaluation / "metrics.json", out, timings)
        write_results(args, out, commands, timings, started)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main(parse_args())
