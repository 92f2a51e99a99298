#!/usr/bin/env python
# Copyright 2026 The diffusers-uncertainty authors. Apache-2.0.
"""Measure a generated labeled dataset before training on it: do the images follow their labels (label fidelity),
do they look like the target domain (target likeness), and does the source segmenter find them as uncertain as real
target images (uncertainty match)? Per uncertainty level: the dataset itself (its own maps, e.g. the bank of real
target maps) and a few of its samples generated again at constant levels (default 0, 0.5 and 1) with the same label
maps, seeds and settings; with those levels, also the held-out real images through the base's autoencoder (the
ceiling of any image the base generates). Every measure comes from models trained by the workflow itself (see
`diffusers_uncertainty/synthetic_evaluation.py` and `docs/synthesis.md`).

    accelerate launch examples/evaluate_synthetic.py --synthetic_data_dir runs/synthetic \
        --source_segmenter runs/segmenters/source_only --target_segmenter runs/segmenters/photometric \
        --source_train_dir data/camvid_daydusk/source/train \
        --target_train_dir data/camvid_daydusk/target/train \
        --source_eval_dir data/camvid_daydusk/source/val \
        --target_eval_dir data/camvid_daydusk/target/val --resolution 176 --output_dir runs/synthetic_evaluation
"""

import argparse
import time

import torch
from accelerate import Accelerator

from diffusers_uncertainty.synthetic_evaluation import (
    RESULTS_NAME,
    UNCERTAINTY_ESTIMATOR_CHOICES,
    check_evaluation_arguments,
    check_evaluation_settings,
    evaluate_synthetic_dataset,
    synthetic_evaluation_table,
)


def build_parser():
    """The command line's flags, with their types, defaults and choices (`check_args` adds the checks across
    them, `parse_args` those on files). The workflow checks its stages' flags with both this parser and `check_args`
    before running any stage."""
    parser = argparse.ArgumentParser(description="Label fidelity, target likeness and uncertainty of a generated dataset.")
    parser.add_argument("--synthetic_data_dir", type=str, required=True,
                        help="The generated dataset (a `save_to_disk` folder, e.g. from generate_synthetic_dataset.py).")
    parser.add_argument("--source_segmenter", type=str, required=True, help="Segmenter trained on the labeled source.")
    parser.add_argument("--target_segmenter", type=str, default=None,
                        help="Segmenter trained on target-like images (the workflow's photometric variant).")
    parser.add_argument("--source_train_dir", type=str, required=True, help="Real source images (domain classifier).")
    parser.add_argument("--target_train_dir", type=str, required=True,
                        help="Real, unlabeled target images (domain classifier).")
    parser.add_argument("--source_eval_dir", type=str, required=True, help="Held-out labeled source images.")
    parser.add_argument("--target_eval_dir", type=str, required=True, help="Held-out labeled target images.")
    parser.add_argument("--uncertainty_levels", type=float, nargs="*", default=[0.0, 0.5, 1.0],
                        help="Constant levels at which --samples_per_level samples are generated again (none: skip).")
    parser.add_argument("--samples_per_level", type=int, default=16)
    parser.add_argument("--max_samples", type=int, default=None, help="Evaluate only the dataset's first N samples.")
    parser.add_argument("--resolution", type=int, default=256, help="Segmenters' input shorter side (as in training).")
    parser.add_argument("--uncertainty_estimator", type=str, default="entropy", choices=UNCERTAINTY_ESTIMATOR_CHOICES)
    parser.add_argument("--classifier_resolution", type=int, default=64, help="Domain classifier's square input side.")
    parser.add_argument("--classifier_steps", type=int, default=300)
    parser.add_argument("--classifier_batch_size", type=int, default=32)
    parser.add_argument("--kid_subsets", type=int, default=100)
    parser.add_argument("--kid_subset_size", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=8, help="Images per segmenter pass and per pipeline call.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--output_dir", type=str, required=True)
    return parser


def parse_args(input_args=None):
    """Parses and checks the command line (every check that needs no model or image).

    Args:
        input_args (`List[str]`, *optional*): Arguments to parse instead of `sys.argv`.
    """
    parser = build_parser()
    args = parser.parse_args(input_args)
    check_evaluation_arguments(
        args.synthetic_data_dir, args.source_segmenter, args.source_train_dir, args.target_train_dir,
        args.source_eval_dir, args.target_eval_dir, args.target_segmenter, *evaluation_settings(args),
    )
    return args


def check_args(args) -> None:
    """Every check across flags that reads no file (the workflow runs it on every stage's flags before the first
    stage); [`parse_args`] also checks the folders and the dataset's generation settings.

    Args:
        args (`argparse.Namespace`): From `build_parser().parse_args(...)`.
    """
    check_evaluation_settings(*evaluation_settings(args))


def evaluation_settings(args) -> tuple:
    """The arguments of `check_evaluation_settings`, in its order."""
    return (
        args.uncertainty_levels, args.samples_per_level, args.resolution, args.classifier_resolution,
        args.classifier_steps, args.classifier_batch_size, args.kid_subsets, args.kid_subset_size, args.batch_size,
        args.max_samples, args.uncertainty_estimator,
    )


def main(args):
    """Runs the evaluation, writes `synthetic_evaluation.{json,md}` and prints the table.

    Args:
        args (`argparse.Namespace`): From [`parse_args`].
    """
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    # The pipeline in the precision it generated with under `accelerate launch --mixed_precision`, as
    # generate_synthetic_dataset.py loads it; the segmenters run under autocast, the classifier in float32.
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    start = time.perf_counter()
    if accelerator.is_main_process:
        results = evaluate_synthetic_dataset(
            args.synthetic_data_dir, args.source_segmenter, args.source_train_dir, args.target_train_dir,
            args.source_eval_dir, args.target_eval_dir, args.output_dir, target_segmenter=args.target_segmenter,
            uncertainty_levels=args.uncertainty_levels, samples_per_level=args.samples_per_level,
            max_samples=args.max_samples, resolution=args.resolution, uncertainty_estimator=args.uncertainty_estimator,
            classifier_resolution=args.classifier_resolution, classifier_steps=args.classifier_steps,
            classifier_batch_size=args.classifier_batch_size, kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size, batch_size=args.batch_size, seed=args.seed,
            device=accelerator.device, autocast=accelerator.autocast, pipeline_dtype=dtype,
        )
        print(synthetic_evaluation_table(results))
        print(f"Wrote {args.output_dir}/{RESULTS_NAME} in {time.perf_counter() - start:.1f} s.")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(parse_args())
