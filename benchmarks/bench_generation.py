"""Images per second of `examples/generate_synthetic_dataset.py`'s batched generation against one image per call.

Both sides run the script's own code path (`SampleMaps.batch` -> `generate_batch` -> `shard_columns`, i.e. condition
stacking, one pipeline call, PNG encoding) on the same work items, the same label maps (PNG files in a temporary
folder) and the same uncertainty bank; the only difference is the number of images per pipeline call. A tiny random
pipeline is used (no download): `build_tiny_pipeline` at `--resolution`, with `--width_multiplier` widening its UNet
and ControlNet. Modes are interleaved round by round so that machine noise hits them alike; the first round is a
warm-up and not timed. Reported: the median wall time over the timed rounds, images/s and the speed-up over one
image per call.

    python benchmarks/bench_generation.py --num_images 16 --batch_sizes 1 4 16 --steps 10 --rounds 4
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import PIL.Image
import torch

from diffusers_uncertainty import build_tiny_pipeline
from diffusers_uncertainty.synthesis import (
    FolderLabelSource,
    SampleMaps,
    UncertaintyBank,
    generate_batch,
    plan_shards,
    plan_work_items,
    shard_columns,
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=16, help="images generated per mode and round")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16], help="images per pipeline call")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--resolution", type=int, default=32, help="image size, a multiple of 8")
    parser.add_argument("--width_multiplier", type=int, default=1, help="UNet/ControlNet widths x this (32, 64 base)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per mode, the first one untimed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if 1 not in args.batch_sizes:
        raise ValueError(f"`--batch_sizes` must include 1 (the one-image-per-call reference), but got {args.batch_sizes}.")
    if args.rounds < 2:
        raise ValueError(f"`--rounds` must be at least 2 (the first is a warm-up), but got {args.rounds}.")
    return args


def run(pipeline, maps, label_source, items, batch_size, args):
    """Generate and encode `items` in shards of `batch_size`, as the script does; returns the wall time."""
    settings = dict(
        prompt="dusk street",  # fits the tiny tokenizer's 16 tokens
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        semantic_conditioning_scale=1.0,
        uncertainty_conditioning_scale=1.0,
    )
    start = time.perf_counter()
    for shard in plan_shards(items, batch_size):
        labels, uncertainty, codes, sources = maps.batch(shard)
        images, aligned = generate_batch(pipeline, shard, labels, uncertainty, **settings)
        shard_columns(shard, images, aligned, codes, sources, [label_source.name(i.label_id) for i in shard], settings)
    return time.perf_counter() - start


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = tuple(width * args.width_multiplier for width in (32, 64))
    pipeline = build_tiny_pipeline(num_classes=12, ignore_index=11, block_out_channels=widths)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        os.makedirs(os.path.join(folder, "labels"))
        os.makedirs(os.path.join(folder, "bank"))
        num_labels = max(1, args.num_images // 4)
        for index in range(num_labels):  # CamVid-like: 12 values (11 classes + void), 4:3 maps resized to square
            label = rng.integers(0, 12, size=(180 // 4, 240 // 4)).astype(np.uint8)
            PIL.Image.fromarray(label).save(os.path.join(folder, "labels", f"{index:03d}.png"))
        for index in range(8):
            np.save(os.path.join(folder, "bank", f"{index}.npy"), rng.uniform(0, 1, (45, 60)).astype(np.float32))
        label_source = FolderLabelSource(os.path.join(folder, "labels"))
        bank = UncertaintyBank(os.path.join(folder, "bank"), show_progress=False)
        items = plan_work_items(num_labels, -(-args.num_images // num_labels), seed=0)[: args.num_images]
        maps = SampleMaps(label_source, bank, args.resolution, args.resolution)

        times = {batch_size: [] for batch_size in args.batch_sizes}
        for round_index in range(args.rounds):
            for batch_size in args.batch_sizes:
                elapsed = run(pipeline, maps, label_source, items, batch_size, args)
                if round_index > 0:
                    times[batch_size].append(elapsed)

    reference = statistics.median(times[1])
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{args.num_images} images of {args.resolution}x{args.resolution}, {args.steps} steps, guidance "
        f"{args.guidance_scale}, UNet widths {widths}, median of {args.rounds - 1} timed rounds\n"
    )
    print("| mode | images per call | pipeline calls | median time (s) | images/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        median = statistics.median(times[batch_size])
        mode = "one image per call" if batch_size == 1 else "script, batched"
        calls = len(plan_shards(items, batch_size))
        print(
            f"| {mode} | {batch_size} | {calls} | {median:.2f} | {len(items) / median:.2f} | "
            f"{reference / median:.2f}x |"
        )


if __name__ == "__main__":
    main()
