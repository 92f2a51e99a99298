"""Batched inference helpers shared by the segmentation scripts, and the package's atomic writers re-exported."""

import os
import shutil
import tempfile
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..atomic import atomic_write_path, save_image_atomic, write_json_atomic, write_text_atomic  # noqa: F401


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


def save_pretrained_atomic(model, output_dir: str, **kwargs) -> None:
    """`model.save_pretrained` into a temporary folder inside `output_dir`, then each file renamed into place, so
    `output_dir` never holds a half-written file (other content of `output_dir`, e.g. checkpoints, is kept).

    Args:
        model: Object with `save_pretrained` (e.g. [`SegmentationModel`]).
        output_dir (`str`): Destination folder.
        **kwargs: Passed to `save_pretrained`.
    """
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=output_dir)
    try:
        model.save_pretrained(tmp, **kwargs)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resize_probs(probs: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinearly resizes class probabilities (or maps with a channel dim) to `size`.

    Args:
        probs (`torch.Tensor` of shape `(batch, C, h, w)`): Probabilities.
        size (`Tuple[int, int]`): (height, width).
    """
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
