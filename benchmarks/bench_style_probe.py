#!/usr/bin/env python
"""Does a trained style encoder tell CamVid dusk from day? A linear probe on its style tokens.

For each seed, a `StyleEncoderModel` is trained jointly with the uncertainty control by
`examples/train_uncertainty_controlnet.py --train_style_encoder` (through `accelerate launch`, as a user runs it) on
`source/train` (305 day images) and `target/train` (62 dusk images) of `data/camvid_daydusk`, on the tiny
offline base pipeline (random frozen VAE/UNet/text encoder built from configs; `--base DIR` takes another base, e.g.
the small CamVid base of `train_base_model.py`). Style images come from each sample's own domain. The uncertainty
maps are constant 0.5 (the figure is about the style encoder; the control only has to train alongside it).

Then every image is embedded alone (its style tokens, flattened; eval mode) by the trained encoder and by two
baselines: the same encoder at its random initialisation, and that random encoder with its batch-norm statistics
recomputed on the training images (training updates those statistics even where it learns nothing, so this baseline
separates "learned" from "normalised to the data"). Two probes are fitted on the encoder's training images
(`source/train` vs `target/train`) and scored on images neither the encoder nor the probe saw: `source/val` (101, day,
other frames of a training sequence), `source/test` (171, day, an unseen sequence) and `target/val` (20, dusk, later
frames). Scores are balanced accuracies (mean of the day and dusk recalls; the held-out set is 272 day vs 20 dusk):

* nearest centroid (cosine distance to the class means of the training embeddings);
* logistic regression (L2, standardised features, fitted with L-BFGS in torch);
* separation: distance between the class centroids over the mean within-class spread (RMS distance to the own
  centroid) on the held-out images; a scale-free "how far apart" that keeps moving when the accuracies saturate.

Medians (and the range) over the seeds are printed as a markdown table with the command, machine and date.

    OMP_NUM_THREADS=1 python benchmarks/bench_style_probe.py --seeds 0 1 2 --max_train_steps 300
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import torch
import torch.nn.functional as F


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusers_uncertainty import StyleEncoderModel, build_tiny_pipeline  # noqa: E402
from diffusers_uncertainty.atomic import write_text_atomic  # noqa: E402
from diffusers_uncertainty.models import prepare_style_images  # noqa: E402
from diffusers_uncertainty.training import list_images  # noqa: E402


TRAIN_SPLITS = {"day": ["source/train"], "dusk": ["target/train"]}
HELD_OUT_SPLITS = {"day": ["source/val", "source/test"], "dusk": ["target/val"]}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "camvid_daydusk"))
    parser.add_argument("--work_dir", default="/tmp/style_probe", help="Base model, maps, runs and results go here.")
    parser.add_argument("--base", default=None, help="A base pipeline folder; default: the tiny offline pipeline.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Control learning rate.")
    parser.add_argument("--style_learning_rate", type=float, default=3e-4)
    parser.add_argument("--style_backbone", default="resnet18")
    parser.add_argument("--style_num_tokens", type=int, default=4)
    parser.add_argument("--style_images_per_sample", type=int, default=2)
    parser.add_argument("--style_drop_rate", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU).")
    return parser.parse_args()


def constant_maps(images_dir: Path, maps_dir: Path) -> None:
    """A constant 0.5 uncertainty map (8-bit PNG, 128/255) per image, mirroring `images_dir`."""
    for relative in list_images(images_dir):
        target = maps_dir / relative.with_suffix(".png")
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with PIL.Image.open(images_dir / relative) as image:
            size = image.size
        temporary = target.with_name(target.name + ".tmp.png")
        PIL.Image.new("L", size, 128).save(temporary)
        os.replace(temporary, target)


def train(args, seed: int, base: Path, work: Path) -> tuple[Path, Path, float]:
    """Save the seed's initial encoder, train it with the script, return (initial, trained, seconds)."""
    run = work / f"seed{seed}"
    initial, output = run / "initial_style_encoder", run / "train"
    if not (initial / "config.json").is_file():
        cross_attention_dim = json.loads((base / "unet" / "config.json").read_text())["cross_attention_dim"]
        torch.manual_seed(seed)
        StyleEncoderModel(
            backbone=args.style_backbone, cross_attention_dim=cross_attention_dim, num_tokens=args.style_num_tokens,
            image_size=args.resolution, max_style_images=max(4, args.style_images_per_sample),
        ).save_pretrained(initial)
    data = Path(args.data_dir)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "examples" / "train_uncertainty_controlnet.py"),
        "--pretrained_model_name_or_path", str(base), "--train_branch", "uncertainty",
        "--train_data_dir", str(data / "source" / "train"), "--uncertainty_dir", str(work / "maps" / "source"),
        "--unlabeled_data_dir", str(data / "target" / "train"),
        "--unlabeled_uncertainty_dir", str(work / "maps" / "target"),
        "--num_classes", "11", "--ignore_index", "11", "--resolution", str(args.resolution), "--random_flip",
        "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.max_train_steps),
        "--learning_rate", str(args.learning_rate), "--lr_warmup_steps", "0",
        "--checkpointing_steps", str(10 * args.max_train_steps), "--seed", str(seed),
        "--train_style_encoder", "--style_encoder_model_name_or_path", str(initial),
        "--style_images_per_sample", str(args.style_images_per_sample), "--style_drop_rate", str(args.style_drop_rate),
        "--style_learning_rate", str(args.style_learning_rate), "--output_dir", str(output),
    ]
    environment = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    if not (output / "style_encoder" / "config.json").is_file():
        result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO)
        (run / "train.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"training failed for seed {seed}; see {run / 'train.log'}:\n{result.stderr[-3000:]}")
    return initial, output / "style_encoder", time.perf_counter() - start


@torch.no_grad()
def embed(encoder: StyleEncoderModel, paths: list[Path]) -> torch.Tensor:
    """Flattened style tokens of each image alone, `(len(paths), num_tokens * dim)`."""
    encoder.eval()
    vectors = []
    for start in range(0, len(paths), 32):
        batch = torch.stack(
            [prepare_style_images(PIL.Image.open(path).convert("RGB"), 3, encoder.config.image_size)[0]
             for path in paths[start : start + 32]]
        )
        vectors.append(encoder(batch[:, None]).style_embeds.flatten(1))
    return torch.cat(vectors).double()


@torch.no_grad()
def recalibrate_batch_norm(encoder: StyleEncoderModel, paths: list[Path]) -> StyleEncoderModel:
    """The encoder with its batch-norm running statistics replaced by their averages over `paths` (no learning)."""
    layers = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over all batches
    encoder.train()
    for start in range(0, len(paths), 8):  # batches of 8 images, as training sees (4 samples x 2 style images)
        batch = torch.stack(
            [prepare_style_images(PIL.Image.open(path).convert("RGB"), 3, encoder.config.image_size)[0]
             for path in paths[start : start + 8]]
        )
        encoder(batch[:, None])
    return encoder.eval()


def balanced_accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return float(statistics.mean((predicted[truth == c] == c).double().mean().item() for c in (0, 1)))


def nearest_centroid(train_x, train_y, test_x, test_y) -> float:
    centroids = torch.stack([F.normalize(train_x[train_y == c], dim=1).mean(0) for c in (0, 1)])
    similarity = F.normalize(test_x, dim=1) @ F.normalize(centroids, dim=1).T
    return balanced_accuracy(similarity.argmax(1), test_y)


def logistic_regression(train_x, train_y, test_x, test_y, l2: float = 1e-2) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-8
    x, t = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros((), dtype=x.dtype, requires_grad=True)
    # Class-balanced loss: dusk is 62 of 367 training images.
    sample_weight = torch.where(train_y == 1, 0.5 / (train_y == 1).sum(), 0.5 / (train_y == 0).sum()).to(x.dtype)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = x @ weight + bias
        loss = (F.binary_cross_entropy_with_logits(logits, train_y.to(x.dtype), reduction="none") * sample_weight).sum()
        loss = loss + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return balanced_accuracy(((t @ weight + bias) > 0).long(), test_y)


def separation(x, y) -> float:
    centroids = [x[y == c].mean(0) for c in (0, 1)]
    spread = statistics.mean(float((x[y == c] - centroids[c]).norm(dim=1).square().mean().sqrt()) for c in (0, 1))
    return float((centroids[0] - centroids[1]).norm()) / spread


def images_of(data: Path, splits: dict) -> tuple[list[Path], torch.Tensor]:
    paths, labels = [], []
    for label, name in enumerate(("day", "dusk")):
        for split in splits[name]:
            folder = data / split / "images"
            found = [folder / relative for relative in list_images(folder)]
            paths += found
            labels += [label] * len(found)
    return paths, torch.tensor(labels)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    data, work = Path(args.data_dir), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.base:
        base = Path(args.base)
    else:
        base = work / "tiny_base"
        if not (base / "model_index.json").is_file():
            build_tiny_pipeline(base, num_classes=11, ignore_index=11)
    constant_maps(data / "source" / "train" / "images", work / "maps" / "source")
    constant_maps(data / "target" / "train" / "images", work / "maps" / "target")
    train_paths, train_y = images_of(data, TRAIN_SPLITS)
    test_paths, test_y = images_of(data, HELD_OUT_SPLITS)

    results = {"random init": [], "random init, batch-norm statistics of the data": [], "trained": []}
    seconds = []
    for seed in args.seeds:
        initial, trained, took = train(args, seed, base, work)
        seconds.append(took)
        for name, folder in zip(results, (initial, initial, trained)):
            encoder = StyleEncoderModel.from_pretrained(folder)
            if name == "random init, batch-norm statistics of the data":
                encoder = recalibrate_batch_norm(encoder, train_paths)
            train_x, test_x = embed(encoder, train_paths), embed(encoder, test_paths)
            row = {
                "seed": seed,
                "nearest_centroid": nearest_centroid(train_x, train_y, test_x, test_y),
                "logistic_regression": logistic_regression(train_x, train_y, test_x, test_y),
                "separation": separation(test_x, test_y),
            }
            results[name].append(row)
            print(f"seed {seed} {name}: {row}", flush=True)

    command = "OMP_NUM_THREADS=1 python benchmarks/bench_style_probe.py " + shlex.join(sys.argv[1:])
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.processor() or platform.platform()}), torch {torch.__version__}, {args.threads} thread(s)"
    lines = [
        f"Command: `{command}`",
        f"Machine: {machine}; date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"total {time.perf_counter() - started:.0f} s (training {statistics.median(seconds):.0f} s per seed, median).",
        f"Probe fit on {len(train_paths)} training images ({int((train_y == 0).sum())} day, {int((train_y == 1).sum())} dusk); "
        f"scored on {len(test_paths)} held-out images ({int((test_y == 0).sum())} day, {int((test_y == 1).sum())} dusk).",
        "",
        f"| style encoder ({args.style_backbone}, {args.max_train_steps} steps) | nearest centroid, balanced acc. | "
        "logistic regression, balanced acc. | separation (centroid distance / spread) |",
        "|---|---|---|---|",
    ]
    for name, rows in results.items():
        cells = []
        for key in ("nearest_centroid", "logistic_regression", "separation"):
            values = [row[key] for row in rows]
            cells.append(f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Medians over seeds {args.seeds} (range in brackets).")
    table = "\n".join(lines)
    print(table)
    write_text_atomic(work / "results.md", table + "\n")
    write_text_atomic(work / "results.json", json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
