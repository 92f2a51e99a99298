#!/usr/bin/env python
# Copyright 2026 The diffusers-uncertainty authors. Apache-2.0.
"""Evaluate a saved segmenter on a labeled folder or dataset: mIoU, per-class IoU, Dice and pixel accuracy
(`ignore_index` excluded, computed with torchmetrics at the labels' original size), written as `metrics.json` and
`metrics.md`, optionally with image | truth | prediction | uncertainty panels.

The images and labels are decoded once and kept on the device; predictions and the confusion matrix are computed
there in batches of images of one size, with no per-image copy to the host (panels excepted).

    accelerate launch examples/evaluate_segmentation.py --model runs/source_only \
        --data_dir data/camvid_daydusk/target/val --resolution 128 --output_dir runs/eval/target_val
"""

import argparse
import json
import os

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from tqdm.auto import tqdm

from diffusers_uncertainty.segmentation import (
    SegmentationMetrics,
    load_segmentation_data,
    load_segmenter,
    metrics_to_markdown,
    normalized_entropy,
)
from diffusers_uncertainty.segmentation.device_data import EvaluationImages
from diffusers_uncertainty.atomic import save_image_atomic, write_json_atomic, write_text_atomic
from diffusers_uncertainty.segmentation.io_utils import resize_probs


def build_parser():
    """The command line's flags, with their types, defaults and choices (`parse_args` adds the checks across
    them). The workflow checks its stages' flags against this parser before running any stage."""
    parser = argparse.ArgumentParser(description="Evaluate a segmenter on a labeled folder or dataset.")
    parser.add_argument("--model", type=str, required=True, help="Saved segmenter (SegmentationModel or LatentDiffusionSegmenter folder or Hub id).")
    parser.add_argument("--data_dir", type=str, required=True, help="`images/` + `labels/` folder, saved dataset or Hub id.")
    parser.add_argument("--dataset_split", type=str, default="train")
    parser.add_argument("--image_column", type=str, default="image")
    parser.add_argument("--label_column", type=str, default="label")
    parser.add_argument("--num_classes", type=int, default=None, help="Defaults to the model's.")
    parser.add_argument("--ignore_index", type=int, default=None, help="Defaults to the model's.")
    parser.add_argument("--classes_json", type=str, default=None, help="`classes.json` with `classes` and `palette`.")
    parser.add_argument("--resolution", type=int, default=256, help="Shorter side of the network input (as in training).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--save_visualizations", type=int, default=0,
                        help="Write this many PNG panels (image | truth | prediction | uncertainty).")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    return parser


def parse_args(input_args=None):
    """Parses the command line.

    Args:
        input_args (`List[str]`, *optional*): Arguments to parse instead of `sys.argv`.
    """
    return build_parser().parse_args(input_args)


def default_palette(num_classes: int) -> np.ndarray:
    """A fixed random colour per class.

    Args:
        num_classes (`int`): Number of classes.
    """
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(num_classes, 3), dtype=np.uint8)


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """RGB rendering of a label map; ignored / unknown values are black.

    Args:
        label (`np.ndarray`): Integer label map.
        palette (`np.ndarray` of shape `(C, 3)`): Colours.
    """
    out = np.zeros((*label.shape, 3), dtype=np.uint8)  # ignore_index and unknown values stay black
    known = (label >= 0) & (label < len(palette))
    out[known] = palette[label[known]]
    return out


def main(args):
    """Evaluates a model and writes the reports.

    Args:
        args (`argparse.Namespace`): From [`parse_args`].
    """
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    model = load_segmenter(args.model).to(accelerator.device).eval()
    num_classes = args.num_classes or model.config.num_classes
    ignore_index = model.config.ignore_index if args.ignore_index is None else args.ignore_index
    if num_classes != model.config.num_classes:
        raise ValueError(f"`--num_classes` {num_classes} does not match the model's {model.config.num_classes} classes.")
    class_names, palette = model.config.class_names, default_palette(num_classes)
    if args.classes_json:
        with open(args.classes_json) as f:
            info = json.load(f)
        class_names = info.get("classes", class_names)
        if "palette" in info:
            palette = np.asarray(info["palette"], dtype=np.uint8)

    dataset = load_segmentation_data(
        args.data_dir, num_classes, ignore_index, require_labels=True, split=args.dataset_split,
        image_column=args.image_column, label_column=args.label_column, argument="--data_dir",
    )
    images = EvaluationImages(dataset, args.resolution, model.output_stride, accelerator.device, args.batch_size)
    metrics = SegmentationMetrics(num_classes, ignore_index, class_names)
    os.makedirs(args.output_dir, exist_ok=True)
    saved = 0
    with torch.no_grad():
        for batch in tqdm(images, desc="Evaluating", disable=not accelerator.is_local_main_process):
            with accelerator.autocast():
                logits = model(batch["pixel_values"]).logits.float()
            probs = resize_probs(logits.softmax(1), batch["original_size"])
            predictions = probs.argmax(1)
            metrics.update(predictions, batch["labels"])
            for k in range(min(len(batch["names"]), args.save_visualizations - saved)):
                image = dataset[batch["indices"][k]]["image"]
                uncertainty = normalized_entropy(probs[k : k + 1], dim=1)[0].cpu().numpy()
                panel = np.concatenate(
                    [
                        np.asarray(image.convert("RGB")),
                        colorize(batch["labels"][k].cpu().numpy(), palette),
                        colorize(predictions[k].cpu().numpy(), palette),
                        np.repeat((uncertainty * 255).round().astype(np.uint8)[..., None], 3, axis=2),
                    ],
                    axis=1,
                )
                name = batch["names"][k]
                save_image_atomic(os.path.join(args.output_dir, "visualizations", f"{name}.png"), Image.fromarray(panel))
                saved += 1

    results = metrics.compute()
    results.update({"model": args.model, "data_dir": args.data_dir, "resolution": args.resolution})
    write_json_atomic(os.path.join(args.output_dir, "metrics.json"), results)
    write_text_atomic(
        os.path.join(args.output_dir, "metrics.md"),
        metrics_to_markdown(results, title=f"{args.model} on {args.data_dir}"),
    )
    print(
        f"mIoU {results['mIoU']:.4f} | mean Dice {results['mDice']:.4f} | pixel accuracy "
        f"{results['pixel_accuracy']:.4f} on {len(dataset)} images of {args.data_dir}"
    )


if __name__ == "__main__":
    main(parse_args())
