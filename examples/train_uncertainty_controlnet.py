#!/usr/bin/env python
# coding=utf-8
# Licensed under the Apache License, Version 2.0.
"""Train the dual-control (semantic + uncertainty) ControlNet of UnIACorN on a frozen Stable Diffusion.

Run it like diffusers' `examples/controlnet/train_controlnet.py`, which this script follows step by step
(argument names, Accelerate set-up, `checkpoint-{step}` folders written by `accelerator.save_state` with save/load
hooks, tracker logging, Hub upload); the differences are the two branches, the labeled/unlabeled data and the
uncertainty maps:

    accelerate launch examples/train_uncertainty_controlnet.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_branch joint --train_data_dir data/source/train --unlabeled_data_dir data/target/train \
        --uncertainty_dir maps/ --num_classes 11 --ignore_index 11 --resolution 512 --output_dir out

`--train_style_encoder` also trains a `StyleEncoderModel` (Style-Extracting Diffusion Models) jointly with the
control: each sample gets `--style_images_per_sample` images of its own domain as style images, whose style tokens
join the text embeddings in the cross-attention of the UNet and the controls; it is saved to
`<output_dir>/style_encoder/`.

See `docs/training.md` for every flag.
"""

import argparse
import contextlib
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from datasets import load_dataset
from huggingface_hub import create_repo, upload_folder
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPTextModel

import diffusers
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel, UniPCMultistepScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from diffusers.utils import is_wandb_available, make_image_grid
from diffusers.utils.import_utils import is_xformers_available

from diffusers_uncertainty import StableDiffusionDualControlPipeline, StyleEncoderModel, UncertaintyControlNetModel
from diffusers_uncertainty.models.style_aggregation import AGGREGATIONS
from diffusers_uncertainty.models.style_encoder import CONDITIONING_MODES, combine_text_and_style
from diffusers_uncertainty.atomic import save_image_atomic, save_pretrained_atomic
from diffusers_uncertainty.training import (
    ControlNetTrainingDataset,
    DatasetRecords,
    PairedTransform,
    attach_uncertainty_maps,
    check_label_values,
    collate_fn,
    colorize_label_map,
    labeled_folder_records,
    load_image,
    load_label,
    select_records,
    unlabeled_folder_records,
    validate_records,
    write_model_card,
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


if is_wandb_available():
    import wandb

logger = get_logger(__name__)

DEFAULT_MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "controlnet_card.md"


# ------------------------------------------------------------------------------------------------ helpers
def branch_modules(controlnet: UncertaintyControlNetModel, train_branch: str) -> list[torch.nn.Module]:
    r"""
    The submodules trained in `train_branch` mode.

    Separate branches: `semantic` trains `semantic_controlnet`, `uncertainty` trains `uncertainty_controlnet`, `joint`
    trains both. Shared trunk: the trunk belongs to both conditions, so `semantic` trains trunk + semantic embedding,
    `uncertainty` trunk + uncertainty embedding, `joint` all three.

    Args:
        controlnet (`UncertaintyControlNetModel`):
            The model.
        train_branch (`str`):
            `"semantic"`, `"uncertainty"` or `"joint"`.
    """
    if controlnet.config.shared_trunk:
        semantic = [controlnet.trunk, controlnet.semantic_embedding]
        uncertainty = [controlnet.trunk, controlnet.uncertainty_embedding]
        joint = [controlnet.trunk, controlnet.semantic_embedding, controlnet.uncertainty_embedding]
    else:
        semantic = [controlnet.semantic_controlnet]
        uncertainty = [controlnet.uncertainty_controlnet]
        joint = semantic + uncertainty
    return {"semantic": semantic, "uncertainty": uncertainty, "joint": joint}[train_branch]


def set_trainable_branch(controlnet: UncertaintyControlNetModel, train_branch: str) -> list[torch.nn.Parameter]:
    r"""
    Freeze the whole model, unfreeze the modules of `train_branch` and return their parameters (each once).

    Args:
        controlnet (`UncertaintyControlNetModel`):
            The model.
        train_branch (`str`):
            `"semantic"`, `"uncertainty"` or `"joint"`.
    """
    controlnet.requires_grad_(False)
    parameters = {}
    for module in branch_modules(controlnet, train_branch):
        module.requires_grad_(True)
        for parameter in module.parameters():
            parameters[id(parameter)] = parameter
    return list(parameters.values())


def branch_conditioning(batch: dict, train_branch: str, dtype: torch.dtype):
    r"""
    `controlnet_cond`, `conditioning_scale` and `semantic_mask` for a batch. The branch not trained gets the scale 0
    (and is skipped by the model); in `joint` mode an unlabeled sample gets the semantic branch switched off.

    Args:
        batch (`dict`):
            A batch of [`ControlNetTrainingDataset`] items.
        train_branch (`str`):
            `"semantic"`, `"uncertainty"` or `"joint"`.
        dtype (`torch.dtype`):
            The dtype of the conditions.
    """
    one_hot = batch["conditioning_one_hot"].to(dtype=dtype)
    uncertainty = batch["conditioning_uncertainty"].to(dtype=dtype)
    if train_branch == "semantic":
        return [one_hot, None], [1.0, 0.0], None
    if train_branch == "uncertainty":
        return [None, uncertainty], [0.0, 1.0], None
    return [one_hot, uncertainty], [1.0, 1.0], batch["is_labeled"].bool()


def compute_loss(
    batch: dict,
    vae: AutoencoderKL,
    text_encoder,
    unet: UNet2DConditionModel,
    controlnet,
    noise_scheduler: DDPMScheduler,
    train_branch: str,
    weight_dtype: torch.dtype = torch.float32,
    snr_gamma: float | None = None,
    style_encoder=None,
    style_conditioning: str = "concat",
    style_drop_rate: float = 0.0,
) -> torch.Tensor:
    r"""
    The denoising loss of one batch, as in diffusers' `train_controlnet.py` (epsilon or v-prediction target, as the
    scheduler's `prediction_type` says) with the optional Min-SNR weighting of `train_text_to_image.py`.

    Args:
        batch (`dict`):
            A batch of [`ControlNetTrainingDataset`] items (`pixel_values`, `input_ids`, ...), or a cached batch
            (`latent_parameters` and `encoder_hidden_states` instead, `LatentCache.batch` +
            `LatentCache.control_conditioning`).
        vae, text_encoder, unet:
            The frozen base model.
        controlnet:
            The `UncertaintyControlNetModel` (possibly wrapped by Accelerate).
        noise_scheduler (`DDPMScheduler`):
            The training noise scheduler.
        train_branch (`str`):
            `"semantic"`, `"uncertainty"` or `"joint"`.
        weight_dtype (`torch.dtype`, defaults to `torch.float32`):
            The dtype of the frozen models.
        snr_gamma (`float`, *optional*):
            Min-SNR gamma; `None` for the plain mean squared error.
        style_encoder (*optional*):
            The `StyleEncoderModel` being trained (possibly wrapped by Accelerate); its tokens from the batch's
            `style_pixel_values` join the text embeddings of the UNet and the controlnet.
        style_conditioning (`str`, defaults to `"concat"`):
            `"concat"` or `"replace"` (the encoder's `conditioning_mode`).
        style_drop_rate (`float`, defaults to 0.0):
            Probability that a sample gets the null style instead (for classifier-free guidance).
    """
    # Convert images to latent space (or sample the cached latent distribution: the same draw, see latent_cache)
    latents = sample_latents(vae, batch, weight_dtype)

    # Sample noise and a random timestep per image, and add the noise (forward diffusion)
    noise = torch.randn_like(latents)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

    if "encoder_hidden_states" in batch:  # from the prompt cache
        encoder_hidden_states = batch["encoder_hidden_states"]
    else:
        encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
    if style_encoder is not None:
        drop_mask = torch.rand(bsz, device=latents.device) < style_drop_rate
        style_embeds = style_encoder(batch["style_pixel_values"], drop_mask=drop_mask, return_dict=False)[0]
        encoder_hidden_states = combine_text_and_style(
            encoder_hidden_states, style_embeds.to(weight_dtype), style_conditioning
        )

    controlnet_cond, conditioning_scale, semantic_mask = branch_conditioning(batch, train_branch, weight_dtype)
    down_block_res_samples, mid_block_res_sample = controlnet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        controlnet_cond=controlnet_cond,
        conditioning_scale=conditioning_scale,
        return_dict=False,
        semantic_mask=semantic_mask,
    )

    model_pred = unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        down_block_additional_residuals=[sample.to(dtype=weight_dtype) for sample in down_block_res_samples],
        mid_block_additional_residual=mid_block_res_sample.to(dtype=weight_dtype),
        return_dict=False,
    )[0]

    # Get the target for loss depending on the prediction type
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")

    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    # Min-SNR weighting (https://huggingface.co/papers/2303.09556), as in diffusers' train_text_to_image.py
    snr = compute_snr(noise_scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    else:
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    return loss.mean()


# --------------------------------------------------------------------------------------------- validation
def log_validation(
    vae, text_encoder, tokenizer, unet, controlnet, scheduler_config, args, accelerator, weight_dtype, step,
    style_encoder=None, style_images=None,
):
    r"""
    Generate the validation grid (follows diffusers' `log_validation` in `train_controlnet.py`): one row per
    `--validation_label` (or a single row without one), one column per `--validation_uncertainty_levels` entry
    (times `--num_validation_images`), the coloured label map first. Logged to the trackers and saved as
    `<output_dir>/validation/step-{step}.png`. With a style encoder every image is generated in the style of
    `style_images`.

    Returns:
        `dict`: `grid` (PIL image), `path`, `prompt`, `labels`, `levels`.
    """
    logger.info("Running validation... ")
    controlnet = accelerator.unwrap_model(controlnet)
    if style_encoder is not None:
        # Batch-norm backbones: inference statistics, and no update of the running ones by validation images.
        style_encoder = accelerator.unwrap_model(style_encoder)
        style_encoder_was_training = style_encoder.training
        style_encoder.eval()
    pipeline = StableDiffusionDualControlPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=controlnet,
        scheduler=UniPCMultistepScheduler.from_config(scheduler_config),
        style_encoder=style_encoder,
    )
    pipeline = pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    if args.enable_xformers_memory_efficient_attention:
        pipeline.enable_xformers_memory_efficient_attention()

    labels = [load_label(path, path) for path in args.validation_label] if args.validation_label else [None]
    levels = args.validation_uncertainty_levels or [None]
    prompt = args.validation_prompt if args.validation_prompt is not None else args.default_prompt
    size = (args.resolution, args.resolution)
    if accelerator.mixed_precision in ("fp16", "bf16"):
        autocast = torch.autocast(accelerator.device.type, dtype=weight_dtype)
    else:
        autocast = contextlib.nullcontext()

    tiles = []
    for label in labels:
        if label is not None:
            tiles.append(colorize_label_map(label, args.num_classes).resize(size, resample=0))
        for level in levels:
            generator = None if args.seed is None else torch.Generator(device="cpu").manual_seed(args.seed)
            for _ in range(args.num_validation_images):
                with autocast:
                    image = pipeline(
                        prompt,
                        semantic_map=label,
                        uncertainty_map=level,
                        height=args.resolution,
                        width=args.resolution,
                        num_inference_steps=args.num_validation_inference_steps,
                        generator=generator,
                        style_images=style_images if style_encoder is not None else None,
                    ).images[0]
                tiles.append(image)
    columns = len(tiles) // len(labels)
    grid = make_image_grid(tiles, rows=len(labels), cols=columns)

    path = os.path.join(args.output_dir, "validation", f"step-{step}.png")
    save_image_atomic(path, grid)
    caption = f"{prompt!r}; columns: " + ("label map, " if labels[0] is not None else "")
    caption += ", ".join("off" if level is None else f"u={level}" for level in levels)
    if style_encoder is not None and style_images:
        caption += f"; in the style of {len(style_images)} validation style image(s)"
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log({"validation": [wandb.Image(grid, caption=caption)]})
        else:
            logger.warning(f"image logging not implemented for {tracker.name}")
    del pipeline
    if style_encoder is not None:
        style_encoder.train(style_encoder_was_training)
    return {"grid": grid, "path": path, "prompt": prompt, "caption": caption}


# --------------------------------------------------------------------------------------------- model card
def save_model_card(repo_id: str, args, data_summary: str, validation_log: dict | None, repo_folder: str) -> str:
    r"""
    Write `README.md` into `repo_folder` from `--model_card_template` (diffusers' `save_model_card`, with a template
    file instead of an inline string).
    """
    if validation_log is not None:
        save_image_atomic(os.path.join(repo_folder, "validation.png"), validation_log["grid"])
        validation = f"Columns: {validation_log['caption']}.\n\n![validation grid](./validation.png)"
    else:
        validation = "No validation grid was produced (no `--validation_label` / `--validation_uncertainty_levels`)."
    if args.class_names:
        classes = ", ".join(f"{index}: {name}" for index, name in enumerate(args.class_names))
    else:
        classes = ", ".join(str(index) for index in range(args.num_classes))
    branches = {
        "semantic": "semantic branch (one-hot label map)",
        "uncertainty": "uncertainty branch (uncertainty map)",
        "joint": "semantic and uncertainty branches, jointly (mixed labeled/unlabeled batches)",
    }[args.train_branch]
    settings = (
        f"{args.max_train_steps} steps, batch size {args.train_batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation, learning rate {args.learning_rate} ({args.lr_scheduler}, "
        f"{args.lr_warmup_steps} warm-up steps), resolution {args.resolution}, mixed precision "
        f"{args.mixed_precision or 'no'}, SNR gamma {args.snr_gamma}, seed {args.seed}"
    )
    if args.train_branch == "joint":
        settings += f", labeled fraction {args.labeled_fraction}"
    architecture = (
        "one shared ControlNet trunk with two conditioning embeddings"
        if args.shared_trunk
        else "two ControlNets (semantic and uncertainty), residuals summed"
    )
    if args.train_style_encoder:
        architecture += (
            f"; plus a style encoder trained jointly (`style_encoder/`, {args.style_backbone} backbone, "
            f"{args.style_aggregation} aggregation, tokens {args.style_conditioning} the text embeddings)"
        )
        settings += (
            f"; style encoder: {args.style_images_per_sample} style image(s) per sample from its own domain, "
            f"style drop rate {args.style_drop_rate}, learning rate {args.style_learning_rate or args.learning_rate}"
        )
    return write_model_card(
        args.model_card_template,
        os.path.join(repo_folder, "README.md"),
        repo_id=repo_id,
        base_model=args.pretrained_model_name_or_path,
        train_branch=args.train_branch,
        branches=branches,
        architecture=architecture,
        data=data_summary,
        num_classes=args.num_classes,
        classes=classes,
        ignore_index=args.ignore_index,
        uncertainty_estimator=args.uncertainty_estimator or "not recorded",
        training_settings=settings,
        validation=validation,
    )


# ------------------------------------------------------------------------------------------------- args
def build_parser():
    """The command line's flags, with their types, defaults and choices (`check_args` adds the checks across
    them, `parse_args` those on files). The workflow checks its stages' flags with both this parser and `check_args`
    before running any stage."""
    parser = argparse.ArgumentParser(description="Train the dual-control (semantic + uncertainty) ControlNet.")
    # Models (names as in diffusers' train_controlnet.py)
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        required=True,
        help="Path to pretrained model or model identifier from huggingface.co/models (the frozen base model).",
    )
    parser.add_argument(
        "--controlnet_model_name_or_path",
        type=str,
        default=None,
        help="Path or Hub id of an UncertaintyControlNetModel to continue training. If not specified, the"
        " branches are initialized from the unet.",
    )
    parser.add_argument(
        "--semantic_controlnet_model_name_or_path",
        type=str,
        default=None,
        help="Path or Hub id of a diffusers ControlNetModel used as the semantic branch (its conditioning channels"
        " must equal --num_classes); the uncertainty branch is initialized from the unet. With --shared_trunk it"
        " becomes the shared trunk and a new uncertainty embedding is added.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    parser.add_argument("--tokenizer_name", type=str, default=None, help="Tokenizer name or path if not the model's.")
    parser.add_argument(
        "--train_branch",
        type=str,
        default="joint",
        choices=["semantic", "uncertainty", "joint"],
        help="semantic: labeled data, condition = one-hot label map. uncertainty: labeled and unlabeled images,"
        " condition = uncertainty map. joint: mixed batches, the semantic branch is switched off for unlabeled"
        " samples.",
    )
    parser.add_argument(
        "--shared_trunk",
        action="store_true",
        help="One ControlNet trunk fed by two conditioning embeddings instead of two ControlNets.",
    )
    parser.add_argument(
        "--conditioning_embedding_out_channels",
        type=int,
        nargs="+",
        default=None,
        help="Channels of the conditioning embeddings of new branches. Default: diffusers' (16, 32, 96, 256), cut to"
        " match the VAE's downsampling factor.",
    )
    parser.add_argument("--output_dir", type=str, default="uncertainty-controlnet-model", help="Output directory.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets go.")
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")

    # Data
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Labeled folder with images/ and labels/ (same file stems, integer label PNGs) and optional"
        " captions/<stem>.txt.",
    )
    parser.add_argument(
        "--dataset_name", type=str, default=None, help="A `datasets` dataset (Hub id or local path) of labeled data."
    )
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The config of the dataset.")
    parser.add_argument("--unlabeled_data_dir", type=str, default=None, help="Folder of unlabeled images.")
    parser.add_argument(
        "--unlabeled_dataset_name", type=str, default=None, help="A `datasets` dataset of unlabeled images."
    )
    parser.add_argument("--image_column", type=str, default="image", help="Dataset column of the images.")
    parser.add_argument("--label_column", type=str, default="label", help="Dataset column of the label maps.")
    parser.add_argument(
        "--uncertainty_column", type=str, default=None, help="Dataset column of the uncertainty maps."
    )
    parser.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="Dataset column of captions (a string or a list of strings). Without one, --default_prompt is used.",
    )
    parser.add_argument(
        "--uncertainty_dir",
        type=str,
        default=None,
        help="Folder of uncertainty maps mirroring the images of --train_data_dir (same relative path and stem;"
        " 8-bit or 16-bit PNG, or .npy float in [0, 1]).",
    )
    parser.add_argument(
        "--unlabeled_uncertainty_dir",
        type=str,
        default=None,
        help="Uncertainty maps mirroring --unlabeled_data_dir. Defaults to --uncertainty_dir.",
    )
    parser.add_argument("--num_classes", type=int, required=True, help="Number of classes of the label maps.")
    parser.add_argument(
        "--ignore_index", type=int, default=None, help="Label value of unlabeled (void) pixels, e.g. 11 for CamVid."
    )
    parser.add_argument("--class_names", type=str, nargs="+", default=None, help="Class names for the model card.")
    parser.add_argument(
        "--uncertainty_estimator",
        type=str,
        default=None,
        help="Name of the estimator that produced the uncertainty maps (recorded in the model card), e.g. entropy.",
    )
    parser.add_argument(
        "--labeled_fraction",
        type=float,
        default=0.5,
        help="joint mode: expected fraction of labeled samples in a batch.",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=512,
        help="Training resolution (divisible by 8): the shorter side is resized to it, then a square crop.",
    )
    parser.add_argument("--center_crop", action="store_true", help="Centre crop instead of random crop.")
    parser.add_argument("--random_flip", action="store_true", help="Randomly flip samples horizontally.")
    parser.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="For debugging or quicker training: keep at most this many labeled and this many unlabeled samples.",
    )
    parser.add_argument("--default_prompt", type=str, default="", help="Caption of samples without one.")
    parser.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0,
        help="Proportion of image prompts to be replaced with empty strings. Defaults to 0 (no prompt replacement).",
    )
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses (stream).")
    parser.add_argument(
        "--dataset_placement",
        type=str,
        default="auto",
        metavar="{" + ",".join(DATASET_PLACEMENTS) + "}",
        help="stream: a DataLoader decodes and crops the images, the VAE and the text encoder run every step. device:"
        " every image is decoded and encoded by the frozen VAE once (both flips), latents, label maps and uncertainty"
        " maps stay on the device and are cropped there; prompts are encoded once. auto: device when that cache takes"
        " at most a quarter of the device's memory (stream with --train_style_encoder, which needs the pixels).",
    )

    # Style conditioning (Style-Extracting Diffusion Models)
    parser.add_argument(
        "--train_style_encoder",
        action="store_true",
        help="Train a StyleEncoderModel jointly with the control: style images of each sample's own domain are encoded"
        " into style tokens for the cross-attention. Saved to <output_dir>/style_encoder/.",
    )
    parser.add_argument(
        "--style_encoder_model_name_or_path",
        type=str,
        default=None,
        help="Path or Hub id of a StyleEncoderModel to start from (its config wins over the --style_* model flags).",
    )
    parser.add_argument(
        "--style_images_per_sample",
        type=int,
        default=2,
        help="Style images per sample: the sample's image under another random crop/flip, then other images of its"
        " domain (labeled data for labeled samples, unlabeled data for unlabeled ones).",
    )
    parser.add_argument(
        "--style_drop_rate",
        type=float,
        default=0.1,
        help="Probability that a sample gets the learned null style instead (for style classifier-free guidance).",
    )
    parser.add_argument("--style_backbone", type=str, default="resnet18", help="timm backbone of a new style encoder.")
    parser.add_argument(
        "--style_pretrained_backbone",
        action="store_true",
        help="Start the backbone of a new style encoder from timm's pretrained weights (needs them on the Hub or in the"
        " local cache); random initialisation otherwise.",
    )
    parser.add_argument("--style_num_tokens", type=int, default=4, help="Style tokens of a new style encoder.")
    parser.add_argument(
        "--style_aggregation",
        type=str,
        default="mean",
        choices=list(AGGREGATIONS),
        help="How a new style encoder merges several style images.",
    )
    parser.add_argument(
        "--style_conditioning",
        type=str,
        default="concat",
        choices=list(CONDITIONING_MODES),
        help="concat: style tokens appended to the text embeddings; replace: instead of them (new style encoder).",
    )
    parser.add_argument(
        "--style_image_size",
        type=int,
        default=None,
        help="Input size of a new style encoder. Default: min(--resolution, 224).",
    )
    parser.add_argument(
        "--style_learning_rate",
        type=float,
        default=None,
        help="Learning rate of the style encoder. Default: --learning_rate.",
    )
    parser.add_argument(
        "--validation_style_images",
        type=str,
        nargs="+",
        default=None,
        help="Style images of the validation grid (with --train_style_encoder). Default: the first"
        " --style_images_per_sample images of the unlabeled data (of the labeled data without unlabeled data).",
    )

    # Optimisation (as diffusers)
    parser.add_argument("--train_batch_size", type=int, default=4, help="Batch size (per device).")
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument(
        "--max_train_steps", type=int, default=None, help="Total training steps. If provided, overrides num_train_epochs."
    )
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a checkpoint of the training state (`checkpoint-{step}`) every X updates, for"
        " --resume_from_checkpoint.",
    )
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints to store.")
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='Resume from a checkpoint folder saved by --checkpointing_steps, or "latest".',
    )
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    parser.add_argument("--learning_rate", type=float, default=5e-6)
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        default=False,
        help="Scale the learning rate by the number of processes, gradient accumulation steps, and batch size.",
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='One of ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"].',
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=500)
    parser.add_argument("--lr_num_cycles", type=int, default=1)
    parser.add_argument("--lr_power", type=float, default=1.0)
    parser.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma; 5.0 is recommended.")
    parser.add_argument("--use_8bit_adam", action="store_true", help="Use 8-bit Adam from bitsandbytes.")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--max_grad_norm", default=1.0, type=float)
    parser.add_argument("--set_grads_to_none", action="store_true", help="optimizer.zero_grad(set_to_none=True).")
    parser.add_argument(
        "--allow_tf32", action="store_true", help="Kept for compatibility: TF32 is always allowed on Ampere and newer GPUs."
    )
    parser.add_argument(
        "--torch_compile", action="store_true", help="torch.compile the controlnet and the frozen unet (in place)."
    )
    parser.add_argument(
        "--torch_compile_mode", type=str, default="default",
        help="torch.compile mode with --torch_compile: default, reduce-overhead (CUDA graphs: for steps bound by kernel"
        " launches), max-autotune, max-autotune-no-cudagraphs.",
    )
    parser.add_argument(
        "--channels_last", action="store_true", help="Keep the controlnet and the unet in channels_last memory format."
    )
    parser.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Log the loss every X steps (the mean over them): the only times the loop waits for the device.",
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Defaults to the accelerate config or the `accelerate launch` flag.",
    )
    parser.add_argument("--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers.")

    # Hub, logging, validation (as diffusers)
    parser.add_argument("--push_to_hub", action="store_true", help="Push the model to the Hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="The token to use to push to the Hub.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="The Hub repository to push to.")
    parser.add_argument(
        "--model_card_template",
        type=str,
        default=str(DEFAULT_MODEL_CARD_TEMPLATE),
        help="Template of the model card written with --push_to_hub.",
    )
    parser.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard log directory (in output_dir).")
    parser.add_argument(
        "--report_to", type=str, default="tensorboard", help='"tensorboard" (default), "wandb", "comet_ml" or "all".'
    )
    parser.add_argument("--tracker_project_name", type=str, default="train_uncertainty_controlnet")
    parser.add_argument(
        "--validation_label", type=str, nargs="+", default=None, help="Label map PNGs for the validation grid rows."
    )
    parser.add_argument(
        "--validation_uncertainty_levels",
        type=float,
        nargs="+",
        default=None,
        help="Constant uncertainty levels for the validation grid columns, e.g. 0.0 0.5 1.0.",
    )
    parser.add_argument("--validation_prompt", type=str, default=None, help="Validation prompt (default_prompt).")
    parser.add_argument("--num_validation_images", type=int, default=1, help="Images per (label, level) cell.")
    parser.add_argument("--num_validation_inference_steps", type=int, default=20)
    parser.add_argument("--validation_steps", type=int, default=100, help="Run validation every X steps.")
    return parser


def parse_args(input_args=None):
    parser = build_parser()
    args = parser.parse_args(input_args)
    check_args(args)
    # The checks that read files.
    resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)  # a named checkpoint must exist
    for path in args.validation_style_images or []:
        if not os.path.isfile(path):
            raise ValueError(f"`--validation_style_images` file does not exist: {path}.")
    for path in args.validation_label or []:
        if not os.path.isfile(path):
            raise ValueError(f"`--validation_label` file does not exist: {path}.")
        check_label_values(load_label(path, path), args.num_classes, args.ignore_index, path)
    if args.push_to_hub and not os.path.isfile(args.model_card_template):
        raise ValueError(f"`--model_card_template` file does not exist: {args.model_card_template}.")
    return args


def check_args(args) -> None:
    """Every check across flags that reads no file, so that a bad command stops at once (the workflow runs it on
    every stage's flags before the first stage).

    Args:
        args (`argparse.Namespace`): From `build_parser().parse_args(...)`.
    """
    if args.resolution <= 0 or args.resolution % 8 != 0:
        raise ValueError(
            "`--resolution` must be a positive multiple of 8 for consistently sized encoded images between the VAE"
            f" and the controlnet encoder, but got {args.resolution}."
        )
    if args.num_classes < 1:
        raise ValueError(f"`--num_classes` must be a positive integer, but got {args.num_classes}.")
    if args.ignore_index is not None and 0 <= args.ignore_index < args.num_classes:
        raise ValueError(
            f"`--ignore_index` must not be a class index in [0, {args.num_classes}), but got {args.ignore_index}."
        )
    if args.class_names is not None and len(args.class_names) != args.num_classes:
        raise ValueError(
            f"`--class_names` must name all {args.num_classes} classes, but got {len(args.class_names)} names."
        )
    check_dataset_placement(args.dataset_placement)
    check_torch_compile_mode(args.torch_compile_mode, args.torch_compile)
    if args.dataset_placement == "device" and args.train_style_encoder:
        raise ValueError(
            "`--dataset_placement device` caches latents, but `--train_style_encoder` needs the style images' pixels "
            "every step: use `--dataset_placement stream` (or auto)."
        )
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps",
                 "num_validation_images", "num_validation_inference_steps", "logging_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be a positive integer, but got {getattr(args, name)}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"`--max_train_steps` must be a positive integer, but got {args.max_train_steps}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"`--checkpoints_total_limit` must be at least 1, but got {args.checkpoints_total_limit}.")
    if not 0 <= args.proportion_empty_prompts <= 1:
        raise ValueError(f"`--proportion_empty_prompts` must be in [0, 1], but got {args.proportion_empty_prompts}.")
    if not 0 <= args.labeled_fraction <= 1:
        raise ValueError(f"`--labeled_fraction` must be in [0, 1], but got {args.labeled_fraction}.")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise ValueError(f"`--snr_gamma` must be positive, but got {args.snr_gamma}.")

    # Style conditioning
    style_flags = [
        flag for flag in ("style_encoder_model_name_or_path", "validation_style_images", "style_learning_rate")
        if getattr(args, flag) is not None
    ] + ["style_pretrained_backbone"] * args.style_pretrained_backbone
    if style_flags and not args.train_style_encoder:
        raise ValueError(f"`--{style_flags[0]}` needs `--train_style_encoder`.")
    if args.style_images_per_sample < 1:
        raise ValueError(f"`--style_images_per_sample` must be a positive integer, but got {args.style_images_per_sample}.")
    if not 0 <= args.style_drop_rate <= 1:
        raise ValueError(f"`--style_drop_rate` must be in [0, 1], but got {args.style_drop_rate}.")
    for name in ("style_num_tokens", "style_image_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be a positive integer, but got {getattr(args, name)}.")
    if args.style_encoder_model_name_or_path and args.style_pretrained_backbone:
        raise ValueError(
            "`--style_pretrained_backbone` initialises a new style encoder; it cannot be used with "
            "`--style_encoder_model_name_or_path`."
        )

    # Data sources per branch
    if args.train_data_dir is not None and args.dataset_name is not None:
        raise ValueError("Specify only one of `--train_data_dir` or `--dataset_name`, but got both.")
    if args.unlabeled_data_dir is not None and args.unlabeled_dataset_name is not None:
        raise ValueError("Specify only one of `--unlabeled_data_dir` or `--unlabeled_dataset_name`, but got both.")
    has_labeled = args.train_data_dir is not None or args.dataset_name is not None
    has_unlabeled = args.unlabeled_data_dir is not None or args.unlabeled_dataset_name is not None
    if args.train_branch in ("semantic", "joint") and not has_labeled:
        raise ValueError(
            f"`--train_branch {args.train_branch}` needs labeled data: specify `--train_data_dir` or `--dataset_name`."
        )
    if args.train_branch == "joint" and not has_unlabeled and args.labeled_fraction < 1:
        raise ValueError(
            "`--train_branch joint` needs unlabeled data: specify `--unlabeled_data_dir` or "
            "`--unlabeled_dataset_name` (or `--labeled_fraction 1`)."
        )
    if args.train_branch == "uncertainty" and not (has_labeled or has_unlabeled):
        raise ValueError(
            "`--train_branch uncertainty` needs images: specify `--train_data_dir`/`--dataset_name` and/or "
            "`--unlabeled_data_dir`/`--unlabeled_dataset_name`."
        )
    if args.train_branch in ("uncertainty", "joint"):
        if args.train_data_dir is not None and args.uncertainty_dir is None:
            raise ValueError(
                f"`--train_branch {args.train_branch}` trains the uncertainty branch on the images of "
                "`--train_data_dir`, so `--uncertainty_dir` (their uncertainty maps) is required."
            )
        if args.unlabeled_data_dir is not None and (args.unlabeled_uncertainty_dir or args.uncertainty_dir) is None:
            raise ValueError(
                f"`--train_branch {args.train_branch}` needs uncertainty maps for `--unlabeled_data_dir`: specify "
                "`--unlabeled_uncertainty_dir` or `--uncertainty_dir`."
            )
        if (args.dataset_name or args.unlabeled_dataset_name) and args.uncertainty_column is None:
            raise ValueError(
                f"`--train_branch {args.train_branch}` with a `datasets` dataset needs `--uncertainty_column`."
            )

    # Models
    if args.controlnet_model_name_or_path and args.semantic_controlnet_model_name_or_path:
        raise ValueError(
            "Specify only one of `--controlnet_model_name_or_path` or `--semantic_controlnet_model_name_or_path`."
        )
    # Validation inputs
    for level in args.validation_uncertainty_levels or []:
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"`--validation_uncertainty_levels` must lie in [0, 1], but got {level}.")

    # Optional dependencies and hardware
    if args.enable_xformers_memory_efficient_attention:
        if not is_xformers_available():
            raise ValueError(
                "`--enable_xformers_memory_efficient_attention` needs xformers, which is not installed: "
                "`pip install xformers`."
            )
        if not torch.cuda.is_available():
            raise ValueError("`--enable_xformers_memory_efficient_attention` needs a CUDA GPU, but none is available.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ImportError(
                "To use 8-bit Adam (`--use_8bit_adam`), please install the bitsandbytes library: "
                "`pip install bitsandbytes`."
            ) from None
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError(
            "You cannot use both --report_to=wandb and --hub_token due to a security risk of exposing your token."
            " Please use `hf auth login` to authenticate with the Hub."
        )


# ------------------------------------------------------------------------------------------------- data
def make_records(args, accelerator):
    r"""
    The labeled and unlabeled records the chosen branch needs, checked (labels in range, maps present and in
    [0, 1], sizes matching) before anything is trained. Returns `(labeled, unlabeled, summary)`.
    """
    needs_uncertainty = args.train_branch in ("uncertainty", "joint")
    labeled, unlabeled, summary = [], [], []
    if args.train_data_dir is not None:
        labeled = labeled_folder_records(args.train_data_dir)
        if needs_uncertainty:
            labeled = attach_uncertainty_maps(labeled, args.uncertainty_dir)
        summary.append(f"labeled folder `{args.train_data_dir}`")
    elif args.dataset_name is not None:
        # In distributed training, load_dataset lets only one local process download the dataset at a time.
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)["train"]
        labeled = DatasetRecords(
            dataset,
            args.image_column,
            label_column=args.label_column if args.train_branch != "uncertainty" else None,
            uncertainty_column=args.uncertainty_column if needs_uncertainty else None,
            caption_column=args.caption_column,
            description=f"--dataset_name {args.dataset_name}",
        )
        summary.append(f"labeled dataset `{args.dataset_name}`")
    if args.train_branch != "semantic":
        if args.unlabeled_data_dir is not None:
            unlabeled = unlabeled_folder_records(args.unlabeled_data_dir)
            unlabeled = attach_uncertainty_maps(
                unlabeled,
                args.unlabeled_uncertainty_dir or args.uncertainty_dir,
                "--unlabeled_uncertainty_dir" if args.unlabeled_uncertainty_dir else "--uncertainty_dir",
            )
            summary.append(f"unlabeled folder `{args.unlabeled_data_dir}`")
        elif args.unlabeled_dataset_name is not None:
            dataset = load_dataset(args.unlabeled_dataset_name, cache_dir=args.cache_dir)["train"]
            unlabeled = DatasetRecords(
                dataset,
                args.image_column,
                uncertainty_column=args.uncertainty_column,
                caption_column=args.caption_column,
                description=f"--unlabeled_dataset_name {args.unlabeled_dataset_name}",
            )
            summary.append(f"unlabeled dataset `{args.unlabeled_dataset_name}`")
    elif args.unlabeled_data_dir or args.unlabeled_dataset_name:
        logger.warning("`--train_branch semantic` trains on labeled data only; the unlabeled data is not used.")

    labeled = select_records(labeled, args.max_train_samples, args.seed)
    unlabeled = select_records(unlabeled, args.max_train_samples, args.seed)
    show = accelerator.is_local_main_process
    validate_records(
        labeled,
        args.num_classes,
        args.ignore_index,
        need_labels=args.train_branch != "uncertainty",
        need_uncertainty=needs_uncertainty,
        description="labeled data",
        uncertainty_argument="--uncertainty_dir" if args.train_data_dir else "--uncertainty_column",
        show_progress=show,
    )
    validate_records(
        unlabeled,
        args.num_classes,
        args.ignore_index,
        need_labels=False,
        need_uncertainty=needs_uncertainty,
        description="unlabeled data",
        uncertainty_argument=(
            ("--unlabeled_uncertainty_dir" if args.unlabeled_uncertainty_dir else "--uncertainty_dir")
            if args.unlabeled_data_dir
            else "--uncertainty_column"
        ),
        show_progress=show,
    )
    summary = "; ".join(summary) + f" ({len(labeled)} labeled, {len(unlabeled)} unlabeled samples)"
    return labeled, unlabeled, summary


# ----------------------------------------------------------------------------------------------- models
def load_controlnet(args, unet: UNet2DConditionModel, vae: AutoencoderKL) -> UncertaintyControlNetModel:
    """The controlnet to train: loaded, built around an existing semantic ControlNet (separate branches or a shared
    trunk), or initialised from the unet."""
    if args.controlnet_model_name_or_path:
        logger.info("Loading existing UncertaintyControlNetModel weights")
        controlnet = UncertaintyControlNetModel.from_pretrained(
            args.controlnet_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir
        )
        config = controlnet.config
        if config.semantic_channels != args.num_classes:
            raise ValueError(
                f"`--num_classes` is {args.num_classes}, but the controlnet from `--controlnet_model_name_or_path` "
                f"has {config.semantic_channels} semantic channels."
            )
        if args.shared_trunk and not config.shared_trunk:
            raise ValueError(
                "`--shared_trunk` was given, but the controlnet from `--controlnet_model_name_or_path` has separate "
                "branches."
            )
        if args.ignore_index is not None and config.ignore_index != args.ignore_index:
            raise ValueError(
                f"`--ignore_index` is {args.ignore_index}, but the controlnet's config has {config.ignore_index}."
            )
        return controlnet

    # The conditioning embedding downsamples by 2 per block after the first; it must match the VAE's factor.
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    embedding_channels = args.conditioning_embedding_out_channels
    if embedding_channels is None:
        embedding_channels = (16, 32, 96, 256)[: int(math.log2(vae_scale_factor)) + 1]
    if 2 ** (len(embedding_channels) - 1) != vae_scale_factor:
        raise ValueError(
            f"`--conditioning_embedding_out_channels` must have {int(math.log2(vae_scale_factor)) + 1} entries to match "
            f"the VAE's downsampling factor {vae_scale_factor}, but got {list(embedding_channels)}."
        )
    if args.semantic_controlnet_model_name_or_path:
        logger.info("Loading the semantic branch from an existing ControlNetModel; uncertainty branch from the unet")
        semantic = ControlNetModel.from_pretrained(
            args.semantic_controlnet_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir
        )
        if semantic.config.conditioning_channels != args.num_classes:
            raise ValueError(
                f"`--num_classes` is {args.num_classes}, but the ControlNet from "
                f"`--semantic_controlnet_model_name_or_path` has {semantic.config.conditioning_channels} conditioning "
                "channels."
            )
        if args.shared_trunk:
            # The existing ControlNet becomes the shared trunk with its embedding as the semantic one; the new
            # uncertainty embedding starts with a zero output convolution, so training starts from the ControlNet.
            return UncertaintyControlNetModel.from_controlnet(semantic, ignore_index=args.ignore_index)
        uncertainty = ControlNetModel.from_unet(
            unet,
            conditioning_channels=1,
            conditioning_embedding_out_channels=tuple(semantic.config.conditioning_embedding_out_channels),
        )
        return UncertaintyControlNetModel.from_controlnets(semantic, uncertainty, ignore_index=args.ignore_index)

    logger.info("Initializing controlnet weights from unet")
    return UncertaintyControlNetModel.from_unet(
        unet,
        semantic_channels=args.num_classes,
        uncertainty_channels=1,
        shared_trunk=args.shared_trunk,
        ignore_index=args.ignore_index,
        conditioning_embedding_out_channels=tuple(embedding_channels),
    )


def load_style_encoder(args, unet: UNet2DConditionModel) -> StyleEncoderModel:
    """The style encoder to train: loaded from `--style_encoder_model_name_or_path` or built from the --style_* flags,
    with tokens of the UNet's `cross_attention_dim`."""
    cross_attention_dim = unet.config.cross_attention_dim
    if args.style_encoder_model_name_or_path:
        logger.info("Loading existing StyleEncoderModel weights")
        style_encoder = StyleEncoderModel.from_pretrained(
            args.style_encoder_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir
        )
        if style_encoder.config.cross_attention_dim != cross_attention_dim:
            raise ValueError(
                f"The style encoder from `--style_encoder_model_name_or_path` makes tokens of width "
                f"{style_encoder.config.cross_attention_dim}, but the UNet's cross_attention_dim is {cross_attention_dim}."
            )
    else:
        style_encoder = StyleEncoderModel(
            backbone=args.style_backbone,
            cross_attention_dim=cross_attention_dim,
            num_tokens=args.style_num_tokens,
            aggregation=args.style_aggregation,
            max_style_images=max(4, args.style_images_per_sample),
            image_size=args.style_image_size or min(args.resolution, 224),
            conditioning_mode=args.style_conditioning,
            # timm's pretrained weights expect ImageNet's normalisation.
            image_mean=(0.485, 0.456, 0.406) if args.style_pretrained_backbone else None,
            image_std=(0.229, 0.224, 0.225) if args.style_pretrained_backbone else None,
        )
        if args.style_pretrained_backbone:
            style_encoder.load_pretrained_backbone()
    config = style_encoder.config
    if config.in_channels != 3:
        raise ValueError(f"The style encoder must take RGB images (in_channels=3), but has in_channels={config.in_channels}.")
    if config.aggregation == "mlp" and args.style_images_per_sample > config.max_style_images:
        raise ValueError(
            f"`--style_images_per_sample` is {args.style_images_per_sample}, but the style encoder's `mlp` aggregation "
            f"takes at most max_style_images={config.max_style_images}."
        )
    return style_encoder


def validation_style_images(args, labeled_records, unlabeled_records) -> list:
    """The style images of the validation grid: `--validation_style_images`, else the first
    `--style_images_per_sample` images of the unlabeled data (of the labeled data without unlabeled data)."""
    if args.validation_style_images:
        return [load_image(path, path) for path in args.validation_style_images]
    records = unlabeled_records if len(unlabeled_records) else labeled_records
    count = min(args.style_images_per_sample, len(records))
    return [load_image(records[i]["image"], records[i]["name"]) for i in range(count)]


# ------------------------------------------------------------------------------------------------- main
def main(args):
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator_project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir)
    # In joint mode a batch without labeled samples skips the semantic branch, so DDP must allow unused parameters.
    # The null style is used only by dropped samples, so the same holds for the style encoder.
    kwargs_handlers = [
        DistributedDataParallelKwargs(find_unused_parameters=args.train_branch == "joint" or args.train_style_encoder)
    ]
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=accelerator_project_config,
        kwargs_handlers=kwargs_handlers,
    )

    # Make one log on every process with the configuration for debugging.
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO,
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

    # Check the data before anything is loaded or created.
    labeled_records, unlabeled_records, data_summary = make_records(args, accelerator)

    # Handle the repository creation
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            repo_id = create_repo(
                repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
            ).repo_id

    # Load the tokenizer, scheduler and frozen models (diffusers' train_controlnet.py)
    if args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision, use_fast=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="tokenizer", revision=args.revision, use_fast=False
        )
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="text_encoder", revision=args.revision, variant=args.variant
    )
    vae = AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision, variant=args.variant
    )
    unet = UNet2DConditionModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant
    )
    controlnet = load_controlnet(args, unet, vae)
    style_encoder = load_style_encoder(args, unet) if args.train_style_encoder else None

    # Custom saving & loading hooks so that `accelerator.save_state(...)` serializes in diffusers' format
    # (as in diffusers' train_controlnet.py): checkpoint-{step}/controlnet/{config.json, safetensors}, and
    # checkpoint-{step}/style_encoder/ with --train_style_encoder.
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                model = accelerator.unwrap_model(model)
                subfolder = "style_encoder" if isinstance(model, StyleEncoderModel) else "controlnet"
                model.save_pretrained(os.path.join(output_dir, subfolder))
            while weights:
                weights.pop()  # make sure accelerate does not save the model again

    def load_model_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())  # pop so that it is not loaded again
            if isinstance(model, StyleEncoderModel):
                name, load_model = "style encoder", StyleEncoderModel.from_pretrained(input_dir, subfolder="style_encoder")
            else:
                name, load_model = "controlnet", UncertaintyControlNetModel.from_pretrained(input_dir, subfolder="controlnet")
            model.load_state_dict(load_model.state_dict())
            del load_model
            logger.info(f"Loaded the {name} weights of {input_dir}")

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    params_to_optimize = set_trainable_branch(controlnet, args.train_branch)
    controlnet.train()
    parameter_groups = [{"params": params_to_optimize}]
    if style_encoder is not None:
        style_encoder.requires_grad_(True)
        style_encoder.train()
        style_parameters = list(style_encoder.parameters())
        parameter_groups.append({"params": style_parameters, "lr": args.style_learning_rate or args.learning_rate})
        params_to_optimize = params_to_optimize + style_parameters

    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()

    # Check that all trainable models are in full precision
    if style_encoder is not None and style_encoder.dtype != torch.float32:
        raise ValueError(f"Style encoder loaded as datatype {style_encoder.dtype}; trainable weights must be float32.")
    if accelerator.unwrap_model(controlnet).dtype != torch.float32:
        raise ValueError(
            f"Controlnet loaded as datatype {accelerator.unwrap_model(controlnet).dtype}. Please make sure to always"
            " have all model weights in full float32 precision when starting training - even if doing mixed"
            " precision training, copy of the weights should still be float32."
        )

    enable_tf32()
    if args.scale_lr:
        factor = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate = args.learning_rate * factor
        if style_encoder is not None:
            parameter_groups[1]["lr"] *= factor

    # The trained models go to the device before the optimizer is built, so that AdamW can be the fused one.
    controlnet.to(accelerator.device)
    if style_encoder is not None:
        style_encoder.to(accelerator.device)
    if args.channels_last:
        controlnet.to(memory_format=torch.channels_last)
    # Use 8-bit Adam for lower memory usage
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class, optimizer_kwargs = bnb.optim.AdamW8bit, {}
    else:
        optimizer_class, optimizer_kwargs = torch.optim.AdamW, adamw_fused_kwargs(params_to_optimize)
    optimizer = optimizer_class(
        parameter_groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        **optimizer_kwargs,
    )

    train_dataset = ControlNetTrainingDataset(
        labeled_records,
        unlabeled_records,
        PairedTransform(args.resolution, center_crop=args.center_crop, random_flip=args.random_flip),
        tokenizer,
        num_classes=args.num_classes,
        ignore_index=args.ignore_index,
        use_labels=args.train_branch != "uncertainty",
        use_uncertainty=args.train_branch != "semantic",
        default_prompt=args.default_prompt,
        proportion_empty_prompts=args.proportion_empty_prompts,
        style_images_per_sample=args.style_images_per_sample if style_encoder is not None else 0,
    )
    style_images = (
        validation_style_images(args, labeled_records, unlabeled_records) if style_encoder is not None else None
    )
    data_seed = args.seed if args.seed is not None else int(torch.empty((), dtype=torch.int64).random_())
    sample_weights = train_dataset.sample_weights(args.labeled_fraction) if args.train_branch == "joint" else None
    # Where the data lives (see --dataset_placement); the style encoder needs pixels, so it streams.
    first = (list(labeled_records[:1]) + list(unlabeled_records[:1]))[0]
    estimated_bytes = estimate_cache_bytes(
        len(train_dataset), load_image(first["image"], first["name"]).size, args.resolution,
        2 ** (len(vae.config.block_out_channels) - 1), vae.config.latent_channels, args.random_flip,
        labels=args.train_branch != "uncertainty", uncertainty=args.train_branch != "semantic",
    )
    placement = (
        "stream" if style_encoder is not None
        else choose_dataset_placement(args.dataset_placement, estimated_bytes, accelerator.device)
    )
    logger.info(f"  Dataset placement = {placement} (--dataset_placement {args.dataset_placement}; "
                f"latent cache ~{estimated_bytes / 2**20:.1f} MiB)")
    if placement == "stream":
        if sample_weights is not None:
            # Mixed batches: a drawn sample is labeled with probability --labeled_fraction.
            sampler = torch.utils.data.WeightedRandomSampler(
                sample_weights, len(train_dataset), generator=torch.Generator().manual_seed(data_seed)
            )
            loader_kwargs = {"sampler": sampler}
        else:
            loader_kwargs = {"shuffle": True}
        train_dataloader = torch.utils.data.DataLoader(
            train_dataset,
            collate_fn=collate_fn,
            batch_size=args.train_batch_size,
            num_workers=args.dataloader_num_workers,
            **loader_kwargs,
        )
    else:
        # Batches of the latent cache, drawn on the device from (seed, epoch, batch, process) only.
        train_dataloader = DeviceBatchSampler(
            len(train_dataset), args.train_batch_size, accelerator.device, data_seed, weights=sample_weights,
            num_processes=accelerator.num_processes, process_index=accelerator.process_index,
        )

    # Scheduler and math around the number of training steps.
    overrode_max_train_steps = False
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
        overrode_max_train_steps = True

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )

    # Prepare everything with our `accelerator`.
    if placement == "stream":
        controlnet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            controlnet, optimizer, train_dataloader, lr_scheduler
        )
    else:
        controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    trained_models = [controlnet]
    if style_encoder is not None:
        style_encoder = accelerator.prepare(style_encoder)
        trained_models.append(style_encoder)

    # The frozen models are only used for inference: cast them to the mixed-precision dtype.
    weight_dtype = torch.float32
    if accelerator.mixed_precision == "fp16":
        weight_dtype = torch.float16
    elif accelerator.mixed_precision == "bf16":
        weight_dtype = torch.bfloat16
    vae.to(accelerator.device, dtype=weight_dtype)
    unet.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    if args.torch_compile:
        # In place (`Module.compile`): state dict keys, save hooks and `unwrap_model` stay as they are.
        compile_in_place(accelerator.unwrap_model(controlnet), args.torch_compile_mode)
        compile_in_place(unet, args.torch_compile_mode)

    if placement == "device":
        # Encode the data once with the frozen VAE (in its dtype, as the streaming path does) and the prompts once.
        records = list(labeled_records) + list(unlabeled_records)
        prompts = [args.default_prompt] + [""] * (args.proportion_empty_prompts > 0)
        prompts += [caption for record in records for caption in record_captions(record, args.default_prompt)]
        prompt_cache = PromptEmbeddingCache(text_encoder, tokenizer, prompts)
        latent_cache = LatentCache.from_records(
            vae, records, args.resolution, prompt_cache, default_prompt=args.default_prompt,
            random_flip=args.random_flip, center_crop=args.center_crop,
            labeled=[True] * len(labeled_records) + [False] * len(unlabeled_records),
            use_labels=args.train_branch != "uncertainty", use_uncertainty=args.train_branch != "semantic",
            label_fill=args.ignore_index if args.ignore_index is not None else -1,
            proportion_empty_prompts=args.proportion_empty_prompts, show_progress=accelerator.is_local_main_process,
        )
        logger.info(f"  Latent cache = {latent_cache.nbytes() / 2**20:.1f} MiB on {latent_cache.device}, "
                    f"{len(prompt_cache.prompts)} distinct prompt(s)")

    # Recalculate the total training steps: the dataloader may have changed size in `prepare`.
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if overrode_max_train_steps:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    # Initialize the trackers (on the main process) and store the configuration; tensorboard takes scalars only.
    if accelerator.is_main_process:
        tracker_config = {
            key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in vars(args).items()
        }
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)

    # Train!
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Branch = {args.train_branch}{' (shared trunk)' if args.shared_trunk else ''}")
    if style_encoder is not None:
        logger.info(
            f"  Style encoder = {accelerator.unwrap_model(style_encoder).config.backbone}, "
            f"{args.style_images_per_sample} style image(s) per sample, drop rate {args.style_drop_rate}"
        )
    logger.info(
        f"  Num examples = {len(train_dataset)} ({train_dataset.num_labeled} labeled, "
        f"{train_dataset.num_unlabeled} unlabeled; label maps {'not ' if args.train_branch == 'uncertainty' else ''}used)"
    )
    logger.info(f"  Num batches each epoch = {len(train_dataloader)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    # Potentially load in the weights and states from a previous save
    global_step = initial_global_step = load_checkpoint(accelerator, args.resume_from_checkpoint, args.output_dir)
    first_epoch = global_step // num_update_steps_per_epoch

    progress_bar = tqdm(
        range(0, args.max_train_steps),
        initial=initial_global_step,
        desc="Steps",
        # Only show the progress bar once on each machine.
        disable=not accelerator.is_local_main_process,
    )

    run_validation = bool(args.validation_label or args.validation_uncertainty_levels)
    validation_log = None
    # Resuming mid-epoch: skip the batches of that epoch the checkpoint has already seen, so that the number of
    # steps per epoch and the end of training stay where an uninterrupted run puts them.
    resume_batches = (initial_global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps

    def epoch_batches(epoch: int, skip: int):
        """The batches of `epoch` after the first `skip`: from the DataLoader, or cut from the latent cache."""
        if placement == "stream":
            yield from accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
            return
        for index in range(skip, len(train_dataloader)):
            generator = train_dataloader.generator("batch", epoch, index, accelerator.process_index)
            batch = latent_cache.batch(train_dataloader.indices(epoch, index), generator)
            batch = latent_cache.control_conditioning(batch, args.num_classes)
            batch["encoder_hidden_states"] = prompt_cache(batch["prompt_ids"])
            yield batch

    # Losses (and labeled fractions) stay on the device until a logging step: no host sync in between.
    meter = ThroughputMeter(accelerator.device, total_batch_size)
    pending_losses, pending_fractions = [], []

    def flush_logs():
        logs = {"loss": accelerator.gather(torch.stack(pending_losses)).mean().item(),
                "lr": lr_scheduler.get_last_lr()[0]}
        if pending_fractions:
            logs["labeled_fraction"] = accelerator.gather(torch.stack(pending_fractions)).mean().item()
        pending_losses.clear()
        pending_fractions.clear()
        progress_bar.set_postfix(**logs)
        accelerator.log(logs, step=global_step)

    for epoch in range(first_epoch, args.num_train_epochs):
        for step, batch in enumerate(epoch_batches(epoch, resume_batches if epoch == first_epoch else 0)):
            mark_step_begin(args.torch_compile_mode)  # (CUDA-graph modes only)
            with accelerator.accumulate(*trained_models):
                loss = compute_loss(
                    batch, vae, text_encoder, unet, controlnet, noise_scheduler, args.train_branch,
                    weight_dtype, args.snr_gamma, style_encoder=style_encoder,
                    style_conditioning=accelerator.unwrap_model(style_encoder).config.conditioning_mode
                    if style_encoder is not None
                    else "concat",
                    style_drop_rate=args.style_drop_rate,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params_to_optimize, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=args.set_grads_to_none)

            pending_losses.append(loss.detach())
            if args.train_branch == "joint":
                pending_fractions.append(batch["is_labeled"].float().mean())
            # Checks if the accelerator has performed an optimization step behind the scenes
            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
                meter.step()
                if global_step % args.logging_steps == 0 or global_step >= args.max_train_steps:
                    flush_logs()

                if accelerator.is_main_process:
                    if global_step % args.checkpointing_steps == 0:
                        save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)

                    if run_validation and global_step % args.validation_steps == 0:
                        validation_log = log_validation(
                            vae, text_encoder, tokenizer, unet, controlnet, noise_scheduler.config, args,
                            accelerator, weight_dtype, global_step, style_encoder, style_images,
                        )

            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    # Save the trained controlnet and, if asked, push it with its model card.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.print(meter.write(args.output_dir, stage="controlnet", dataset_placement=placement))
        controlnet = accelerator.unwrap_model(controlnet)
        save_pretrained_atomic(controlnet, args.output_dir)
        logger.info(f"Saved the UncertaintyControlNetModel to {args.output_dir} (global step {global_step})")
        if style_encoder is not None:
            style_encoder = accelerator.unwrap_model(style_encoder)
            save_pretrained_atomic(style_encoder, os.path.join(args.output_dir, "style_encoder"))
            logger.info(f"Saved the StyleEncoderModel to {os.path.join(args.output_dir, 'style_encoder')}")

        # Run a final round of validation (diffusers' scripts do the same).
        if run_validation and (validation_log is None or global_step % args.validation_steps != 0):
            validation_log = log_validation(
                vae, text_encoder, tokenizer, unet, controlnet, noise_scheduler.config, args,
                accelerator, weight_dtype, global_step, style_encoder, style_images,
            )

        if args.push_to_hub:
            save_model_card(repo_id, args, data_summary, validation_log, repo_folder=args.output_dir)
            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                token=args.hub_token,
                ignore_patterns=["step_*", "epoch_*", "checkpoint-*", ".checkpoint-*", ".controlnet-*", "*/.controlnet-*"],
            )

    accelerator.end_training()


if __name__ == "__main__":
    args = parse_args()
    main(args)
