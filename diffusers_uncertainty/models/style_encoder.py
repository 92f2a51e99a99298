"""`StyleEncoderModel`: one or several example images -> style tokens for the UNet's cross-attention.

The Style-Extracting Diffusion Models recipe: a trainable image encoder turns each style image into `num_tokens`
tokens of the UNet's `cross_attention_dim`; an aggregation block (see `style_aggregation.py`) merges the tokens of
several images of one style into one set; the tokens reach the UNet and the controls as (part of) their
`encoder_hidden_states`. A learned *null style* stands for "no style" in classifier-free guidance (training drops
the style of a fraction of the samples and puts the null style in its place).
"""

import importlib.util
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .style_aggregation import AGGREGATIONS, build_aggregation


CONDITIONING_MODES = ("replace", "concat")


@dataclass
class StyleEncoderOutput(BaseOutput):
    r"""
    Output of [`StyleEncoderModel`].

    Args:
        style_embeds (`torch.Tensor`):
            Style tokens `(batch, num_tokens, cross_attention_dim)`.
    """

    style_embeds: torch.Tensor


def combine_text_and_style(text_embeds: torch.Tensor, style_embeds: torch.Tensor, mode: str) -> torch.Tensor:
    r"""
    The `encoder_hidden_states` the UNet and the controls see: the style tokens in place of the text embeddings
    (`"replace"`) or appended after them along the sequence axis (`"concat"`).

    Args:
        text_embeds (`torch.Tensor`):
            Text embeddings `(batch, sequence, dim)`.
        style_embeds (`torch.Tensor`):
            Style tokens `(batch, num_tokens, dim)`.
        mode (`str`):
            `"replace"` or `"concat"`.
    """
    if mode == "replace":
        return style_embeds.to(text_embeds.dtype)
    if mode == "concat":
        return torch.cat([text_embeds, style_embeds.to(text_embeds.dtype)], dim=1)
    raise ValueError(f"`conditioning_mode` must be one of {list(CONDITIONING_MODES)}, but got {mode!r}.")


def _timm():
    if importlib.util.find_spec("timm") is None:
        raise ImportError(
            "StyleEncoderModel builds its backbone with timm, which is not installed: "
            "`pip install 'diffusers-uncertainty[style]'` (or `pip install timm`)."
        )
    import timm

    return timm


def _image_to_array(image, argument: str) -> np.ndarray:
    """One style image as a float `(C, H, W)` array in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode not in ("L", "LA", "RGB", "RGBA"):
            raise ValueError(f"`{argument}`: PIL images must be 8-bit (mode L, LA, RGB, RGBA or P), but got mode {image.mode}.")
        array = np.asarray(image, dtype=np.float32) / 255.0
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if isinstance(image, np.ndarray):  # (H, W) or (H, W, C), as PIL converts
        if image.ndim not in (2, 3):
            raise ValueError(f"`{argument}`: numpy images must be (H, W) or (H, W, C), but got shape {image.shape}.")
        array = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    elif isinstance(image, torch.Tensor):  # (H, W) or (C, H, W), as torchvision
        if image.ndim not in (2, 3):
            raise ValueError(f"`{argument}`: tensor images must be (H, W) or (C, H, W), but got shape {tuple(image.shape)}.")
        array = (image[None] if image.ndim == 2 else image).detach().cpu().numpy()
    else:
        raise ValueError(
            f"`{argument}` must hold PIL images, numpy arrays or torch tensors, but got {type(image).__name__}."
        )
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"`{argument}`: arrays must be uint8 or float in [0, 1], but got dtype {array.dtype}.")
    array = array.astype(np.float32)
    if np.isnan(array).any() or array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(
            f"`{argument}`: float images must lie in [0, 1], but got values in [{array.min()}, {array.max()}]."
        )
    return array


def prepare_style_images(images, in_channels: int, image_size: int, argument: str = "style_images") -> torch.Tensor:
    r"""
    Convert one set of style images to the encoder's input: `(num_images, in_channels, image_size, image_size)`
    float32 in [-1, 1]. Each image's shorter side is resized (bilinear, antialiased) to `image_size`, then centre
    cropped, as in training.

    Args:
        images:
            A PIL image, a numpy `(H, W[, C])` array, a torch `(C, H, W)` tensor, a list of them, or a batch
            (`(N, C, H, W)` tensor, `(N, H, W, C)` array). uint8 values are divided by 255; float values must lie in
            [0, 1].
        in_channels (`int`):
            Channels the encoder expects; every image must have exactly this many.
        image_size (`int`):
            The encoder's input size.
        argument (`str`, defaults to `"style_images"`):
            Name used in error messages.

    Raises:
        `ValueError`: on an empty set, a wrong type, a channel count other than `in_channels`, or values out of range.
    """
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError(f"`{argument}` must hold at least one style image, but got 0.")
    prepared = []
    for index, image in enumerate(images):
        array = _image_to_array(image, argument)
        if array.shape[0] != in_channels:
            raise ValueError(
                f"`{argument}`: the style encoder expects {in_channels}-channel images (in_channels={in_channels}), "
                f"but image {index} has {array.shape[0]} channels."
            )
        tensor = torch.from_numpy(np.ascontiguousarray(array))[None]
        height, width = tensor.shape[-2:]
        scale = image_size / min(height, width)
        size = (max(image_size, round(height * scale)), max(image_size, round(width * scale)))
        tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)
        top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        tensor = tensor[..., top : top + image_size, left : left + image_size]
        prepared.append(tensor.clamp(0.0, 1.0) * 2.0 - 1.0)
    return torch.cat(prepared)


class StyleEncoderModel(ModelMixin, ConfigMixin):
    r"""
    Style encoder of Style-Extracting Diffusion Models: images -> style tokens of the UNet's `cross_attention_dim`.

    Each image goes through a timm backbone (random initialisation; [`~StyleEncoderModel.load_pretrained_backbone`]
    loads the library's pretrained weights when asked and reachable), whose pooled features a linear layer turns into
    `num_tokens` tokens (layer-normalised, the scale of CLIP text embeddings). The tokens of the images of one sample
    are merged by the `aggregation` block:

    * `"mean"` / `"max"`: over the images, order-invariant, any count;
    * `"mlp"`: concatenation then an MLP; order-dependent, at most `max_style_images`, missing slots filled with the
      null style;
    * `"set_transformer"`: a small transformer over all tokens (no image-position encoding), then a mean over the
      images: order-invariant, any count.

    `null_style` `(num_tokens, cross_attention_dim)` is a learned "no style", used for the samples dropped in
    training (`drop_mask`) and for the unconditional branch of classifier-free guidance.

    `conditioning_mode` says how the tokens reach the UNet and the controls (see [`combine_text_and_style`]):
    `"concat"` appends them to the text embeddings, `"replace"` uses them instead. It is part of the model's config
    because training and generation must agree on it.

    Args:
        backbone (`str`, defaults to `"resnet18"`):
            A timm model name (`timm.list_models()`), built with `num_classes=0` (globally pooled features).
        in_channels (`int`, defaults to 3):
            Channels of the style images.
        cross_attention_dim (`int`, defaults to 768):
            Width of the tokens; must equal the UNet's `cross_attention_dim`.
        num_tokens (`int`, defaults to 4):
            Style tokens per image (and after aggregation).
        aggregation (`str`, defaults to `"mean"`):
            `"mean"`, `"max"`, `"mlp"` or `"set_transformer"`.
        max_style_images (`int`, defaults to 4):
            Slots of the `"mlp"` aggregation (other blocks take any count).
        image_size (`int`, defaults to 224):
            Input size; inputs of another size are resized (bilinear) in `forward`.
        image_mean (`tuple[float]`, *optional*), image_std (`tuple[float]`, *optional*):
            Per-channel normalisation applied to images in [0, 1] before the backbone. Default 0.5 / 0.5 (inputs in
            [-1, 1] as the VAE sees them); use ImageNet's with pretrained backbones.
        conditioning_mode (`str`, defaults to `"concat"`):
            `"concat"` or `"replace"`.
        aggregation_layers (`int`, defaults to 2), aggregation_heads (`int`, defaults to 4):
            Size of the `"set_transformer"` block.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        backbone: str = "resnet18",
        in_channels: int = 3,
        cross_attention_dim: int = 768,
        num_tokens: int = 4,
        aggregation: str = "mean",
        max_style_images: int = 4,
        image_size: int = 224,
        image_mean: tuple[float, ...] | None = None,
        image_std: tuple[float, ...] | None = None,
        conditioning_mode: str = "concat",
        aggregation_layers: int = 2,
        aggregation_heads: int = 4,
    ):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {list(AGGREGATIONS)}, but got {aggregation!r}.")
        if conditioning_mode not in CONDITIONING_MODES:
            raise ValueError(f"`conditioning_mode` must be one of {list(CONDITIONING_MODES)}, but got {conditioning_mode!r}.")
        for name, value in (("in_channels", in_channels), ("num_tokens", num_tokens), ("image_size", image_size),
                            ("max_style_images", max_style_images), ("cross_attention_dim", cross_attention_dim)):
            if value < 1:
                raise ValueError(f"`{name}` must be a positive integer, but got {value}.")
        mean = [0.5] * in_channels if image_mean is None else list(image_mean)
        std = [0.5] * in_channels if image_std is None else list(image_std)
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(
                f"`image_mean` and `image_std` must have in_channels={in_channels} entries, but got {len(mean)} and {len(std)}."
            )
        self.image_encoder = _timm().create_model(backbone, pretrained=False, num_classes=0, in_chans=in_channels)
        self.projection = nn.Linear(self.image_encoder.num_features, num_tokens * cross_attention_dim)
        self.token_norm = nn.LayerNorm(cross_attention_dim)
        self.aggregator = build_aggregation(
            aggregation, cross_attention_dim, num_tokens, max_style_images, aggregation_layers, aggregation_heads
        )
        # Same scale as the layer-normalised tokens it stands in for.
        self.null_style = nn.Parameter(torch.randn(num_tokens, cross_attention_dim))
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def load_pretrained_backbone(self) -> None:
        r"""
        Replace the backbone's random weights with timm's pretrained ones for `config.backbone` (downloaded through
        the Hugging Face Hub cache). Set `image_mean`/`image_std` to the weights' normalisation when building the
        model.

        Raises:
            `OSError`: if the weights cannot be reached (e.g. `HF_HUB_OFFLINE=1` and nothing cached).
        """
        try:
            pretrained = _timm().create_model(
                self.config.backbone, pretrained=True, num_classes=0, in_chans=self.config.in_channels
            )
        except Exception as error:  # timm raises RuntimeError, OSError or hub errors depending on the cause
            raise OSError(
                f"Could not load pretrained weights for the style backbone {self.config.backbone!r}: {error}. They "
                "come from the Hugging Face Hub (or its local cache); go online once or keep the random initialisation."
            ) from error
        self.image_encoder.load_state_dict(pretrained.state_dict())

    def get_null_style(self, batch_size: int) -> torch.Tensor:
        r"""
        The null style repeated for `batch_size` samples, `(batch_size, num_tokens, cross_attention_dim)`.

        Args:
            batch_size (`int`):
                Number of samples.
        """
        return self.null_style[None].expand(batch_size, -1, -1)

    def forward(
        self, style_images: torch.Tensor, drop_mask: torch.Tensor | None = None, return_dict: bool = True
    ) -> StyleEncoderOutput | tuple:
        r"""
        Args:
            style_images (`torch.Tensor`):
                `(batch, num_images, in_channels, H, W)` (or `(batch, in_channels, H, W)` for one image per sample),
                values in [-1, 1]; resized to `image_size` when needed.
            drop_mask (`torch.Tensor`, *optional*):
                `(batch,)` booleans; `True` samples get the null style (style dropout for classifier-free guidance).
            return_dict (`bool`, defaults to `True`):
                Return a [`StyleEncoderOutput`] instead of a tuple.

        Returns:
            [`StyleEncoderOutput`] or `tuple`: style tokens `(batch, num_tokens, cross_attention_dim)`.
        """
        if style_images.ndim == 4:
            style_images = style_images[:, None]
        if style_images.ndim != 5:
            raise ValueError(
                "`style_images` must have shape (batch, num_images, channels, H, W), but got "
                f"{tuple(style_images.shape)}."
            )
        batch, count, channels, height, width = style_images.shape
        if count == 0:
            raise ValueError("`style_images` must hold at least one style image per sample, but got 0.")
        if channels != self.config.in_channels:
            raise ValueError(
                f"`style_images`: the style encoder expects {self.config.in_channels}-channel images (in_channels="
                f"{self.config.in_channels}), but got {channels} channels."
            )
        images = style_images.reshape(batch * count, channels, height, width).to(self.dtype)
        size = self.config.image_size
        if (height, width) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        images = ((images + 1.0) / 2.0 - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        features = self.image_encoder(images)
        tokens = self.projection(features).view(batch, count, self.config.num_tokens, self.config.cross_attention_dim)
        style = self.aggregator(self.token_norm(tokens), self.null_style)
        if drop_mask is not None:
            if drop_mask.shape != (batch,):
                raise ValueError(f"`drop_mask` must have shape ({batch},), but got {tuple(drop_mask.shape)}.")
            style = torch.where(drop_mask.to(style.device).bool()[:, None, None], self.get_null_style(batch), style)
        if not return_dict:
            return (style,)
        return StyleEncoderOutput(style_embeds=style)
