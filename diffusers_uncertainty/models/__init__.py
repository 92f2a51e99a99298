from .uncertainty_controlnet import UncertaintyControlNetModel

__all__ = ["UncertaintyControlNetModel"]
