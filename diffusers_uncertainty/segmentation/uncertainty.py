"""Per-pixel uncertainty of a segmenter: normalised predictive entropy, MC-dropout mutual information and
deep-ensemble disagreement. Every estimator returns maps in `[0, 1]` (1 = maximally uncertain) and a per-image
score (the mean of the map over the image).
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, List, Sequence

import numpy as np
import torch
import torch.nn as nn
from diffusers.utils import BaseOutput


def normalized_entropy(probs: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    r"""Normalised Shannon entropy $H(p) / \log C = -\sum_c p_c \log p_c / \log C$, in `[0, 1]`.

    Args:
        probs (`torch.Tensor`): Probabilities summing to one along `dim` (C >= 2 entries).
        dim (`int`, defaults to 1): Class dimension.
        eps (`float`, defaults to 1e-12): Guards `log(0)`; `0 log 0` counts as 0.

    Returns:
        `torch.Tensor`: `probs` with `dim` reduced.
    """
    num_classes = probs.shape[dim]
    if num_classes < 2:
        raise ValueError(f"`probs` needs at least 2 classes along dim {dim}, got {num_classes}.")
    entropy = -(probs * torch.log(probs.clamp_min(eps))).sum(dim=dim)
    return (entropy / math.log(num_classes)).clamp(0.0, 1.0)


def mutual_information(member_probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    r"""Normalised mutual information (BALD) between the prediction and the model, over `N` stochastic passes or
    ensemble members: $I = [H(\bar p) - \frac{1}{N}\sum_n H(p_n)] / \log C$ with $\bar p = \frac1N \sum_n p_n$.

    Since $0 \le I \le H(\bar p) \le \log C$ the result lies in `[0, 1]`; it is 0 when all members agree.

    Args:
        member_probs (`torch.Tensor` of shape `(N, batch, C, height, width)`): Class probabilities of each member.
        eps (`float`, defaults to 1e-12): Guards `log(0)`.

    Returns:
        `torch.Tensor` of shape `(batch, height, width)`.
    """
    if member_probs.ndim != 5:
        raise ValueError(f"`member_probs` must have shape (N, batch, C, H, W), got {tuple(member_probs.shape)}.")
    mean_entropy = normalized_entropy(member_probs, dim=2, eps=eps).mean(dim=0)
    entropy_of_mean = normalized_entropy(member_probs.mean(dim=0), dim=1, eps=eps)
    return (entropy_of_mean - mean_entropy).clamp(0.0, 1.0)


@contextlib.contextmanager
def mc_dropout_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: the model in eval mode except its dropout modules, which sample (train mode).

    BatchNorm and every other module stay in eval mode; the previous train/eval state of every module is restored
    on exit.

    Args:
        model (`torch.nn.Module`): Model with at least one active dropout module (`p > 0`).
    """
    dropout_types = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
    dropouts = [m for m in model.modules() if isinstance(m, dropout_types) and m.p > 0]
    if not dropouts:
        raise ValueError(
            "MC-dropout needs a model with dropout (p > 0); this model has none. Train it with `dropout > 0`."
        )
    previous = {module: module.training for module in model.modules()}
    model.eval()
    for module in dropouts:
        module.train(True)
    try:
        yield model
    finally:
        for module, mode in previous.items():
            module.training = mode


@dataclass
class UncertaintyOutput(BaseOutput):
    """Output of the uncertainty estimators.

    Args:
        maps (`torch.Tensor` of shape `(batch, height, width)`): Per-pixel uncertainty in `[0, 1]`.
        scores (`torch.Tensor` of shape `(batch,)`): Per-image uncertainty (mean of the map).
        probs (`torch.Tensor` of shape `(batch, C, height, width)`): Mean predicted class probabilities.
    """

    maps: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor


def _logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    output = model(pixel_values)
    return output.logits if hasattr(output, "logits") else output


class UncertaintyEstimator:
    """Base class: call the estimator on a batch of images to get an [`UncertaintyOutput`]. Subclasses implement
    `_members_probs` (class probabilities of each pass / member) and [`~UncertaintyEstimator.map_from_probs`]; the
    class attribute `name` is the short name written in outputs.
    """

    name = "base"

    def _members_probs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def map_from_probs(self, member_probs: torch.Tensor) -> torch.Tensor:
        """Uncertainty map from member probabilities of shape `(N, batch, C, H, W)`.

        Args:
            member_probs (`torch.Tensor`): Probabilities of each pass / member.
        """
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> UncertaintyOutput:
        """Estimates uncertainty for a batch.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch, channels, height, width)`): Images in `[0, 1]`.

        Returns:
            [`UncertaintyOutput`]
        """
        member_probs = self._members_probs(pixel_values).float()
        maps = self.map_from_probs(member_probs)
        return UncertaintyOutput(maps=maps, scores=maps.flatten(1).mean(dim=1), probs=member_probs.mean(dim=0))


class EntropyEstimator(UncertaintyEstimator):
    r"""Normalised predictive entropy $H(p)/\log C$ of one deterministic pass (model in eval mode). Default.

    Args:
        model (`torch.nn.Module`): Segmenter returning logits (or an output with `.logits`).
    """

    name = "entropy"

    def __init__(self, model: nn.Module):
        self.model = model

    def _members_probs(self, pixel_values):
        was_training = self.model.training
        self.model.eval()
        try:
            return _logits(self.model, pixel_values).softmax(dim=1)[None]
        finally:
            self.model.train(was_training)

    def map_from_probs(self, member_probs):
        return normalized_entropy(member_probs[0], dim=1)


class MCDropoutEstimator(UncertaintyEstimator):
    """Epistemic uncertainty: mutual information over `num_passes` forward passes with only dropout active.

    Args:
        model (`torch.nn.Module`): Segmenter with dropout (`p > 0`).
        num_passes (`int`, defaults to 8): Number of stochastic passes (at least 2).
    """

    name = "mc_dropout"

    def __init__(self, model: nn.Module, num_passes: int = 8):
        if num_passes < 2:
            raise ValueError(f"`num_passes` must be at least 2, got {num_passes}.")
        self.model = model
        self.num_passes = num_passes

    def _members_probs(self, pixel_values):
        with mc_dropout_mode(self.model):
            return torch.stack([_logits(self.model, pixel_values).softmax(dim=1) for _ in range(self.num_passes)])

    def map_from_probs(self, member_probs):
        return mutual_information(member_probs)


class EnsembleEstimator(UncertaintyEstimator):
    """Deep-ensemble disagreement: mutual information between the members' predictions (each in eval mode).

    Args:
        models (`Sequence[torch.nn.Module]`): At least two segmenters with the same classes (e.g. several seeds or
            checkpoints).
    """

    name = "ensemble"

    def __init__(self, models: Sequence[nn.Module]):
        models = list(models)
        if len(models) < 2:
            raise ValueError(f"`models` must hold at least 2 members for an ensemble, got {len(models)}.")
        self.models: List[nn.Module] = models

    def _members_probs(self, pixel_values):
        probs = []
        for model in self.models:
            was_training = model.training
            model.eval()
            try:
                probs.append(_logits(model, pixel_values).softmax(dim=1))
            finally:
                model.train(was_training)
        shapes = {tuple(p.shape) for p in probs}
        if len(shapes) != 1:
            raise ValueError(f"Ensemble members disagree on output shape: {sorted(shapes)}.")
        return torch.stack(probs)

    def map_from_probs(self, member_probs):
        return mutual_information(member_probs)


UNCERTAINTY_ESTIMATORS = {
    "entropy": EntropyEstimator,
    "mc_dropout": MCDropoutEstimator,
    "ensemble": EnsembleEstimator,
}


# ------------------------------------------------------------------------------ matching a distribution of map values
# Maps are stored as 16-bit PNGs (see `io_utils.uncertainty_to_png16`), so their values are the 65536 levels 0..65535
# and a histogram over those levels describes a set of maps exactly.
UNCERTAINTY_LEVELS = 65536


def uncertainty_histogram(maps: Sequence) -> np.ndarray:
    r"""
    Counts of every 16-bit level over a set of maps.

    Args:
        maps (sequence of `np.ndarray` of dtype `uint16`):
            Maps as stored (0 <-> 0.0, 65535 <-> 1.0), any shapes.

    Returns:
        `np.ndarray` of shape `(65536,)`, dtype `int64`.
    """
    counts = np.zeros(UNCERTAINTY_LEVELS, dtype=np.int64)
    for index, levels in enumerate(maps):
        if levels.dtype != np.uint16:
            raise ValueError(f"Uncertainty maps must be uint16 levels, but map {index} has dtype {levels.dtype}.")
        counts += np.bincount(levels.ravel(), minlength=UNCERTAINTY_LEVELS)
    return counts


def quantile_matching_table(counts: np.ndarray, reference_counts: np.ndarray) -> np.ndarray:
    r"""
    The monotone table that gives a set of maps the value distribution of a reference set (histogram matching):
    every level `v` goes to the reference's quantile at the middle of `v`'s share of the maps' own distribution,
    `F_ref^-1((F(v-1) + F(v)) / 2)`. The order of values is kept (equal values stay equal); a set matched to itself
    is unchanged; the matched set's quantiles equal the reference's up to the width of one level's share.

    A refinement round uses it to keep the uncertainty scale the control learned in round 1: a segmenter trained on
    target-like data is less uncertain on the target, and without matching the new maps ask the control for less
    target appearance (see `docs/workflow.md`, "Refinement rounds").

    Args:
        counts (`np.ndarray` of shape `(65536,)`):
            [`uncertainty_histogram`] of the maps to transform.
        reference_counts (`np.ndarray` of shape `(65536,)`):
            [`uncertainty_histogram`] of the reference maps.

    Returns:
        `np.ndarray` of shape `(65536,)`, dtype `uint16`: `table[level]` is the matched level.
    """
    for name, value in (("counts", counts), ("reference_counts", reference_counts)):
        if value.shape != (UNCERTAINTY_LEVELS,) or value.sum() <= 0 or (value < 0).any():
            raise ValueError(
                f"`{name}` must be a histogram of {UNCERTAINTY_LEVELS} non-negative counts with a positive total, "
                f"but got shape {tuple(value.shape)} and total {value.sum()}."
            )
    cumulative = np.cumsum(counts, dtype=np.float64)
    middle = (cumulative - counts / 2) / cumulative[-1]  # in (0, 1) for every occupied level
    reference_cumulative = np.cumsum(reference_counts, dtype=np.float64) / reference_counts.sum()
    levels = np.searchsorted(reference_cumulative, middle, side="left")
    return np.minimum(levels, UNCERTAINTY_LEVELS - 1).astype(np.uint16)


def folder_uncertainty_histogram(folder, argument: str = "--match_reference_dir") -> np.ndarray:
    r"""
    [`uncertainty_histogram`] of every 16-bit PNG map under a folder (searched recursively; a `compute_uncertainty.py`
    output folder or its `maps/`).

    Args:
        folder (`str` or `os.PathLike`):
            The folder of maps.
        argument (`str`, defaults to `"--match_reference_dir"`):
            The name errors give the folder.
    """
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    paths = sorted(folder.rglob("*.png")) if folder.is_dir() else []
    if not paths:
        raise ValueError(f"`{argument}` must be a folder of 16-bit PNG uncertainty maps, but {folder} has none.")
    maps = []
    for path in paths:
        with Image.open(path) as image:
            levels = np.array(image)
        if levels.dtype != np.uint16 or levels.ndim != 2:
            raise ValueError(
                f"`{argument}` must hold 16-bit grayscale uncertainty maps, but {path} is {image.mode} "
                f"({levels.dtype}, {levels.ndim} dimensions)."
            )
        maps.append(levels)
    return uncertainty_histogram(maps)
