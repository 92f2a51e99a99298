r"""Noise-aware segmentation losses (FLEX-Seg, seed 001) and the usual cross-entropy + Dice.

Notation used in the docstrings: $z_p \in \mathbb{R}^C$ are the logits at pixel $p$, $p_p = \mathrm{softmax}(z_p)$,
$y_p$ the label, $V$ the set of pixels with $y_p \ne$ `ignore_index`, $\mathrm{CE}_p = -\log p_{p, y_p}$,
$u_p = H(p_p)/\log C \in [0,1]$ the normalised prediction entropy, and $B_1 \subseteq B_2 \subseteq \dots \subseteq
B_K$ the boundary bands of [`boundary_bands`] (thin, medium, thick).
"""

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .uncertainty import normalized_entropy


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 4:
        raise ValueError(f"`logits` must have shape (batch, C, height, width), got {tuple(logits.shape)}.")
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0] or labels.shape[1:] != logits.shape[2:]:
        raise ValueError(
            f"`labels` must have shape {(logits.shape[0], *logits.shape[2:])} to match `logits`, got {tuple(labels.shape)}."
        )


def label_edges(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    r"""Pixels on a label edge: valid pixels with a valid 8-neighbour of a different class.

    Computed with a morphological gradient restricted to valid pixels: $E = V \cap \{\max_{N_3(p) \cap V} y \ne
    \min_{N_3(p) \cap V} y\}$ where $N_3(p)$ is the 3x3 window around $p$. Borders with `ignore_index` are not edges.

    Args:
        labels (`torch.Tensor` of shape `(batch, height, width)`): Integer label maps.
        ignore_index (`int`): Label of unlabeled pixels.

    Returns:
        `torch.BoolTensor` of shape `(batch, height, width)`.
    """
    if labels.ndim != 3:
        raise ValueError(f"`labels` must have shape (batch, height, width), got {tuple(labels.shape)}.")
    valid = labels != ignore_index
    lab = labels.float()[:, None]
    big = 1e9  # larger than any label: never the minimum when a valid neighbour exists
    local_max = F.max_pool2d(torch.where(valid[:, None], lab, torch.full_like(lab, -1.0)), 3, stride=1, padding=1)
    local_min = -F.max_pool2d(-torch.where(valid[:, None], lab, torch.full_like(lab, big)), 3, stride=1, padding=1)
    return valid & (local_max != local_min)[:, 0]


def boundary_bands(labels: torch.Tensor, radii: Sequence[int] = (1, 3, 6), ignore_index: int = 255) -> torch.Tensor:
    r"""Multi-scale boundary bands from morphological dilation of the label edges.

    $B_k = V \cap \mathrm{dilate}_{(2 r_k + 1) \times (2 r_k + 1)}(E)$: the valid pixels whose Chebyshev distance
    to an edge pixel of [`label_edges`] is at most $r_k$. With strictly increasing radii the bands are nested
    (thin $\subseteq$ medium $\subseteq$ thick) and each contains every edge pixel.

    Args:
        labels (`torch.Tensor` of shape `(batch, height, width)`): Integer label maps.
        radii (`Sequence[int]`, defaults to `(1, 3, 6)`): Strictly increasing non-negative band half-widths in pixels.
        ignore_index (`int`, defaults to 255): Label of unlabeled pixels (never in a band).

    Returns:
        `torch.BoolTensor` of shape `(batch, len(radii), height, width)`.
    """
    radii = [int(r) for r in radii]
    if not radii or radii[0] < 0 or any(b <= a for a, b in zip(radii, radii[1:])):
        raise ValueError(f"`radii` must be non-empty, non-negative and strictly increasing, got {radii}.")
    edges = label_edges(labels, ignore_index)[:, None].float()
    valid = labels != ignore_index
    bands = [F.max_pool2d(edges, 2 * r + 1, stride=1, padding=r)[:, 0] > 0 for r in radii]
    return torch.stack(bands, dim=1) & valid[:, None]


def band_granularity(bands: torch.Tensor) -> torch.Tensor:
    r"""Granularity level of every pixel: the index $k$ of the thinnest band containing it, $K$ outside all bands.

    Args:
        bands (`torch.BoolTensor` of shape `(batch, K, height, width)`): Nested bands from [`boundary_bands`].

    Returns:
        `torch.LongTensor` of shape `(batch, height, width)` with values in `0..K`.
    """
    num_bands = bands.shape[1]
    # Number of bands that do NOT contain the pixel; for nested bands that is the index of the thinnest one.
    return num_bands - bands.long().sum(dim=1)


def cross_entropy_dice_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, dice_weight: float = 0.0
) -> torch.Tensor:
    r"""Cross-entropy, optionally plus soft Dice.

    $\mathcal{L} = \frac{1}{|V|}\sum_{p \in V} \mathrm{CE}_p + \lambda_{dice}\,\big(1 - \frac{1}{C'}\sum_c
    \frac{2 \sum_p p_{p,c} [y_p = c]}{\sum_p p_{p,c} + \sum_p [y_p=c]}\big)$, the Dice term from
    `segmentation_models_pytorch.losses.DiceLoss` (multiclass, classes present in the batch, `ignore_index` excluded).

    Args:
        logits (`torch.Tensor` of shape `(batch, C, height, width)`): Class scores.
        labels (`torch.LongTensor` of shape `(batch, height, width)`): Labels.
        ignore_index (`int`): Label excluded from the loss.
        dice_weight (`float`, defaults to 0.0): $\lambda_{dice}$; 0 disables Dice.

    Returns:
        `torch.Tensor`: scalar loss.
    """
    _check_logits_labels(logits, labels)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
    if dice_weight > 0:
        from segmentation_models_pytorch.losses import DiceLoss

        loss = loss + dice_weight * DiceLoss("multiclass", from_logits=True, ignore_index=ignore_index)(
            logits.float(), labels
        )
    return loss


def uncertainty_boundary_weights(
    logits: torch.Tensor, bands: torch.Tensor, alpha: float = 1.0, beta: float = 1.0
) -> torch.Tensor:
    r"""Per-pixel weights of the uncertainty boundary emphasis loss (no gradient flows through them).

    $w_p = 1 + \alpha\, u_p\,(1 + \beta\, b_p)$ with $u_p = H(p_p)/\log C$ and
    $b_p = \frac{1}{K}\sum_k [p \in B_k] \in [0, 1]$ (1 on a label edge, decreasing across the bands, 0 far away).
    So the weight grows with the prediction entropy and, at equal entropy, is larger near label boundaries.

    Args:
        logits (`torch.Tensor` of shape `(batch, C, height, width)`): Class scores.
        bands (`torch.BoolTensor` of shape `(batch, K, height, width)`): From [`boundary_bands`].
        alpha (`float`, defaults to 1.0): Strength of the entropy term.
        beta (`float`, defaults to 1.0): Extra emphasis of the entropy term near boundaries.

    Returns:
        `torch.Tensor` of shape `(batch, height, width)`, values in `[1, 1 + alpha (1 + beta)]`.
    """
    with torch.no_grad():
        uncertainty = normalized_entropy(logits.detach().float().softmax(dim=1), dim=1)
        proximity = bands.float().mean(dim=1)
        return 1.0 + alpha * uncertainty * (1.0 + beta * proximity)


def uncertainty_boundary_emphasis_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    bands: torch.Tensor,
    ignore_index: int,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> torch.Tensor:
    r"""Uncertainty boundary emphasis: entropy-weighted cross-entropy, stronger near label boundaries.

    $\mathcal{L}_{ube} = \sum_{p \in V} w_p\, \mathrm{CE}_p \,/\, \sum_{p \in V} w_p$ with the weights $w_p$ of
    [`uncertainty_boundary_weights`]. Pixels the network is unsure about, above all on boundaries (where generated
    images and masks disagree), get more weight instead of being trusted blindly or dropped.

    Args:
        logits (`torch.Tensor` of shape `(batch, C, height, width)`): Class scores.
        labels (`torch.LongTensor` of shape `(batch, height, width)`): Labels.
        bands (`torch.BoolTensor` of shape `(batch, K, height, width)`): From [`boundary_bands`].
        ignore_index (`int`): Label excluded from the loss.
        alpha (`float`, defaults to 1.0): Strength of the entropy term.
        beta (`float`, defaults to 1.0): Extra emphasis near boundaries.

    Returns:
        `torch.Tensor`: scalar loss (0 if no pixel is valid).
    """
    _check_logits_labels(logits, labels)
    valid = labels != ignore_index
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    weights = uncertainty_boundary_weights(logits, bands, alpha=alpha, beta=beta) * valid
    return (weights * ce).sum() / weights.sum().clamp_min(1e-12)


def boundary_band_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    bands: torch.Tensor,
    ignore_index: int,
    band_weights: Sequence[float] = (1.0, 0.5, 0.25),
) -> torch.Tensor:
    r"""Multi-scale boundary band loss: cross-entropy averaged inside each band, weighted per band.

    $\mathcal{L}_{band} = \sum_{k=1}^K \lambda_k\, \frac{1}{|B_k|} \sum_{p \in B_k} \mathrm{CE}_p$
    (an empty band contributes 0). Since the bands are nested, edge pixels count in every band and the thin band
    gets the largest weight by default.

    Args:
        logits (`torch.Tensor` of shape `(batch, C, height, width)`): Class scores.
        labels (`torch.LongTensor` of shape `(batch, height, width)`): Labels.
        bands (`torch.BoolTensor` of shape `(batch, K, height, width)`): From [`boundary_bands`].
        ignore_index (`int`): Label excluded from the loss.
        band_weights (`Sequence[float]`, defaults to `(1.0, 0.5, 0.25)`): $\lambda_k$, one per band.

    Returns:
        `torch.Tensor`: scalar loss.
    """
    _check_logits_labels(logits, labels)
    if len(band_weights) != bands.shape[1]:
        raise ValueError(f"`band_weights` must have {bands.shape[1]} entries (one per band), got {len(band_weights)}.")
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    loss = ce.new_zeros(())
    for k, weight in enumerate(band_weights):
        band = bands[:, k].float()
        loss = loss + weight * (ce * band).sum() / band.sum().clamp_min(1.0)
    return loss


class GranularPrototypeBank(nn.Module):
    r"""Granular adaptive prototypes: a (class x granularity) bank of feature prototypes kept by moving average,
    with a contrastive term that pulls boundary features to the prototype of their class and granularity.

    Granularity $g(p)$ of a pixel is the index of the thinnest boundary band containing it ([`band_granularity`]);
    pixels outside all bands form the last granularity ("interior"), so the bank has `num_bands + 1` granularities.
    Features are L2-normalised, $\hat f_p = f_p / \lVert f_p \rVert$.

    Update (exact moving average, from detached features): for every (c, g) present in the batch with mean
    $m_{c,g} = \frac{1}{|S_{c,g}|}\sum_{p \in S_{c,g}} \hat f_p$, $S_{c,g} = \{p: y_p = c, g(p) = g\}$:
    $P_{c,g} \leftarrow m_{c,g}$ the first time, then $P_{c,g} \leftarrow \mu P_{c,g} + (1-\mu)\, m_{c,g}$.

    Contrastive term (boundary pixels $p$ with $g(p) < K$ whose own prototype exists):
    $\mathcal{L}_{proto} = -\frac{1}{|P|}\sum_p \log \frac{\exp(\cos(\hat f_p, P_{y_p, g(p)})/\tau)}
    {\sum_{c \in A_{g(p)}} \exp(\cos(\hat f_p, P_{c, g(p)})/\tau)}$, $A_g$ the classes with a prototype at
    granularity g.

    Args:
        num_classes (`int`): Number of classes C.
        num_granularities (`int`): Number of granularities (number of bands + 1).
        feature_dim (`int`): Feature channels.
        momentum (`float`, defaults to 0.99): $\mu$.
        temperature (`float`, defaults to 0.1): $\tau$.
        max_pixels (`int`, defaults to 4096): At most this many boundary pixels (random subset) enter the
            contrastive term per call, to bound memory.
    """

    def __init__(
        self,
        num_classes: int,
        num_granularities: int,
        feature_dim: int,
        momentum: float = 0.99,
        temperature: float = 0.1,
        max_pixels: int = 4096,
    ):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum}.")
        if temperature <= 0:
            raise ValueError(f"`temperature` must be positive, got {temperature}.")
        self.num_classes = num_classes
        self.num_granularities = num_granularities
        self.momentum = momentum
        self.temperature = temperature
        self.max_pixels = max_pixels
        self.register_buffer("prototypes", torch.zeros(num_classes, num_granularities, feature_dim))
        self.register_buffer("initialized", torch.zeros(num_classes, num_granularities, dtype=torch.bool))

    def _flatten(self, features, labels, granularity, ignore_index):
        if features.ndim != 4 or features.shape[1] != self.prototypes.shape[-1]:
            raise ValueError(
                f"`features` must have shape (batch, {self.prototypes.shape[-1]}, h, w), got {tuple(features.shape)}."
            )
        if labels.shape != granularity.shape or labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"`labels` {tuple(labels.shape)} and `granularity` {tuple(granularity.shape)} must have the same "
                f"shape (batch, H, W) with batch {features.shape[0]}."
            )
        if labels.shape[1:] != features.shape[2:]:
            # Heads that upsample (DeepLabV3+, SegFormer) give coarser features: sample labels at feature resolution.
            size = features.shape[2:]
            labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
            granularity = F.interpolate(granularity[:, None].float(), size=size, mode="nearest")[:, 0].long()
        feats = F.normalize(features.float().permute(0, 2, 3, 1).reshape(-1, features.shape[1]), dim=1)
        labels = labels.reshape(-1)
        granularity = granularity.reshape(-1)
        valid = labels != ignore_index
        return feats[valid], labels[valid], granularity[valid]

    @torch.no_grad()
    def update(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        granularity: torch.Tensor,
        ignore_index: int,
        reduce_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        """Moving-average update of the prototypes from a batch (see the class docstring for the formula).

        Args:
            features (`torch.Tensor` of shape `(batch, D, h, w)`): Features (detached internally).
            labels (`torch.LongTensor` of shape `(batch, H, W)`): Labels.
            granularity (`torch.LongTensor` of shape `(batch, H, W)`): From [`band_granularity`].
            ignore_index (`int`): Label to skip.
            reduce_fn (`Callable`, *optional*): Sums a tensor over processes (e.g.
                `lambda t: accelerator.reduce(t, "sum")`) so that every process applies the same update.
        """
        feats, labels, granularity = self._flatten(features.detach(), labels, granularity, ignore_index)
        index = labels * self.num_granularities + granularity
        num_entries = self.num_classes * self.num_granularities
        sums = feats.new_zeros(num_entries, feats.shape[1]).index_add_(0, index, feats)
        counts = feats.new_zeros(num_entries).index_add_(0, index, torch.ones_like(index, dtype=feats.dtype))
        if reduce_fn is not None:
            sums, counts = reduce_fn(sums), reduce_fn(counts)
        present = (counts > 0).view(self.num_classes, self.num_granularities)
        means = (sums / counts.clamp_min(1.0)[:, None]).view(self.num_classes, self.num_granularities, -1)
        means = means.to(self.prototypes.dtype)
        blended = self.momentum * self.prototypes + (1.0 - self.momentum) * means
        new = torch.where(self.initialized[..., None], blended, means)
        self.prototypes.copy_(torch.where(present[..., None], new, self.prototypes))
        self.initialized |= present

    def contrastive_loss(
        self, features: torch.Tensor, labels: torch.Tensor, granularity: torch.Tensor, ignore_index: int
    ) -> torch.Tensor:
        """Prototype contrastive term for boundary pixels (see the class docstring for the formula).

        Args:
            features (`torch.Tensor` of shape `(batch, D, h, w)`): Features (gradients flow into them).
            labels (`torch.LongTensor` of shape `(batch, H, W)`): Labels.
            granularity (`torch.LongTensor` of shape `(batch, H, W)`): From [`band_granularity`].
            ignore_index (`int`): Label to skip.

        Returns:
            `torch.Tensor`: scalar loss; 0 (with a graph to `features`) when no boundary pixel has a prototype.
        """
        feats, labels, granularity = self._flatten(features, labels, granularity, ignore_index)
        keep = (granularity < self.num_granularities - 1) & self.initialized[labels, granularity]
        feats, labels, granularity = feats[keep], labels[keep], granularity[keep]
        if feats.shape[0] == 0:
            return features.sum() * 0.0
        if feats.shape[0] > self.max_pixels:
            choice = torch.randperm(feats.shape[0], device=feats.device)[: self.max_pixels]
            feats, labels, granularity = feats[choice], labels[choice], granularity[choice]
        protos = F.normalize(self.prototypes[:, granularity].permute(1, 0, 2), dim=-1)  # (P, C, D)
        logits = torch.einsum("pd,pcd->pc", feats, protos.to(feats.dtype)) / self.temperature
        available = self.initialized[:, granularity].T  # (P, C)
        logits = logits.masked_fill(~available, float("-inf"))
        return F.cross_entropy(logits, labels)


class FlexSegLoss(nn.Module):
    r"""The segmentation objective of the training script, each FLEX-Seg term switched on by its weight:

    $\mathcal{L} = \mathcal{L}_{ce(+dice)} + \lambda_{ube}\mathcal{L}_{ube} + \lambda_{band}\mathcal{L}_{band}
    + \lambda_{proto}\mathcal{L}_{proto}$ (see [`cross_entropy_dice_loss`], [`uncertainty_boundary_emphasis_loss`],
    [`boundary_band_loss`], [`GranularPrototypeBank`]). Also returns the per-sample loss that drives
    hardness-aware sampling: the mean cross-entropy of each image over its valid pixels.

    Args:
        num_classes (`int`): Number of classes.
        ignore_index (`int`): Label excluded everywhere.
        dice_weight (`float`, defaults to 0.0): Dice weight inside the base loss.
        ube_weight (`float`, defaults to 0.0): $\lambda_{ube}$.
        ube_alpha (`float`, defaults to 1.0): Entropy strength of the emphasis weights.
        ube_beta (`float`, defaults to 1.0): Boundary strength of the emphasis weights.
        band_weight (`float`, defaults to 0.0): $\lambda_{band}$.
        band_radii (`Sequence[int]`, defaults to `(1, 3, 6)`): Half-widths of the thin/medium/thick bands.
        band_weights (`Sequence[float]`, defaults to `(1.0, 0.5, 0.25)`): Per-band weights.
        proto_weight (`float`, defaults to 0.0): $\lambda_{proto}$; needs `feature_dim`.
        feature_dim (`int`, *optional*): Feature channels of the segmenter (for the prototype bank).
        proto_momentum (`float`, defaults to 0.99): Prototype moving-average momentum.
        proto_temperature (`float`, defaults to 0.1): Contrastive temperature.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int,
        dice_weight: float = 0.0,
        ube_weight: float = 0.0,
        ube_alpha: float = 1.0,
        ube_beta: float = 1.0,
        band_weight: float = 0.0,
        band_radii: Sequence[int] = (1, 3, 6),
        band_weights: Sequence[float] = (1.0, 0.5, 0.25),
        proto_weight: float = 0.0,
        feature_dim: Optional[int] = None,
        proto_momentum: float = 0.99,
        proto_temperature: float = 0.1,
    ):
        super().__init__()
        if len(band_weights) != len(band_radii):
            raise ValueError(
                f"`band_weights` ({len(band_weights)} entries) must match `band_radii` ({len(band_radii)} entries)."
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.dice_weight = dice_weight
        self.ube_weight, self.ube_alpha, self.ube_beta = ube_weight, ube_alpha, ube_beta
        self.band_weight, self.band_radii, self.band_weights = band_weight, tuple(band_radii), tuple(band_weights)
        self.proto_weight = proto_weight
        self.prototypes = None
        if proto_weight > 0:
            if feature_dim is None:
                raise ValueError("`feature_dim` is required when `proto_weight` > 0.")
            self.prototypes = GranularPrototypeBank(
                num_classes, len(band_radii) + 1, feature_dim, momentum=proto_momentum, temperature=proto_temperature
            )

    @property
    def needs_features(self) -> bool:
        """Whether the segmenter must return features (prototype term on)."""
        return self.prototypes is not None

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        features: Optional[torch.Tensor] = None,
        reduce_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Computes the loss terms (and updates the prototype bank after computing its term).

        Args:
            logits (`torch.Tensor` of shape `(batch, C, height, width)`): Class scores.
            labels (`torch.LongTensor` of shape `(batch, height, width)`): Labels.
            features (`torch.Tensor`, *optional*): Decoder features, required when the prototype term is on.
            reduce_fn (`Callable`, *optional*): Sum over processes for the prototype update.

        Returns:
            `Dict[str, torch.Tensor]`: `loss` (total), one entry per active term, and `per_sample` (batch,).
        """
        _check_logits_labels(logits, labels)
        terms = {"ce": cross_entropy_dice_loss(logits, labels, self.ignore_index, self.dice_weight)}
        total = terms["ce"]
        bands = None
        if self.ube_weight > 0 or self.band_weight > 0 or self.prototypes is not None:
            bands = boundary_bands(labels, self.band_radii, self.ignore_index)
        if self.ube_weight > 0:
            terms["ube"] = uncertainty_boundary_emphasis_loss(
                logits, labels, bands, self.ignore_index, self.ube_alpha, self.ube_beta
            )
            total = total + self.ube_weight * terms["ube"]
        if self.band_weight > 0:
            terms["band"] = boundary_band_loss(logits, labels, bands, self.ignore_index, self.band_weights)
            total = total + self.band_weight * terms["band"]
        if self.prototypes is not None:
            if features is None:
                raise ValueError("`features` are required when the prototype term is on.")
            granularity = band_granularity(bands)
            terms["proto"] = self.prototypes.contrastive_loss(features, labels, granularity, self.ignore_index)
            self.prototypes.update(features, labels, granularity, self.ignore_index, reduce_fn=reduce_fn)
            total = total + self.proto_weight * terms["proto"]
        with torch.no_grad():
            valid = (labels != self.ignore_index).float()
            ce = F.cross_entropy(logits.detach().float(), labels, ignore_index=self.ignore_index, reduction="none")
            terms["per_sample"] = (ce * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1.0)
        terms["loss"] = total
        return terms
