#!/usr/bin/env python
# Copyright 2026 The diffusers-uncertainty authors. Apache-2.0.
"""Train a semantic segmentation network (source only, photometric augmentation, or FLEX-Seg noise-aware training
on real + synthetic data), either an encoder-decoder from segmentation-models-pytorch (`--model smp`, default) or a
latent-diffusion segmenter on a frozen diffusers base (`--model latent_diffusion`, ICCLD), optionally aligned to an
unlabeled target domain with a gradient-reversal domain discriminator (`--adversarial_weight`,
`--unlabeled_data_dir`), and optionally with Fourier domain adaptation of the labeled images to unlabeled target
images (`--fourier_domain_adaptation --fda_target_dir`).

Training data that fits `--device_data_budget_mb` is decoded once and kept on the accelerator, where crops, flips
and photometric augmentation are made in batches (`--dataset_placement device`, chosen by `auto` on a GPU); larger
data streams through DataLoader workers (`--dataset_placement stream`). The loop reads losses back to the host only
every `--logging_steps` steps and ends by printing its steady-state throughput (also in `<output_dir>/throughput.json`).

The structure (argument names, accelerate setup, checkpointing with `--checkpointing_steps` /
`--resume_from_checkpoint`, trackers, Hub upload) follows diffusers' `examples/controlnet/train_controlnet.py`.

    accelerate launch examples/train_segmentation.py \
        --train_data_dir data/camvid_daydusk/source/train \
        --validation_data_dir data/camvid_daydusk/target/val \
        --num_classes 11 --ignore_index 11 --resolution 128 --max_train_steps 300 --output_dir runs/source_only

    accelerate launch examples/train_segmentation.py --model latent_diffusion --base_model_name_or_path runs/base \
        --adversarial_weight 0.1 --unlabeled_data_dir data/camvid_daydusk/target/train \
        --train_data_dir data/camvid_daydusk/source/train --num_classes 11 --ignore_index 11 \
        --resolution 128 --max_train_steps 300 --output_dir runs/iccld
"""

import argparse
import contextlib
import json
import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffusers.optimization import get_scheduler
from diffusers_uncertainty.atomic import save_pretrained_atomic, write_json_atomic, write_text_atomic
from diffusers_uncertainty.training.checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint
from diffusers_uncertainty.training.performance import (
    ThroughputMeter,
    adamw_fused_kwargs,
    check_torch_compile_mode,
    compile_in_place,
    enable_tf32,
    mark_step_begin,
)
from diffusers_uncertainty.segmentation import (
    DomainDiscriminator,
    FlexSegLoss,
    HardnessAwareSampler,
    LatentDiffusionSegmenter,
    PhotometricAugmentation,
    SegmentationMetrics,
    SegmentationTransform,
    TransformedDataset,
    create_segmentation_model,
    dann_lambda,
    domain_adversarial_loss,
    load_segmentation_data,
    load_segmenter,
    metrics_to_markdown,
    mixture_weights,
)
from diffusers_uncertainty.segmentation.data import concat_datasets, first_samples, list_collate
from diffusers_uncertainty.segmentation.device_data import (
    DeviceSegmentationDataset,
    check_dataset_placement,
    EvaluationImages,
    choose_dataset_placement,
    decoded_nbytes,
    StreamedEvaluationBatches,
)
from diffusers_uncertainty.segmentation.fourier import FourierDomainAdaptation
from diffusers_uncertainty.segmentation.label_agreement import keep_most_agreeing, label_agreement_scores
from diffusers_uncertainty.segmentation.io_utils import resize_probs


logger = get_logger(__name__)


def cycle(dataloader):
    """Endless iteration over a data loader (a new shuffled pass each time one ends)."""
    while True:
        yield from dataloader


FLEXSEG_DEFAULTS = {
    "ube_weight": 1.0,
    "band_weight": 0.5,
    "proto_weight": 0.1,
    "hardness_sampling": True,
}
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "segmenter_card.md"


def build_parser():
    """The command line's flags, with their types, defaults and choices (`check_args` adds the checks across
    them, `parse_args` those on files). The workflow checks its stages' flags with both this parser and `check_args`
    before running any stage."""
    parser = argparse.ArgumentParser(description="Train a segmentation network (source only / augmented / FLEX-Seg).")
    # Data
    parser.add_argument("--train_data_dir", type=str, nargs="+", required=True,
                        help="Labeled training sources: `images/`+`labels/` folders, `save_to_disk` datasets or Hub ids.")
    parser.add_argument("--train_data_weights", type=float, nargs="+", default=None,
                        help="Sampling weight of each --train_data_dir source (default: proportional to size).")
    parser.add_argument("--synthetic_data_dir", type=str, nargs="*", default=[],
                        help="Synthetic labeled sources (e.g. a generated dataset with `image` and `label` columns).")
    parser.add_argument("--synthetic_ratio", type=float, default=None,
                        help="Fraction of training draws taken from --synthetic_data_dir (default: proportional to size).")
    parser.add_argument("--synthetic_ratio_end", type=float, default=None,
                        help="A schedule for --synthetic_ratio: the fraction moves linearly from --synthetic_ratio at "
                             "the first step to this value at the last (e.g. 0.5 -> 0: synthetic data early, real "
                             "data at the end). Default: constant.")
    parser.add_argument("--max_synthetic_samples", type=int, default=None,
                        help="Use only the first N synthetic samples: --synthetic_data_dir sources in the order given, "
                             "a generated dataset read by sample index, then label map (one sample of every label "
                             "map before the second of any), any other source in its stored order. Default: all.")
    parser.add_argument("--synthetic_filter_model", type=str, default=None,
                        help="A trained segmenter (e.g. one trained with --photometric_augmentation) that scores every "
                             "synthetic sample by the agreement of its prediction with the sample's label map "
                             "(per-image mIoU); with --synthetic_keep_fraction only the best-agreeing share is used.")
    parser.add_argument("--synthetic_keep_fraction", type=float, default=None,
                        help="Share of the synthetic samples kept by --synthetic_filter_model, in (0, 1] (one ranking "
                             "over every --synthetic_data_dir, after --max_synthetic_samples).")
    parser.add_argument("--validation_data_dir", type=str, default=None, help="Labeled folder/dataset for validation.")
    parser.add_argument("--dataset_split", type=str, default="train", help="Split used for `datasets` sources.")
    parser.add_argument("--image_column", type=str, default="image")
    parser.add_argument("--label_column", type=str, default="label")
    parser.add_argument("--num_classes", type=int, required=True)
    parser.add_argument("--ignore_index", type=int, default=255)
    parser.add_argument("--class_names", type=str, nargs="+", default=None)
    parser.add_argument("--classes_json", type=str, default=None,
                        help="A `classes.json` with a `classes` list (as in camvid_daydusk) to name the classes.")
    parser.add_argument("--resolution", type=int, default=256,
                        help="Training crop size (shorter side resized to it); validation resizes the shorter side to it.")
    parser.add_argument("--photometric_augmentation", action="store_true",
                        help="Random brightness, contrast, gamma, blur and noise on training images.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0,
                        help="Workers that decode samples (stream placement) or decode the data once (device placement).")
    parser.add_argument("--dataset_placement", type=str, default="auto",
                        help="`device`: decode the training and validation data once and keep it on the accelerator, "
                             "crops/flips/photometric augmentation batched there. `stream`: decode per sample in "
                             "DataLoader workers. `auto`: `device` on an accelerator when the decoded training data "
                             "fits --device_data_budget_mb, else `stream`.")
    parser.add_argument("--device_data_budget_mb", type=float, default=4096,
                        help="Largest decoded training data (MB) that `--dataset_placement auto` puts on the device.")
    # Fourier domain adaptation
    parser.add_argument("--fourier_domain_adaptation", action="store_true",
                        help="FDA (Yang & Soatto 2020): give each labeled training image the low-frequency amplitude "
                             "spectrum of a random image of --fda_target_dir, keeping its phase (and labels).")
    parser.add_argument("--fda_target_dir", type=str, default=None,
                        help="Unlabeled target images (folder or dataset) whose amplitude spectra FDA transfers.")
    parser.add_argument("--fda_beta", type=float, default=0.03,
                        help="FDA window: frequencies below beta x the shorter crop side take the target amplitude.")
    parser.add_argument("--fda_on_synthetic", action="store_true",
                        help="Apply FDA to --synthetic_data_dir images too (default: real labeled images only).")
    # Model
    parser.add_argument("--model", type=str, default="smp", choices=["smp", "latent_diffusion"],
                        help="`smp`: encoder-decoder from segmentation-models-pytorch (--architecture, --encoder_*). "
                             "`latent_diffusion`: decoder on the frozen VAE/UNet of --base_model_name_or_path (ICCLD).")
    parser.add_argument("--architecture", type=str, default="unet")
    parser.add_argument("--encoder_name", type=str, default="resnet18")
    parser.add_argument("--encoder_depth", type=int, default=5)
    parser.add_argument("--decoder_channels", type=int, nargs="+", default=None,
                        help="smp: one width per encoder stage (unet-like). latent_diffusion: one value, the decoder "
                             "width at latent resolution (default 64).")
    parser.add_argument("--encoder_weights", type=str, default=None,
                        help="Pretrained encoder weights (e.g. `imagenet`); default random init. Unreachable -> random init.")
    parser.add_argument("--dropout", type=float, default=0.1, help="Dropout before the head (used by MC-dropout).")
    # Latent-diffusion segmenter (--model latent_diffusion)
    parser.add_argument("--base_model_name_or_path", type=str, default=None,
                        help="Diffusers Stable Diffusion pipeline folder or Hub id whose VAE and UNet are read (frozen).")
    parser.add_argument("--feature_timestep", type=int, default=50,
                        help="Timestep the latent is noised to before the UNet reads it.")
    parser.add_argument("--unet_feature_blocks", type=int, nargs="+", default=None,
                        help="Indices of the UNet up blocks whose outputs feed the decoder (default: all).")
    parser.add_argument("--lora_rank", type=int, default=0, help="LoRA rank on the UNet's attention (0: UNet frozen).")
    # Adversarial domain alignment (--model latent_diffusion)
    parser.add_argument("--adversarial_weight", type=float, default=0.0,
                        help="Final gradient-reversal strength of the domain discriminator (DANN ramp-up from 0); "
                             "0 disables adversarial alignment.")
    parser.add_argument("--unlabeled_data_dir", type=str, default=None,
                        help="Unlabeled target images (folder or dataset) for adversarial alignment.")
    parser.add_argument("--discriminator_learning_rate", type=float, default=None,
                        help="Learning rate of the domain discriminator (default: --learning_rate).")
    parser.add_argument("--discriminator_channels", type=int, default=64, help="Width of the domain discriminator.")
    # Losses
    parser.add_argument("--flexseg", action="store_true",
                        help="FLEX-Seg: sets ube/band/proto weights and hardness sampling to their defaults unless given.")
    parser.add_argument("--dice_weight", type=float, default=0.0, help="Add soft Dice to cross-entropy with this weight.")
    parser.add_argument("--ube_weight", type=float, default=None, help="Uncertainty boundary emphasis loss weight.")
    parser.add_argument("--ube_alpha", type=float, default=1.0)
    parser.add_argument("--ube_beta", type=float, default=1.0)
    parser.add_argument("--band_weight", type=float, default=None, help="Multi-scale boundary band loss weight.")
    parser.add_argument("--band_radii", type=int, nargs="+", default=[1, 3, 6])
    parser.add_argument("--band_weights", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--proto_weight", type=float, default=None, help="Granular prototype contrastive loss weight.")
    parser.add_argument("--proto_momentum", type=float, default=0.99)
    parser.add_argument("--proto_temperature", type=float, default=0.1)
    parser.add_argument("--hardness_sampling", action="store_true", default=None, help="Hardness-aware sampling.")
    parser.add_argument("--hardness_max", type=float, default=0.5, help="Final mix toward the hard distribution.")
    parser.add_argument("--hardness_gamma", type=float, default=2.0)
    parser.add_argument("--hardness_momentum", type=float, default=0.9)
    # Optimisation
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--max_train_steps", type=int, default=1000)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--lr_scheduler", type=str, default="cosine",
                        help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup".')
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the segmenter (in place).")
    parser.add_argument(
        "--torch_compile_mode", type=str, default="default",
        help="torch.compile mode with --torch_compile: default, reduce-overhead (CUDA graphs: for steps bound by kernel"
        " launches), max-autotune, max-autotune-no-cudagraphs.",
    )
    parser.add_argument("--seed", type=int, default=None)
    # Bookkeeping
    parser.add_argument("--output_dir", type=str, default="segmenter-model")
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--report_to", type=str, default="tensorboard",
                        help='"tensorboard", "wandb", "all" or "none".')
    parser.add_argument("--logging_steps", type=int, default=10,
                        help="Read the losses back to the host (progress bar, trackers) every this many steps.")
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help='A checkpoint folder or "latest".')
    parser.add_argument("--validation_steps", type=int, default=100)
    parser.add_argument("--validation_batch_size", type=int, default=8)
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", type=str, default=None)
    parser.add_argument("--hub_token", type=str, default=None)
    return parser


def parse_args(input_args=None):
    """Parses and checks the command line.

    Args:
        input_args (`List[str]`, *optional*): Arguments to parse instead of `sys.argv`.
    """
    parser = build_parser()
    args = parser.parse_args(input_args)
    for name, default in FLEXSEG_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default if args.flexseg else (False if isinstance(default, bool) else 0.0))
    check_args(args)
    # The checks that read files.
    resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)  # a named checkpoint must exist
    if args.classes_json is not None:
        with open(args.classes_json) as f:
            args.class_names = json.load(f)["classes"]
        check_class_names(args)
    return args


def check_args(args) -> None:
    """Every check across flags that reads no file, so that a bad command stops at once (the workflow runs it on
    every stage's flags before the first stage).

    Args:
        args (`argparse.Namespace`): From `build_parser().parse_args(...)`.
    """
    if args.train_data_weights is not None and len(args.train_data_weights) != len(args.train_data_dir):
        raise ValueError(
            f"`--train_data_weights` needs one weight per `--train_data_dir` ({len(args.train_data_dir)}), "
            f"got {len(args.train_data_weights)}."
        )
    if args.synthetic_ratio is not None:
        if not args.synthetic_data_dir:
            raise ValueError("`--synthetic_ratio` needs at least one `--synthetic_data_dir`.")
        if not 0.0 <= args.synthetic_ratio <= 1.0:
            raise ValueError(f"`--synthetic_ratio` must be in [0, 1], got {args.synthetic_ratio}.")
    if args.synthetic_ratio_end is not None:
        if args.synthetic_ratio is None:
            raise ValueError("`--synthetic_ratio_end` needs `--synthetic_ratio` (the fraction at the first step).")
        if not 0.0 <= args.synthetic_ratio_end <= 1.0:
            raise ValueError(f"`--synthetic_ratio_end` must be in [0, 1], got {args.synthetic_ratio_end}.")
    if args.max_synthetic_samples is not None:
        if not args.synthetic_data_dir:
            raise ValueError("`--max_synthetic_samples` needs at least one `--synthetic_data_dir`.")
        if args.max_synthetic_samples < 1:
            raise ValueError(f"`--max_synthetic_samples` must be at least 1, got {args.max_synthetic_samples}.")
    if (args.synthetic_filter_model is None) != (args.synthetic_keep_fraction is None):
        raise ValueError(
            "`--synthetic_filter_model` and `--synthetic_keep_fraction` go together, got only "
            f"{'--synthetic_filter_model' if args.synthetic_keep_fraction is None else '--synthetic_keep_fraction'}."
        )
    if args.synthetic_filter_model is not None:
        if not args.synthetic_data_dir:
            raise ValueError("`--synthetic_filter_model` needs at least one `--synthetic_data_dir`.")
        if not 0.0 < args.synthetic_keep_fraction <= 1.0:
            raise ValueError(f"`--synthetic_keep_fraction` must be in (0, 1], got {args.synthetic_keep_fraction}.")
    if len(args.band_weights) != len(args.band_radii):
        raise ValueError(
            f"`--band_weights` ({len(args.band_weights)}) must have one weight per `--band_radii` ({len(args.band_radii)})."
        )
    check_model_args(args)
    check_dataset_placement(args.dataset_placement)
    check_torch_compile_mode(args.torch_compile_mode, args.torch_compile)
    if args.device_data_budget_mb < 0:
        raise ValueError(f"`--device_data_budget_mb` must be >= 0, got {args.device_data_budget_mb}.")
    if args.logging_steps < 1:
        raise ValueError(f"`--logging_steps` must be a positive integer, got {args.logging_steps}.")
    if args.fourier_domain_adaptation:
        if not args.fda_target_dir:
            raise ValueError("`--fourier_domain_adaptation` needs `--fda_target_dir` (unlabeled target images), got none.")
        if not 0.0 <= args.fda_beta <= 1.0:
            raise ValueError(f"`--fda_beta` must be in [0, 1], got {args.fda_beta}.")
    elif args.fda_target_dir or args.fda_on_synthetic:
        raise ValueError("`--fda_target_dir` and `--fda_on_synthetic` are only used with `--fourier_domain_adaptation`.")
    if args.max_train_steps < 1:
        raise ValueError(f"`--max_train_steps` must be positive, got {args.max_train_steps}.")
    if args.checkpointing_steps < 1:
        raise ValueError(f"`--checkpointing_steps` must be positive, got {args.checkpointing_steps}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"`--checkpoints_total_limit` must be at least 1, got {args.checkpoints_total_limit}.")
    if args.class_names is not None and args.classes_json is not None:
        raise ValueError("Give either `--class_names` or `--classes_json`, not both.")
    if args.class_names is not None:
        check_class_names(args)


def check_class_names(args) -> None:
    """One name per class, from `--class_names` or the file of `--classes_json`."""
    if len(args.class_names) != args.num_classes:
        source = f"`--classes_json` {args.classes_json}" if args.classes_json else "`--class_names`"
        raise ValueError(f"Expected {args.num_classes} class names (`--num_classes`), got {len(args.class_names)} from {source}.")


def check_model_args(args) -> None:
    """Raises a `ValueError` for flags that do not fit `--model` (before any data is read).

    Args:
        args (`argparse.Namespace`): Parsed arguments.
    """
    latent = args.model == "latent_diffusion"
    if latent and not args.base_model_name_or_path:
        raise ValueError(
            "`--model latent_diffusion` needs `--base_model_name_or_path` (a diffusers pipeline folder or Hub id), got none."
        )
    if not latent:
        for flag, value, default in (
            ("base_model_name_or_path", args.base_model_name_or_path, None),
            ("unet_feature_blocks", args.unet_feature_blocks, None),
            ("lora_rank", args.lora_rank, 0),
            ("adversarial_weight", args.adversarial_weight, 0.0),
            ("unlabeled_data_dir", args.unlabeled_data_dir, None),
        ):
            if value != default:
                raise ValueError(f"`--{flag}` is only used with `--model latent_diffusion`, but `--model` is {args.model!r}.")
        return
    if args.encoder_weights is not None:
        raise ValueError(
            f"`--encoder_weights` is for `--model smp`; `--model latent_diffusion` reads the frozen base, got "
            f"{args.encoder_weights!r}."
        )
    if args.decoder_channels is not None and len(args.decoder_channels) != 1:
        raise ValueError(
            f"`--decoder_channels` takes one value (the width at latent resolution) with `--model latent_diffusion`, "
            f"got {args.decoder_channels}."
        )
    if args.adversarial_weight < 0:
        raise ValueError(f"`--adversarial_weight` must be >= 0, got {args.adversarial_weight}.")
    if args.adversarial_weight > 0 and not args.unlabeled_data_dir:
        raise ValueError(
            f"`--adversarial_weight` {args.adversarial_weight} needs `--unlabeled_data_dir` (unlabeled target images), got none."
        )
    if args.unlabeled_data_dir and args.adversarial_weight == 0:
        raise ValueError("`--unlabeled_data_dir` is only read for adversarial alignment; set `--adversarial_weight` > 0.")
    if args.lora_rank < 0:
        raise ValueError(f"`--lora_rank` must be >= 0, got {args.lora_rank}.")


def build_model(args):
    """The segmenter chosen with `--model`.

    Args:
        args (`argparse.Namespace`): Parsed arguments.

    Returns:
        [`SegmentationModel`] or [`LatentDiffusionSegmenter`]
    """
    class_names = tuple(args.class_names) if args.class_names else None
    if args.model == "latent_diffusion":
        return LatentDiffusionSegmenter(
            base_model_name_or_path=args.base_model_name_or_path,
            num_classes=args.num_classes,
            ignore_index=args.ignore_index,
            class_names=class_names,
            feature_timestep=args.feature_timestep,
            unet_feature_blocks=tuple(args.unet_feature_blocks) if args.unet_feature_blocks else None,
            decoder_channels=args.decoder_channels[0] if args.decoder_channels else 64,
            dropout=args.dropout,
            lora_rank=args.lora_rank,
            noise_seed=args.seed or 0,
        )
    return create_segmentation_model(
        architecture=args.architecture,
        encoder_name=args.encoder_name,
        num_classes=args.num_classes,
        encoder_weights=args.encoder_weights,
        encoder_depth=args.encoder_depth,
        decoder_channels=tuple(args.decoder_channels) if args.decoder_channels else None,
        in_channels=3,
        dropout=args.dropout,
        ignore_index=args.ignore_index,
        class_names=class_names,
    )


def make_lr_scheduler(optimizer, args, accelerator):
    """The `--lr_scheduler` schedule (with `--lr_warmup_steps`) over `--max_train_steps` for one optimizer.

    Args:
        optimizer (`torch.optim.Optimizer`): The optimizer to schedule.
        args (`argparse.Namespace`): Parsed arguments.
        accelerator (`Accelerator`): For the number of processes (prepared schedulers step once per process).
    """
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )


def method_name(args) -> str:
    """Short name of the training recipe (e.g. `source-only`, `flexseg+synthetic`).

    Args:
        args (`argparse.Namespace`): Parsed arguments.
    """
    parts = []
    if args.ube_weight or args.band_weight or args.proto_weight or args.hardness_sampling:
        parts.append("flexseg" if args.flexseg else "noise-aware")
    if args.photometric_augmentation:
        parts.append("photometric-augmentation")
    if args.fourier_domain_adaptation:
        parts.append("fda")
    if args.synthetic_data_dir:
        parts.append("synthetic")
    if args.adversarial_weight > 0:
        parts.append("adversarial")
    return "+".join(parts) if parts else "source-only"


def build_training_data(args, device="cpu", autocast=contextlib.nullcontext):
    """Opens and checks every source (raises before any training).

    Args:
        args (`argparse.Namespace`): Parsed arguments.
        device (`torch.device`, defaults to `"cpu"`): Where `--synthetic_filter_model` scores the synthetic samples.
        autocast (`Callable`, defaults to `contextlib.nullcontext`): Context of its forward passes.

    Returns:
        `Tuple`: the sources (real first, then synthetic, cut to `--max_synthetic_samples`, then filtered by
        `--synthetic_filter_model`), per-sample base sampling weights of their concatenation (at the first step, and
        at the last with `--synthetic_ratio_end`, else `None`), size of each source,
        and the filter's summary (`None` without a filter).
    """
    real = [
        load_segmentation_data(src, args.num_classes, args.ignore_index, split=args.dataset_split,
                               image_column=args.image_column, label_column=args.label_column,
                               argument=f"--train_data_dir {src}")
        for src in args.train_data_dir
    ]
    synthetic = [
        load_segmentation_data(src, args.num_classes, args.ignore_index, split=args.dataset_split,
                               image_column=args.image_column, label_column=args.label_column,
                               argument=f"--synthetic_data_dir {src}")
        for src in args.synthetic_data_dir
    ]
    if args.max_synthetic_samples is not None:
        synthetic = first_samples(synthetic, args.max_synthetic_samples)
    synthetic_filter = None
    if args.synthetic_filter_model is not None:
        synthetic, synthetic_filter = filter_synthetic(args, synthetic, device, autocast)
    sources = real + synthetic
    lengths = [len(d) for d in sources]
    if args.train_data_weights is not None:
        real_weights = list(args.train_data_weights)
    else:
        real_weights = [float(n) for n in lengths[: len(real)]]
    synthetic_weights = [float(n) for n in lengths[len(real):]]

    def weights_at(ratio):
        if ratio is None:
            return mixture_weights(lengths, real_weights + synthetic_weights)
        # Real sources share (1 - ratio), synthetic sources share ratio, each group split by its own weights.
        real_total, synth_total = sum(real_weights), sum(synthetic_weights)
        return mixture_weights(
            lengths,
            [(1 - ratio) * w / real_total for w in real_weights] + [ratio * w / synth_total for w in synthetic_weights],
        )

    base_weights = weights_at(args.synthetic_ratio)
    final_base_weights = None if args.synthetic_ratio_end is None else weights_at(args.synthetic_ratio_end)
    return sources, base_weights, final_base_weights, lengths, synthetic_filter


def filter_synthetic(args, synthetic, device, autocast):
    """Keeps the `--synthetic_keep_fraction` of the synthetic samples whose labels `--synthetic_filter_model` agrees
    with best (per-image mIoU of its prediction against the label map; one ranking over every source).

    Args:
        args (`argparse.Namespace`): Parsed arguments.
        synthetic (`List[Dataset]`): The synthetic sources.
        device (`torch.device`): Where the filter model runs.
        autocast (`Callable`): Context of its forward passes.

    Returns:
        `Tuple`: the kept sources and a summary (written to `<output_dir>/synthetic_filter.json`).
    """
    model = load_segmenter(args.synthetic_filter_model).to(device).eval()
    if model.config.num_classes != args.num_classes:
        raise ValueError(
            f"`--synthetic_filter_model` {args.synthetic_filter_model!r} predicts {model.config.num_classes} classes, "
            f"but `--num_classes` is {args.num_classes}."
        )
    scores = [
        label_agreement_scores(model, source, args.resolution, args.num_classes, args.ignore_index,
                               batch_size=args.validation_batch_size, autocast=autocast)
        for source in synthetic
    ]
    kept, indices = keep_most_agreeing(synthetic, scores, args.synthetic_keep_fraction)
    del model
    every = torch.cat(scores)
    chosen = torch.zeros(len(every), dtype=torch.bool)
    chosen[indices] = True
    summary = {
        "model": args.synthetic_filter_model,
        "keep_fraction": args.synthetic_keep_fraction,
        "num_scored": len(every),
        "num_kept": int(chosen.sum()),
        "lowest_kept_score": float(every[chosen].nan_to_num(-1.0).min()),
        "mean_score_kept": float(every[chosen].nanmean()),
        "mean_score_dropped": float(every[~chosen].nanmean()) if (~chosen).any() else None,
        "scores": [source_scores.tolist() for source_scores in scores],  # per source, in its sample order
    }
    return kept, summary


def build_fda(args, device):
    """The `--fourier_domain_adaptation` transfer with the amplitude spectra of `--fda_target_dir` (or `None`).

    Args:
        args (`argparse.Namespace`): Parsed arguments.
        device (`torch.device`): Where the spectra live.
    """
    if not args.fourier_domain_adaptation:
        return None
    targets = load_segmentation_data(
        args.fda_target_dir, args.num_classes, args.ignore_index, require_labels=False, split=args.dataset_split,
        image_column=args.image_column, label_column="__none__", argument="--fda_target_dir",
    )
    return FourierDomainAdaptation(
        [targets[i]["image"] for i in range(len(targets))], args.resolution, args.fda_beta, device
    )


@torch.no_grad()
def evaluate(model, batches, args, accelerator):
    """mIoU etc. on a labeled dataset; logits upsampled to the label size, metrics accumulated on the device.

    Args:
        model (`SegmentationModel`): Unwrapped model.
        batches (`Iterable[Dict]`): [`EvaluationImages`] (device placement) or [`StreamedEvaluationBatches`]
            (stream placement): the same batches either way.
        args (`argparse.Namespace`): Parsed arguments.
        accelerator (`Accelerator`): For device and autocast.
    """
    model.eval()
    metrics = SegmentationMetrics(args.num_classes, args.ignore_index, args.class_names)
    for batch in batches:
        with accelerator.autocast():
            logits = model(batch["pixel_values"].to(accelerator.device)).logits.float()
        prediction = resize_probs(logits, batch["original_size"]).argmax(1)
        metrics.update(prediction, batch["labels"])
    model.train()
    return metrics.compute()


def write_model_card(args, repo_id, validation_metrics):
    """Fills `model_cards/segmenter_card.md` and writes it as `<output_dir>/README.md`.

    Args:
        args (`argparse.Namespace`): Parsed arguments.
        repo_id (`str`): Hub repository id (or local name).
        validation_metrics (`dict`, *optional*): Final validation metrics.
    """
    template = MODEL_CARD_TEMPLATE.read_text()
    losses = ["cross-entropy" + (f" + {args.dice_weight} x Dice" if args.dice_weight else "")]
    if args.ube_weight:
        losses.append(f"{args.ube_weight} x uncertainty boundary emphasis (alpha {args.ube_alpha}, beta {args.ube_beta})")
    if args.band_weight:
        losses.append(f"{args.band_weight} x boundary bands (radii {args.band_radii}, weights {args.band_weights})")
    if args.proto_weight:
        losses.append(f"{args.proto_weight} x granular prototype contrast (momentum {args.proto_momentum})")
    if args.hardness_sampling:
        losses.append(f"hardness-aware sampling (max mix {args.hardness_max}, gamma {args.hardness_gamma})")
    if args.adversarial_weight > 0:
        losses.append(
            f"domain-adversarial alignment on `{args.unlabeled_data_dir}` (gradient reversal, DANN ramp-up to "
            f"{args.adversarial_weight})"
        )
    if validation_metrics is not None:
        validation = f"On `{args.validation_data_dir}`:\n\n" + metrics_to_markdown(validation_metrics)
    else:
        validation = "No validation set was given."
    values = {
        "model_name": repo_id.split("/")[-1],
        "repo_id": repo_id,
        "method": method_name(args),
        "method_tag": method_name(args).replace("+", "-"),
        "architecture": args.architecture if args.model == "smp" else "latent_diffusion",
        "encoder_name": args.encoder_name if args.model == "smp" else
        f"frozen VAE + UNet of {args.base_model_name_or_path}, timestep {args.feature_timestep}, LoRA rank {args.lora_rank}",
        "encoder_depth": args.encoder_depth if args.model == "smp" else "-",
        "num_classes": args.num_classes,
        "ignore_index": args.ignore_index,
        "dropout": args.dropout,
        "encoder_init": (args.encoder_weights or "random") if args.model == "smp" else "the frozen diffusion base",
        "train_data": ", ".join(f"`{s}`" for s in args.train_data_dir + args.synthetic_data_dir),
        "losses": "; ".join(losses) + (" + photometric augmentation" if args.photometric_augmentation else ""),
        "max_train_steps": args.max_train_steps,
        "train_batch_size": args.train_batch_size,
        "resolution": args.resolution,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "mixed_precision": args.mixed_precision or "no",
        "validation": validation,
    }
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", str(value))
    write_text_atomic(os.path.join(args.output_dir, "README.md"), template)


def main(args):
    """Trains a segmenter.

    Args:
        args (`argparse.Namespace`): From [`parse_args`].
    """
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator_project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=accelerator_project_config,
    )
    enable_tf32()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if args.seed is not None:
        set_seed(args.seed)

    # Data first: bad input stops here, before a model is built.
    sources, base_weights, final_base_weights, lengths, synthetic_filter = build_training_data(
        args, accelerator.device, accelerator.autocast
    )
    num_real = sum(lengths[: len(args.train_data_dir)])
    nbytes = decoded_nbytes(sources, args.resolution) if args.dataset_placement == "auto" else 0
    placement = choose_dataset_placement(
        args.dataset_placement, nbytes, int(args.device_data_budget_mb * 2**20), accelerator.device
    )
    photometric = PhotometricAugmentation() if args.photometric_augmentation else None
    if placement == "device":
        train_dataset = DeviceSegmentationDataset(
            sources, args.resolution, accelerator.device, photometric=photometric,
            num_workers=args.dataloader_num_workers,
        )
    else:
        transform = SegmentationTransform(args.resolution, train=True, photometric=photometric)
        train_dataset = TransformedDataset(concat_datasets(sources), transform)
    fda = build_fda(args, accelerator.device)
    validation_batches = None
    if args.validation_data_dir is not None:
        validation_data = load_segmentation_data(
            args.validation_data_dir, args.num_classes, args.ignore_index, split=args.dataset_split,
            image_column=args.image_column, label_column=args.label_column, argument="--validation_data_dir",
        )

    unlabeled_dataset = None
    if args.adversarial_weight > 0:
        unlabeled_data = load_segmentation_data(
            args.unlabeled_data_dir, args.num_classes, args.ignore_index, require_labels=False,
            split=args.dataset_split, image_column=args.image_column, label_column="__none__",
            argument="--unlabeled_data_dir",
        )
        # Target images get the geometric training transform only: photometric augmentation would blur the very
        # domain difference the discriminator should see.
        unlabeled_dataset = TransformedDataset(unlabeled_data, SegmentationTransform(args.resolution, train=True))

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if synthetic_filter is not None:
            write_json_atomic(os.path.join(args.output_dir, "synthetic_filter.json"), synthetic_filter)
            dropped = synthetic_filter["mean_score_dropped"]
            logger.info(
                f"Synthetic filter: kept {synthetic_filter['num_kept']} of {synthetic_filter['num_scored']} samples "
                f"(mean label agreement {synthetic_filter['mean_score_kept']:.3f} kept, "
                f"{'-' if dropped is None else f'{dropped:.3f}'} dropped)"
            )

    model = build_model(args)
    if args.resolution % model.output_stride:
        raise ValueError(
            f"`--resolution` must be divisible by the network stride {model.output_stride}, got {args.resolution}."
        )
    if args.validation_data_dir is not None:
        # Validation inputs keep the aspect ratio, rounded to a multiple of the network stride: the rule of
        # evaluate_segmentation.py and compute_uncertainty.py, so the metrics reported here are the ones it gives.
        multiple = model.output_stride
        if placement == "device":
            validation_batches = EvaluationImages(
                validation_data, args.resolution, multiple, accelerator.device, args.validation_batch_size,
                num_workers=args.dataloader_num_workers,
            )
        else:
            validation_batches = StreamedEvaluationBatches(
                DataLoader(
                    TransformedDataset(validation_data, SegmentationTransform(args.resolution, train=False, multiple=multiple)),
                    batch_size=args.validation_batch_size, shuffle=False, collate_fn=list_collate,
                    num_workers=args.dataloader_num_workers,
                ),
                accelerator.device,
            )
    loss_fn = FlexSegLoss(
        args.num_classes,
        args.ignore_index,
        dice_weight=args.dice_weight,
        ube_weight=args.ube_weight,
        ube_alpha=args.ube_alpha,
        ube_beta=args.ube_beta,
        band_weight=args.band_weight,
        band_radii=args.band_radii,
        band_weights=args.band_weights,
        proto_weight=args.proto_weight,
        feature_dim=model.feature_channels,
        proto_momentum=args.proto_momentum,
        proto_temperature=args.proto_temperature,
    ).to(accelerator.device)

    sampler = None
    uniform = len(set(round(w * len(base_weights), 9) for w in base_weights)) == 1
    if args.hardness_sampling or not uniform or final_base_weights is not None:
        # Same seed in every process: each process draws the same sequence, which accelerate shards (or each
        # process slices, on the device). On the device the sampler's state stays there: no host read per step.
        sampler = HardnessAwareSampler(
            base_weights,
            num_draws=len(train_dataset),
            momentum=args.hardness_momentum,
            gamma=args.hardness_gamma,
            max_hardness=args.hardness_max if args.hardness_sampling else 0.0,
            final_base_weights=final_base_weights,
            seed=args.seed or 0,
            device=accelerator.device if placement == "device" else "cpu",
        )
    drop_last = len(train_dataset) >= args.train_batch_size
    channels_last = accelerator.device.type == "cuda" and args.model == "smp"
    model.to(accelerator.device)
    if channels_last:
        # cuDNN's convolutions run fastest on NHWC tensors with mixed precision.
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
        **adamw_fused_kwargs(model.parameters()),
    )
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator)
    if placement == "device":
        train_dataloader = None
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    else:
        train_dataloader = DataLoader(
            train_dataset,
            batch_size=args.train_batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            num_workers=args.dataloader_num_workers,
            drop_last=drop_last,
            pin_memory=accelerator.device.type == "cuda",
        )
        model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            model, optimizer, train_dataloader, lr_scheduler
        )
    if args.torch_compile:
        compile_in_place(accelerator.unwrap_model(model), args.torch_compile_mode)
    discriminator = None
    if unlabeled_dataset is not None:
        # Discriminator, its optimizer and the target loader are prepared too, so checkpoints hold their state.
        discriminator = DomainDiscriminator(
            accelerator.unwrap_model(model).latent_channels, hidden_channels=args.discriminator_channels
        )
        discriminator_optimizer = torch.optim.AdamW(
            discriminator.parameters(), lr=args.discriminator_learning_rate or args.learning_rate,
            weight_decay=args.weight_decay,
        )
        unlabeled_dataloader = DataLoader(
            unlabeled_dataset, batch_size=args.train_batch_size, shuffle=True, num_workers=args.dataloader_num_workers,
            drop_last=len(unlabeled_dataset) >= args.train_batch_size,
        )
        # The discriminator follows the segmenter's schedule (as in DANN, one annealed rate drives both): against a
        # constant discriminator rate, a decaying segmenter rate lets the discriminator win at the end of training.
        discriminator_lr_scheduler = make_lr_scheduler(discriminator_optimizer, args, accelerator)
        discriminator, discriminator_optimizer, discriminator_lr_scheduler, unlabeled_dataloader = accelerator.prepare(
            discriminator, discriminator_optimizer, discriminator_lr_scheduler, unlabeled_dataloader
        )
        unlabeled_batches = cycle(unlabeled_dataloader)
    # Prototype bank and sampler state go into every checkpoint too.
    accelerator.register_for_checkpointing(loss_fn)
    if sampler is not None:
        accelerator.register_for_checkpointing(sampler)

    if accelerator.is_main_process and args.report_to != "none":
        tracker_config = {k: (str(v) if isinstance(v, (list, tuple)) or v is None else v) for k, v in vars(args).items()}
        accelerator.init_trackers("train_segmentation", config=tracker_config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Method = {method_name(args)}")
    logger.info(f"  Num examples = {len(train_dataset)} (sources: {lengths}), dataset placement = {placement}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    if discriminator is not None:
        logger.info(f"  Adversarial alignment on {len(unlabeled_dataset)} unlabeled images, weight {args.adversarial_weight}")

    global_step = load_checkpoint(accelerator, args.resume_from_checkpoint, args.output_dir)

    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    reduce_fn = (lambda t: accelerator.reduce(t, reduction="sum")) if accelerator.num_processes > 1 else None
    validation_metrics = None
    throughput_line = None
    # Device-side random draws: the sample order is the same in every process (each takes its slice), crops, flips,
    # photometric changes and FDA targets differ per process. Seeded with the step too, so a resume draws anew.
    seed = (args.seed or 0) + global_step
    order_generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    augment_generator = torch.Generator(device=accelerator.device).manual_seed(
        seed + 7919 * (accelerator.process_index + 1)
    )
    meter = ThroughputMeter(
        accelerator.device, total_batch_size, warmup_steps=min(10, (args.max_train_steps - global_step) // 2)
    )

    def training_batches():
        """One pass over the training data (the prepared DataLoader or batches made on the device)."""
        if train_dataloader is not None:
            return iter(train_dataloader)
        return train_dataset.batches(
            args.train_batch_size, sampler=sampler, generator=order_generator, augment_generator=augment_generator,
            drop_last=drop_last, num_processes=accelerator.num_processes, process_index=accelerator.process_index,
        )

    model.train()
    # The data is iterated until `max_train_steps` (epochs carry no meaning with random sampling); after a resume,
    # training continues with fresh draws.
    while global_step < args.max_train_steps:
        for batch in training_batches():
            pixel_values = batch["pixel_values"]
            if fda is not None:
                # Real labeled images only, unless --fda_on_synthetic (synthetic samples follow the real ones).
                apply = None if args.fda_on_synthetic else batch["index"] < num_real
                pixel_values = fda(pixel_values, generator=augment_generator, apply=apply)
            if channels_last:
                pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
            mark_step_begin(args.torch_compile_mode)  # (CUDA-graph modes only)
            with accelerator.accumulate(model):
                if discriminator is None:
                    with accelerator.autocast():
                        output = model(pixel_values, return_features=loss_fn.needs_features)
                    terms = loss_fn(output.logits, batch["labels"], output.features, reduce_fn=reduce_fn)
                    loss = terms["loss"]
                else:
                    # Source and target in one forward pass (the decoder's GroupNorm is per sample, so the target
                    # images do not change the source predictions); segmentation loss on the source part,
                    # discriminator loss through gradient reversal on both.
                    target_pixels = next(unlabeled_batches)["pixel_values"]
                    num_source = pixel_values.shape[0]
                    strength = dann_lambda(min(1.0, global_step / args.max_train_steps), args.adversarial_weight)
                    with accelerator.autocast():
                        output = model(torch.cat([pixel_values, target_pixels]),
                                       return_features=loss_fn.needs_features, return_latent_features=True)
                        domain = torch.cat([torch.zeros(num_source), torch.ones(target_pixels.shape[0])])
                        adversarial = domain_adversarial_loss(
                            discriminator, output.latent_features, domain.to(accelerator.device), strength
                        )
                    features = output.features[:num_source] if output.features is not None else None
                    terms = loss_fn(output.logits[:num_source], batch["labels"], features, reduce_fn=reduce_fn)
                    terms["adversarial_loss"] = adversarial["loss"]
                    terms["discriminator_accuracy"] = adversarial["accuracy"]
                    terms["reversal_strength"] = torch.tensor(strength)
                    loss = terms["loss"] + adversarial["loss"]
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                if discriminator is not None:
                    discriminator_optimizer.step()
                    discriminator_lr_scheduler.step()
                    discriminator_optimizer.zero_grad()
            if args.hardness_sampling:  # (the difficulties matter only then)
                indices, losses = accelerator.gather((batch["index"].to(accelerator.device), terms["per_sample"]))
                sampler.update(indices, losses)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            meter.step()
            if global_step == args.max_train_steps and accelerator.is_main_process:
                # Measured before the final checkpoint and validation.
                throughput_line = meter.write(args.output_dir, stage="train_segmentation", dataset_placement=placement)
            progress_bar.update(1)
            if sampler is not None:
                sampler.set_progress(global_step / args.max_train_steps)
            if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                # The only host read of the losses: every --logging_steps steps.
                logs = {k: float(v.detach()) for k, v in terms.items() if k != "per_sample"}
                logs["lr"] = lr_scheduler.get_last_lr()[0]
                if args.hardness_sampling:
                    sampler.check()
                    logs["hardness_mix"] = sampler.hardness_mix
                if args.synthetic_ratio_end is not None:  # the synthetic share of the sampler's base distribution now
                    logs["synthetic_ratio"] = float(sampler.base_probabilities()[num_real:].sum())
                if discriminator is not None:
                    progress_bar.set_postfix(loss=logs["loss"], lr=logs["lr"], disc_acc=logs["discriminator_accuracy"])
                else:
                    progress_bar.set_postfix(loss=logs["loss"], lr=logs["lr"])
                accelerator.log(logs, step=global_step)

            if global_step % args.checkpointing_steps == 0 and accelerator.is_main_process:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)

            if (
                validation_batches is not None
                and accelerator.is_main_process
                and (global_step % args.validation_steps == 0 or global_step == args.max_train_steps)
            ):
                validation_metrics = evaluate(accelerator.unwrap_model(model), validation_batches, args, accelerator)
                accelerator.log(
                    {"val/mIoU": validation_metrics["mIoU"], "val/pixel_accuracy": validation_metrics["pixel_accuracy"]},
                    step=global_step,
                )
                logger.info(f"step {global_step}: validation mIoU {validation_metrics['mIoU']:.4f}")
            if global_step >= args.max_train_steps:
                break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_pretrained_atomic(unwrapped, args.output_dir)
        if validation_metrics is not None:
            write_json_atomic(os.path.join(args.output_dir, "validation_metrics.json"), validation_metrics)
        repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
        write_model_card(args, repo_id, validation_metrics)
        if args.push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = create_repo(repo_id=repo_id, exist_ok=True, token=args.hub_token).repo_id
            write_model_card(args, repo_id, validation_metrics)
            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                ignore_patterns=["step_*", "epoch_*", "checkpoint-*", ".tmp-*", args.logging_dir + "/*"],
                token=args.hub_token,
            )
        if validation_metrics is not None:
            accelerator.print(f"final validation mIoU {validation_metrics['mIoU']:.4f}")
        if throughput_line is not None:
            accelerator.print(throughput_line)
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
