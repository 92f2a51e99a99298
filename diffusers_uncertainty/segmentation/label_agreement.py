"""Label agreement of labeled images with a segmenter, and filtering of synthetic samples by it.

A generated image only teaches a segmenter what its label map says if the image follows that map. A segmenter
trained on target-like data (e.g. with photometric augmentation) that segments the generated image as its label map
says is evidence that it does; [`label_agreement_scores`] measures that per image, [`most_agreeing`] keeps the best
share, and `train_segmentation.py --synthetic_filter_model DIR --synthetic_keep_fraction F` trains on only those.
"""

import contextlib
import math
from typing import Callable, List, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from .device_data import EvaluationImages
from .io_utils import resize_probs


def image_mean_iou(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    r"""
    Mean IoU of each image of a batch over the classes present in its label map or its prediction (pixels labeled
    `ignore_index` left out). An image without a labeled pixel scores NaN.

    Args:
        predictions (`torch.Tensor`): `(B, H, W)` class ids.
        labels (`torch.Tensor`): `(B, H, W)` class ids or `ignore_index`.
        num_classes (`int`), ignore_index (`int`): The label space.

    Returns:
        `torch.Tensor`: `(B,)` float scores in `[0, 1]` (or NaN).
    """
    if predictions.shape != labels.shape or predictions.dim() != 3:
        raise ValueError(
            f"`predictions` and `labels` must both be (B, H, W), got {tuple(predictions.shape)} and {tuple(labels.shape)}."
        )
    valid = (labels != ignore_index)[:, None]
    classes = torch.arange(num_classes, device=labels.device)[None, :, None, None]
    predicted = (predictions[:, None] == classes) & valid
    labeled = (labels[:, None] == classes) & valid
    intersection = (predicted & labeled).sum((2, 3)).float()
    union = (predicted | labeled).sum((2, 3)).float()
    present = union > 0
    iou = torch.where(present, intersection / union.clamp(min=1), torch.zeros_like(union))
    return iou.sum(1) / present.sum(1)  # 0 / 0 = NaN for an image without labeled pixels


@torch.no_grad()
def label_agreement_scores(
    segmenter: torch.nn.Module,
    dataset: Dataset,
    resolution: int,
    num_classes: int,
    ignore_index: int,
    batch_size: int = 16,
    autocast: Callable = contextlib.nullcontext,
) -> torch.Tensor:
    r"""
    How well a segmenter's prediction on each labeled image matches its label map ([`image_mean_iou`]), with the
    inputs `examples/evaluate_segmentation.py` gives it (shorter side resized to `resolution`, probabilities resized
    back to the label map).

    Args:
        segmenter (`torch.nn.Module`):
            A loaded segmenter in eval mode (its `output_stride` is the input-size divisor), on the device to use.
        dataset (`Dataset`):
            A labeled [`SegmentationFolder`] / [`HFSegmentationDataset`] (or a [`SampleSubset`] of one).
        resolution (`int`):
            Shorter side of the network input.
        num_classes (`int`), ignore_index (`int`):
            The label space.
        batch_size (`int`, defaults to 16):
            Images per forward pass.
        autocast (`Callable`, defaults to `contextlib.nullcontext`):
            Context of the forward passes (e.g. `accelerator.autocast`).

    Returns:
        `torch.Tensor`: `(len(dataset),)` scores on the CPU, in dataset order.
    """
    if not getattr(dataset, "has_labels", False):
        raise ValueError("`dataset` must be labeled: label agreement compares a segmenter's prediction with the labels.")
    device = next(segmenter.parameters()).device
    images = EvaluationImages(dataset, resolution, getattr(segmenter, "output_stride", 32), device, batch_size)
    scores = torch.full((len(dataset),), float("nan"))
    for batch in images:
        with autocast():
            logits = segmenter(batch["pixel_values"]).logits.float()
        predictions = resize_probs(logits.softmax(1), batch["original_size"]).argmax(1)
        batch_scores = image_mean_iou(predictions, batch["labels"].long(), num_classes, ignore_index)
        scores[torch.as_tensor(batch["indices"])] = batch_scores.cpu()
    return scores


def most_agreeing(scores: torch.Tensor, keep_fraction: float, argument: str = "--synthetic_keep_fraction") -> List[int]:
    r"""
    The indices of the `ceil(keep_fraction x N)` highest scores (at least one), in increasing index order. Ties go
    to the earlier index; NaN scores (images without labeled pixels) rank last.

    Args:
        scores (`torch.Tensor`): `(N,)` scores.
        keep_fraction (`float`): In `(0, 1]`.
        argument (`str`, defaults to `"--synthetic_keep_fraction"`): Argument name used in error messages.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"`{argument}` must be in (0, 1], got {keep_fraction}.")
    if scores.dim() != 1 or len(scores) == 0:
        raise ValueError(f"`scores` must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}.")
    count = max(1, math.ceil(keep_fraction * len(scores) - 1e-9))
    ranked = sorted(range(len(scores)), key=lambda i: (-_rank_value(scores[i]), i))
    return sorted(ranked[:count])


def _rank_value(score: torch.Tensor) -> float:
    value = float(score)
    return -math.inf if math.isnan(value) else value


def keep_most_agreeing(
    datasets: Sequence[Dataset], scores: Sequence[torch.Tensor], keep_fraction: float
) -> Tuple[List[Dataset], List[int]]:
    r"""
    The samples of several sources whose scores are among the `keep_fraction` best of all of them (one ranking over
    every source, [`most_agreeing`]). A source kept whole is returned as is, a partly kept one as a
    [`SampleSubset`], one with nothing kept is left out.

    Args:
        datasets (`Sequence[Dataset]`): The sources.
        scores (`Sequence[torch.Tensor]`): One `(len(dataset),)` score tensor per source.
        keep_fraction (`float`): In `(0, 1]`.

    Returns:
        `Tuple`: the kept sources, and the kept samples' indices into the concatenation of all sources.
    """
    from .data import SampleSubset

    if len(datasets) != len(scores) or any(len(d) != len(s) for d, s in zip(datasets, scores)):
        raise ValueError("`scores` must hold one score per sample of each dataset.")
    kept = most_agreeing(torch.cat(list(scores)), keep_fraction)
    out, start = [], 0
    for dataset in datasets:
        indices = [i - start for i in kept if start <= i < start + len(dataset)]
        if len(indices) == len(dataset):
            out.append(dataset)
        elif indices:
            out.append(SampleSubset(dataset, indices))
        start += len(dataset)
    return out, kept
