"""diffusers-uncertainty: uncertainty-aware dual-control ControlNets for Hugging Face diffusers."""

from .conditioning import prepare_semantic_map, prepare_uncertainty_map
from .models import ConditionEmbeddings, StyleEncoderModel, UncertaintyControlNetModel
from .pipelines import DualControlPipelineOutput, StableDiffusionDualControlPipeline
from .registration import register_with_diffusers
from .tiny import build_tiny_components, build_tiny_pipeline, write_tiny_tokenizer


__version__ = "0.1.0"

register_with_diffusers(
    models=[UncertaintyControlNetModel, StyleEncoderModel], pipelines=[StableDiffusionDualControlPipeline]
)

__all__ = [
    "ConditionEmbeddings",
    "DualControlPipelineOutput",
    "StableDiffusionDualControlPipeline",
    "StyleEncoderModel",
    "UncertaintyControlNetModel",
    "build_tiny_components",
    "build_tiny_pipeline",
    "prepare_semantic_map",
    "prepare_uncertainty_map",
    "write_tiny_tokenizer",
]
