"""Images per second of `examples/generate_synthetic_dataset.py`'s generation path against diffusers' stock ControlNet
pipeline doing the same work.

Three modes generate the same work items from the same label maps (PNG files in a temporary folder) and uncertainty
bank, and store them as the script does (PNG-encoded parquet shards, one per pipeline call):

  stock        StableDiffusionControlNetPipeline with the same two ControlNets (a MultiControlNetModel), one-hot maps
               built by the caller, then `shard_columns` + `write_shard` in the loop
  sequential   the script's path (`SampleMaps.batch` -> `generate_batch` -> `shard_columns` -> `write_shard`), all in
               the loop
  script       the same with the script's `BackgroundShardWriter`: encoding and writing overlap the next batch

`--architecture tiny` uses `build_tiny_pipeline` (widths x `--width_multiplier`); `sd15` Stable Diffusion 1.5 sizes
with random weights (as `bench_dual_control.py`), initialised on `--device`. Every batch size runs
`--shards_per_batch_size` shards per mode and round; modes are interleaved round by round, the first round is a
warm-up and not timed. Reported: median wall time, images/s and the speed-up over the stock pipeline.

    python benchmarks/bench_generation.py --batch_sizes 1 4 16 --steps 10 --rounds 3 --threads 1
    python benchmarks/bench_generation.py --architecture sd15 --device cuda --dtype float16 --resolutions 128 512 \\
        --batch_sizes 8 32 64 --steps 4 --rounds 2 --shards_per_batch_size 1
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import datasets
import numpy as np
import PIL.Image
import torch
from diffusers import MultiControlNetModel, StableDiffusionControlNetPipeline


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package
from diffusers_uncertainty import (  # noqa: E402
    StableDiffusionDualControlPipeline,
    UncertaintyControlNetModel,
    build_tiny_pipeline,
    prepare_semantic_map,
)
from diffusers_uncertainty.synthesis import (  # noqa: E402
    BackgroundShardWriter,
    FolderLabelSource,
    SampleMaps,
    UncertaintyBank,
    generate_batch,
    plan_shards,
    plan_work_items,
    shard_columns,
    shard_filename,
    write_shard,
)


MODES = ["stock", "sequential", "script"]
NUM_CLASSES, IGNORE_INDEX = 12, 11


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default="tiny", choices=["tiny", "sd15"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16], help="images per pipeline call")
    parser.add_argument("--shards_per_batch_size", type=int, default=2, help="pipeline calls per batch size and mode")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32], help="image sizes, multiples of 8")
    parser.add_argument("--width_multiplier", type=int, default=1, help="tiny: UNet/ControlNet widths x this")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per mode; the first is an untimed warm-up at the smallest batch"
    )
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(input_args)
    if args.rounds < 2:
        raise ValueError(f"`--rounds` must be at least 2 (the first is a warm-up), but got {args.rounds}.")
    if any(size <= 0 or size % 8 != 0 for size in args.resolutions):
        raise ValueError(f"`--resolutions` must be positive multiples of 8, but got {args.resolutions}.")
    if min(args.batch_sizes) < 1 or args.shards_per_batch_size < 1:
        raise ValueError(
            f"`--batch_sizes` and `--shards_per_batch_size` must be positive, but got {args.batch_sizes} and "
            f"{args.shards_per_batch_size}."
        )
    return args


def build_pipelines(args):
    """(ours, stock): the dual-control pipeline and the stock ControlNet pipeline around the same two ControlNets."""
    dtype = getattr(torch, args.dtype)
    if args.architecture == "tiny":
        widths = tuple(width * args.width_multiplier for width in (32, 64))
        ours = build_tiny_pipeline(num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX, block_out_channels=widths)
        ours.to(args.device, dtype)
        components = {name: ours.components[name] for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    else:
        from bench_dual_control import build_sd15_components, random_controlnet

        components = build_sd15_components(args.device, dtype)
        semantic = random_controlnet(components["unet"], NUM_CLASSES, seed=1).to(args.device, dtype)
        uncertainty = random_controlnet(components["unet"], 1, seed=2).to(args.device, dtype)
        controlnet = UncertaintyControlNetModel.from_controlnets(semantic, uncertainty, ignore_index=IGNORE_INDEX)
        ours = StableDiffusionDualControlPipeline(**components, controlnet=controlnet)
    nets = ours.controlnet.nets
    stock = StableDiffusionControlNetPipeline(
        **components,
        controlnet=MultiControlNetModel(list(nets)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for pipeline in (ours, stock):
        pipeline.set_progress_bar_config(disable=True)
    return ours, stock


def run(mode, ours, stock, maps, label_source, items, batch_size, settings, folder, device):
    """Generate and store `items` in shards of `batch_size`; returns the wall time (device work included)."""
    shards = plan_shards(items, batch_size)
    paths = [os.path.join(folder, f"{mode}-{shard_filename(index, len(shards))}") for index in range(len(shards))]
    start = time.perf_counter()
    writer = BackgroundShardWriter() if mode == "script" else None
    for shard, path in zip(shards, paths):
        labels, uncertainty, codes, sources = maps.batch(shard)
        names = [label_source.name(item.label_id) for item in shard]
        if mode == "stock":
            # The same work with diffusers' pipeline: the caller builds the one-hot maps and the aligned labels.
            one_hot, aligned = prepare_semantic_map(labels, NUM_CLASSES, *labels.shape[1:], ignore_index=IGNORE_INDEX)
            images = stock(
                [settings["prompt"]] * len(shard),
                image=[one_hot, uncertainty],
                num_inference_steps=settings["num_inference_steps"],
                guidance_scale=settings["guidance_scale"],
                controlnet_conditioning_scale=[settings["semantic_conditioning_scale"], settings["uncertainty_conditioning_scale"]],
                generator=[torch.Generator("cpu").manual_seed(item.seed) for item in shard],
            ).images
            aligned = aligned.numpy()
        else:
            images, aligned = generate_batch(ours, shard, labels, uncertainty, **settings)
        if writer is None:
            write_shard(shard_columns(shard, images, aligned, codes, sources, names, settings), path)
        else:
            writer.submit(path, shard, images, aligned, codes, sources, names, settings)
    if writer is not None:
        writer.close()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return elapsed, [open(path, "rb").read() for path in paths]


def main(args):
    datasets.disable_progress_bars()  # one bar per shard write, as in the script
    if args.threads:
        torch.set_num_threads(args.threads)
    build_start = time.perf_counter()
    ours, stock = build_pipelines(args)
    build_seconds = time.perf_counter() - build_start
    rng = np.random.default_rng(0)
    settings = dict(
        prompt="dusk street",  # fits the tiny tokenizer's 16 tokens
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        semantic_conditioning_scale=1.0,
        uncertainty_conditioning_scale=1.0,
    )
    with tempfile.TemporaryDirectory() as folder:
        os.makedirs(os.path.join(folder, "labels"))
        os.makedirs(os.path.join(folder, "bank"))
        os.makedirs(os.path.join(folder, "shards"))
        num_labels = 8
        for index in range(num_labels):  # CamVid-like: 12 values (11 classes + void), 4:3 maps resized to square
            label = rng.integers(0, NUM_CLASSES, size=(180 // 4, 240 // 4)).astype(np.uint8)
            PIL.Image.fromarray(label).save(os.path.join(folder, "labels", f"{index:03d}.png"))
        for index in range(8):
            np.save(os.path.join(folder, "bank", f"{index}.npy"), rng.uniform(0, 1, (45, 60)).astype(np.float32))
        label_source = FolderLabelSource(os.path.join(folder, "labels"))
        bank = UncertaintyBank(os.path.join(folder, "bank"), show_progress=False)

        times = {key: [] for key in _keys(args)}
        identical = {}  # (resolution, batch size) -> whether every mode wrote byte-identical shards
        for resolution in args.resolutions:
            maps = SampleMaps(label_source, bank, resolution, resolution)
            for round_index in range(args.rounds):
                # The warm-up round runs the smallest batch only: kernels and allocator warm up, at a small cost.
                for batch_size in args.batch_sizes if round_index else [min(args.batch_sizes)]:
                    count = batch_size * args.shards_per_batch_size
                    items = plan_work_items(num_labels, -(-count // num_labels), seed=round_index)[:count]
                    outputs = []
                    for mode in args.modes:
                        elapsed, shards = run(
                            mode, ours, stock, maps, label_source, items, batch_size, settings,
                            os.path.join(folder, "shards"), args.device,
                        )
                        outputs.append(shards)
                        if round_index > 0:
                            times[(resolution, mode, batch_size)].append(elapsed)
                    identical[(resolution, batch_size)] = all(shards == outputs[0] for shards in outputs)

    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: python {' '.join(sys.argv)}")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(
        f"machine: {device}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.architecture} random weights, {args.dtype}, {args.steps} steps, "
        f"guidance {args.guidance_scale}, {args.shards_per_batch_size} shards per batch size, median of "
        f"{args.rounds - 1} timed rounds; build {build_seconds:.1f} s\n"
    )
    print("| resolution | mode | images per call | images | median time (s) | images/s | x stock | shards identical across modes |")
    print("|---|---|---|---|---|---|---|---|")
    for resolution, mode, batch_size in _keys(args):
        count = batch_size * args.shards_per_batch_size
        median = statistics.median(times[(resolution, mode, batch_size)])
        reference = "-"
        if "stock" in args.modes:
            reference = f"{statistics.median(times[(resolution, 'stock', batch_size)]) / median:.2f}x"
        same = "yes" if identical[(resolution, batch_size)] else "no"
        print(
            f"| {resolution} | {mode} | {batch_size} | {count} | {median:.2f} | {count / median:.2f} | {reference} | "
            f"{same} |"
        )


def _keys(args):
    return [(size, mode, batch) for size in args.resolutions for batch in args.batch_sizes for mode in args.modes]


if __name__ == "__main__":
    main(parse_args())
