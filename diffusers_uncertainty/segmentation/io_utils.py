"""Helpers shared by the segmentation scripts: uncertainty maps as 16-bit PNGs and resizing class probabilities."""

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def uncertainty_to_png16(uncertainty: np.ndarray) -> Image.Image:
    """Maps an uncertainty map in `[0, 1]` to a 16-bit grayscale PNG image (0 -> 0, 1 -> 65535).

    Args:
        uncertainty (`np.ndarray` of shape `(H, W)`): Values in `[0, 1]`.
    """
    if uncertainty.min() < 0 or uncertainty.max() > 1:
        raise ValueError(
            f"Uncertainty maps must lie in [0, 1], got [{uncertainty.min():.4f}, {uncertainty.max():.4f}]."
        )
    return Image.fromarray(np.round(uncertainty * 65535).astype(np.uint16))


def png16_to_uncertainty(image: Image.Image) -> np.ndarray:
    """Inverse of [`uncertainty_to_png16`].

    Args:
        image (`PIL.Image.Image`): 16-bit grayscale image.
    """
    return np.asarray(image).astype(np.float64) / 65535.0


def resize_probs(probs: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinearly resizes class probabilities (or maps with a channel dim) to `size`.

    Args:
        probs (`torch.Tensor` of shape `(batch, C, h, w)`): Probabilities.
        size (`Tuple[int, int]`): (height, width).
    """
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
