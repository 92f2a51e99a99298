"""Tiny, randomly initialised, fully offline Stable Diffusion components for tests, examples and demos.

Nothing here touches the network: the tokenizer's vocabulary and merges files are written by
[`write_tiny_tokenizer`], every model is built from a config. The result is a normal diffusers pipeline
folder once saved, accepted anywhere a `--pretrained_model_name_or_path` is.
"""

import json
import os
import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .models.uncertainty_controlnet import UncertaintyControlNetModel


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters a byte-level BPE (GPT-2, CLIP) uses for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_tiny_tokenizer(save_directory: str | os.PathLike, model_max_length: int = 16) -> CLIPTokenizer:
    r"""
    Write a working byte-level CLIP tokenizer (every byte and its end-of-word form, plus the special tokens) to
    `save_directory` and return it loaded from there.

    Args:
        save_directory (`str` or `os.PathLike`):
            Folder for `vocab.json`, `merges.txt` and the saved tokenizer files.
        model_max_length (`int`, defaults to 16):
            Maximum sequence length, and the padding length of prompts.
    """
    os.makedirs(save_directory, exist_ok=True)
    vocab = {}
    for suffix in ("", "</w>"):
        for char in _byte_level_alphabet():
            vocab[char + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_file = os.path.join(save_directory, "vocab.json")
    merges_file = os.path.join(save_directory, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as handle:
        json.dump(vocab, handle)
    with open(merges_file, "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=vocab_file, merges=merges_file, model_max_length=model_max_length)
    tokenizer.save_pretrained(save_directory)
    return tokenizer


def build_tiny_components(
    num_classes: int = 4,
    uncertainty_channels: int = 1,
    shared_trunk: bool = False,
    ignore_index: int | None = None,
    sample_size: int = 8,
    block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 32,
    seed: int = 0,
) -> dict:
    r"""
    Build every component of a [`StableDiffusionDualControlPipeline`] at toy size with random weights.

    The sizes follow diffusers' own fast tests for the ControlNet pipeline: two UNet levels of 32/64 channels,
    a 4-channel latent, a 2-layer CLIP text encoder of width 32, and a VAE with a downsampling factor of 2
    (so `sample_size * 2` is the default image size).

    Args:
        num_classes (`int`, defaults to 4):
            Semantic channels of the controlnet.
        uncertainty_channels (`int`, defaults to 1):
            Uncertainty channels of the controlnet.
        shared_trunk (`bool`, defaults to `False`):
            Build the shared-trunk variant of the controlnet.
        ignore_index (`int`, *optional*):
            Label value of unlabeled pixels.
        sample_size (`int`, defaults to 8):
            Latent size of the UNet.
        block_out_channels (`tuple[int, ...]`, defaults to `(32, 64)`):
            UNet and ControlNet level widths.
        cross_attention_dim (`int`, defaults to 32):
            Text embedding width.
        seed (`int`, defaults to 0):
            Seed of the random initialisation (components are reproducible).

    Returns:
        `dict`: `vae`, `text_encoder`, `tokenizer`, `unet`, `controlnet`, `scheduler`, `safety_checker` (None),
        `feature_extractor` (None): the keyword arguments of the pipeline.
    """
    levels = len(block_out_channels)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=block_out_channels,
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    controlnet = UncertaintyControlNetModel.from_unet(
        unet,
        semantic_channels=num_classes,
        uncertainty_channels=uncertainty_channels,
        shared_trunk=shared_trunk,
        ignore_index=ignore_index,
        conditioning_embedding_out_channels=(16, 32),
    )
    # diffusers zero-initialises the ControlNet outputs; give them small random weights so that the controls
    # change the image in tests (an untrained control would add exactly nothing).
    generator = torch.Generator().manual_seed(seed + 2)
    for name, parameter in controlnet.named_parameters():
        if "controlnet_down_blocks" in name or "controlnet_mid_block" in name or "conv_out" in name:
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_tiny_tokenizer(folder)
    torch.manual_seed(seed + 4)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=len(tokenizer) - 2,
            eos_token_id=len(tokenizer) - 1,
            pad_token_id=len(tokenizer) - 1,
            hidden_size=cross_attention_dim,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "controlnet": controlnet,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }


def build_tiny_pipeline(save_directory: str | os.PathLike | None = None, **kwargs):
    r"""
    Build a tiny [`StableDiffusionDualControlPipeline`] (see [`build_tiny_components`]) and optionally save it.

    Args:
        save_directory (`str` or `os.PathLike`, *optional*):
            If given, the pipeline is saved there with `save_pretrained` (a normal diffusers pipeline folder).
        kwargs:
            Passed to [`build_tiny_components`].
    """
    from .pipelines.pipeline_dual_control import StableDiffusionDualControlPipeline

    pipeline = StableDiffusionDualControlPipeline(**build_tiny_components(**kwargs))
    pipeline.set_progress_bar_config(disable=True)
    if save_directory is not None:
        pipeline.save_pretrained(save_directory)
    return pipeline
