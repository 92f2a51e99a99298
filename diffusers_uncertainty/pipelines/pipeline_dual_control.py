"""`StableDiffusionDualControlPipeline`: Stable Diffusion with a semantic and an uncertainty control."""

from dataclasses import dataclass
from typing import Any, Callable

import inspect

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.controlnet.pipeline_controlnet import StableDiffusionControlNetPipeline, retrieve_timesteps
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import is_compiled_module, randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ..conditioning import prepare_semantic_map, prepare_uncertainty_map
from ..models.style_encoder import StyleEncoderModel, combine_text_and_style, prepare_style_images
from ..models.uncertainty_controlnet import UncertaintyControlNetModel


logger = logging.get_logger(__name__)


@dataclass
class DualControlPipelineOutput(BaseOutput):
    r"""
    Output of [`StableDiffusionDualControlPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images, as `output_type` asks.
        semantic_maps (`np.ndarray` or `torch.Tensor`, *optional*):
            The label maps the images were generated from, `(batch, height, width)` int64 at the output size and in
            the order of `images` (unlabeled pixels carry the controlnet's `ignore_index`): each `(images[i],
            semantic_maps[i])` is a labeled sample. A torch tensor for `output_type="pt"`, numpy otherwise;
            `None` without a `semantic_map`.
        nsfw_content_detected (`list[bool]`, *optional*):
            Safety checker flags, `None` without a safety checker.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    semantic_maps: np.ndarray | torch.Tensor | None
    nsfw_content_detected: list[bool] | None


def _per_branch(value, name: str) -> list[float]:
    """A number for both branches, or a `(semantic, uncertainty)` pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"`{name}` must be a number or a pair (semantic, uncertainty), but got {value!r}.")
        return [float(v) for v in value]
    return [float(value), float(value)]


class StableDiffusionDualControlPipeline(StableDiffusionControlNetPipeline):
    r"""
    Stable Diffusion with an [`UncertaintyControlNetModel`]: generate images that follow a label map (semantic
    control) and look as unfamiliar to a segmenter as an uncertainty map says (uncertainty control). The label
    maps come back with the images, aligned, so every output is a labeled sample.

    It reuses the prompt encoding, latent preparation and safety checking of diffusers'
    `StableDiffusionControlNetPipeline` and replaces its `__call__`; the denoising loop follows that `__call__`
    step for step, so given the same inputs and seed both pipelines produce the same image.

    Args:
        vae (`AutoencoderKL`):
            Variational auto-encoder between images and latents.
        text_encoder (`CLIPTextModel`):
            Frozen text encoder.
        tokenizer (`CLIPTokenizer`):
            Tokenizer of the text encoder.
        unet (`UNet2DConditionModel`):
            The denoising UNet.
        controlnet (`UncertaintyControlNetModel`):
            The dual control.
        scheduler (`SchedulerMixin`):
            A Stable Diffusion scheduler (e.g. `DDIMScheduler`, `PNDMScheduler`).
        safety_checker (`StableDiffusionSafetyChecker`, *optional*):
            Flags offensive outputs; `None` to disable.
        feature_extractor (`CLIPImageProcessor`, *optional*):
            Inputs for the safety checker.
        style_encoder (`StyleEncoderModel`, *optional*):
            Turns `style_images` into style tokens for the UNet's and the controls' cross-attention (Style-Extracting
            Diffusion Models). Without it, or without `style_images`, the pipeline runs exactly as it would without
            style conditioning.
        image_encoder (`CLIPVisionModelWithProjection`, *optional*):
            Encodes `ip_adapter_image` for an IP-Adapter loaded with `load_ip_adapter` (as in diffusers' ControlNet
            pipeline).
        requires_safety_checker (`bool`, defaults to `False`):
            Warn when no safety checker is given. Off by default: the outputs are medical and street-scene
            training data, not images for the public.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->style_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "style_encoder", "image_encoder"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: UncertaintyControlNetModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        style_encoder: StyleEncoderModel | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = False,
    ):
        # Not super().__init__: the parent wraps a list of ControlNets in a MultiControlNetModel. Any component may
        # be None, as in diffusers' pipelines (e.g. only the text components, for `encode_prompt`); `__call__` then
        # names what is missing.
        DiffusionPipeline.__init__(self)
        if controlnet is not None and not isinstance(controlnet, UncertaintyControlNetModel):
            raise ValueError(
                f"`controlnet` must be an UncertaintyControlNetModel, but got {type(controlnet).__name__}. Build one "
                "with UncertaintyControlNetModel.from_unet(...) or .from_controlnets(semantic, uncertainty)."
            )
        nets = {id(net): net for net in controlnet.nets}.values() if controlnet is not None and vae is not None else []
        for net in nets:
            factor = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
            vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
            if factor != vae_factor:
                raise ValueError(
                    f"`controlnet` reduces its conditions by {factor} (conditioning_embedding_out_channels="
                    f"{list(net.config.conditioning_embedding_out_channels)}), but the VAE's latents are 1/{vae_factor} "
                    f"of the image. Build it with {int(vae_factor).bit_length()} conditioning_embedding_out_channels."
                )
        if style_encoder is not None:
            if not isinstance(style_encoder, StyleEncoderModel):
                raise ValueError(f"`style_encoder` must be a StyleEncoderModel or None, but got {type(style_encoder).__name__}.")
            if unet is not None and style_encoder.config.cross_attention_dim != unet.config.cross_attention_dim:
                raise ValueError(
                    f"`style_encoder` makes tokens of width {style_encoder.config.cross_attention_dim}, but the UNet's "
                    f"cross_attention_dim is {unet.config.cross_attention_dim}."
                )
        if safety_checker is None and requires_safety_checker:
            logger.warning(f"You have disabled the safety checker for {self.__class__.__name__}.")
        if safety_checker is not None and feature_extractor is None:
            raise ValueError("`feature_extractor` is required when a `safety_checker` is given, but got None.")
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            controlnet=controlnet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            style_encoder=style_encoder,
            image_encoder=image_encoder,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True)
        self.register_to_config(requires_safety_checker=requires_safety_checker)

    @staticmethod
    def _map_size(value):
        """(height, width) of a map argument, or None for a number, None or an unknown type."""
        first = value[0] if isinstance(value, (list, tuple)) and len(value) > 0 else value
        if isinstance(first, PIL.Image.Image):
            return first.height, first.width
        if isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim >= 2:
            return tuple(first.shape[-2:])
        return None

    def _size_source(self, semantic_map, uncertainty_map):
        """Which argument the default output size comes from."""
        if self._map_size(semantic_map) is not None:
            return "semantic_map"
        if self._map_size(uncertainty_map) is not None:
            return "uncertainty_map"
        return None

    def _resolve_size(self, semantic_map, uncertainty_map, height, width) -> tuple[int, int]:
        """Output size: explicit, else the semantic map's, else the uncertainty map's, else the UNet's default."""
        size = self._map_size(semantic_map) or self._map_size(uncertainty_map)
        if size is None:
            size = (self.unet.config.sample_size * self.vae_scale_factor,) * 2
        return height or int(size[0]), width or int(size[1])

    def check_components(self, prompt, output_type, ip_adapter_image=None, ip_adapter_image_embeds=None, init_image=None):
        r"""
        Raise a `ValueError` naming the component a call needs but the pipeline was built without (diffusers'
        pipelines may be built with only some components, e.g. the text components for `encode_prompt`).
        """
        needed = ["unet", "controlnet", "scheduler"]
        if prompt is not None:
            needed += ["text_encoder", "tokenizer"]
        if output_type != "latent" or init_image is not None:
            needed.append("vae")
        if ip_adapter_image is not None:
            needed.append("image_encoder")
        for name in needed:
            if getattr(self, name, None) is None:
                raise ValueError(f"This call needs the pipeline's `{name}`, but the pipeline was built with {name}=None.")
        if (ip_adapter_image is not None or ip_adapter_image_embeds is not None) and not hasattr(
            self.unet.encoder_hid_proj, "image_projection_layers"
        ):
            raise ValueError(
                "`ip_adapter_image` or `ip_adapter_image_embeds` was given, but the UNet has no IP-Adapter: load one "
                "with `pipe.load_ip_adapter(...)` first."
            )

    def check_dual_inputs(
        self,
        prompt,
        height,
        width,
        prompt_embeds,
        negative_prompt,
        negative_prompt_embeds,
        control_guidance_start,
        control_guidance_end,
        callback_on_step_end_tensor_inputs,
        size_source=None,
        timesteps=None,
        sigmas=None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
    ):
        r"""
        Validate the arguments of `__call__` that do not depend on the maps; raises `ValueError` naming the
        argument, what was expected and what came.
        """
        controlnet = self.controlnet._orig_mod if is_compiled_module(self.controlnet) else self.controlnet
        if not isinstance(controlnet, UncertaintyControlNetModel):
            raise ValueError(f"`controlnet` must be an UncertaintyControlNetModel, but got {type(controlnet).__name__}.")
        for name, value in (("height", height), ("width", width)):
            if value % 8 != 0:
                raise ValueError(
                    f"`{name}` must be divisible by 8, but got {value}"
                    + (f" (taken from {size_source}'s size; pass `height` and `width`)." if size_source else ".")
                )
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, "
                f"but got {callback_on_step_end_tensor_inputs}."
            )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass `prompt` or `prompt_embeds`; got neither.")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"`prompt` must be a str or a list of str, but got {type(prompt).__name__}.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    "`prompt_embeds` and `negative_prompt_embeds` must have the same shape, but got "
                    f"{tuple(prompt_embeds.shape)} and {tuple(negative_prompt_embeds.shape)}."
                )
        for start, end in zip(control_guidance_start, control_guidance_end):
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(
                    "`control_guidance_start` and `control_guidance_end` must satisfy 0 <= start < end <= 1 for each "
                    f"branch, but got start={control_guidance_start} and end={control_guidance_end}."
                )
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass either `timesteps` or `sigmas`, not both.")
        for name, values in (("timesteps", timesteps), ("sigmas", sigmas)):
            if values is not None and name not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(
                    f"`{name}` was given, but the scheduler {type(self.scheduler).__name__} does not take custom {name} "
                    "in `set_timesteps`."
                )
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("Pass either `ip_adapter_image` or `ip_adapter_image_embeds`, not both.")
        if ip_adapter_image_embeds is not None:
            if not isinstance(ip_adapter_image_embeds, list) or not all(
                torch.is_tensor(embeds) and embeds.ndim in (3, 4) for embeds in ip_adapter_image_embeds
            ):
                raise ValueError(
                    "`ip_adapter_image_embeds` must be a list of 3D or 4D tensors (one per IP-Adapter), but got "
                    f"{type(ip_adapter_image_embeds).__name__}"
                    + (
                        f" of {[tuple(e.shape) if torch.is_tensor(e) else type(e).__name__ for e in ip_adapter_image_embeds]}"
                        if isinstance(ip_adapter_image_embeds, list)
                        else ""
                    )
                    + "."
                )

    def check_uncertainty_guidance(
        self, uncertainty_guidance_scale, uncertainty, uncertainty_conditioning_scale, guide_style: bool, guess_mode: bool
    ) -> None:
        r"""
        Validate `uncertainty_guidance_scale` of `__call__` (other than 1.0) before any work (`uncertainty`: the
        prepared uncertainty map or `None`).
        """
        value = uncertainty_guidance_scale
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0 or value == float("inf"):
            raise ValueError(f"`uncertainty_guidance_scale` must be a finite number >= 0, but got {value!r}.")
        if uncertainty is None:
            raise ValueError(
                f"`uncertainty_guidance_scale` is {value}, but no `uncertainty_map` was given; it guides towards the "
                "uncertainty map."
            )
        if uncertainty_conditioning_scale == 0:
            raise ValueError(
                f"`uncertainty_guidance_scale` is {value}, but `uncertainty_conditioning_scale` is 0: the uncertainty "
                "control is off, so there is nothing to guide."
            )
        if guide_style:
            raise ValueError(
                f"`uncertainty_guidance_scale` ({value}) cannot be combined with `style_guidance_scale` > 1; set one "
                "of them to 1."
            )
        if guess_mode:
            raise ValueError(f"`uncertainty_guidance_scale` ({value}) cannot be combined with `guess_mode`.")

    def check_image_inputs(self, init_image, strength, latents, num_steps: int) -> None:
        r"""
        Validate `init_image` and `strength` of `__call__` before any work (`num_steps`: the length of the schedule).
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise ValueError(f"`strength` must be a number in (0, 1], but got {strength!r}.")
        if init_image is None:
            if strength != 1.0:
                raise ValueError(
                    f"`strength` {strength} applies to image-to-image generation, but no `init_image` was given; pass "
                    "`init_image` or leave `strength` at 1.0."
                )
            return
        if latents is not None:
            raise ValueError("Pass either `init_image` (generation starts from the noised image) or `latents`, not both.")
        if int(num_steps * strength) < 1:
            raise ValueError(
                f"`strength` {strength} of {num_steps} denoising steps leaves no step to run (int(strength x steps) "
                "= 0); raise `strength` or `num_inference_steps`."
            )

    def get_timesteps(self, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
        r"""
        The last `int(strength * num_inference_steps)` timesteps of the scheduler's schedule, and their number
        (as `StableDiffusionImg2ImgPipeline.get_timesteps`).
        """
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * self.scheduler.order)
        return timesteps, num_inference_steps - t_start

    def prepare_image_latents(self, image: torch.Tensor, timestep: torch.Tensor, dtype, device, generator) -> torch.Tensor:
        r"""
        The starting latents of image-to-image generation: `image` (`(N, 3, H, W)` in [-1, 1]) encoded with the VAE
        (the mean of its latent distribution, scaled by the VAE's `scaling_factor`) and noised to `timestep` with the
        scheduler's `add_noise`; the noise comes from `generator` (one per image when a list) as in `prepare_latents`.
        """
        if isinstance(generator, list) and len(generator) != image.shape[0]:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but {image.shape[0]} images are "
                "generated; pass one generator per image."
            )
        image = image.to(device=device, dtype=self.vae.dtype)
        image_latents = self.vae.encode(image).latent_dist.mode() * self.vae.config.scaling_factor
        image_latents = image_latents.to(dtype)
        noise = randn_tensor(image_latents.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(image_latents, noise, timestep.repeat(image_latents.shape[0]))

    def prepare_style_sets(self, style_images, batch_size: int, style_guidance_scale: float) -> list[torch.Tensor] | None:
        r"""
        Validate and convert `style_images` (no model runs): `None` without style images, else one
        `(num_images, C, S, S)` tensor per set (one set shared by all prompts, or one per prompt).

        Args:
            style_images:
                `None`; one set (an image or a list of images: PIL, numpy `(H, W[, C])`, torch `(C, H, W)`); or a list
                of `batch_size` sets (lists), one per prompt.
            batch_size (`int`):
                Number of prompts (after broadcasting).
            style_guidance_scale (`float`):
                The style guidance scale (only checked here).
        """
        if style_images is None:
            if style_guidance_scale != 1.0:
                raise ValueError(
                    f"`style_guidance_scale` is {style_guidance_scale}, but no `style_images` were given; it guides "
                    "towards the style of `style_images`."
                )
            return None
        if self.style_encoder is None:
            raise ValueError(
                "`style_images` were given, but the pipeline has no `style_encoder`: load one with "
                "StyleEncoderModel.from_pretrained(...) and pass `style_encoder=` to the pipeline."
            )
        config = self.style_encoder.config
        per_prompt = (
            isinstance(style_images, (list, tuple))
            and len(style_images) > 0
            and all(isinstance(item, (list, tuple)) for item in style_images)
        )
        if per_prompt:
            if len(style_images) not in (1, batch_size):
                raise ValueError(
                    f"`style_images` holds {len(style_images)} sets (one per prompt), but there are {batch_size} prompts."
                )
            names = [f"style_images[{index}]" for index in range(len(style_images))]
        else:
            style_images, names = [style_images], ["style_images"]
        sets = [
            prepare_style_images(images, config.in_channels, config.image_size, argument=name)
            for images, name in zip(style_images, names)
        ]
        for images, name in zip(sets, names):
            if config.aggregation == "mlp" and images.shape[0] > config.max_style_images:
                raise ValueError(
                    f"`{name}` holds {images.shape[0]} images, but the style encoder's `mlp` aggregation takes at most "
                    f"max_style_images={config.max_style_images}."
                )
        return sets

    def encode_style(self, style_sets: list[torch.Tensor], batch_size: int, num_images_per_prompt: int, device):
        r"""
        Style tokens `(batch_size * num_images_per_prompt, num_tokens, dim)` in the order of the prompt embeddings
        (each prompt's images consecutive, as `encode_prompt` orders them).

        Args:
            style_sets (`list[torch.Tensor]`):
                From [`~StableDiffusionDualControlPipeline.prepare_style_sets`]: one set, or one per prompt.
            batch_size (`int`):
                Number of prompts.
            num_images_per_prompt (`int`):
                Images per prompt.
            device (`torch.device`):
                Where the tokens go.
        """
        dtype = self.style_encoder.dtype
        embeds = torch.cat(
            [self.style_encoder(images[None].to(device=device, dtype=dtype)).style_embeds for images in style_sets]
        )
        if embeds.shape[0] == 1:
            embeds = embeds.expand(batch_size, -1, -1)
        return embeds.repeat_interleave(num_images_per_prompt, dim=0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        semantic_map=None,
        uncertainty_map=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        semantic_conditioning_scale: float = 1.0,
        uncertainty_conditioning_scale: float = 1.0,
        uncertainty_guidance_scale: float = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | tuple[float, float] = 0.0,
        control_guidance_end: float | tuple[float, float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        style_images=None,
        style_guidance_scale: float = 1.0,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        init_image=None,
        strength: float = 1.0,
    ):
        r"""
        Generate images from label maps and uncertainty maps, from noise or (with `init_image`) from a noised image.

        Batching: the prompts, label maps and uncertainty maps each have a batch size of 1 or `B`; size-1 inputs
        are repeated to `B` (one prompt for many label maps is the usual case), and everything is then repeated
        `num_images_per_prompt` times, giving `B * num_images_per_prompt` images.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt(s); or pass `prompt_embeds`.
            semantic_map (*optional*):
                Integer label maps: PIL images in mode `"L"`/`"P"`, numpy arrays or integer tensors of shape `(H, W)`
                or `(B, H, W)`, or a list of them; or an already one-hot float tensor `(B, C, H, W)`. `C` is the
                controlnet's `semantic_channels`; pixels equal to its `ignore_index` get an all-zero vector. Resized
                to the output size with nearest-neighbour. `None` switches the semantic control off.
            uncertainty_map (*optional*):
                Uncertainty in [0, 1]: a number (a constant map), PIL images, float arrays or tensors of shape
                `(H, W)`, `(B, H, W)` or `(B, 1, H, W)`, or a list of maps. Resized bilinearly. `None` switches the
                uncertainty control off.
            height (`int`, *optional*), width (`int`, *optional*):
                Output size, divisible by 8. Defaults to the size of the semantic map (else the uncertainty map, else
                the UNet's default).
            num_inference_steps (`int`, defaults to 50):
                Denoising steps.
            guidance_scale (`float`, defaults to 7.5):
                Classifier-free guidance scale; guidance is off at <= 1.
            negative_prompt (`str` or `list[str]`, *optional*):
                What not to generate.
            num_images_per_prompt (`int`, defaults to 1):
                Images per (prompt, maps) item.
            eta (`float`, defaults to 0.0):
                DDIM eta; ignored by other schedulers.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes generation deterministic.
            latents (`torch.Tensor`, *optional*):
                Pre-generated initial noise.
            prompt_embeds (`torch.Tensor`, *optional*), negative_prompt_embeds (`torch.Tensor`, *optional*):
                Pre-computed text embeddings.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`):
                Return a [`DualControlPipelineOutput`] instead of a tuple `(images, semantic_maps, nsfw)`.
            cross_attention_kwargs (`dict`, *optional*):
                Passed to the attention processors.
            semantic_conditioning_scale (`float`, defaults to 1.0):
                Weight of the semantic control's residuals.
            uncertainty_conditioning_scale (`float`, defaults to 1.0):
                Weight of the uncertainty control's residuals.
            uncertainty_guidance_scale (`float`, defaults to 1.0):
                Guidance towards the `uncertainty_map`, against a zero map (the control's "familiar to the segmenter"
                condition), as classifier-free guidance is towards the prompt: one more branch in the guidance batch
                sees the text and the zero map, and `e = e_guided + (uncertainty_guidance_scale - 1) * (e(text, map) -
                e(text, zero map))`, where `e_guided` is the usual prediction (with `guidance_scale` > 1, `e(neg, map) +
                guidance_scale * (e(text, map) - e(neg, map))`; else `e(text, map)`). At 1.0 nothing changes and no
                branch is added; above 1 the step moves further in the direction the uncertainty control moves it,
                in the prediction rather than in the controls' residuals (`uncertainty_conditioning_scale`); between
                0 and 1 it moves less (at 0 without `guidance_scale`: exactly the zero map). Needs an
                `uncertainty_map` and a non-zero `uncertainty_conditioning_scale`; not combined with `guess_mode` or
                with `style_guidance_scale` > 1. Costs one more UNet and control pass per step for every image.
            guess_mode (`bool`, defaults to `False`):
                The controls see only the conditional half of the classifier-free-guidance batch (diffusers'
                ControlNet guess mode).
            control_guidance_start (`float` or a pair, defaults to 0.0), control_guidance_end (`float` or a pair,
            defaults to 1.0):
                Fraction of the denoising steps during which the controls act; a pair sets (semantic, uncertainty)
                separately. A branch outside its window is not computed at all (with `uncertainty_guidance_scale`,
                neither is the zero-map branch at the steps outside the uncertainty window).
            clip_skip (`int`, *optional*):
                Text encoder layers to skip.
            callback_on_step_end (`Callable`, *optional*):
                Called as `callback_on_step_end(self, step, timestep, callback_kwargs)` after every step.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                Tensors passed in `callback_kwargs`.
            style_images (*optional*):
                Example images of the wanted style (needs a `style_encoder`): one set shared by all prompts (a PIL
                image, a numpy `(H, W[, C])` array, a torch `(C, H, W)` tensor in [0, 1] or uint8, or a list of them),
                or a list of sets, one per prompt (each a list). The encoder's aggregation merges the images of a set.
                The style tokens join the text embeddings as the encoder's `conditioning_mode` says (`concat`:
                appended; `replace`: instead of them) for the UNet and both controls. `None`: no style conditioning.
            style_guidance_scale (`float`, defaults to 1.0):
                Classifier-free guidance towards the style, against the encoder's learned null style. At 1.0 the
                style is in every branch (no extra cost). Above 1 with `guidance_scale` > 1, three branches are run
                (as InstructPix2Pix composes image and text guidance): `e = e(neg, null) + guidance_scale * (e(text,
                null) - e(neg, null)) + style_guidance_scale * (e(text, style) - e(text, null))`; with
                `guidance_scale` <= 1, two: `e = e(text, null) + style_guidance_scale * (e(text, style) - e(text,
                null))`. Not combined with `guess_mode`.
            timesteps (`list[int]`, *optional*), sigmas (`list[float]`, *optional*):
                Custom timesteps or sigmas for schedulers whose `set_timesteps` accepts them (as in diffusers'
                pipelines); `num_inference_steps` is then ignored.
            ip_adapter_image (*optional*):
                Image(s) for the IP-Adapter(s) loaded with `load_ip_adapter` (needs an `image_encoder`), one per
                adapter, as in diffusers' ControlNet pipeline. They act on the UNet.
            ip_adapter_image_embeds (`list[torch.Tensor]`, *optional*):
                Pre-computed IP-Adapter image embeddings, one tensor per adapter, `(batch, num_images, dim)` with the
                negative embeddings first when guidance is on (as `prepare_ip_adapter_image_embeds` returns them).
            init_image (*optional*):
                Starting image(s) for image-to-image generation, as `image` in diffusers' img2img pipelines (SDEdit,
                Meng et al. 2022; named apart because `image` is the control image in the ControlNet pipeline this one
                mirrors): PIL images, numpy arrays or tensors as `VaeImageProcessor.preprocess` takes them, batch size
                1 or `B`, resized to the output size. The image is encoded with the VAE (the mean of its latent
                distribution), noised to the timestep where the last `strength` of the schedule begins, and denoised
                from there with both controls. Typical use: a labeled source image with its own label map and a target
                uncertainty map, so the layout is kept and the appearance moves toward the target. `None`: from noise.
            strength (`float`, defaults to 1.0):
                With `init_image`, the fraction of the `num_inference_steps` steps that runs, in (0, 1]; `int(strength *
                num_inference_steps)` steps must be at least 1. Lower keeps more of the image. Must be 1.0 without
                `init_image`.

        Returns:
            [`DualControlPipelineOutput`] or `tuple`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        self.check_components(prompt, output_type, ip_adapter_image, ip_adapter_image_embeds, init_image)
        controlnet = self.controlnet._orig_mod if is_compiled_module(self.controlnet) else self.controlnet
        control_guidance_start = _per_branch(control_guidance_start, "control_guidance_start")
        control_guidance_end = _per_branch(control_guidance_end, "control_guidance_end")
        size_source = None if height is not None and width is not None else self._size_source(semantic_map, uncertainty_map)
        height, width = self._resolve_size(semantic_map, uncertainty_map, height, width)

        # 1. Check everything before any work is done.
        self.check_dual_inputs(
            prompt,
            height,
            width,
            prompt_embeds,
            negative_prompt,
            negative_prompt_embeds,
            control_guidance_start,
            control_guidance_end,
            callback_on_step_end_tensor_inputs,
            size_source=size_source,
            timesteps=timesteps,
            sigmas=sigmas,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
        )
        num_steps = len(timesteps) if timesteps is not None else len(sigmas) if sigmas is not None else num_inference_steps
        self.check_image_inputs(init_image, strength, latents, num_steps)
        if init_image is not None:
            init_image = self.image_processor.preprocess(init_image, height=height, width=width)
        config = controlnet.config
        one_hot = labels = uncertainty = None
        if semantic_map is not None:
            one_hot, labels = prepare_semantic_map(
                semantic_map,
                config.semantic_channels,
                height,
                width,
                ignore_index=config.ignore_index,
                device=self._execution_device,
                dtype=controlnet.dtype,
            )
        if uncertainty_map is not None:
            uncertainty = prepare_uncertainty_map(uncertainty_map, config.uncertainty_channels, height, width)

        prompt_batch = (
            1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        )
        sizes = {"prompt": prompt_batch}
        if one_hot is not None:
            sizes["semantic_map"] = one_hot.shape[0]
        if uncertainty is not None:
            sizes["uncertainty_map"] = uncertainty.shape[0]
        if init_image is not None:
            sizes["init_image"] = init_image.shape[0]
        batch_size = max(sizes.values())
        if any(size not in (1, batch_size) for size in sizes.values()):
            raise ValueError(f"Batch sizes must be 1 or equal, but got {sizes}.")
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != prompt_batch:
            raise ValueError(
                f"`negative_prompt_embeds` must have batch size {prompt_batch} like the prompts, but got "
                f"{negative_prompt_embeds.shape[0]}."
            )
        if prompt_batch == 1 and batch_size > 1:
            # One prompt for many maps.
            if prompt is not None:
                prompt = [prompt if isinstance(prompt, str) else prompt[0]] * batch_size
            else:
                prompt_embeds = prompt_embeds.repeat(batch_size, 1, 1)
                if negative_prompt_embeds is not None:
                    negative_prompt_embeds = negative_prompt_embeds.repeat(batch_size, 1, 1)
            if isinstance(negative_prompt, list) and len(negative_prompt) == 1:
                negative_prompt = negative_prompt * batch_size

        style_sets = self.prepare_style_sets(style_images, batch_size, style_guidance_scale)

        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        guess_mode = guess_mode or controlnet.nets[0].config.global_pool_conditions
        total = batch_size * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            # Checked here, not only where the noise is drawn, so that no model has run yet.
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch "
                f"size of {total} ({batch_size} x `num_images_per_prompt` {num_images_per_prompt}); pass one "
                "generator per image."
            )
        guide_style = style_sets is not None and style_guidance_scale > 1.0
        guide_uncertainty = uncertainty_guidance_scale != 1.0
        # Branches of the guidance batch: [uncond, cond] as in diffusers, one more for separate style guidance, one
        # more (last) for uncertainty guidance.
        num_branches = 1 + int(self.do_classifier_free_guidance) + int(guide_style) + int(guide_uncertainty)
        if guess_mode and guide_style and self.do_classifier_free_guidance:
            raise ValueError(
                "`guess_mode` cannot be combined with `style_guidance_scale` > 1 and `guidance_scale` > 1 (three "
                "guidance branches); set one of the scales to 1."
            )
        if guide_uncertainty:
            self.check_uncertainty_guidance(
                uncertainty_guidance_scale, uncertainty, uncertainty_conditioning_scale, guide_style, guess_mode
            )

        # 2. Encode the prompt (StableDiffusionControlNetPipeline.encode_prompt).
        text_encoder_lora_scale = (
            self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs is not None else None
        )
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=text_encoder_lora_scale,
            clip_skip=self.clip_skip,
        )
        if style_sets is None:
            branches = [negative_prompt_embeds] if self.do_classifier_free_guidance else []
            branches += [prompt_embeds] * (1 + int(guide_uncertainty))
            prompt_embeds = torch.cat(branches) if len(branches) > 1 else prompt_embeds
        else:
            # Style tokens join the text embeddings of every branch; the null style stands for "no style".
            style_embeds = self.encode_style(style_sets, batch_size, num_images_per_prompt, device)
            null_style = self.style_encoder.get_null_style(total).to(device)
            mode = self.style_encoder.config.conditioning_mode
            branches = []
            if self.do_classifier_free_guidance:
                branches.append(combine_text_and_style(negative_prompt_embeds, null_style if guide_style else style_embeds, mode))
            if guide_style:
                branches.append(combine_text_and_style(prompt_embeds, null_style, mode))
            branches += [combine_text_and_style(prompt_embeds, style_embeds, mode)] * (1 + int(guide_uncertainty))
            prompt_embeds = torch.cat(branches)

        # IP-Adapter image embeddings, for the UNet only (as in StableDiffusionControlNetPipeline), in the order of
        # the guidance branches: the negative image for the unconditional branch, the image for the others.
        added_cond_kwargs = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, total, self.do_classifier_free_guidance
            )
            # Every branch after the first (unconditional) one is conditional: [neg, image, image] or [image, image].
            if num_branches == 3:
                image_embeds = [torch.cat([*embeds.chunk(2), embeds.chunk(2)[1]]) for embeds in image_embeds]
            elif num_branches == 2 and not self.do_classifier_free_guidance:
                image_embeds = [torch.cat([embeds, embeds]) for embeds in image_embeds]
            added_cond_kwargs = {"image_embeds": image_embeds}

        # 3. Conditions: repeated as StableDiffusionControlNetPipeline.prepare_image repeats its control images.
        def expand(condition):
            if condition is None:
                return None
            repeat_by = total if condition.shape[0] == 1 else num_images_per_prompt
            condition = condition.repeat_interleave(repeat_by, dim=0).to(device=device, dtype=controlnet.dtype)
            if num_branches > 1 and not guess_mode:
                condition = torch.cat([condition] * num_branches)
            return condition

        if labels is not None:
            repeat_by = total if labels.shape[0] == 1 else num_images_per_prompt
            labels = labels.repeat_interleave(repeat_by, dim=0)
        base_scales = [
            float(semantic_conditioning_scale) if one_hot is not None else 0.0,
            float(uncertainty_conditioning_scale) if uncertainty is not None else 0.0,
        ]
        # The conditioning embeddings depend on neither the timestep nor the latents: computed once here and reused
        # at every step (the controlnet then skips its own embedding).
        offload_hook = getattr(controlnet, "_hf_hook", None)
        if offload_hook is not None:
            offload_hook.pre_forward(controlnet)  # model CPU offload: weights onto the device, as a forward does
        uncertainty_condition = expand(uncertainty)
        if guide_uncertainty:  # the last branch sees the zero map
            branches = list(uncertainty_condition.chunk(num_branches))
            branches[-1] = torch.zeros_like(branches[-1])
            uncertainty_condition = torch.cat(branches)
        controlnet_cond = controlnet.embed_conditions([expand(one_hot), uncertainty_condition], base_scales)
        if guide_uncertainty:
            # At steps outside the uncertainty window both maps give the same prediction (the guidance term is 0):
            # the zero-map branch, the last rows of every batched input, is then left out.
            unguided_rows = (num_branches - 1) * total
            unguided_cond = controlnet_cond.first_rows(unguided_rows)
            unguided_added_cond_kwargs = None
            if added_cond_kwargs is not None:
                unguided_added_cond_kwargs = {
                    "image_embeds": [embeds[:unguided_rows] for embeds in added_cond_kwargs["image_embeds"]]
                }

        # 4. Timesteps and 5. latents.
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        if init_image is None:
            latents = self.prepare_latents(
                total, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
            )
        else:
            timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength)
            repeat_by = total if init_image.shape[0] == 1 else num_images_per_prompt
            latents = self.prepare_image_latents(
                init_image.repeat_interleave(repeat_by, dim=0), timesteps[:1], prompt_embeds.dtype, device, generator
            )
        self._num_timesteps = len(timesteps)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(total)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 6. Which branch acts at which step; a branch at scale 0 is skipped by the controlnet.
        controlnet_keep = [
            [
                1.0 - float(i / len(timesteps) < start or (i + 1) / len(timesteps) > end)
                for start, end in zip(control_guidance_start, control_guidance_end)
            ]
            for i in range(len(timesteps))
        ]

        # 7. Denoising loop (as StableDiffusionControlNetPipeline.__call__).
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                zero_map_step = guide_uncertainty and controlnet_keep[i][1] == 1.0
                if guide_uncertainty and not zero_map_step:
                    branches, step_prompt_embeds = num_branches - 1, prompt_embeds[:unguided_rows]
                    step_cond, step_added_cond_kwargs = unguided_cond, unguided_added_cond_kwargs
                else:
                    branches, step_prompt_embeds = num_branches, prompt_embeds
                    step_cond, step_added_cond_kwargs = controlnet_cond, added_cond_kwargs
                latent_model_input = torch.cat([latents] * branches) if branches > 1 else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                if guess_mode and num_branches > 1:
                    control_model_input = self.scheduler.scale_model_input(latents, t)
                    controlnet_prompt_embeds = prompt_embeds.chunk(2)[1]
                else:
                    control_model_input = latent_model_input
                    controlnet_prompt_embeds = step_prompt_embeds

                cond_scale = [scale * keep for scale, keep in zip(base_scales, controlnet_keep[i])]
                down_block_res_samples, mid_block_res_sample = self.controlnet(
                    control_model_input,
                    t,
                    encoder_hidden_states=controlnet_prompt_embeds,
                    controlnet_cond=step_cond,
                    conditioning_scale=cond_scale,
                    guess_mode=guess_mode,
                    return_dict=False,
                )
                if guess_mode and num_branches > 1:
                    down_block_res_samples = [torch.cat([torch.zeros_like(d), d]) for d in down_block_res_samples]
                    mid_block_res_sample = torch.cat([torch.zeros_like(mid_block_res_sample), mid_block_res_sample])

                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=step_prompt_embeds,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    added_cond_kwargs=step_added_cond_kwargs,
                    down_block_additional_residuals=down_block_res_samples,
                    mid_block_additional_residual=mid_block_res_sample,
                    return_dict=False,
                )[0]
                predictions = noise_pred.chunk(branches)
                if zero_map_step:
                    predictions, noise_pred_zero_map = predictions[:-1], predictions[-1]
                if len(predictions) == 3:
                    noise_pred_uncond, noise_pred_null_style, noise_pred_style = predictions
                    noise_pred = (
                        noise_pred_uncond
                        + self.guidance_scale * (noise_pred_null_style - noise_pred_uncond)
                        + style_guidance_scale * (noise_pred_style - noise_pred_null_style)
                    )
                elif len(predictions) == 2:
                    # [uncond, cond] in diffusers' order; the guided condition is the text, or the style alone.
                    scale = self.guidance_scale if self.do_classifier_free_guidance else style_guidance_scale
                    noise_pred_uncond, noise_pred_text = predictions
                    noise_pred = noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)
                else:
                    noise_pred = predictions[0]
                if zero_map_step:
                    noise_pred = noise_pred + (uncertainty_guidance_scale - 1.0) * (predictions[-1] - noise_pred_zero_map)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    step_locals = locals()  # not inside the comprehension: that has its own locals()
                    callback_kwargs = {k: step_locals[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 8. Decode, check, post-process.
        if output_type != "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image, has_nsfw_concept = latents, None
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        if labels is not None and output_type != "pt":
            labels = labels.numpy()
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, labels, has_nsfw_concept)
        return DualControlPipelineOutput(images=image, semantic_maps=labels, nsfw_content_detected=has_nsfw_concept)
