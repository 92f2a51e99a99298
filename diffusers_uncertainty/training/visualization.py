"""Turning label maps into pictures for validation grids and model cards."""

import numpy as np
import PIL.Image


def label_palette(num_classes: int) -> np.ndarray:
    r"""
    A fixed, well-spread colour per class (the PASCAL VOC bit-interleaving palette), `(num_classes, 3)` uint8.

    Args:
        num_classes (`int`):
            Number of classes.
    """
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        value, red, green, blue = index + 1, 0, 0, 0
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


def colorize_label_map(labels: np.ndarray, num_classes: int) -> PIL.Image.Image:
    r"""
    An RGB picture of an integer label map; values outside `[0, num_classes)` (e.g. `ignore_index`) are black.

    Args:
        labels (`np.ndarray`):
            `(H, W)` integer label map.
        num_classes (`int`):
            Number of classes.
    """
    labels = np.asarray(labels)
    palette = label_palette(num_classes)
    valid = (labels >= 0) & (labels < num_classes)
    rgb = np.zeros(labels.shape + (3,), dtype=np.uint8)
    rgb[valid] = palette[labels[valid]]
    return PIL.Image.fromarray(rgb)


def uncertainty_to_image(level: float, size: tuple[int, int]) -> PIL.Image.Image:
    r"""
    A grey tile showing a constant uncertainty level (black = certain, white = uncertain).

    Args:
        level (`float`):
            Uncertainty in [0, 1].
        size (`tuple[int, int]`):
            `(width, height)` of the tile.
    """
    return PIL.Image.new("RGB", size, (round(255 * level),) * 3)
