import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_uncertainty import prepare_semantic_map, prepare_uncertainty_map


def test_integer_labels_become_one_hot_and_ignore_index_an_all_zero_vector():
    labels = torch.tensor([[[0, 1], [2, 255]]])
    one_hot, out = prepare_semantic_map(labels, 3, 2, 2, ignore_index=255)
    assert one_hot.dtype == torch.float32 and one_hot.shape == (1, 3, 2, 2)
    assert one_hot[0, :, 0, 0].tolist() == [1, 0, 0]
    assert one_hot[0, :, 0, 1].tolist() == [0, 1, 0]
    assert one_hot[0, :, 1, 0].tolist() == [0, 0, 1]
    assert one_hot[0, :, 1, 1].tolist() == [0, 0, 0]
    assert torch.equal(out, labels)


def test_pil_numpy_and_torch_labels_agree_and_resize_with_nearest_neighbour():
    array = np.random.default_rng(0).integers(0, 5, (12, 12)).astype(np.uint8)
    palette = PIL.Image.fromarray(array, mode="L").convert("P")
    results = [
        prepare_semantic_map(x, 5, 24, 24)
        for x in (PIL.Image.fromarray(array), palette, array, torch.from_numpy(array).long())
    ]
    for one_hot, labels in results[1:]:
        assert torch.equal(one_hot, results[0][0]) and torch.equal(labels, results[0][1])
    labels = results[0][1][0]
    # Upsampling by 2 with nearest-neighbour repeats every label in a 2x2 block, values unchanged.
    assert torch.equal(labels, torch.from_numpy(array).long().repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_one_hot_float_input_passes_through_and_gives_labels():
    labels = torch.randint(0, 3, (2, 8, 8))
    one_hot, _ = prepare_semantic_map(labels, 3, 8, 8)
    again, recovered = prepare_semantic_map(one_hot, 3, 8, 8)
    assert torch.equal(again, one_hot) and torch.equal(recovered, labels)


@pytest.mark.parametrize(
    "value, message",
    [
        (torch.tensor([[0, 3]]), r"`semantic_map` values must be in \[0, 3\), but found \[3\]"),
        (torch.tensor([[0, -1]]), r"found \[-1\]"),
        (np.zeros((4, 4), dtype=np.float32), "must have an integer dtype, but got float32"),
        (torch.zeros(1, 2, 4, 4), r"must be one-hot with shape \(B, 3, H, W\), but got shape \(1, 2, 4, 4\)"),
        (torch.full((1, 3, 4, 4), 0.5), "only 0 and 1 values"),
        (PIL.Image.new("RGB", (4, 4)), "mode 'L', 'P', 'I' or 'I;16', but got mode 'RGB'"),
        ([torch.zeros(4, 4, dtype=torch.long), torch.zeros(5, 5, dtype=torch.long)], "same size"),
        ("labels.png", "but got str"),
    ],
)
def test_bad_label_maps_are_rejected_with_the_reason(value, message):
    with pytest.raises(ValueError, match=message):
        prepare_semantic_map(value, 3, 4, 4)


def test_unlabeled_one_hot_pixels_need_an_ignore_index():
    one_hot = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="no `ignore_index`"):
        prepare_semantic_map(one_hot, 3, 4, 4)
    _, labels = prepare_semantic_map(one_hot, 3, 4, 4, ignore_index=9)
    assert bool((labels == 9).all())


def test_uncertainty_inputs_agree_across_types():
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, (8, 8)).astype(np.uint8)
    as_float = levels.astype(np.float32) / 255.0
    from_pil = prepare_uncertainty_map(PIL.Image.fromarray(levels), 1, 8, 8)
    from_numpy = prepare_uncertainty_map(as_float, 1, 8, 8)
    from_torch = prepare_uncertainty_map(torch.from_numpy(as_float)[None, None], 1, 8, 8)
    assert torch.equal(from_pil, from_numpy) and torch.equal(from_numpy, from_torch)
    sixteen = PIL.Image.fromarray((as_float * 65535).round().astype(np.uint16))
    torch.testing.assert_close(prepare_uncertainty_map(sixteen, 1, 8, 8), from_numpy, atol=1e-4, rtol=0)
    constant = prepare_uncertainty_map(0.3, 1, 8, 8)
    assert constant.shape == (1, 1, 8, 8) and torch.allclose(constant, torch.full_like(constant, 0.3))


def test_uncertainty_is_resized_bilinearly_and_stays_in_range():
    ramp = torch.linspace(0, 1, 16).repeat(16, 1)
    small = prepare_uncertainty_map(ramp, 1, 8, 8)
    large = prepare_uncertainty_map(ramp, 1, 32, 32)
    for resized in (small, large):
        assert resized.min() >= 0 and resized.max() <= 1
        assert bool((resized[0, 0, :, 1:] >= resized[0, 0, :, :-1]).all())  # still a left-to-right ramp
    assert torch.allclose(prepare_uncertainty_map(torch.full((4, 4), 0.6), 1, 8, 8), torch.full((1, 1, 8, 8), 0.6))


@pytest.mark.parametrize(
    "value, message",
    [
        (1.5, r"must lie in \[0, 1\], but got 1.5"),
        (float("nan"), r"must lie in \[0, 1\], but got nan"),
        (torch.tensor([[0.2, float("nan")]]), "contains NaN"),
        (torch.tensor([[0.2, -0.1]]), r"values must lie in \[0, 1\], but range from -0.1"),
        (np.zeros((4, 4), dtype=np.uint8), "must be floats in \\[0, 1\\], but got dtype uint8"),
        (torch.zeros(1, 2, 4, 4), r"\(B, 1, H, W\), but got \(1, 2, 4, 4\)"),
        (PIL.Image.new("RGB", (4, 4)), "single-channel"),
        (True, "got a bool"),
    ],
)
def test_bad_uncertainty_maps_are_rejected_with_the_reason(value, message):
    with pytest.raises(ValueError, match=message):
        prepare_uncertainty_map(value, 1, 4, 4)


def test_one_hot_equals_torch_one_hot_in_the_asked_dtype_and_layout():
    labels = torch.randint(0, 6, (3, 24, 32), generator=torch.Generator().manual_seed(0))
    labels[0, :5] = 6  # ignore_index
    reference = torch.nn.functional.one_hot(torch.where(labels == 6, 0, labels), 6).permute(0, 3, 1, 2).float()
    reference[:, :][(labels == 6)[:, None].expand(-1, 6, -1, -1)] = 0
    one_hot, returned = prepare_semantic_map(labels, 6, 24, 32, ignore_index=6)
    assert torch.equal(one_hot, reference) and one_hot.is_contiguous()
    assert torch.equal(returned, labels)
    half, _ = prepare_semantic_map(labels, 6, 24, 32, ignore_index=6, device="cpu", dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half.float(), reference)
