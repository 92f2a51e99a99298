"""A segmenter that reads a frozen latent diffusion model (ICCLD, "Inter-Coder Connected Latent Diffusion"):
VAE encoder -> slightly noised latent -> UNet, with the UNet's multi-scale decoder features and the VAE encoder's
intermediate feature maps (the *inter-coder connections*) fused by a light, trainable segmentation decoder.

The paper gives the idea, not the recipe; the choices made here are documented on [`LatentDiffusionSegmenter`].
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL, ConfigMixin, DDPMScheduler, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.utils import is_peft_available, logging

from .models import SegmentationOutput


logger = logging.get_logger(__name__)

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LatentSegmentationOutput(SegmentationOutput):
    """Output of [`LatentDiffusionSegmenter`]: a [`SegmentationOutput`] plus the latent-space features.

    Args:
        logits (`torch.Tensor` of shape `(batch, num_classes, height, width)`): Class scores at input resolution.
        features (`torch.Tensor` of shape `(batch, channels, height, width)`, *optional*): Features fed to the
            classification head (after dropout), returned when `return_features=True`.
        latent_features (`torch.Tensor` of shape `(batch, decoder_channels, h, w)`, *optional*): The fused UNet
            features at latent resolution (what the domain discriminator reads), returned when
            `return_latent_features=True`.
    """

    latent_features: Optional[torch.Tensor] = None


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution, GroupNorm (batch-size independent, so train and eval behave alike), SiLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.GroupNorm(math.gcd(8, out_channels), out_channels),
        nn.SiLU(),
    )


class _FeatureRecorder:
    """Forward hooks that store the outputs of some modules under given names (first tensor of tuple outputs)."""

    def __init__(self, modules: Dict[str, nn.Module]):
        self.features: Dict[str, torch.Tensor] = {}
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.features[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def pop(self) -> Dict[str, torch.Tensor]:
        features, self.features = self.features, {}
        return features


class LatentDiffusionSegmenter(ModelMixin, ConfigMixin):
    r"""Semantic segmentation on the features of a frozen latent diffusion base (ICCLD), with diffusers' config /
    weights handling. Inputs are RGB images in `[0, 1]`, as for [`SegmentationModel`]; the output is the same
    [`SegmentationOutput`] (logits at input resolution, optional head features), so losses, FLEX-Seg, the
    uncertainty estimators and the evaluation script apply unchanged.

    How the features are made (choices the paper leaves open):

    - **Latent**: the image (mapped to `[-1, 1]`) goes through the frozen VAE encoder; the latent is the *mean* of
      the posterior times the VAE's `scaling_factor` (no posterior sampling: the VAE is not trained here).
    - **Noise**: the latent is noised to `feature_timestep` with the base's noise schedule (`scheduler/` of the
      base, read as a `DDPMScheduler`). In training mode the noise is fresh every call (a mild augmentation). In eval
      mode (`model.eval()`, also MC-dropout, which keeps the model in eval mode) the noise is fixed: one tensor drawn
      from a CPU generator seeded with `noise_seed`, the same for every image of a batch, so an image always gives
      the same logits wherever it sits in a batch and on any device.
    - **Text conditioning**: the base's text encoder encodes `prompt` (default `""`, the unconditional embedding
      the base also uses for classifier-free guidance) once when the base is loaded; it is kept as a non-persistent
      buffer and the text encoder is dropped.
    - **UNet features**: forward hooks on the UNet's `up_blocks` listed in `unet_feature_blocks` (all by default)
      collect multi-scale decoder features. Each goes through a 1x1 projection to `decoder_channels`, is upsampled
      to the latent resolution, and the sum passes a 3x3 block: the **latent-space features** (what the domain
      discriminator of adversarial training reads, since they are the first trainable representation of the frozen
      diffusion features).
    - **Inter-coder connections**: forward hooks on the VAE encoder's `conv_in` (full resolution) and each of its
      `down_blocks` (strides 2, 4, ... up to the VAE factor) give feature maps that the 8x (or 4x, 2x) latent has
      compressed away. The decoder climbs from the latent resolution to the image resolution one factor 2 at a
      time; at every stride it concatenates the 1x1-projected VAE feature of that stride (the deepest one where two
      share a stride), then a 3x3 block. Widths halve per level from `decoder_channels` (at least 16).
    - **Head**: dropout (what MC-dropout switches on) and a 1x1 convolution to `num_classes`.
    - **Shapes** (channels and strides of every hooked feature) come from a dry run of the base at init, so any
      Stable Diffusion 1.x/2.x-layout base works: any VAE depth, any number of UNet levels.

    What is saved: only the trainable parts (decoder, and LoRA weights when `lora_rank > 0`) plus this config, whose
    `base_model_name_or_path` references the base. The frozen VAE and UNet are held in a plain tuple attribute, not
    as registered submodules, so they are in neither `state_dict()` nor `parameters()` (an optimizer built from
    `model.parameters()` cannot touch them, and `model.train()` leaves them in eval mode); `_apply` is overridden so
    that `.to()`, `.cuda()`, `.half()` etc. move them along. [`~LatentDiffusionSegmenter.from_pretrained`] loads
    the base again from the reference (a local folder, or a Hub id through `huggingface_hub` and its cache); pass
    `base_model_name_or_path=...` to it to point at a moved base.

    LoRA (optional, needs `peft`): with `lora_rank > 0`, LoRA adapters on the UNet's attention projections
    (`to_q`, `to_k`, `to_v`, `to_out.0`) are trained with the decoder. They live inside the frozen UNet and are
    registered a second time in `self.lora_parameters` (same tensors), which is how they reach the optimizer and
    the saved weights.

    Args:
        base_model_name_or_path (`str`): Diffusers pipeline folder or Hub id with `vae/`, `unet/`, `scheduler/`,
            `tokenizer/` and `text_encoder/` (Stable Diffusion 1.x/2.x layout).
        num_classes (`int`, defaults to 11): Number of classes (not counting `ignore_index`).
        ignore_index (`int`, defaults to 255): Label value of unlabeled pixels (stored for the scripts).
        class_names (`Tuple[str]`, *optional*): Names of the classes, `num_classes` of them.
        feature_timestep (`int`, defaults to 50): Diffusion timestep the latent is noised to (0 = clean latent).
        unet_feature_blocks (`Tuple[int]`, *optional*): Indices of the UNet `up_blocks` to hook (default: all).
        decoder_channels (`int`, defaults to 64): Decoder width at latent resolution.
        dropout (`float`, defaults to 0.1): Dropout before the classification head.
        lora_rank (`int`, defaults to 0): Rank of LoRA adapters on the UNet's attention (0 = none).
        prompt (`str`, defaults to `""`): Text the UNet is conditioned on.
        noise_seed (`int`, defaults to 0): Seed of the fixed evaluation noise.
    """

    @register_to_config
    def __init__(
        self,
        base_model_name_or_path: str,
        num_classes: int = 11,
        ignore_index: int = 255,
        class_names: Optional[Tuple[str, ...]] = None,
        feature_timestep: int = 50,
        unet_feature_blocks: Optional[Tuple[int, ...]] = None,
        decoder_channels: int = 64,
        dropout: float = 0.1,
        lora_rank: int = 0,
        prompt: str = "",
        noise_seed: int = 0,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be at least 2, got {num_classes}.")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"`ignore_index` must not be a class index (0..{num_classes - 1}), got {ignore_index}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"`class_names` must have {num_classes} entries, got {len(class_names)}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout}.")
        if decoder_channels < 8:
            raise ValueError(f"`decoder_channels` must be at least 8, got {decoder_channels}.")
        if lora_rank < 0:
            raise ValueError(f"`lora_rank` must be >= 0, got {lora_rank}.")
        if lora_rank > 0 and not is_peft_available():
            raise ImportError("`lora_rank` > 0 needs `peft`: `pip install 'diffusers-uncertainty[lora]'`.")

        vae, unet, scheduler, prompt_embeds = self._load_base(base_model_name_or_path, prompt)
        num_timesteps = scheduler.config.num_train_timesteps
        if not 0 <= feature_timestep < num_timesteps:
            raise ValueError(
                f"`feature_timestep` must be in [0, {num_timesteps}) (the base's training timesteps), "
                f"got {feature_timestep}."
            )
        num_up = len(unet.up_blocks)
        blocks = tuple(range(num_up)) if unet_feature_blocks is None else tuple(unet_feature_blocks)
        if not blocks or any(not 0 <= b < num_up for b in blocks) or len(set(blocks)) != len(blocks):
            raise ValueError(
                f"`unet_feature_blocks` must be distinct indices in 0..{num_up - 1} (the base UNet's up blocks), "
                f"got {unet_feature_blocks}."
            )
        if lora_rank > 0:
            from peft import LoraConfig

            unet.add_adapter(
                LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                           target_modules=list(LORA_TARGET_MODULES))
            )
            lora = {n.replace(".", "__"): p for n, p in unet.named_parameters() if "lora_" in n}
            if not lora:
                raise ValueError("`lora_rank` > 0, but the base UNet has no attention projections to adapt.")
            for parameter in lora.values():
                parameter.requires_grad_(True)
            self.lora_parameters = nn.ParameterDict(lora)

        # Not registered submodules on purpose: see the class docstring.
        self._base = (vae, unet)
        self._vae_names = ["vae_conv_in"] + [f"vae_down_{i}" for i in range(len(vae.encoder.down_blocks))]
        self._unet_names = [f"unet_up_{i}" for i in blocks]
        hooked = {"vae_conv_in": vae.encoder.conv_in}
        hooked.update({f"vae_down_{i}": block for i, block in enumerate(vae.encoder.down_blocks)})
        hooked.update({f"unet_up_{i}": unet.up_blocks[i] for i in blocks})
        self._recorder = _FeatureRecorder(hooked)
        self.register_buffer("_prompt_embeds", prompt_embeds, persistent=False)
        self.register_buffer("_alphas_cumprod", scheduler.alphas_cumprod.float().clone(), persistent=False)

        shapes = self._dry_run()
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.output_stride = self.vae_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        latent_stride = self.vae_factor

        # UNet features -> latent-space features.
        self.unet_projections = nn.ModuleList(
            nn.Conv2d(shapes[name][0], decoder_channels, 1) for name in self._unet_names
        )
        self.latent_block = _conv_block(decoder_channels, decoder_channels)

        # Inter-coder connections: the deepest VAE feature at each stride from the latent's down to 1.
        by_stride: Dict[int, str] = {}
        for name in self._vae_names:
            by_stride[shapes[name][1]] = name  # later (deeper) blocks overwrite earlier ones at the same stride
        self._skip_strides = sorted((s for s in by_stride if s <= latent_stride), reverse=True)
        self._skip_names = [by_stride[s] for s in self._skip_strides]
        in_width = decoder_channels
        self.skip_projections, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for stride, name in zip(self._skip_strides, self._skip_names):
            width = max(16, decoder_channels * stride // latent_stride)
            self.skip_projections.append(nn.Conv2d(shapes[name][0], width, 1))
            self.up_blocks.append(_conv_block(in_width + width, width))
            in_width = width
        self.head_dropout = nn.Dropout(p=dropout)
        self.segmentation_head = nn.Conv2d(in_width, num_classes, 1)

    # ----------------------------------------------------------------------------------------------- base model
    @staticmethod
    def _load_base(path: str, prompt: str):
        """Frozen VAE and UNet, the noise scheduler and the encoded prompt of a diffusers pipeline folder / Hub id."""
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        except (OSError, ValueError, EnvironmentError) as error:
            raise ValueError(
                f"`base_model_name_or_path`: expected a diffusers Stable Diffusion pipeline (folder or Hub id) with "
                f"vae/, unet/, scheduler/, tokenizer/ and text_encoder/, got {path!r} ({type(error).__name__}: {error})."
            ) from error
        if unet.config.addition_embed_type is not None:
            raise ValueError(
                f"`base_model_name_or_path` {path!r}: UNets with added conditioning "
                f"({unet.config.addition_embed_type!r}, e.g. SDXL) are not supported; use a Stable Diffusion 1.x/2.x base."
            )
        with torch.no_grad():
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            prompt_embeds = text_encoder(ids)[0].float()
        for module in (vae, unet):
            module.requires_grad_(False)
            module.eval()
        return vae, unet, scheduler, prompt_embeds

    @property
    def vae(self) -> AutoencoderKL:
        """The frozen VAE of the base (not part of the saved weights)."""
        return self._base[0]

    @property
    def unet(self) -> UNet2DConditionModel:
        """The frozen (LoRA-adapted if `lora_rank > 0`) UNet of the base (not part of the saved weights)."""
        return self._base[1]

    def _apply(self, fn, *args, **kwargs):
        # `.to()`, `.cuda()`, `.float()`, `.half()` all go through `_apply`: move the frozen base along.
        super()._apply(fn, *args, **kwargs)
        for module in self._base:
            module._apply(fn, *args, **kwargs)
        return self

    @torch.no_grad()
    def _dry_run(self) -> Dict[str, Tuple[int, int]]:
        """(channels, stride relative to the image) of every hooked feature, from one pass of a small blank image."""
        vae, unet = self._base
        size = 2 * 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.block_out_channels) - 1)
        features = self._base_features(torch.zeros(1, 3, size, size), fixed_noise=True)
        return {name: (f.shape[1], size // f.shape[-1]) for name, f in features.items()}

    def _noise(self, latents: torch.Tensor, fixed: bool) -> torch.Tensor:
        if not fixed:
            return torch.randn_like(latents)
        generator = torch.Generator().manual_seed(self.config.noise_seed)
        noise = torch.randn((1, *latents.shape[1:]), generator=generator, dtype=torch.float32)
        return noise.to(device=latents.device, dtype=latents.dtype).expand_as(latents)

    def _base_features(self, pixel_values: torch.Tensor, fixed_noise: bool) -> Dict[str, torch.Tensor]:
        """Runs the frozen VAE encoder and UNet; returns the hooked feature maps by name."""
        vae, unet = self._base
        self._recorder.pop()
        with torch.no_grad():
            latents = vae.encode(pixel_values * 2.0 - 1.0).latent_dist.mean * vae.config.scaling_factor
            timestep = self.config.feature_timestep
            alpha = self._alphas_cumprod[timestep].to(latents.dtype)
            # = DDPMScheduler.add_noise at one fixed timestep
            noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * self._noise(latents, fixed_noise)
        grad = self.config.lora_rank > 0 and torch.is_grad_enabled()
        with contextlib.nullcontext() if grad else torch.no_grad():
            embeds = self._prompt_embeds.to(noisy.dtype).expand(noisy.shape[0], -1, -1)
            timesteps = torch.full((noisy.shape[0],), timestep, device=noisy.device, dtype=torch.long)
            unet(noisy, timesteps, encoder_hidden_states=embeds)
        return self._recorder.pop()

    # ---------------------------------------------------------------------------------------------------- forward
    @property
    def feature_channels(self) -> int:
        """Number of channels of the head features returned with `return_features=True`."""
        return self.segmentation_head.in_channels

    @property
    def latent_channels(self) -> int:
        """Number of channels of the latent-space features (the domain discriminator's input)."""
        return self.config.decoder_channels

    def forward(
        self,
        pixel_values: torch.Tensor,
        return_features: bool = False,
        return_latent_features: bool = False,
        return_dict: bool = True,
    ):
        """Predicts class logits.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch, 3, height, width)`): Images in `[0, 1]`; height and width
                must be divisible by `self.output_stride` (VAE factor x UNet downsampling).
            return_features (`bool`, defaults to `False`): Also return the head features (for prototype losses).
            return_latent_features (`bool`, defaults to `False`): Also return the latent-space features (for the
                domain discriminator).
            return_dict (`bool`, defaults to `True`): Return a [`LatentSegmentationOutput`] instead of a tuple.

        Returns:
            [`LatentSegmentationOutput`] or `tuple`: logits of shape `(batch, num_classes, height, width)` and, if
            asked, the head features and the latent features.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"`pixel_values` must have shape (batch, 3, height, width), got {tuple(pixel_values.shape)}.")
        height, width = pixel_values.shape[-2:]
        if height % self.output_stride or width % self.output_stride:
            raise ValueError(
                f"`pixel_values` height and width must be divisible by {self.output_stride}, got {height}x{width}."
            )
        base = self._base_features(pixel_values, fixed_noise=not self.training)
        latent_size = (height // self.vae_factor, width // self.vae_factor)
        x = sum(
            F.interpolate(projection(base[name]), size=latent_size, mode="bilinear", align_corners=False)
            for projection, name in zip(self.unet_projections, self._unet_names)
        )
        latent_features = self.latent_block(x)
        x = latent_features
        for stride, name, projection, block in zip(
            self._skip_strides, self._skip_names, self.skip_projections, self.up_blocks
        ):
            size = (height // stride, width // stride)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = block(torch.cat([x, projection(base[name].to(x.dtype))], dim=1))
        features = self.head_dropout(x)
        logits = self.segmentation_head(features)
        outputs = (logits, features if return_features else None, latent_features if return_latent_features else None)
        if not return_dict:
            return tuple(o for o in outputs if o is not None)
        return LatentSegmentationOutput(*outputs)

    # ---------------------------------------------------------------------------------------------- save / load
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Loads a saved segmenter: its config and trainable weights from `pretrained_model_name_or_path`, the frozen
        base again from the config's `base_model_name_or_path` (or the `base_model_name_or_path` keyword, which
        overrides it).

        Follows `ModelMixin.from_pretrained`, with `low_cpu_mem_usage=False`: the constructor loads the frozen base,
        which must not happen under accelerate's empty-weights context.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): Folder or Hub id written by `save_pretrained`.
            **kwargs: Passed to `ModelMixin.from_pretrained`.
        """
        kwargs["low_cpu_mem_usage"] = False
        model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model._tie_lora_parameters()
        return model

    def _tie_lora_parameters(self) -> None:
        """Makes the UNet use the tensors of `self.lora_parameters` again (weight loading may replace them)."""
        if self.config.lora_rank == 0:
            return
        for key, parameter in self.lora_parameters.items():
            module_name, _, attribute = key.replace("__", ".").rpartition(".")
            module = self.unet.get_submodule(module_name)
            if getattr(module, attribute) is not parameter:
                setattr(module, attribute, parameter)
