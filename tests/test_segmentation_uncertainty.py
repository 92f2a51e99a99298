import math

import pytest
import torch
import torch.nn as nn

from diffusers_uncertainty.segmentation import (
    EnsembleEstimator,
    EntropyEstimator,
    MCDropoutEstimator,
    SegmentationModel,
    mc_dropout_mode,
    mutual_information,
    normalized_entropy,
)


def tiny_model(seed=0, dropout=0.3):
    torch.manual_seed(seed)
    return SegmentationModel(
        architecture="unet",
        encoder_name="tu-mobilenetv3_small_050",
        encoder_depth=3,
        decoder_channels=(16, 8, 8),
        num_classes=4,
        dropout=dropout,
        ignore_index=255,
    ).eval()


def test_normalized_entropy_bounds():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    h = normalized_entropy(probs, dim=1)
    assert h.tolist() == pytest.approx([1.0, 0.0, math.log(2) / math.log(4)], abs=1e-6)


def test_mutual_information_zero_on_agreement_positive_on_disagreement():
    agree = torch.softmax(torch.randn(1, 2, 3, 4, 4), dim=2).expand(5, 2, 3, 4, 4)
    assert mutual_information(agree).abs().max() < 1e-6
    one_hot = torch.eye(3)[torch.tensor([0, 1, 2])]  # three members, each sure of a different class
    disagree = one_hot[:, None, :, None, None].expand(3, 1, 3, 2, 2)
    mi = mutual_information(disagree)
    assert torch.allclose(mi, torch.ones_like(mi), atol=1e-6)  # maximal: H(mean) = log C, mean H = 0
    random = torch.softmax(torch.randn(4, 2, 3, 5, 5) * 3, dim=2)
    mi = mutual_information(random)
    assert (mi >= 0).all() and (mi <= normalized_entropy(random.mean(0), dim=1) + 1e-6).all()


def test_mc_dropout_mode_only_switches_dropout_and_restores():
    model = tiny_model()
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms
    with mc_dropout_mode(model):
        assert model.head_dropout.training
        assert not any(bn.training for bn in batchnorms)
        assert not model.encoder.training
    assert not any(m.training for m in model.modules())
    model.train()
    with mc_dropout_mode(model):
        assert not any(bn.training for bn in batchnorms)
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="dropout"):
        with mc_dropout_mode(tiny_model(dropout=0.0)):
            pass


def test_mc_dropout_passes_differ_but_batchnorm_statistics_do_not_move():
    model = tiny_model()
    x = torch.rand(2, 3, 32, 32)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    out = MCDropoutEstimator(model, num_passes=4)(x)
    assert out.maps.shape == (2, 32, 32) and out.scores.shape == (2,)
    assert (out.maps >= 0).all() and (out.maps <= 1).all()
    assert out.maps.max() > 0  # dropout made the passes differ
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, stats[k])
    assert torch.allclose(out.scores, out.maps.flatten(1).mean(1))


def test_entropy_estimator_matches_softmax_entropy():
    model = tiny_model()
    x = torch.rand(2, 3, 32, 32)
    out = EntropyEstimator(model)(x)
    with torch.no_grad():
        expected = normalized_entropy(model(x).logits.softmax(1), dim=1)
    assert torch.allclose(out.maps, expected, atol=1e-6)
    assert torch.allclose(out.scores, expected.flatten(1).mean(1), atol=1e-6)


def test_ensemble_disagreement_zero_for_identical_members_positive_otherwise():
    x = torch.rand(1, 3, 32, 32)
    a, b = tiny_model(0), tiny_model(0)
    assert EnsembleEstimator([a, b])(x).maps.abs().max() < 1e-5
    out = EnsembleEstimator([tiny_model(0), tiny_model(1), tiny_model(2)])(x)
    assert out.scores.item() > 0 and out.maps.max() <= 1
    with pytest.raises(ValueError, match="at least 2"):
        EnsembleEstimator([a])


# ------------------------------------------------------------------------ histogram matching of stored uncertainty maps
def test_quantile_matching_to_itself_changes_nothing():
    import numpy as np

    from diffusers_uncertainty.segmentation import quantile_matching_table, uncertainty_histogram

    rng = np.random.default_rng(0)
    maps = [(rng.beta(0.5, 3.0, size=(17, 23)) * 65535).astype(np.uint16) for _ in range(4)]
    maps.append(np.full((5, 5), 1234, dtype=np.uint16))  # a heavily tied level
    counts = uncertainty_histogram(maps)
    assert counts.sum() == sum(m.size for m in maps)
    table = quantile_matching_table(counts, counts)
    for levels in maps:
        assert np.array_equal(table[levels], levels)


def test_quantile_matching_keeps_the_order_and_takes_the_reference_distribution():
    import numpy as np

    from diffusers_uncertainty.segmentation import quantile_matching_table, uncertainty_histogram

    rng = np.random.default_rng(1)
    # Round 2's maps: lower and narrower than round 1's (the adapted segmenter is surer on the target).
    new = [(rng.beta(1.0, 8.0, size=(40, 50)) * 65535).astype(np.uint16) for _ in range(6)]
    reference = [(rng.beta(2.0, 4.0, size=(30, 30)) * 65535).astype(np.uint16) for _ in range(9)]
    table = quantile_matching_table(uncertainty_histogram(new), uncertainty_histogram(reference))
    assert (np.diff(table.astype(np.int64)) >= 0).all()  # monotone: the new maps' order of values is kept
    matched = np.concatenate([table[m].ravel() for m in new]).astype(np.float64)
    reference_values = np.concatenate([m.ravel() for m in reference]).astype(np.float64)
    quantiles = [0.05, 0.25, 0.5, 0.75, 0.95]
    # Up to the width of one level's share (here well under 0.5 % of the range).
    np.testing.assert_allclose(np.quantile(matched, quantiles), np.quantile(reference_values, quantiles), atol=300)
    assert abs(matched.mean() - reference_values.mean()) < 300
    # Before matching the two sets were far apart.
    before = np.concatenate([m.ravel() for m in new]).astype(np.float64)
    assert reference_values.mean() - before.mean() > 10000


def test_quantile_matching_rejects_what_is_not_a_histogram_of_maps():
    import numpy as np

    from diffusers_uncertainty.segmentation import quantile_matching_table, uncertainty_histogram

    good = np.ones(65536, dtype=np.int64)
    with pytest.raises(ValueError, match=r"`counts` must be a histogram of 65536 non-negative counts .* shape \(10,\)"):
        quantile_matching_table(np.ones(10, dtype=np.int64), good)
    with pytest.raises(ValueError, match=r"`reference_counts` must be .* total 0"):
        quantile_matching_table(good, np.zeros(65536, dtype=np.int64))
    with pytest.raises(ValueError, match=r"must be uint16 levels, but map 1 has dtype float32"):
        uncertainty_histogram([np.zeros((2, 2), np.uint16), np.zeros((2, 2), np.float32)])


def test_folder_histogram_reads_16_bit_maps_and_names_the_argument(tmp_path):
    import numpy as np
    from PIL import Image

    from diffusers_uncertainty.segmentation import folder_uncertainty_histogram

    with pytest.raises(ValueError, match=rf"`--match_reference_dir` must be a folder of 16-bit PNG uncertainty maps, "
                                         rf"but {tmp_path} has none"):
        folder_uncertainty_histogram(tmp_path)
    (tmp_path / "maps" / "sub").mkdir(parents=True)
    Image.fromarray(np.array([[0, 7], [7, 65535]], dtype=np.uint16)).save(tmp_path / "maps" / "a.png")
    Image.fromarray(np.array([[7]], dtype=np.uint16)).save(tmp_path / "maps" / "sub" / "b.png")
    counts = folder_uncertainty_histogram(tmp_path)
    assert counts.sum() == 5 and counts[7] == 3 and counts[0] == 1 and counts[65535] == 1
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "maps" / "c.png")
    with pytest.raises(ValueError, match=r"must hold 16-bit grayscale uncertainty maps, but .*c\.png is L"):
        folder_uncertainty_histogram(tmp_path, argument="--match_reference_dir")
