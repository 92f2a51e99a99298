"""Segmentation networks: a small architecture factory over `segmentation-models-pytorch` and a
diffusers-style `SegmentationModel` wrapper (`ModelMixin` + `ConfigMixin`) so that trained
segmenters save and load with `save_pretrained` / `from_pretrained` (config.json + safetensors).
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput, logging


logger = logging.get_logger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Segmentation models need `segmentation-models-pytorch`: "
            "`pip install 'diffusers-uncertainty[segmentation]'`."
        ) from error
    return smp


def _smp_builder(smp_name: str) -> Callable[..., nn.Module]:
    def build(
        encoder_name: str,
        encoder_depth: int,
        in_channels: int,
        num_classes: int,
        decoder_channels: Optional[Sequence[int]] = None,
    ) -> nn.Module:
        kwargs = {}
        if smp_name in ("unet", "unetplusplus", "fpn", "manet", "linknet", "deeplabv3plus", "pan", "upernet"):
            kwargs["encoder_depth"] = encoder_depth
        if decoder_channels is not None:
            if smp_name not in ("unet", "unetplusplus", "manet"):
                raise ValueError(
                    f"`decoder_channels` is only supported for unet-like architectures, got architecture={smp_name!r}."
                )
            if len(decoder_channels) != encoder_depth:
                raise ValueError(
                    f"`decoder_channels` must have `encoder_depth`={encoder_depth} entries, got {list(decoder_channels)}."
                )
            kwargs["decoder_channels"] = tuple(decoder_channels)
        # Encoder weights are never fetched here: `SegmentationModel.load_encoder_weights` does it on request.
        return _smp().create_model(
            smp_name,
            encoder_name=encoder_name,
            encoder_weights=None,
            in_channels=in_channels,
            classes=num_classes,
            **kwargs,
        )

    return build


# Architecture name -> builder. A builder takes (encoder_name, encoder_depth, in_channels, num_classes,
# decoder_channels) and returns a module with `encoder`, `decoder` and `segmentation_head` attributes laid
# out like a `segmentation_models_pytorch` model (`head(decoder(encoder(x)))` gives the logits).
SEGMENTATION_ARCHITECTURES: Dict[str, Callable[..., nn.Module]] = {
    "unet": _smp_builder("unet"),
    "unetplusplus": _smp_builder("unetplusplus"),
    "fpn": _smp_builder("fpn"),
    "deeplabv3plus": _smp_builder("deeplabv3plus"),
    "segformer": _smp_builder("segformer"),
}


def register_segmentation_architecture(name: str, builder: Callable[..., nn.Module]) -> None:
    """Adds an architecture to the factory used by [`SegmentationModel`].

    Args:
        name (`str`): Key used as `architecture` in the model config. Must not exist yet.
        builder (`Callable`): Called as `builder(encoder_name=..., encoder_depth=..., in_channels=...,
            num_classes=..., decoder_channels=...)`; must return a module with `encoder`, `decoder` and
            `segmentation_head` attributes such that `segmentation_head(decoder(encoder(x)))` are the logits.
    """
    if name in SEGMENTATION_ARCHITECTURES:
        raise ValueError(f"Architecture {name!r} is already registered.")
    SEGMENTATION_ARCHITECTURES[name] = builder


@dataclass
class SegmentationOutput(BaseOutput):
    """Output of [`SegmentationModel`].

    Args:
        logits (`torch.Tensor` of shape `(batch, num_classes, height, width)`): Class scores at input resolution.
        features (`torch.Tensor` of shape `(batch, channels, h, w)`, *optional*): Decoder features fed to the
            classification head (after dropout), returned when `return_features=True`; `h, w` may be smaller than
            the input for architectures whose head upsamples (DeepLabV3+, SegFormer).
    """

    logits: torch.Tensor
    features: Optional[torch.Tensor] = None


class SegmentationModel(ModelMixin, ConfigMixin):
    r"""Semantic segmentation network (encoder-decoder from `segmentation-models-pytorch`) with diffusers'
    config / weights handling.

    Inputs are RGB images in `[0, 1]`; the model normalises them with `image_mean` / `image_std` itself, so every
    caller (training, uncertainty, evaluation) feeds the same tensors. A dropout layer sits between the decoder and
    the classification head; it is what MC-dropout switches on at inference.

    Args:
        architecture (`str`, defaults to `"unet"`): Key of [`SEGMENTATION_ARCHITECTURES`] (`unet`, `unetplusplus`,
            `fpn`, `deeplabv3plus`, `segformer`, or one added with [`register_segmentation_architecture`]).
        encoder_name (`str`, defaults to `"resnet18"`): smp encoder name; `tu-<timm name>` for any timm model,
            `mit_b0`...`mit_b5` for SegFormer (Mix Transformer) encoders.
        encoder_depth (`int`, defaults to 5): Number of encoder stages used (3 to 5).
        decoder_channels (`Tuple[int]`, *optional*): Decoder widths for unet-like architectures, one per stage.
        num_classes (`int`, defaults to 11): Number of classes (not counting `ignore_index`).
        in_channels (`int`, defaults to 3): Image channels.
        dropout (`float`, defaults to 0.1): Dropout probability before the classification head.
        ignore_index (`int`, defaults to 255): Label value that marks unlabeled pixels (excluded from losses and
            metrics); stored so that scripts reading the model use the same value.
        class_names (`Tuple[str]`, *optional*): Names of the classes, `num_classes` of them.
        image_mean (`Tuple[float]`, defaults to ImageNet mean): Per-channel mean used to normalise inputs.
        image_std (`Tuple[float]`, defaults to ImageNet std): Per-channel standard deviation used to normalise inputs.
    """

    @register_to_config
    def __init__(
        self,
        architecture: str = "unet",
        encoder_name: str = "resnet18",
        encoder_depth: int = 5,
        decoder_channels: Optional[Tuple[int, ...]] = None,
        num_classes: int = 11,
        in_channels: int = 3,
        dropout: float = 0.1,
        ignore_index: int = 255,
        class_names: Optional[Tuple[str, ...]] = None,
        image_mean: Tuple[float, ...] = IMAGENET_MEAN,
        image_std: Tuple[float, ...] = IMAGENET_STD,
    ):
        super().__init__()
        if architecture not in SEGMENTATION_ARCHITECTURES:
            raise ValueError(
                f"`architecture` must be one of {sorted(SEGMENTATION_ARCHITECTURES)}, got {architecture!r}."
            )
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be at least 2, got {num_classes}.")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"`ignore_index` must not be a class index (0..{num_classes - 1}), got {ignore_index}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"`class_names` must have {num_classes} entries, got {len(class_names)}.")
        if len(image_mean) != in_channels or len(image_std) != in_channels:
            raise ValueError(
                f"`image_mean` and `image_std` must have `in_channels`={in_channels} entries, "
                f"got {len(image_mean)} and {len(image_std)}."
            )

        net = SEGMENTATION_ARCHITECTURES[architecture](
            encoder_name=encoder_name,
            encoder_depth=encoder_depth,
            in_channels=in_channels,
            num_classes=num_classes,
            decoder_channels=decoder_channels,
        )
        self.encoder = net.encoder
        self.decoder = net.decoder
        self.segmentation_head = net.segmentation_head
        self.head_dropout = nn.Dropout(p=dropout)
        self.register_buffer("_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.output_stride = int(getattr(net.encoder, "output_stride", 2**encoder_depth))

    @property
    def feature_channels(self) -> int:
        """Number of channels of the decoder features returned with `return_features=True`."""
        for module in self.segmentation_head.modules():
            if isinstance(module, nn.Conv2d):
                return module.in_channels
        raise AttributeError("The segmentation head has no Conv2d layer to read the feature width from.")

    def load_encoder_weights(self, encoder_weights: str = "imagenet") -> bool:
        """Loads pretrained encoder weights through `segmentation-models-pytorch` when they can be reached.

        Weights are fetched from the Hugging Face Hub (or its local cache); if that fails (offline, unknown weights
        name), a warning is logged and the encoder keeps its random initialisation.

        Args:
            encoder_weights (`str`, defaults to `"imagenet"`): Name of the pretrained weights of the encoder.

        Returns:
            `bool`: `True` if the weights were loaded, `False` if the encoder stays randomly initialised.
        """
        smp = _smp()
        try:
            pretrained = smp.encoders.get_encoder(
                self.config.encoder_name,
                in_channels=self.config.in_channels,
                depth=self.config.encoder_depth,
                weights=encoder_weights,
            )
        except Exception as error:  # network, offline mode, unknown weights: all mean "not reachable"
            logger.warning(
                f"Could not load encoder weights {encoder_weights!r} for {self.config.encoder_name!r} "
                f"({type(error).__name__}: {error}); the encoder stays randomly initialised."
            )
            return False
        self.encoder.load_state_dict(pretrained.state_dict())
        return True

    def forward(
        self, pixel_values: torch.Tensor, return_features: bool = False, return_dict: bool = True
    ):
        """Predicts class logits.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch, in_channels, height, width)`): Images in `[0, 1]`;
                height and width must be divisible by `self.output_stride`.
            return_features (`bool`, defaults to `False`): Also return the decoder features (for prototype losses).
            return_dict (`bool`, defaults to `True`): Return a [`SegmentationOutput`] instead of a tuple.

        Returns:
            [`SegmentationOutput`] or `tuple`: logits of shape `(batch, num_classes, height, width)` and, if asked,
            the features.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`pixel_values` must have shape (batch, {self.config.in_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )
        height, width = pixel_values.shape[-2:]
        if height % self.output_stride or width % self.output_stride:
            raise ValueError(
                f"`pixel_values` height and width must be divisible by {self.output_stride}, got {height}x{width}."
            )
        x = (pixel_values - self._mean.to(pixel_values.dtype)) / self._std.to(pixel_values.dtype)
        features = self.head_dropout(self.decoder(self.encoder(x)))
        logits = self.segmentation_head(features)
        if not return_features:
            features = None
        if not return_dict:
            return (logits,) if features is None else (logits, features)
        return SegmentationOutput(logits=logits, features=features)


def create_segmentation_model(
    architecture: str = "unet",
    encoder_name: str = "resnet18",
    num_classes: int = 11,
    encoder_weights: Optional[str] = None,
    **kwargs,
) -> SegmentationModel:
    """Builds a [`SegmentationModel`], randomly initialised unless `encoder_weights` is given and reachable.

    Args:
        architecture (`str`, defaults to `"unet"`): See [`SegmentationModel`].
        encoder_name (`str`, defaults to `"resnet18"`): See [`SegmentationModel`].
        num_classes (`int`, defaults to 11): See [`SegmentationModel`].
        encoder_weights (`str`, *optional*): Pretrained encoder weights to load (e.g. `"imagenet"`); `None` keeps the
            random initialisation. Unreachable weights log a warning and keep the random initialisation.
        **kwargs: Other [`SegmentationModel`] config arguments.

    Returns:
        [`SegmentationModel`]
    """
    model = SegmentationModel(architecture=architecture, encoder_name=encoder_name, num_classes=num_classes, **kwargs)
    if encoder_weights is not None:
        model.load_encoder_weights(encoder_weights)
    return model


def load_segmenter(pretrained_model_name_or_path: str, **kwargs) -> ModelMixin:
    """Loads any saved segmenter of this package: reads the folder's `config.json` and dispatches on its
    `_class_name` ([`SegmentationModel`] or [`~segmentation.latent_diffusion.LatentDiffusionSegmenter`]).

    Args:
        pretrained_model_name_or_path (`str`): Folder or Hub id written by `save_pretrained`.
        **kwargs: Passed to the class's `from_pretrained` (e.g. `base_model_name_or_path=` for a latent-diffusion
            segmenter whose base moved).

    Returns:
        [`SegmentationModel`] or [`~segmentation.latent_diffusion.LatentDiffusionSegmenter`]
    """
    from .latent_diffusion import LatentDiffusionSegmenter

    classes = {cls.__name__: cls for cls in (SegmentationModel, LatentDiffusionSegmenter)}
    try:
        config = SegmentationModel.load_config(pretrained_model_name_or_path)
    except (OSError, ValueError, EnvironmentError) as error:
        raise ValueError(
            f"Expected a saved segmenter (folder or Hub id with a config.json), got {pretrained_model_name_or_path!r} "
            f"({type(error).__name__}: {error})."
        ) from error
    class_name = config.get("_class_name")
    if class_name not in classes:
        raise ValueError(
            f"{pretrained_model_name_or_path!r} is not a segmenter: its config's `_class_name` is {class_name!r}, "
            f"expected one of {sorted(classes)}."
        )
    return classes[class_name].from_pretrained(pretrained_model_name_or_path, **kwargs)
