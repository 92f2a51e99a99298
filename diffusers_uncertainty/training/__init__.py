"""Reusable pieces of the training scripts: data loading and checking, paired transforms, pictures, model cards."""

from .data import (
    IMAGE_EXTENSIONS,
    UNCERTAINTY_EXTENSIONS,
    ControlNetTrainingDataset,
    DatasetRecords,
    PairedTransform,
    attach_uncertainty_maps,
    check_label_values,
    collate_fn,
    labeled_folder_records,
    list_images,
    load_image,
    load_label,
    load_uncertainty,
    select_records,
    unlabeled_folder_records,
    validate_records,
)
from .model_card import write_model_card
from .visualization import colorize_label_map, label_palette, uncertainty_to_image


__all__ = [
    "IMAGE_EXTENSIONS",
    "UNCERTAINTY_EXTENSIONS",
    "ControlNetTrainingDataset",
    "DatasetRecords",
    "PairedTransform",
    "attach_uncertainty_maps",
    "check_label_values",
    "collate_fn",
    "colorize_label_map",
    "label_palette",
    "labeled_folder_records",
    "list_images",
    "load_image",
    "load_label",
    "load_uncertainty",
    "select_records",
    "uncertainty_to_image",
    "unlabeled_folder_records",
    "validate_records",
    "write_model_card",
]
