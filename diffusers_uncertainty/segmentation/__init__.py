"""Segmentation side of diffusers-uncertainty: segmenters, uncertainty maps, noise-aware (FLEX-Seg) training
losses and sampling, data loading and metrics.
"""

from .data import (
    HFSegmentationDataset,
    PhotometricAugmentation,
    SegmentationFolder,
    SegmentationTransform,
    TransformedDataset,
    eval_size,
    load_segmentation_data,
    mixture_weights,
)
from .adversarial import DomainDiscriminator, GradientReversal, dann_lambda, domain_adversarial_loss, reverse_gradient
from .latent_diffusion import LatentDiffusionSegmenter, LatentSegmentationOutput
from .losses import (
    FlexSegLoss,
    GranularPrototypeBank,
    band_granularity,
    boundary_band_loss,
    boundary_bands,
    cross_entropy_dice_loss,
    label_edges,
    uncertainty_boundary_emphasis_loss,
    uncertainty_boundary_weights,
)
from .metrics import SegmentationMetrics, labeled_classes_mean_iou, metrics_to_markdown
from .models import (
    SEGMENTATION_ARCHITECTURES,
    SegmentationModel,
    SegmentationOutput,
    create_segmentation_model,
    load_segmenter,
    register_segmentation_architecture,
)
from .sampling import HardnessAwareSampler
from .uncertainty import (
    UNCERTAINTY_ESTIMATORS,
    EnsembleEstimator,
    EntropyEstimator,
    MCDropoutEstimator,
    UncertaintyEstimator,
    UncertaintyOutput,
    folder_uncertainty_histogram,
    mc_dropout_mode,
    mutual_information,
    normalized_entropy,
    quantile_matching_table,
    uncertainty_histogram,
)


__all__ = [
    "DomainDiscriminator",
    "GradientReversal",
    "LatentDiffusionSegmenter",
    "LatentSegmentationOutput",
    "dann_lambda",
    "domain_adversarial_loss",
    "load_segmenter",
    "reverse_gradient",
    "EnsembleEstimator",
    "EntropyEstimator",
    "FlexSegLoss",
    "GranularPrototypeBank",
    "HFSegmentationDataset",
    "HardnessAwareSampler",
    "MCDropoutEstimator",
    "PhotometricAugmentation",
    "SEGMENTATION_ARCHITECTURES",
    "SegmentationFolder",
    "SegmentationMetrics",
    "SegmentationModel",
    "SegmentationOutput",
    "SegmentationTransform",
    "TransformedDataset",
    "UNCERTAINTY_ESTIMATORS",
    "UncertaintyEstimator",
    "UncertaintyOutput",
    "band_granularity",
    "boundary_band_loss",
    "boundary_bands",
    "create_segmentation_model",
    "cross_entropy_dice_loss",
    "eval_size",
    "folder_uncertainty_histogram",
    "label_edges",
    "load_segmentation_data",
    "mc_dropout_mode",
    "labeled_classes_mean_iou",
    "metrics_to_markdown",
    "mixture_weights",
    "mutual_information",
    "normalized_entropy",
    "quantile_matching_table",
    "uncertainty_histogram",
    "register_segmentation_architecture",
    "uncertainty_boundary_emphasis_loss",
    "uncertainty_boundary_weights",
]
