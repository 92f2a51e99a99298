import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_uncertainty.segmentation import (
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


IGNORE = 9


def _scene():
    """Two classes split vertically, a square of class 2, a void (ignore) blob inside class 0."""
    label = torch.zeros(1, 24, 30, dtype=torch.long)
    label[:, :, 15:] = 1
    label[:, 6:12, 18:24] = 2
    label[:, 16:20, 3:7] = IGNORE
    return label


def _brute_force_edges(label: np.ndarray) -> np.ndarray:
    h, w = label.shape
    edges = np.zeros_like(label, dtype=bool)
    for y in range(h):
        for x in range(w):
            if label[y, x] == IGNORE:
                continue
            window = label[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
            window = window[window != IGNORE]
            edges[y, x] = (window != label[y, x]).any()
    return edges


def _chebyshev_distance_to(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    grid_y, grid_x = np.mgrid[: mask.shape[0], : mask.shape[1]]
    d = np.maximum(np.abs(grid_y[..., None] - ys), np.abs(grid_x[..., None] - xs))
    return d.min(axis=-1)


def test_label_edges_lie_exactly_on_label_changes_and_ignore_void_borders():
    label = _scene()
    edges = label_edges(label, IGNORE)[0].numpy()
    np.testing.assert_array_equal(edges, _brute_force_edges(label[0].numpy()))
    # The void blob is surrounded by class 0 only: its border is not an edge.
    assert not edges[15:21, 2:8].any()
    # Both sides of the 0|1 split are edges.
    assert edges[0, 14] and edges[0, 15] and not edges[0, 10]


def test_boundary_bands_are_nested_and_are_exact_distance_bands_around_edges():
    label = _scene()
    radii = (1, 2, 4)
    bands = boundary_bands(label, radii, IGNORE)[0].numpy()
    assert bands.shape == (3, 24, 30)
    edges = _brute_force_edges(label[0].numpy())
    valid = label[0].numpy() != IGNORE
    distance = _chebyshev_distance_to(edges)
    for k, r in enumerate(radii):
        np.testing.assert_array_equal(bands[k], (distance <= r) & valid)
        assert bands[k][edges].all()  # every edge pixel is in every band
    # Nested: thin within medium within thick, and strictly growing here.
    assert (bands[0] <= bands[1]).all() and (bands[1] <= bands[2]).all()
    assert bands[0].sum() < bands[1].sum() < bands[2].sum()
    # No band pixel on void.
    assert not bands[:, ~valid].any()


def test_boundary_bands_reject_non_increasing_radii():
    with pytest.raises(ValueError, match="strictly increasing"):
        boundary_bands(_scene(), (2, 2), IGNORE)


def test_band_granularity_is_index_of_thinnest_band():
    label = _scene()
    bands = boundary_bands(label, (1, 2, 4), IGNORE)
    g = band_granularity(bands)[0]
    edges = label_edges(label, IGNORE)[0]
    assert (g[edges] == 0).all()
    assert (g[~bands[0, 2]] == 3).all()
    ring = bands[0, 1] & ~bands[0, 0]
    assert (g[ring] == 1).all()


def test_entropy_weight_is_largest_where_prediction_is_most_uncertain():
    # Four pixels in a row, from confident to uniform; no boundary involved (all bands empty).
    scale = torch.tensor([20.0, 3.0, 1.0, 0.0])
    logits = torch.zeros(1, 4, 1, 4)
    logits[0, 0, 0] = scale
    bands = torch.zeros(1, 3, 1, 4, dtype=torch.bool)
    weights = uncertainty_boundary_weights(logits, bands, alpha=2.0, beta=1.0)[0, 0]
    assert torch.all(weights[1:] > weights[:-1])
    assert weights[0] == pytest.approx(1.0, abs=1e-6)
    assert weights[-1] == pytest.approx(1.0 + 2.0, abs=1e-6)  # uniform prediction, off-boundary: 1 + alpha
    # Same entropy on an edge (in all bands): 1 + alpha (1 + beta), the global maximum.
    on_edge = uncertainty_boundary_weights(logits, torch.ones_like(bands), alpha=2.0, beta=1.0)[0, 0]
    assert on_edge[-1] == pytest.approx(1.0 + 2.0 * 2.0, abs=1e-6)
    assert torch.all(on_edge[1:] > weights[1:])


def test_uncertainty_boundary_emphasis_loss_matches_formula_and_reduces_to_ce():
    torch.manual_seed(0)
    label = _scene()
    logits = torch.randn(1, 3, 24, 30) * 2
    bands = boundary_bands(label, (1, 2, 4), IGNORE)
    loss = uncertainty_boundary_emphasis_loss(logits, label, bands, IGNORE, alpha=1.5, beta=0.5)
    ce = F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="none")
    w = uncertainty_boundary_weights(logits, bands, 1.5, 0.5) * (label != IGNORE)
    assert loss.item() == pytest.approx(((w * ce).sum() / w.sum()).item(), rel=1e-6)
    plain = uncertainty_boundary_emphasis_loss(logits, label, bands, IGNORE, alpha=0.0)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, label, ignore_index=IGNORE).item(), rel=1e-6)


def test_boundary_band_loss_only_sees_band_pixels():
    label = _scene()
    bands = boundary_bands(label, (1, 2, 4), IGNORE)
    # Perfect prediction inside the thick band, wrong everywhere else.
    target = torch.where(label == IGNORE, torch.zeros_like(label), label)
    logits = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 30
    far = ~bands[:, 2]
    logits = torch.where(far[:, None], logits.roll(1, dims=1), logits)
    assert boundary_band_loss(logits, label, bands, IGNORE).item() < 1e-6
    assert F.cross_entropy(logits, label, ignore_index=IGNORE).item() > 1.0
    # Formula: sum_k lambda_k mean_{B_k} CE.
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 24, 30)
    ce = F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="none")
    expected = sum(lam * ce[bands[:, k]].mean() for k, lam in enumerate((1.0, 0.5, 0.25)))
    got = boundary_band_loss(logits, label, bands, IGNORE, (1.0, 0.5, 0.25))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_cross_entropy_dice_excludes_ignore_and_dice_vanishes_for_perfect_prediction():
    label = _scene()
    target = torch.where(label == IGNORE, torch.zeros_like(label), label)
    logits = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 30
    assert cross_entropy_dice_loss(logits, label, IGNORE, dice_weight=1.0).item() < 1e-4
    # Changing logits on ignored pixels changes nothing.
    other = logits.clone()
    other[:, :, label[0] == IGNORE] = torch.tensor([-5.0, 5.0, 0.0])[:, None]
    assert cross_entropy_dice_loss(other, label, IGNORE, 1.0).item() == pytest.approx(
        cross_entropy_dice_loss(logits, label, IGNORE, 1.0).item(), abs=1e-7
    )
    # And a wrong prediction is penalised by the Dice term as well.
    wrong = logits.roll(1, dims=1)
    assert cross_entropy_dice_loss(wrong, label, IGNORE, 1.0) > cross_entropy_dice_loss(wrong, label, IGNORE, 0.0) + 0.5


def test_prototype_moving_average_update_is_exact():
    bank = GranularPrototypeBank(num_classes=2, num_granularities=2, feature_dim=2, momentum=0.75)
    labels = torch.tensor([[[0, 0, 1, IGNORE]]])
    granularity = torch.tensor([[[0, 1, 0, 0]]])
    f1 = torch.tensor([[[[3.0, 0.0, 0.0, 5.0]], [[4.0, 2.0, -1.0, 5.0]]]])  # (1, 2, 1, 4)
    bank.update(f1, labels, granularity, IGNORE)
    # First update copies the mean of the normalised features.
    assert torch.allclose(bank.prototypes[0, 0], torch.tensor([0.6, 0.8]))
    assert torch.allclose(bank.prototypes[0, 1], torch.tensor([0.0, 1.0]))
    assert torch.allclose(bank.prototypes[1, 0], torch.tensor([0.0, -1.0]))
    assert bank.initialized.tolist() == [[True, True], [True, False]]
    labels2 = torch.tensor([[[0, 0, 1, 1]]])
    granularity2 = torch.tensor([[[0, 0, 1, 1]]])
    f2 = torch.tensor([[[[1.0, 0.0, 2.0, 0.0]], [[0.0, 1.0, 0.0, 3.0]]]])
    bank.update(f2, labels2, granularity2, IGNORE)
    mean00 = torch.tensor([0.5, 0.5])
    assert torch.allclose(bank.prototypes[0, 0], 0.75 * torch.tensor([0.6, 0.8]) + 0.25 * mean00)
    assert torch.allclose(bank.prototypes[0, 1], torch.tensor([0.0, 1.0]))  # absent: unchanged
    assert torch.allclose(bank.prototypes[1, 0], torch.tensor([0.0, -1.0]))  # absent: unchanged
    assert torch.allclose(bank.prototypes[1, 1], torch.tensor([0.5, 0.5]))  # new: copied
    assert bank.initialized.all()


def test_prototype_contrastive_term_pulls_boundary_features_to_their_prototype():
    bank = GranularPrototypeBank(num_classes=2, num_granularities=2, feature_dim=2, momentum=0.9, temperature=0.1)
    bank.prototypes[0, 0] = torch.tensor([1.0, 0.0])
    bank.prototypes[1, 0] = torch.tensor([0.0, 1.0])
    bank.initialized[:, 0] = True
    labels = torch.tensor([[[0, 1]]])
    boundary = torch.zeros(1, 1, 2, dtype=torch.long)  # granularity 0 = boundary
    aligned = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    swapped = aligned.flip(-1)
    assert bank.contrastive_loss(aligned, labels, boundary, IGNORE) < 0.01
    assert bank.contrastive_loss(swapped, labels, boundary, IGNORE) > 5.0
    # A gradient step moves a feature toward its own prototype.
    feature = torch.tensor([[[[0.6, 0.6]], [[0.8, 0.8]]]], requires_grad=True)
    bank.contrastive_loss(feature, labels, boundary, IGNORE).backward()
    moved = F.normalize((feature - 0.1 * feature.grad)[0, :, 0].T, dim=1)
    before = F.normalize(feature.detach()[0, :, 0].T, dim=1)
    protos = torch.stack([bank.prototypes[0, 0], bank.prototypes[1, 0]])
    assert ((moved * protos).sum(1) > (before * protos).sum(1)).all()
    # Interior pixels (last granularity) do not enter the term.
    interior = torch.ones(1, 1, 2, dtype=torch.long)
    assert bank.contrastive_loss(swapped, labels, interior, IGNORE).item() == 0.0


def test_flexseg_loss_combines_terms_and_reports_per_sample_loss():
    torch.manual_seed(0)
    label = torch.cat([_scene(), _scene().flip(-1)])
    logits = torch.randn(2, 3, 24, 30, requires_grad=True)
    features = torch.randn(2, 4, 24, 30, requires_grad=True)
    loss_fn = FlexSegLoss(3, IGNORE, ube_weight=1.0, band_weight=0.5, proto_weight=0.1, feature_dim=4,
                          band_radii=(1, 2, 4))
    terms = loss_fn(logits, label, features)
    assert set(terms) == {"ce", "ube", "band", "proto", "per_sample", "loss"}
    expected = terms["ce"] + terms["ube"] + 0.5 * terms["band"] + 0.1 * terms["proto"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    ce = F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="none")
    for i in range(2):
        assert terms["per_sample"][i].item() == pytest.approx(ce[i][label[i] != IGNORE].mean().item(), rel=1e-5)
    assert loss_fn.prototypes.initialized.any()
    # Second call: prototypes exist, the contrastive term is active and differentiable.
    terms = loss_fn(logits, label, features)
    assert terms["proto"].item() > 0
    terms["loss"].backward()
    assert features.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="features"):
        loss_fn(logits, label, None)
    assert math.isfinite(terms["loss"].item())
