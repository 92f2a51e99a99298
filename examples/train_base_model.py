#!/usr/bin/env python
# coding=utf-8
# Licensed under the Apache License, Version 2.0.
"""Train a small Stable Diffusion-architecture base model from scratch (or fine-tune one) on unlabeled images.

For domains far from what Stable Diffusion saw (OCT, histology) and for machines that cannot download a base model.
Two stages on the images of all given folders/datasets (labels are not used):

1. an `AutoencoderKL`: reconstruction (L1 or MSE) + a small KL weight; its latent `scaling_factor` is then set to
   1 / std of the latents, as Stable Diffusion's was;
2. a `UNet2DConditionModel` with the VAE frozen: epsilon prediction on DDPM noise (Stable Diffusion's schedule),
   following diffusers' `examples/text_to_image/train_text_to_image.py`, conditioned through a small
   `CLIPTextModel` on `--default_prompt` or captions. The text encoder stays frozen at its random initialisation
   unless `--train_text_encoder` (a frozen random encoder still maps different captions to different, fixed
   embeddings, which the UNet's cross-attention learns to read).

The output is a normal `StableDiffusionPipeline` folder (no safety checker, DDIM scheduler) for every script's
`--pretrained_model_name_or_path`:

    accelerate launch examples/train_base_model.py \
        --train_data_dir oct/source/train oct/target/train --resolution 64 \
        --vae_train_steps 1500 --unet_train_steps 3000 --output_dir oct-base

`--pretrained_model_name_or_path` fine-tunes an existing base instead (its size flags are then ignored);
`--skip_vae_training` keeps its VAE. See `docs/base_model.md`.
"""

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

import diffusers
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.utils import make_image_grid

from diffusers_uncertainty.atomic import save_image_atomic, save_pretrained_atomic, write_json_atomic
from diffusers_uncertainty.base_model import (
    BaseModelTrainingDataset,
    build_inference_scheduler,
    build_noise_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    collate_images,
    latent_scaling_factor,
    reconstruction_error,
    vae_loss,
)
from diffusers_uncertainty.training import (
    DatasetRecords,
    load_image,
    select_records,
    unlabeled_folder_records,
    validate_records,
)
from diffusers_uncertainty.training.checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint
from diffusers_uncertainty.training.latent_cache import (
    DATASET_PLACEMENTS,
    DeviceBatchSampler,
    LatentCache,
    PromptEmbeddingCache,
    check_dataset_placement,
    choose_dataset_placement,
    estimate_cache_bytes,
    record_captions,
    sample_latents,
)
from diffusers_uncertainty.training.performance import (
    ThroughputMeter,
    adamw_fused_kwargs,
    check_torch_compile_mode,
    compile_in_place,
    enable_tf32,
    mark_step_begin,
)


logger = get_logger(__name__)

STATE_FILE = "base_model_state.json"
SUMMARY_FILE = "training_summary.json"


# ------------------------------------------------------------------------------------------------ helpers
class VAETrainingModule(torch.nn.Module):
    """Wraps the VAE so that Accelerate (DDP, autocast) sees one `forward` computing the whole VAE loss."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float, reconstruction_loss: str):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.reconstruction_loss = reconstruction_loss

    def forward(self, pixel_values: torch.Tensor):
        return vae_loss(self.vae, pixel_values, self.kl_weight, self.reconstruction_loss)


def loss_summary(losses: list[float], window: int = 10) -> dict:
    """First and last loss and the means of the first/last `window` steps of a stage."""
    if not losses:
        return {"steps": 0}
    window = min(window, len(losses))
    return {
        "steps": len(losses),
        "first": losses[0],
        "last": losses[-1],
        f"mean_first_{window}": sum(losses[:window]) / window,
        f"mean_last_{window}": sum(losses[-window:]) / window,
    }


def build_parser():
    """The command line's flags, with their types, defaults and choices (`check_args` adds the checks across
    them, `parse_args` those on files). The workflow checks its stages' flags with both this parser and `check_args`
    before running any stage."""
    parser = argparse.ArgumentParser(description="Train a small Stable Diffusion-architecture base model.")
    # Model
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Fine-tune this base (a diffusers Stable Diffusion folder or Hub id) instead of building one; the size"
        " flags are then ignored.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    parser.add_argument("--skip_vae_training", action="store_true", help="Keep the pretrained VAE as it is.")
    parser.add_argument(
        "--vae_block_out_channels",
        type=int,
        nargs="+",
        default=[32, 64, 128, 128],
        help="VAE channels per level; n levels downsample by 2**(n-1) (4 levels = Stable Diffusion's factor 8).",
    )
    parser.add_argument("--vae_layers_per_block", type=int, default=1, help="VAE ResNet layers per level.")
    parser.add_argument("--latent_channels", type=int, default=4, help="VAE latent channels (Stable Diffusion: 4).")
    parser.add_argument(
        "--unet_block_out_channels",
        type=int,
        nargs="+",
        default=[64, 128, 128],
        help="UNet channels per level (cross-attention on all but the lowest, as in Stable Diffusion).",
    )
    parser.add_argument("--unet_layers_per_block", type=int, default=1, help="UNet layers per level.")
    parser.add_argument(
        "--unet_attention_head_dim",
        type=int,
        default=8,
        help="Stable Diffusion 1.x's `attention_head_dim` (the number of heads); must divide the UNet channels.",
    )
    parser.add_argument(
        "--cross_attention_dim", type=int, default=64, help="Text embedding width (= the text encoder's width)."
    )
    parser.add_argument("--text_encoder_layers", type=int, default=2, help="Transformer layers of the text encoder.")
    parser.add_argument("--text_encoder_heads", type=int, default=4, help="Attention heads of the text encoder.")
    parser.add_argument(
        "--tokenizer_max_length",
        type=int,
        default=32,
        help="Prompt length in tokens of the new byte-level tokenizer (one token per byte, plus start and end).",
    )
    parser.add_argument("--norm_num_groups", type=int, default=8, help="GroupNorm groups of the VAE and the UNet.")
    parser.add_argument("--train_text_encoder", action="store_true", help="Train the text encoder with the UNet.")
    parser.add_argument("--output_dir", type=str, default="base-model", help="Where the pipeline folder goes.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets go.")
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")

    # Data
    parser.add_argument(
        "--train_data_dir",
        type=str,
        nargs="+",
        default=None,
        help="One or more folders of images: each an `images/` folder's parent or a folder of images (recursive);"
        " optional captions in <folder>/captions/<stem>.txt. Labels are not used.",
    )
    parser.add_argument("--dataset_name", type=str, default=None, help="A `datasets` dataset (Hub id or local path).")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The config of the dataset.")
    parser.add_argument("--dataset_split", type=str, default="train", help="The split of --dataset_name.")
    parser.add_argument("--image_column", type=str, default="image", help="Dataset column of the images.")
    parser.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="Dataset column of captions (a string or a list of strings). Without one, --default_prompt is used.",
    )
    parser.add_argument("--default_prompt", type=str, default="", help="Caption of images without one.")
    parser.add_argument(
        "--resolution",
        type=int,
        default=64,
        help="Training resolution (divisible by 8): the shorter side is resized to it, then a square crop.",
    )
    parser.add_argument("--center_crop", action="store_true", help="Centre crop instead of random crop.")
    parser.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Keep at most this many images.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses (stream).")
    parser.add_argument(
        "--dataset_placement",
        type=str,
        default="auto",
        metavar="{" + ",".join(DATASET_PLACEMENTS) + "}",
        help="Data of the UNet stage. stream: the DataLoader decodes and crops the images and the VAE and the text"
        " encoder run every step. device: once the VAE is frozen, every image is encoded once (both flips) and the"
        " latents stay on the device, cropped there; each prompt is encoded once. auto: device when that cache"
        " takes at most a quarter of the device's memory. The VAE stage always reads the DataLoader.",
    )

    # Optimisation
    parser.add_argument("--vae_train_steps", type=int, default=1000, help="Optimisation steps of the VAE stage.")
    parser.add_argument("--unet_train_steps", type=int, default=2000, help="Optimisation steps of the UNet stage.")
    parser.add_argument("--train_batch_size", type=int, default=16, help="Batch size (per device).")
    parser.add_argument("--learning_rate", type=float, default=2e-4, help="Learning rate of the UNet stage.")
    parser.add_argument(
        "--vae_learning_rate", type=float, default=None, help="Learning rate of the VAE stage (default: --learning_rate)."
    )
    parser.add_argument(
        "--vae_reconstruction_loss", type=str, default="l1", choices=["l1", "mse"], help="VAE reconstruction term."
    )
    parser.add_argument("--vae_kl_weight", type=float, default=1e-6, help="Weight of the VAE's KL term.")
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='One of ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"].',
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of each stage.")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--max_grad_norm", default=1.0, type=float)
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the UNet (in place).")
    parser.add_argument(
        "--torch_compile_mode", type=str, default="default",
        help="torch.compile mode with --torch_compile: default, reduce-overhead (CUDA graphs: for steps bound by kernel"
        " launches), max-autotune, max-autotune-no-cudagraphs.",
    )
    parser.add_argument("--channels_last", action="store_true", help="Keep the UNet in channels_last memory format.")
    parser.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Log the losses every X steps (all per-step losses are kept): the only times the loop waits for the"
        " device.",
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Defaults to the accelerate config or the `accelerate launch` flag.",
    )
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save the training state (`checkpoint-{step}`, steps counted over both stages) every X steps.",
    )
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints to store.")
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='Resume from a checkpoint folder saved by --checkpointing_steps, or "latest".',
    )

    # Logging and samples
    parser.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard log directory (in output_dir).")
    parser.add_argument(
        "--report_to", type=str, default="tensorboard", help='"tensorboard" (default), "wandb", "comet_ml" or "all".'
    )
    parser.add_argument("--tracker_project_name", type=str, default="train_base_model")
    parser.add_argument(
        "--num_validation_images",
        type=int,
        default=4,
        help="Images generated at the end into output_dir/samples.png (0: none).",
    )
    parser.add_argument("--validation_prompt", type=str, default=None, help="Prompt of the samples (default_prompt).")
    parser.add_argument("--num_inference_steps", type=int, default=25, help="Denoising steps of the samples.")
    return parser


def parse_args(input_args=None):
    parser = build_parser()
    args = parser.parse_args(input_args)
    check_args(args)
    resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)  # a named checkpoint must exist
    return args


def check_args(args) -> None:
    """Every check across flags that reads no file, so that a bad command stops at once (the workflow runs it on
    every stage's flags before the first stage).

    Args:
        args (`argparse.Namespace`): From `build_parser().parse_args(...)`.
    """
    if args.resolution <= 0 or args.resolution % 8 != 0:
        raise ValueError(f"`--resolution` must be a positive multiple of 8, but got {args.resolution}.")
    if args.train_data_dir is None and args.dataset_name is None:
        raise ValueError("Training needs images: specify `--train_data_dir` (one or more folders) or `--dataset_name`.")
    if args.train_data_dir is not None and args.dataset_name is not None:
        raise ValueError("Specify only one of `--train_data_dir` or `--dataset_name`, but got both.")
    check_dataset_placement(args.dataset_placement)
    check_torch_compile_mode(args.torch_compile_mode, args.torch_compile)
    for name in ("train_batch_size", "checkpointing_steps", "num_inference_steps", "tokenizer_max_length", "logging_steps",
                 "text_encoder_layers", "text_encoder_heads", "norm_num_groups", "vae_layers_per_block",
                 "unet_layers_per_block", "unet_attention_head_dim", "latent_channels", "cross_attention_dim"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be a positive integer, but got {getattr(args, name)}.")
    for name in ("vae_train_steps", "unet_train_steps", "num_validation_images", "lr_warmup_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"`--{name}` must be a non-negative integer, but got {getattr(args, name)}.")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise ValueError(f"`--max_train_samples` must be a positive integer, but got {args.max_train_samples}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"`--checkpoints_total_limit` must be at least 1, but got {args.checkpoints_total_limit}.")
    if args.learning_rate <= 0 or (args.vae_learning_rate is not None and args.vae_learning_rate <= 0):
        raise ValueError(
            f"`--learning_rate` and `--vae_learning_rate` must be positive, but got {args.learning_rate} and "
            f"{args.vae_learning_rate}."
        )
    if args.vae_kl_weight < 0:
        raise ValueError(f"`--vae_kl_weight` must be non-negative, but got {args.vae_kl_weight}.")
    if args.pretrained_model_name_or_path is None:
        if args.skip_vae_training:
            raise ValueError("`--skip_vae_training` keeps a pretrained VAE: it needs `--pretrained_model_name_or_path`.")
        if args.vae_train_steps < 1:
            raise ValueError(
                f"`--vae_train_steps` must be positive when building a new base model (its VAE starts random), but "
                f"got {args.vae_train_steps}."
            )
        vae_factor = 2 ** (len(args.vae_block_out_channels) - 1)
        unet_factor = 2 ** (len(args.unet_block_out_channels) - 1)
        if args.resolution % (vae_factor * unet_factor) != 0:
            raise ValueError(
                f"`--resolution` must be a multiple of {vae_factor * unet_factor} (the VAE downsamples by {vae_factor},"
                f" the UNet by {unet_factor} more), but got {args.resolution}."
            )
        # The builders check channel counts against groups and heads; run them on the config values now.
        if args.cross_attention_dim % args.text_encoder_heads:
            raise ValueError(
                f"`--cross_attention_dim` must be a multiple of `--text_encoder_heads` ({args.text_encoder_heads}), "
                f"but got {args.cross_attention_dim}."
            )
        for name, multiple in (("vae_block_out_channels", args.norm_num_groups),
                               ("unet_block_out_channels", math.lcm(args.norm_num_groups, args.unet_attention_head_dim))):
            channels = getattr(args, name)
            if any(value < 1 or value % multiple for value in channels):
                raise ValueError(f"`--{name}` must be positive multiples of {multiple}, but got {channels}.")
        if len(args.unet_block_out_channels) < 2:
            raise ValueError(f"`--unet_block_out_channels` must have at least 2 levels, but got {args.unet_block_out_channels}.")


def make_records(args) -> list:
    """The training images of every `--train_data_dir` folder, or of `--dataset_name`; errors name the argument."""
    if args.train_data_dir is not None:
        records = []
        for folder in args.train_data_dir:
            records.extend(unlabeled_folder_records(folder, argument="--train_data_dir"))
    else:
        from datasets import load_dataset

        dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
        if args.dataset_split not in dataset:
            raise ValueError(
                f"`--dataset_split` '{args.dataset_split}' is not a split of {args.dataset_name}: {', '.join(dataset)}."
            )
        records = DatasetRecords(
            dataset[args.dataset_split], args.image_column, caption_column=args.caption_column,
            description=args.dataset_name,
        )
        if len(records) == 0:
            raise ValueError(f"`--dataset_name` {args.dataset_name}: split '{args.dataset_split}' has no rows.")
    return select_records(records, args.max_train_samples, args.seed)


def load_or_build_models(args):
    """(tokenizer, text_encoder, vae, unet, noise_scheduler, built): loaded from the pretrained base or new."""
    if args.pretrained_model_name_or_path:
        path, kwargs = args.pretrained_model_name_or_path, {"revision": args.revision, "cache_dir": args.cache_dir}
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, **kwargs)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **kwargs)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **kwargs)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kwargs)
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
        if args.resolution % (vae_factor * unet_factor) != 0:
            raise ValueError(
                f"`--resolution` must be a multiple of {vae_factor * unet_factor} for the model of "
                f"`--pretrained_model_name_or_path` (VAE factor {vae_factor}, UNet factor {unet_factor}), but got "
                f"{args.resolution}."
            )
        return tokenizer, text_encoder, vae, unet, noise_scheduler, False

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(folder, model_max_length=args.tokenizer_max_length)
    text_encoder = build_text_encoder(
        tokenizer, args.cross_attention_dim, args.text_encoder_layers, args.text_encoder_heads
    )
    vae = build_vae(
        args.vae_block_out_channels, args.latent_channels, args.vae_layers_per_block, args.norm_num_groups,
        sample_size=args.resolution,
    )
    vae_factor = 2 ** (len(args.vae_block_out_channels) - 1)
    unet = build_unet(
        args.unet_block_out_channels, args.cross_attention_dim, args.latent_channels, args.unet_layers_per_block,
        args.unet_attention_head_dim, args.norm_num_groups, sample_size=args.resolution // vae_factor,
    )
    return tokenizer, text_encoder, vae, unet, build_noise_scheduler(), True


# ------------------------------------------------------------------------------------------------- main
def main(args):
    start_time = time.time()
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        # A seedable sampler: the shuffle of each epoch depends on (seed, epoch) only, so resuming reproduces it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if args.seed is not None:
        set_seed(args.seed)

    # Data first: a missing or empty folder or an unreadable image stops the run before any model is built.
    records = make_records(args)
    validate_records(
        records, num_classes=1, ignore_index=None, need_labels=False, need_uncertainty=False,
        description="training images", show_progress=accelerator.is_local_main_process,
    )
    tokenizer, text_encoder, vae, unet, noise_scheduler, built = load_or_build_models(args)
    enable_tf32()
    train_vae = not args.skip_vae_training and args.vae_train_steps > 0
    vae_steps = args.vae_train_steps if train_vae else 0
    total_steps = vae_steps + args.unet_train_steps
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # The loader draws its shuffles and worker seeds from its own generator, and the crops depend on (seed, epoch,
    # index) only, never on the global RNGs that the noise comes from (or on accelerate's one-batch prefetch): a run
    # resumed mid-epoch then replays exactly the random numbers of an uninterrupted one.
    data_seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    train_dataset = BaseModelTrainingDataset(
        records, args.resolution, tokenizer, args.default_prompt, args.center_crop, args.random_flip, seed=data_seed
    )
    loader_generator = torch.Generator().manual_seed(data_seed)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, shuffle=True, collate_fn=collate_images, batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers, drop_last=len(train_dataset) >= args.train_batch_size,
        generator=loader_generator,
    )
    # Where the UNet stage's data lives (see --dataset_placement): the latent cache's size decides `auto`.
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    estimated_bytes = estimate_cache_bytes(
        len(records), load_image(records[0]["image"], records[0]["name"]).size, args.resolution, vae_factor,
        vae.config.latent_channels, args.random_flip, labels=False, uncertainty=False,
    )
    placement = choose_dataset_placement(args.dataset_placement, estimated_bytes, accelerator.device)

    # A few fixed images (centre crops) to measure the VAE's reconstruction error before and after training.
    scale_dataset = BaseModelTrainingDataset(records, args.resolution, tokenizer, center_crop=True)
    probe_indices = sorted({round(i) for i in np.linspace(0, len(scale_dataset) - 1, min(8, len(scale_dataset)))})
    probe = torch.stack([scale_dataset[index]["pixel_values"] for index in probe_indices])  # spread over all folders

    # Train state: the stage losses and the latent scaling factor travel with the checkpoints.
    state = {"vae_losses": [], "unet_losses": [], "scaling_factor": vae.config.scaling_factor,
             "reconstruction_error_before": None}

    # Saving & loading hooks so that `accelerator.save_state(...)` writes diffusers folders (as in diffusers'
    # train_text_to_image.py): checkpoint-{step}/{vae,unet,text_encoder}/ plus the stage state.
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                model = accelerator.unwrap_model(model)
                if isinstance(model, VAETrainingModule):
                    model.vae.save_pretrained(os.path.join(output_dir, "vae"))
                elif isinstance(model, UNet2DConditionModel):
                    model.save_pretrained(os.path.join(output_dir, "unet"))
                elif isinstance(model, CLIPTextModel):
                    model.save_pretrained(os.path.join(output_dir, "text_encoder"))
            while weights:
                weights.pop()  # make sure accelerate does not save the models again
            write_json_atomic(os.path.join(output_dir, STATE_FILE), state)

    def load_model_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())  # pop so that it is not loaded again
            if isinstance(model, VAETrainingModule):
                model.vae.load_state_dict(AutoencoderKL.from_pretrained(input_dir, subfolder="vae").state_dict())
            elif isinstance(model, UNet2DConditionModel):
                model.load_state_dict(UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet").state_dict())
            elif isinstance(model, CLIPTextModel):
                model.load_state_dict(CLIPTextModel.from_pretrained(input_dir, subfolder="text_encoder").state_dict())
        with open(os.path.join(input_dir, STATE_FILE), encoding="utf-8") as handle:
            state.update(json.load(handle))

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    def make_optimizer(parameters, learning_rate, steps):
        parameters = list(parameters)
        optimizer = torch.optim.AdamW(
            parameters, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **adamw_fused_kwargs(parameters),
        )
        lr_scheduler = get_scheduler(
            args.lr_scheduler, optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=max(1, steps) * accelerator.num_processes,
        )
        return optimizer, lr_scheduler

    vae.requires_grad_(train_vae)
    unet.requires_grad_(True)
    text_encoder.requires_grad_(args.train_text_encoder)
    for name, model in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        if model.dtype != torch.float32:
            raise ValueError(
                f"The {name} was loaded as {model.dtype}; trainable weights must be float32 (mixed precision is set "
                "with `--mixed_precision`)."
            )

    # On the device before the optimizers are built, so that AdamW can be the fused one.
    for model in (vae, unet, text_encoder):
        model.to(accelerator.device)
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)

    # Everything trained goes through `prepare` once, so a checkpoint holds both stages.
    vae_module = VAETrainingModule(vae, args.vae_kl_weight, args.vae_reconstruction_loss)
    unet_parameters = list(unet.parameters()) + (list(text_encoder.parameters()) if args.train_text_encoder else [])
    unet_optimizer, unet_lr_scheduler = make_optimizer(unet_parameters, args.learning_rate, args.unet_train_steps)
    unet, unet_optimizer, unet_lr_scheduler, train_dataloader = accelerator.prepare(
        unet, unet_optimizer, unet_lr_scheduler, train_dataloader
    )
    if args.train_text_encoder:
        text_encoder = accelerator.prepare(text_encoder)
    if train_vae:
        vae_optimizer, vae_lr_scheduler = make_optimizer(
            vae.parameters(), args.vae_learning_rate or args.learning_rate, vae_steps
        )
        vae_module, vae_optimizer, vae_lr_scheduler = accelerator.prepare(vae_module, vae_optimizer, vae_lr_scheduler)

    weight_dtype = torch.float32
    if accelerator.mixed_precision == "fp16":
        weight_dtype = torch.float16
    elif accelerator.mixed_precision == "bf16":
        weight_dtype = torch.bfloat16
    if not args.train_text_encoder:
        text_encoder.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device)  # trained in fp32 (autocast does the mixed precision); cast once frozen
    if args.torch_compile:
        compile_in_place(accelerator.unwrap_model(unet), args.torch_compile_mode)

    if accelerator.is_main_process:
        tracker_config = {
            key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in vars(args).items()
        }
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)

    logger.info("***** Running training *****")
    logger.info(f"  Base model = {args.pretrained_model_name_or_path or 'new (built from the size flags)'}")
    logger.info(f"  Num images = {len(train_dataset)}; batches each epoch = {len(train_dataloader)}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  VAE steps = {vae_steps}; UNet steps = {args.unet_train_steps}")
    logger.info(f"  Dataset placement of the UNet stage = {placement} (--dataset_placement {args.dataset_placement}; "
                f"latent cache ~{estimated_bytes / 2**20:.1f} MiB)")
    logger.info(f"  Parameters: VAE {sum(p.numel() for p in vae.parameters()):,}, "
                f"UNet {sum(p.numel() for p in accelerator.unwrap_model(unet).parameters()):,}, "
                f"text encoder {sum(p.numel() for p in accelerator.unwrap_model(text_encoder).parameters()):,}")

    global_step = load_checkpoint(accelerator, args.resume_from_checkpoint, args.output_dir)

    def batches(start_batch: int):
        """Batches forever, epoch after epoch, starting after `start_batch` batches (resuming mid-epoch)."""
        epoch, skip = divmod(start_batch, len(train_dataloader))
        while True:
            train_dataloader.set_epoch(epoch)
            train_dataset.set_epoch(epoch)
            loader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
            yield from loader
            epoch, skip = epoch + 1, 0

    progress_bar = tqdm(
        range(total_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    batch_iterator = batches(global_step)

    # Per-step losses stay on the device until a logging or checkpointing step (no host sync in between); all of
    # them reach `state` (the summary keeps every step's loss) and the trackers.
    pending = []
    samples_per_step = args.train_batch_size * accelerator.num_processes
    vae_meter, unet_meter = ThroughputMeter(accelerator.device, samples_per_step), ThroughputMeter(
        accelerator.device, samples_per_step
    )
    vae_throughput = None

    def flush_losses(stage: str, lr: float, force: bool = False) -> None:
        """Move the pending losses of `stage` into `state` and the trackers (a collective: every process calls it)."""
        if not pending or not (force or global_step % args.logging_steps == 0 or global_step % args.checkpointing_steps == 0):
            return
        names = list(pending[0])
        stacked = torch.stack([torch.stack([entry[name].float() for name in names]) for entry in pending])
        values = accelerator.gather(stacked[None]).mean(0).tolist()  # (processes, steps, names) -> per step
        first_step = global_step - len(pending) + 1
        for offset, row in enumerate(values):
            logs = {f"{stage}_{name}": value for name, value in zip(names, row)}
            accelerator.log(logs, step=first_step + offset)
        state[f"{stage}_losses"].extend(row[0] for row in values)
        pending.clear()
        progress_bar.set_postfix(**logs, lr=lr)
        accelerator.log({"lr": lr}, step=global_step)

    # ---- Stage 1: the VAE
    if train_vae and global_step < vae_steps:
        if state["reconstruction_error_before"] is None:
            state["reconstruction_error_before"] = reconstruction_error(vae, probe)
        vae_module.train()
        while global_step < vae_steps:
            batch = next(batch_iterator)
            loss, parts = vae_module(batch["pixel_values"])
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(vae.parameters(), args.max_grad_norm)
            vae_optimizer.step()
            vae_lr_scheduler.step()
            vae_optimizer.zero_grad()
            global_step += 1
            vae_meter.step()
            pending.append({"loss": loss.detach(), **parts})
            progress_bar.update(1)
            flush_losses("vae", vae_lr_scheduler.get_last_lr()[0], force=global_step == vae_steps)

            if global_step == vae_steps and built:
                # Stable Diffusion's latent scale: 1 / std of the latents, measured once the VAE is trained.
                # Measured on up to 64 centre crops (not on the training stream, which resuming replays).
                vae.eval()
                images = [scale_dataset[index]["pixel_values"] for index in range(min(64, len(scale_dataset)))]
                chunks = [torch.stack(images[start : start + 16]) for start in range(0, len(images), 16)]
                state["scaling_factor"] = latent_scaling_factor(vae, chunks)
                vae_module.train()
            if accelerator.is_main_process and global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            accelerator.wait_for_everyone()
        vae_throughput = vae_meter.result()  # now, before the UNet stage's time counts
        accelerator.print(
            f"VAE stage done: {vae_steps} steps, loss {loss_summary(state['vae_losses'])}, "
            f"scaling_factor {state['scaling_factor']:.4f}"
        )
    if train_vae:
        state["reconstruction_error_after"] = reconstruction_error(vae, probe)
        accelerator.print(
            f"VAE reconstruction error (mean |x - D(E(x))| in [-1, 1] units) on {len(probe)} images: "
            f"{state['reconstruction_error_before']:.4f} before, {state['reconstruction_error_after']:.4f} after"
        )
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    vae.requires_grad_(False)
    vae.eval()
    if weight_dtype != torch.float32:
        vae.to(accelerator.device, dtype=weight_dtype)

    # ---- Stage 2: the UNet (as diffusers' train_text_to_image.py: epsilon/v target on DDPM-noised latents)
    if placement == "device" and global_step < total_steps:
        # The VAE is frozen from here on: encode every image once (both flips with --random_flip), in the VAE's
        # dtype as the streaming path does, and every distinct prompt once (see latent_cache for what is exact).
        prompts = [args.default_prompt] + [
            caption for record in records for caption in record_captions(record, args.default_prompt)
        ]
        prompt_cache = PromptEmbeddingCache(
            accelerator.unwrap_model(text_encoder), tokenizer, prompts, encode=not args.train_text_encoder
        )
        latent_cache = LatentCache.from_records(
            vae, records, args.resolution, prompt_cache, default_prompt=args.default_prompt,
            random_flip=args.random_flip, center_crop=args.center_crop,
            show_progress=accelerator.is_local_main_process,
        )
        # Batches depend on (seed, epoch, batch, process) only: a resumed run draws the same ones.
        cache_sampler = DeviceBatchSampler(
            len(latent_cache), args.train_batch_size, accelerator.device, data_seed,
            drop_last=len(latent_cache) >= args.train_batch_size, num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
        )
        logger.info(f"  Latent cache = {latent_cache.nbytes() / 2**20:.1f} MiB on {latent_cache.device}, "
                    f"{len(prompt_cache.prompts)} distinct prompt(s), {len(cache_sampler)} batches per epoch")
    unet.train()
    if args.train_text_encoder:
        text_encoder.train()
    while global_step < total_steps:
        if placement == "device":
            epoch, index = divmod(global_step - vae_steps, len(cache_sampler))
            generator = cache_sampler.generator("batch", epoch, index, accelerator.process_index)
            batch = latent_cache.batch(cache_sampler.indices(epoch, index), generator)
        else:
            batch = next(batch_iterator)
        mark_step_begin(args.torch_compile_mode)  # (CUDA-graph modes only)
        with torch.no_grad():
            latents = sample_latents(vae, batch, weight_dtype)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        ).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        if "prompt_ids" not in batch:
            with torch.set_grad_enabled(args.train_text_encoder):
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
        elif args.train_text_encoder:
            encoder_hidden_states = text_encoder(prompt_cache.input_ids[batch["prompt_ids"]], return_dict=False)[0]
        else:
            encoder_hidden_states = prompt_cache(batch["prompt_ids"])
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(unet_parameters, args.max_grad_norm)
        unet_optimizer.step()
        unet_lr_scheduler.step()
        unet_optimizer.zero_grad()
        global_step += 1
        unet_meter.step()
        pending.append({"loss": loss.detach()})
        progress_bar.update(1)
        flush_losses("unet", unet_lr_scheduler.get_last_lr()[0], force=global_step == total_steps)
        if accelerator.is_main_process and global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
        accelerator.wait_for_everyone()
    if args.unet_train_steps:
        accelerator.print(f"UNet stage done: {args.unet_train_steps} steps, loss {loss_summary(state['unet_losses'])}")

    # ---- Save the pipeline (fp32) atomically, a summary and a few samples.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
        for model in (unet, text_encoder, vae):  # the pipeline is saved in fp32
            if model.dtype != torch.float32:
                model.to(torch.float32)
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=build_inference_scheduler(noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        save_pretrained_atomic(pipeline, args.output_dir)
        logger.info(f"Saved the StableDiffusionPipeline to {args.output_dir}")

        summary = {
            "vae": {**loss_summary(state["vae_losses"]), "trained": train_vae,
                    "reconstruction_error_before": state["reconstruction_error_before"],
                    "reconstruction_error_after": state.get("reconstruction_error_after"),
                    "scaling_factor": state["scaling_factor"]},
            "unet": loss_summary(state["unet_losses"]),
            "vae_losses": state["vae_losses"],
            "unet_losses": state["unet_losses"],
            "num_images": len(train_dataset),
            "dataset_placement": placement,
            "seconds": round(time.time() - start_time, 1),
            "args": {key: value if isinstance(value, (int, float, str, bool, list, type(None))) else str(value)
                     for key, value in vars(args).items()},
        }
        write_json_atomic(os.path.join(args.output_dir, SUMMARY_FILE), summary)
        # Steady-state throughput: the UNet stage's record, the VAE stage's as the `vae_stage` key.
        if vae_throughput is not None:
            accelerator.print(f"VAE stage throughput: {vae_throughput['steps_per_second']:.2f} it/s")
        accelerator.print(
            "UNet stage: " + unet_meter.write(args.output_dir, stage="unet", dataset_placement=placement,
                                              vae_stage=vae_throughput)
        )

        if args.num_validation_images > 0:
            pipeline.to(accelerator.device)
            pipeline.set_progress_bar_config(disable=True)
            generator = torch.Generator(device=accelerator.device).manual_seed(args.seed or 0)
            prompt = args.validation_prompt if args.validation_prompt is not None else args.default_prompt
            images = pipeline(
                [prompt] * args.num_validation_images, height=args.resolution, width=args.resolution,
                num_inference_steps=args.num_inference_steps, guidance_scale=1.0, generator=generator,
            ).images
            columns = min(4, len(images))
            rows = math.ceil(len(images) / columns)
            images += [PIL.Image.new("RGB", images[0].size)] * (rows * columns - len(images))  # pad the last row
            grid = make_image_grid(images, rows=rows, cols=columns)
            save_image_atomic(os.path.join(args.output_dir, "samples.png"), grid)
        accelerator.print(f"Done in {time.time() - start_time:.1f} s; pipeline in {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
