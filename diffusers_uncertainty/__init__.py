"""diffusers-uncertainty: uncertainty-aware dual-control ControlNets for Hugging Face diffusers."""

import diffusers

from .conditioning import prepare_semantic_map, prepare_uncertainty_map
from .models import UncertaintyControlNetModel
from .pipelines import DualControlPipelineOutput, StableDiffusionDualControlPipeline
from .tiny import build_tiny_components, build_tiny_pipeline, write_tiny_tokenizer


__version__ = "0.1.0"

# `DiffusionPipeline.from_pretrained` looks a folder's `_class_name` up in the `diffusers` namespace; make our
# pipeline findable there once this package is imported. Components are found through model_index.json's
# ["diffusers_uncertainty", "UncertaintyControlNetModel"] entry by import, so they need no registration.
setattr(diffusers, StableDiffusionDualControlPipeline.__name__, StableDiffusionDualControlPipeline)

__all__ = [
    "DualControlPipelineOutput",
    "StableDiffusionDualControlPipeline",
    "UncertaintyControlNetModel",
    "build_tiny_components",
    "build_tiny_pipeline",
    "prepare_semantic_map",
    "prepare_uncertainty_map",
    "write_tiny_tokenizer",
]
