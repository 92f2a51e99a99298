"""StyleEncoderModel: aggregation invariances, the null style, save/load, input conversion and errors."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_uncertainty import StyleEncoderModel
from diffusers_uncertainty.models import combine_text_and_style, prepare_style_images


ORDER_INVARIANT = ["mean", "max", "set_transformer"]


def _encoder(aggregation="mean", **kwargs):
    torch.manual_seed(0)
    config = dict(backbone="test_resnet", cross_attention_dim=32, num_tokens=3, image_size=32, max_style_images=4)
    config.update(kwargs)
    return StyleEncoderModel(aggregation=aggregation, **config).eval()


def _images(batch=2, count=4, size=24, seed=0):
    return torch.rand(batch, count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("aggregation", ORDER_INVARIANT)
def test_order_invariant_aggregations_ignore_the_order_of_the_style_images(aggregation):
    encoder, images = _encoder(aggregation), _images()
    with torch.no_grad():
        reference = encoder(images).style_embeds
        for permutation in ([3, 2, 1, 0], [1, 3, 0, 2]):
            permuted = encoder(images[:, permutation]).style_embeds
            torch.testing.assert_close(permuted, reference, atol=1e-5, rtol=1e-5)
    # ... but they do look at the images: another set gives other tokens.
    assert not torch.allclose(encoder(_images(seed=1)).style_embeds, reference, atol=1e-3)


def test_mlp_aggregation_depends_on_the_order_and_pads_with_the_null_style():
    encoder, images = _encoder("mlp"), _images()
    with torch.no_grad():
        assert not torch.allclose(encoder(images).style_embeds, encoder(images[:, [3, 2, 1, 0]]).style_embeds, atol=1e-4)
        # One image: the three empty slots hold the null style, exactly as if the null style had been the input tokens.
        captured = []
        encoder.token_norm.register_forward_hook(lambda module, args, output: captured.append(output))
        single = encoder(images[:, :1]).style_embeds
        tokens = captured[-1]
        assert tokens.shape == (2, 1, 3, 32)
        padded = torch.cat([tokens, encoder.null_style.expand(2, 3, 3, 32)], dim=1)
        expected = encoder.aggregator.mlp(padded.permute(0, 2, 1, 3).reshape(2, 3, 4 * 32))
        torch.testing.assert_close(single, expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"at most max_style_images=4 style images per sample, but got 5"):
        encoder(_images(count=5))


@pytest.mark.parametrize("aggregation", ["mean", "max", "mlp", "set_transformer"])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_any_count_from_one_gives_num_tokens_tokens(aggregation, count):
    encoder = _encoder(aggregation)
    with torch.no_grad():
        assert encoder(_images(count=count)).style_embeds.shape == (2, 3, 32)
    if count == 1:  # a 4-D batch is one image per sample
        with torch.no_grad():
            torch.testing.assert_close(encoder(_images(count=1)[:, 0]).style_embeds, encoder(_images(count=1)).style_embeds)


def test_mean_of_identical_images_is_the_single_image_style():
    encoder, images = _encoder("mean"), _images(count=1)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder(images.repeat(1, 3, 1, 1, 1)).style_embeds, encoder(images).style_embeds, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("aggregation", ["mean", "set_transformer"])
def test_drop_mask_gives_exactly_the_null_style(aggregation):
    encoder, images = _encoder(aggregation), _images(batch=3)
    with torch.no_grad():
        styled = encoder(images).style_embeds
        dropped = encoder(images, drop_mask=torch.tensor([True, False, True])).style_embeds
    null = encoder.get_null_style(3)
    assert torch.equal(dropped[0], null[0]) and torch.equal(dropped[2], null[2])
    assert torch.equal(dropped[1], styled[1])
    assert not torch.allclose(styled[0], null[0])
    assert encoder.null_style.requires_grad


@pytest.mark.parametrize("aggregation", ["mean", "max", "mlp", "set_transformer"])
def test_save_and_load_round_trip_every_tensor_and_the_config(aggregation, tmp_path):
    encoder = _encoder(aggregation, conditioning_mode="replace", image_mean=(0.4, 0.5, 0.6), image_std=(0.2, 0.3, 0.4))
    encoder.save_pretrained(tmp_path)
    loaded = StyleEncoderModel.from_pretrained(tmp_path).eval()
    def config(model):
        return {k: v for k, v in json.loads(model.to_json_string()).items() if k != "_name_or_path"}

    assert config(loaded) == config(encoder) and config(loaded)["image_std"] == [0.2, 0.3, 0.4]
    state, loaded_state = encoder.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(_images()).style_embeds, encoder(_images()).style_embeds)


def test_gradients_reach_backbone_projection_aggregator_and_null_style():
    encoder = _encoder("set_transformer").train()
    style = encoder(_images(batch=4, count=2), drop_mask=torch.tensor([True, False, False, False])).style_embeds
    style.square().mean().backward()
    for name in ("image_encoder", "projection", "aggregator", "null_style"):
        grads = [p.grad for n, p in encoder.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name


def test_combine_text_and_style():
    text, style = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    assert torch.equal(combine_text_and_style(text, style, "replace"), style)
    combined = combine_text_and_style(text, style, "concat")
    assert combined.shape == (2, 8, 32) and torch.equal(combined[:, :5], text) and torch.equal(combined[:, 5:], style)
    with pytest.raises(ValueError, match=r"`conditioning_mode` must be one of \['replace', 'concat'\], but got 'add'"):
        combine_text_and_style(text, style, "add")


def test_prepare_style_images_reads_pil_numpy_and_tensors_alike():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    from_pil = prepare_style_images(PIL.Image.fromarray(pixels), 3, 16)
    from_numpy = prepare_style_images(pixels, 3, 16)
    from_tensor = prepare_style_images(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, 3, 16)
    assert from_pil.shape == (1, 3, 16, 16) and from_pil.min() >= -1 and from_pil.max() <= 1
    assert torch.equal(from_pil, from_numpy)
    torch.testing.assert_close(from_tensor, from_pil, atol=1e-5, rtol=0)
    batch = prepare_style_images([pixels, PIL.Image.fromarray(pixels[:20])], 3, 16)
    assert batch.shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    "images, message",
    [
        ([], r"`style_images` must hold at least one style image, but got 0"),
        (PIL.Image.new("L", (16, 16)), r"expects 3-channel images \(in_channels=3\), but image 0 has 1 channels"),
        ([np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 4), np.uint8)], r"expects 3-channel images \(in_channels=3\), but image 1 has 4 channels"),
        (torch.full((3, 16, 16), 2.0), r"float images must lie in \[0, 1\], but got values in \[2.0, 2.0\]"),
        (["a.png"], r"must hold PIL images, numpy arrays or torch tensors, but got str"),
    ],
)
def test_prepare_style_images_errors(images, message):
    with pytest.raises(ValueError, match=message):
        prepare_style_images(images, 3, 16)


def test_forward_errors_on_zero_images_and_wrong_channels():
    encoder = _encoder()
    with pytest.raises(ValueError, match=r"at least one style image per sample, but got 0"):
        encoder(torch.zeros(2, 0, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expects 3-channel images \(in_channels=3\), but got 1 channels"):
        encoder(torch.zeros(2, 2, 1, 16, 16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(aggregation="sum"), r"`aggregation` must be one of \['mean', 'max', 'mlp', 'set_transformer'\], but got 'sum'"),
        (dict(conditioning_mode="add"), r"`conditioning_mode` must be one of \['replace', 'concat'\]"),
        (dict(aggregation="set_transformer", aggregation_heads=5), r"`aggregation_heads` must divide cross_attention_dim=32"),
        (dict(num_tokens=0), r"`num_tokens` must be a positive integer, but got 0"),
        (dict(image_mean=(0.5,)), r"`image_mean` and `image_std` must have in_channels=3 entries"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _encoder(**kwargs)


def test_pretrained_weights_unreachable_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    encoder = _encoder(backbone="resnet10t")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(OSError, match=r"Could not load pretrained weights for the style backbone 'resnet10t'"):
        encoder.load_pretrained_backbone()
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
