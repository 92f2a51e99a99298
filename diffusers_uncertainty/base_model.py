"""Reusable pieces of `examples/train_base_model.py`: a small Stable Diffusion-architecture base model from scratch.

For domains far from what Stable Diffusion saw (OCT scans, histology) and for machines that cannot download a base
model, the package can train its own: an `AutoencoderKL`, a `UNet2DConditionModel` and a small `CLIPTextModel` with
a locally written byte-level tokenizer, with the same architecture families and the same folder layout as Stable
Diffusion 1.x, only narrower. The result is a normal diffusers `StableDiffusionPipeline` folder that every script of
the package accepts as `--pretrained_model_name_or_path`.

Here: builders from size settings, the image dataset (images of any number of folders or `datasets` splits, labels
unused), the VAE's reconstruction/KL loss and latent scaling factor, and an atomic pipeline save.
"""

import math
import os
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .tiny import write_tiny_tokenizer
from .training.data import PairedTransform, load_image


# Stable Diffusion 1.x's noise schedule (scheduler/scheduler_config.json of stable-diffusion-v1-5).
SD_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}


def _check_channels(name: str, channels: Sequence[int], norm_num_groups: int, multiple: int = 1) -> tuple[int, ...]:
    channels = tuple(int(value) for value in channels)
    if len(channels) < 1 or any(value < 1 for value in channels):
        raise ValueError(f"`{name}` must be one or more positive integers, but got {list(channels)}.")
    bad = [value for value in channels if value % norm_num_groups or value % multiple]
    if bad:
        need = norm_num_groups * multiple // math.gcd(norm_num_groups, multiple)
        raise ValueError(
            f"`{name}` must be multiples of {need} (`norm_num_groups` {norm_num_groups}"
            + (f" and the attention heads {multiple}" if multiple > 1 else "")
            + f"), but got {list(channels)}."
        )
    return channels


def build_vae(
    block_out_channels: Sequence[int] = (32, 64, 128, 128),
    latent_channels: int = 4,
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    sample_size: int = 64,
) -> AutoencoderKL:
    r"""
    A randomly initialised `AutoencoderKL` of Stable Diffusion's architecture at the given width. The image is
    downsampled by `2 ** (len(block_out_channels) - 1)`: four levels give Stable Diffusion's factor 8, which
    `UncertaintyControlNetModel.from_unet`'s default conditioning embedding expects.

    Args:
        block_out_channels (`Sequence[int]`, defaults to `(32, 64, 128, 128)`):
            Channels per level (Stable Diffusion: `(128, 256, 512, 512)`).
        latent_channels (`int`, defaults to 4):
            Latent channels (4 as in Stable Diffusion, so that the UNet and ControlNets match).
        layers_per_block (`int`, defaults to 1):
            ResNet layers per level (Stable Diffusion: 2).
        norm_num_groups (`int`, defaults to 8):
            GroupNorm groups; every entry of `block_out_channels` must be a multiple.
        sample_size (`int`, defaults to 64):
            Training resolution, recorded in the config.
    """
    channels = _check_channels("vae_block_out_channels", block_out_channels, norm_num_groups)
    if latent_channels < 1:
        raise ValueError(f"`latent_channels` must be a positive integer, but got {latent_channels}.")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
    )


def build_unet(
    block_out_channels: Sequence[int] = (64, 128, 128),
    cross_attention_dim: int = 64,
    in_channels: int = 4,
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    norm_num_groups: int = 8,
    sample_size: int = 8,
) -> UNet2DConditionModel:
    r"""
    A randomly initialised `UNet2DConditionModel` laid out as Stable Diffusion 1.x's: cross-attention blocks on every
    level but the lowest (`CrossAttnDownBlock2D`... `DownBlock2D`, mirrored on the way up), a cross-attention
    mid-block, epsilon prediction.

    Args:
        block_out_channels (`Sequence[int]`, defaults to `(64, 128, 128)`):
            Channels per level (Stable Diffusion: `(320, 640, 1280, 1280)`). The latent is downsampled by
            `2 ** (len(block_out_channels) - 1)`.
        cross_attention_dim (`int`, defaults to 64):
            Width of the text embeddings (the text encoder's hidden size).
        in_channels (`int`, defaults to 4):
            The VAE's latent channels.
        layers_per_block (`int`, defaults to 1):
            ResNet/attention layers per level (Stable Diffusion: 2).
        attention_head_dim (`int`, defaults to 8):
            As in Stable Diffusion 1.x's config, where this (historically misnamed) value is the number of heads;
            every entry of `block_out_channels` must be a multiple.
        norm_num_groups (`int`, defaults to 8):
            GroupNorm groups; every entry of `block_out_channels` must be a multiple.
        sample_size (`int`, defaults to 8):
            Latent size at the training resolution, recorded in the config (the pipeline's default size is
            `sample_size * vae_scale_factor`).
    """
    channels = _check_channels("unet_block_out_channels", block_out_channels, norm_num_groups, attention_head_dim)
    if len(channels) < 2:
        raise ValueError(f"`unet_block_out_channels` must have at least 2 levels, but got {list(channels)}.")
    if cross_attention_dim < 1:
        raise ValueError(f"`cross_attention_dim` must be a positive integer, but got {cross_attention_dim}.")
    levels = len(channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


def build_tokenizer(save_directory: str | os.PathLike, model_max_length: int = 32):
    r"""
    The offline byte-level `CLIPTokenizer` of [`write_tiny_tokenizer`] (every byte is a token; no merges), written to
    `save_directory`. A prompt of `model_max_length - 2` characters fits.

    Args:
        save_directory (`str` or `os.PathLike`):
            Where the tokenizer files go.
        model_max_length (`int`, defaults to 32):
            Padding/truncation length of prompts (and the text encoder's positions).
    """
    if model_max_length < 3:
        raise ValueError(f"`model_max_length` must be at least 3 (start, one token, end), but got {model_max_length}.")
    return write_tiny_tokenizer(save_directory, model_max_length=model_max_length)


def build_text_encoder(
    tokenizer, hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4
) -> CLIPTextModel:
    r"""
    A randomly initialised `CLIPTextModel` sized for `tokenizer` (vocabulary, special tokens, positions).

    Args:
        tokenizer (`CLIPTokenizer`):
            From [`build_tokenizer`].
        hidden_size (`int`, defaults to 64):
            Width, which is the UNet's `cross_attention_dim`.
        num_hidden_layers (`int`, defaults to 2):
            Transformer layers.
        num_attention_heads (`int`, defaults to 4):
            Heads; must divide `hidden_size`.
    """
    if hidden_size < 1 or num_attention_heads < 1 or hidden_size % num_attention_heads:
        raise ValueError(
            f"`cross_attention_dim` (the text encoder width) must be a positive multiple of the text encoder's "
            f"{num_attention_heads} attention heads, but got {hidden_size}."
        )
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_noise_scheduler() -> DDPMScheduler:
    r"""The training `DDPMScheduler` with Stable Diffusion 1.x's schedule (1000 steps, scaled-linear betas)."""
    return DDPMScheduler(**SD_NOISE_SCHEDULE)


def build_inference_scheduler(noise_scheduler_config) -> DDIMScheduler:
    r"""
    The `DDIMScheduler` saved with the pipeline, on the training schedule, configured as Stable Diffusion's DDIM
    (`set_alpha_to_one=False`, `steps_offset=1`).

    Args:
        noise_scheduler_config:
            The training scheduler's config.
    """
    return DDIMScheduler.from_config(noise_scheduler_config, set_alpha_to_one=False, steps_offset=1, clip_sample=False)


# ------------------------------------------------------------------------------------------------- data
class BaseModelTrainingDataset(torch.utils.data.Dataset):
    r"""
    Images (labels unused) with tokenized captions for base-model training. Each item: `pixel_values` `(3, R, R)` in
    [-1, 1] (shorter side resized to R, centre or random square crop, optional flip: [`PairedTransform`], as in
    diffusers' `train_text_to_image.py`) and `input_ids`.

    Args:
        records (`Sequence[dict]`):
            Records with `"name"`, `"image"` and `"caption"` (from `unlabeled_folder_records` or `DatasetRecords`).
        resolution (`int`):
            Training resolution (a positive multiple of 8).
        tokenizer:
            The text encoder's tokenizer; captions are padded to `tokenizer.model_max_length`.
        default_prompt (`str`, defaults to `""`):
            Caption of samples without one.
        center_crop (`bool`, defaults to `False`):
            Centre crop instead of random crop.
        random_flip (`bool`, defaults to `False`):
            Flip horizontally with probability 0.5.
        seed (`int`, *optional*):
            With a seed, the random crop, flip and caption choice of an item depend only on `(seed, epoch, index)`
            (see [`~BaseModelTrainingDataset.set_epoch`]), not on the order in which items are loaded: a run resumed
            in the middle of an epoch sees the same crops as an uninterrupted one. Without, the `random` module.
    """

    def __init__(
        self,
        records: Sequence[dict],
        resolution: int,
        tokenizer,
        default_prompt: str = "",
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int | None = None,
    ):
        if len(records) == 0:
            raise ValueError("The training data is empty: no images.")
        self.records = records
        self.transform = PairedTransform(resolution, center_crop=center_crop, random_flip=random_flip)
        self.tokenizer = tokenizer
        self.default_prompt = default_prompt
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        r"""Set the epoch that, with the seed, determines the random crops and flips (call before each epoch)."""
        self.epoch = epoch

    def caption(self, record: dict, rng=random) -> str:
        r"""The record's caption (a random one of several, as diffusers' scripts do), or `default_prompt`."""
        caption = record.get("caption")
        if caption is None or (isinstance(caption, (list, tuple, np.ndarray)) and len(caption) == 0):
            return self.default_prompt
        if isinstance(caption, str):
            return caption
        if isinstance(caption, (list, tuple, np.ndarray)):
            return str(rng.choice(list(caption)))
        raise ValueError(
            f"Captions must be strings or lists of strings, but {record['name']} has a {type(caption).__name__}."
        )

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        rng = random if self.seed is None else random.Random(f"{self.seed}-{self.epoch}-{index}")
        image = load_image(record["image"], record["name"])
        input_ids = self.tokenizer(
            self.caption(record, rng),
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        return {"pixel_values": self.transform(image, rng=rng)["pixel_values"], "input_ids": input_ids}


def collate_images(examples: list[dict]) -> dict:
    r"""
    Stack [`BaseModelTrainingDataset`] items into a batch (diffusers' `collate_fn`: contiguous float pixels).

    Args:
        examples (`list[dict]`):
            The items.
    """
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    return {
        "pixel_values": pixel_values.to(memory_format=torch.contiguous_format).float(),
        "input_ids": torch.stack([example["input_ids"] for example in examples]),
    }


# ----------------------------------------------------------------------------------------------- losses
def vae_loss(
    vae: AutoencoderKL,
    pixel_values: torch.Tensor,
    kl_weight: float = 1e-6,
    reconstruction_loss: str = "l1",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    r"""
    The autoencoder's training loss: reconstruction error of a sampled latent (L1 or MSE, per pixel) plus
    `kl_weight` times the KL divergence of the posterior to N(0, I) (per latent element). Stable Diffusion's
    autoencoder adds a perceptual (LPIPS) and an adversarial term; both are left out here (no downloads, small data).

    Args:
        vae (`AutoencoderKL`):
            The autoencoder (possibly wrapped by Accelerate).
        pixel_values (`torch.Tensor`):
            `(B, 3, H, W)` images in [-1, 1].
        kl_weight (`float`, defaults to 1e-6):
            Weight of the KL term (Stable Diffusion's KL-f8 autoencoder: 1e-6).
        reconstruction_loss (`str`, defaults to `"l1"`):
            `"l1"` or `"mse"`.
        generator (`torch.Generator`, *optional*):
            For the posterior sample.

    Returns:
        `tuple[torch.Tensor, dict]`: the loss, and its parts (`reconstruction`, `kl`) as detached 0-d tensors (left on
        the device: reading them is a host sync, which a training loop does only when it logs).
    """
    if reconstruction_loss not in ("l1", "mse"):
        raise ValueError(f"`reconstruction_loss` must be 'l1' or 'mse', but got {reconstruction_loss!r}.")
    model = getattr(vae, "module", vae)
    posterior = model.encode(pixel_values).latent_dist
    reconstruction = model.decode(posterior.sample(generator=generator)).sample
    if reconstruction_loss == "l1":
        reconstruction_term = F.l1_loss(reconstruction.float(), pixel_values.float())
    else:
        reconstruction_term = F.mse_loss(reconstruction.float(), pixel_values.float())
    kl_term = posterior.kl().mean() / posterior.mean[0].numel()
    loss = reconstruction_term + kl_weight * kl_term
    return loss, {"reconstruction": reconstruction_term.detach(), "kl": kl_term.detach()}


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, pixel_values: torch.Tensor) -> float:
    r"""
    Mean absolute error of the deterministic reconstruction (posterior mode), in units of [-1, 1] pixels.

    Args:
        vae (`AutoencoderKL`):
            The autoencoder.
        pixel_values (`torch.Tensor`):
            `(B, 3, H, W)` images in [-1, 1].
    """
    model = getattr(vae, "module", vae)
    latents = model.encode(pixel_values.to(model.device, model.dtype)).latent_dist.mode()
    reconstruction = model.decode(latents).sample
    return (reconstruction.float() - pixel_values.to(reconstruction.device).float()).abs().mean().item()


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, batches) -> float:
    r"""
    `1 / std` of the VAE's latents over `batches`, the way Stable Diffusion's `scaling_factor` (0.18215) was chosen,
    so that the UNet sees latents of unit variance.

    Args:
        vae (`AutoencoderKL`):
            The trained autoencoder.
        batches:
            An iterable of `(B, 3, H, W)` image tensors in [-1, 1].
    """
    model = getattr(vae, "module", vae)
    latents = [model.encode(batch.to(model.device, model.dtype)).latent_dist.sample().float() for batch in batches]
    if not latents:
        raise ValueError("`batches` is empty: no images to measure the latent scale on.")
    std = torch.cat([latent.flatten() for latent in latents]).std().item()
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"The VAE's latents have standard deviation {std}; cannot set a scaling factor.")
    return 1.0 / std
