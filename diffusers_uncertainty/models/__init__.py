from .style_encoder import StyleEncoderModel, StyleEncoderOutput, combine_text_and_style, prepare_style_images
from .uncertainty_controlnet import ConditionEmbeddings, UncertaintyControlNetModel

__all__ = [
    "ConditionEmbeddings",
    "StyleEncoderModel",
    "StyleEncoderOutput",
    "UncertaintyControlNetModel",
    "combine_text_and_style",
    "prepare_style_images",
]
