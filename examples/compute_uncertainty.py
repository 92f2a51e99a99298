#!/usr/bin/env python
# Copyright 2026 The diffusers-uncertainty authors. Apache-2.0.
"""Per-pixel uncertainty maps of a trained segmenter for every image of a folder or dataset.

Writes `<output_dir>/maps/<name>.png` (16-bit grayscale, 0..65535 <-> 0..1, at the original image size) and
`<output_dir>/scores.csv` + `<output_dir>/scores.json` (per-image score = mean of the map; JSON also holds the mean
over images). With `accelerate launch --num_processes N` the images are split between processes.

The images are decoded once and kept on the device; the maps are computed, resized to the original size and
averaged there in batches of images of one size, and each batch is copied to the host once, to be written.

With `--match_reference_dir DIR` the maps are given the value distribution of the maps in DIR before they are
written (histogram matching over the 16-bit levels, order of values kept): a refinement round uses it to keep round
1's uncertainty scale (`refine: {match_uncertainty: true}` in a workflow config). The maps of a process are then held
in memory (16 bits a pixel) until every process has counted its levels.

    accelerate launch examples/compute_uncertainty.py --model runs/source_only \
        --data_dir data/camvid_daydusk/target/train --resolution 128 --output_dir runs/uncertainty/target
"""

import argparse
import csv
import io
import os

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from diffusers_uncertainty.segmentation import (
    UNCERTAINTY_ESTIMATORS,
    folder_uncertainty_histogram,
    load_segmentation_data,
    load_segmenter,
    quantile_matching_table,
    uncertainty_histogram,
)
from diffusers_uncertainty.segmentation.device_data import EvaluationImages
from diffusers_uncertainty.atomic import save_image_atomic, write_json_atomic, write_text_atomic
from diffusers_uncertainty.segmentation.io_utils import resize_probs, uncertainty_to_png16


def build_parser():
    """The command line's flags, with their types, defaults and choices (`check_args` adds the checks across
    them, `parse_args` those on files). The workflow checks its stages' flags with both this parser and `check_args`
    before running any stage."""
    parser = argparse.ArgumentParser(description="Write uncertainty maps and per-image scores of a segmenter.")
    parser.add_argument("--model", type=str, nargs="+", required=True,
                        help="Saved segmenter(s) (SegmentationModel or LatentDiffusionSegmenter folder or Hub id); several for --estimator ensemble.")
    parser.add_argument("--data_dir", type=str, required=True,
                        help="Folder of images (or `images/` + optional `labels/`), saved dataset, or Hub dataset id.")
    parser.add_argument("--dataset_split", type=str, default="train")
    parser.add_argument("--image_column", type=str, default="image")
    parser.add_argument("--estimator", type=str, default="entropy", choices=sorted(UNCERTAINTY_ESTIMATORS))
    parser.add_argument("--num_passes", type=int, default=8, help="Stochastic passes for mc_dropout.")
    parser.add_argument("--resolution", type=int, default=256, help="Shorter side of the network input (as in training).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--dataloader_num_workers", type=int, default=0,
                        help="DataLoader workers that decode the images (once, before inference).")
    parser.add_argument("--match_reference_dir", type=str, default=None,
                        help="Give the maps the value distribution of the 16-bit PNG maps in this folder (e.g. an "
                             "earlier compute_uncertainty.py output of the same images), keeping their order.")
    return parser


def parse_args(input_args=None):
    """Parses and checks the command line.

    Args:
        input_args (`List[str]`, *optional*): Arguments to parse instead of `sys.argv`.
    """
    parser = build_parser()
    args = parser.parse_args(input_args)
    check_args(args)
    if args.match_reference_dir is not None and not os.path.isdir(args.match_reference_dir):
        raise ValueError(f"`--match_reference_dir` must be a folder of uncertainty maps, but "
                         f"{args.match_reference_dir} does not exist.")
    return args


def check_args(args) -> None:
    """Every check across flags that reads no file (the workflow runs it on every stage's flags before the first
    stage).

    Args:
        args (`argparse.Namespace`): From `build_parser().parse_args(...)`.
    """
    if args.estimator == "ensemble" and len(args.model) < 2:
        raise ValueError(f"`--estimator ensemble` needs at least 2 `--model`, got {len(args.model)}.")
    if args.estimator != "ensemble" and len(args.model) != 1:
        raise ValueError(f"`--estimator {args.estimator}` takes exactly one `--model`, got {len(args.model)}.")


def build_estimator(args, models):
    """The estimator chosen with `--estimator`.

    Args:
        args (`argparse.Namespace`): Parsed arguments.
        models (`List[ModelMixin]`): Loaded models.
    """
    if args.estimator == "entropy":
        return UNCERTAINTY_ESTIMATORS["entropy"](models[0])
    if args.estimator == "mc_dropout":
        return UNCERTAINTY_ESTIMATORS["mc_dropout"](models[0], num_passes=args.num_passes)
    return UNCERTAINTY_ESTIMATORS["ensemble"](models)


def main(args):
    """Writes maps and scores.

    Args:
        args (`argparse.Namespace`): From [`parse_args`].
    """
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    # Read (and checked) before any work.
    reference_counts = None if args.match_reference_dir is None else folder_uncertainty_histogram(args.match_reference_dir)
    models = [load_segmenter(m).to(accelerator.device).eval() for m in args.model]
    strides = {m.output_stride for m in models}
    dataset = load_segmentation_data(
        args.data_dir, num_classes=models[0].config.num_classes, ignore_index=models[0].config.ignore_index,
        require_labels=False, split=args.dataset_split, image_column=args.image_column, label_column="__none__",
        argument="--data_dir",
    )
    # Each process takes its share of the images (accelerate's split_between_processes).
    with accelerator.split_between_processes(list(range(len(dataset)))) as shard:
        shard = list(shard)
    images = EvaluationImages(
        dataset, args.resolution, max(strides), accelerator.device, args.batch_size, indices=shard,
        num_workers=args.dataloader_num_workers,
    )
    estimator = build_estimator(args, models)
    map_dir = os.path.join(args.output_dir, "maps")
    os.makedirs(map_dir, exist_ok=True)
    rows, held = [], {}
    for batch in tqdm(images, desc="Uncertainty", disable=not accelerator.is_local_main_process):
        with accelerator.autocast():
            output = estimator(batch["pixel_values"])
        full = resize_probs(output.maps[:, None].float(), batch["original_size"])[:, 0].clamp(0.0, 1.0)
        scores = full.mean((-2, -1))
        full, scores = full.cpu().numpy(), scores.cpu().tolist()  # one host copy per batch
        for name, uncertainty, score in zip(batch["names"], full, scores):
            levels = uncertainty_to_png16(uncertainty)
            if reference_counts is None:
                save_image_atomic(os.path.join(map_dir, f"{name}.png"), levels)
                rows.append({"name": name, "score": score})
            else:  # written once every process's maps are counted
                held[name] = np.array(levels)

    if reference_counts is not None:
        counts = torch.from_numpy(uncertainty_histogram(list(held.values()))).to(accelerator.device)
        counts = accelerator.reduce(counts, reduction="sum").cpu().numpy()
        table = quantile_matching_table(counts, reference_counts)
        for name, levels in held.items():
            matched = table[levels]
            save_image_atomic(os.path.join(map_dir, f"{name}.png"), Image.fromarray(matched))
            rows.append({"name": name, "score": float(matched.mean()) / 65535})

    rows = gather_object(rows)
    if accelerator.is_main_process:
        rows = sorted(rows, key=lambda r: r["name"])
        mean = sum(r["score"] for r in rows) / len(rows)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["name", "score"])
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(os.path.join(args.output_dir, "scores.csv"), buffer.getvalue())
        write_json_atomic(
            os.path.join(args.output_dir, "scores.json"),
            {
                "estimator": args.estimator,
                "models": args.model,
                "data_dir": args.data_dir,
                "resolution": args.resolution,
                "match_reference_dir": args.match_reference_dir,
                "num_images": len(rows),
                "mean_score": mean,
                "scores": {r["name"]: r["score"] for r in rows},
            },
        )
        print(f"mean {args.estimator} uncertainty over {len(rows)} images of {args.data_dir}: {mean:.4f}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(parse_args())
