from .pipeline_dual_control import DualControlPipelineOutput, StableDiffusionDualControlPipeline

__all__ = ["DualControlPipelineOutput", "StableDiffusionDualControlPipeline"]
