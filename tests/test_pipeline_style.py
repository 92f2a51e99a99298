"""StableDiffusionDualControlPipeline with style images: unchanged without them, style tokens in every
cross-attention, guidance against the null style, saving/loading, and input errors before any work."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionControlNetPipeline

from diffusers_uncertainty import StableDiffusionDualControlPipeline, StyleEncoderModel, build_tiny_components
from diffusers_uncertainty.conditioning import prepare_semantic_map


TEXT_TOKENS = 16  # the tiny tokenizer's model_max_length
STYLE_TOKENS = 2


def _style_encoder(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = dict(backbone="test_resnet", cross_attention_dim=32, num_tokens=STYLE_TOKENS, image_size=16)
    config.update(kwargs)
    return StyleEncoderModel(**config).eval()


def _pipeline(style_encoder=None, **kwargs):
    components = build_tiny_components(num_classes=4, ignore_index=255, **kwargs)
    pipeline = StableDiffusionDualControlPipeline(**components, style_encoder=style_encoder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _style_set(seed, count=2, size=20):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


LABELS = torch.randint(0, 4, (1, 16, 16), generator=torch.Generator().manual_seed(0))


def _run(pipeline, **kwargs):
    arguments = dict(
        prompt="a scan", semantic_map=LABELS, uncertainty_map=0.5, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    arguments.update(kwargs)
    return pipeline(**arguments).images


def _capture_hidden_states(pipeline):
    """encoder_hidden_states of every UNet and controlnet-branch call."""
    seen = {"unet": [], "controlnet": []}

    def hook(name):
        return lambda module, args, kwargs: seen[name].append(kwargs["encoder_hidden_states"].clone())

    pipeline.unet.register_forward_pre_hook(hook("unet"), with_kwargs=True)
    for net in pipeline.controlnet.nets:
        net.register_forward_pre_hook(hook("controlnet"), with_kwargs=True)
    return seen


def test_without_style_images_the_output_is_unchanged_and_equals_the_stock_pipeline():
    plain, styled = _pipeline(), _pipeline(style_encoder=_style_encoder())
    components = {k: v for k, v in build_tiny_components(num_classes=4, ignore_index=255).items()}
    stock = StableDiffusionControlNetPipeline(**components, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    reference = _run(plain, guidance_scale=3.0)
    assert (_run(styled, guidance_scale=3.0) == reference).all()
    one_hot, _ = prepare_semantic_map(LABELS, 4, 16, 16, ignore_index=255)
    stock_images = stock(
        "a scan", image=[one_hot, torch.full((1, 1, 16, 16), 0.5)], num_inference_steps=2, output_type="np",
        guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
    ).images
    assert (stock_images == reference).all()


def test_style_images_change_the_image_and_different_styles_give_different_images():
    pipeline = _pipeline(style_encoder=_style_encoder())
    without = _run(pipeline)
    style_a = _run(pipeline, style_images=_style_set(1))
    style_b = _run(pipeline, style_images=_style_set(2))
    assert not np.allclose(style_a, without, atol=1e-4)
    assert not np.allclose(style_a, style_b, atol=1e-4)
    # The same style given as PIL images, uint8 arrays or float tensors gives the same image; so does a re-run.
    arrays = [np.array(image) for image in _style_set(1)]
    tensors = [torch.from_numpy(array).permute(2, 0, 1) / 255.0 for array in arrays]
    assert (_run(pipeline, style_images=arrays) == style_a).all()
    np.testing.assert_allclose(_run(pipeline, style_images=tensors), style_a, atol=1e-5)
    assert (_run(pipeline, style_images=_style_set(1)) == style_a).all()


@pytest.mark.parametrize("guidance_scale, uncertainty_guidance_scale", [(1.0, 1.0), (3.0, 1.0), (3.0, 2.0)])
def test_style_tokens_reach_the_unet_and_both_controls_in_concat_mode(guidance_scale, uncertainty_guidance_scale):
    encoder = _style_encoder()
    pipeline = _pipeline(style_encoder=encoder)
    seen = _capture_hidden_states(pipeline)
    style = _style_set(1)
    _run(pipeline, style_images=style, guidance_scale=guidance_scale, uncertainty_guidance_scale=uncertainty_guidance_scale)
    from diffusers_uncertainty.models import prepare_style_images

    with torch.no_grad():
        expected = encoder(prepare_style_images(style, 3, 16)[None]).style_embeds[0]
    # [negative, text] with classifier-free guidance, and one more text branch (the zero map) with uncertainty guidance
    branches = (2 if guidance_scale > 1 else 1) + int(uncertainty_guidance_scale != 1.0)
    assert len(seen["unet"]) == 2 and len(seen["controlnet"]) == 2 * 2  # 2 steps; 2 control branches per step
    for states in seen["unet"] + seen["controlnet"]:
        assert states.shape == (branches, TEXT_TOKENS + STYLE_TOKENS, 32)
        for branch in range(branches):  # at style_guidance_scale 1 the style is in every branch
            torch.testing.assert_close(states[branch, TEXT_TOKENS:], expected, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(states, seen["unet"][0]) for states in seen["controlnet"][:2])


def test_style_guidance_puts_the_null_style_in_the_unconditional_branches():
    encoder = _style_encoder()
    pipeline = _pipeline(style_encoder=encoder)
    seen = _capture_hidden_states(pipeline)
    _run(pipeline, style_images=_style_set(1), guidance_scale=3.0, style_guidance_scale=2.0)
    states = seen["unet"][0]
    assert states.shape == (3, TEXT_TOKENS + STYLE_TOKENS, 32)  # [negative + null, text + null, text + style]
    null = encoder.null_style.detach()
    assert torch.equal(states[0, TEXT_TOKENS:], null) and torch.equal(states[1, TEXT_TOKENS:], null)
    assert not torch.allclose(states[2, TEXT_TOKENS:], null)
    assert torch.equal(states[1, :TEXT_TOKENS], states[2, :TEXT_TOKENS])  # the same (positive) text
    assert not torch.equal(states[0, :TEXT_TOKENS], states[1, :TEXT_TOKENS])  # negative prompt "" vs "a scan"
    assert all(torch.equal(s, states) for s in seen["controlnet"][:2])

    # Style guidance alone: [text + null, text + style].
    seen["unet"].clear()
    guided = _run(pipeline, style_images=_style_set(1), guidance_scale=1.0, style_guidance_scale=2.0)
    states = seen["unet"][0]
    assert states.shape == (2, TEXT_TOKENS + STYLE_TOKENS, 32)
    assert torch.equal(states[0, TEXT_TOKENS:], null) and torch.equal(states[0, :TEXT_TOKENS], states[1, :TEXT_TOKENS])
    assert not np.allclose(guided, _run(pipeline, style_images=_style_set(1), guidance_scale=1.0), atol=1e-4)


def test_replace_mode_and_one_style_set_per_prompt():
    encoder = _style_encoder(conditioning_mode="replace", aggregation="set_transformer")
    pipeline = _pipeline(style_encoder=encoder)
    seen = _capture_hidden_states(pipeline)
    sets = [_style_set(1, count=1), _style_set(2, count=3)]
    images = _run(pipeline, prompt=["a", "b"], style_images=sets, num_images_per_prompt=2, guidance_scale=1.0)
    assert images.shape == (4, 16, 16, 3)
    from diffusers_uncertainty.models import prepare_style_images

    with torch.no_grad():
        expected = [encoder(prepare_style_images(s, 3, 16)[None]).style_embeds[0] for s in sets]
    states = seen["unet"][0]
    assert states.shape == (4, STYLE_TOKENS, 32)  # the text embeddings are replaced
    for row, style in zip(states, [expected[0], expected[0], expected[1], expected[1]]):
        torch.testing.assert_close(row, style, atol=1e-5, rtol=1e-5)


def test_pipeline_with_a_style_encoder_saves_and_loads_through_both_loaders(tmp_path):
    pipeline = _pipeline(style_encoder=_style_encoder(aggregation="mlp", max_style_images=3))
    reference = _run(pipeline, style_images=_style_set(1))
    pipeline.save_pretrained(tmp_path / "with")
    model_index = json.loads((tmp_path / "with" / "model_index.json").read_text())
    assert model_index["style_encoder"] == ["diffusers_uncertainty", "StyleEncoderModel"]
    for loader in (StableDiffusionDualControlPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path / "with")
        assert isinstance(loaded.style_encoder, StyleEncoderModel) and loaded.style_encoder.config.aggregation == "mlp"
        original, restored = pipeline.style_encoder.state_dict(), loaded.style_encoder.state_dict()
        assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
        loaded.set_progress_bar_config(disable=True)
        assert (_run(loaded, style_images=_style_set(1)) == reference).all()

    # A folder without a style encoder (saved before style conditioning existed, or without one) still loads.
    plain = _pipeline()
    plain.save_pretrained(tmp_path / "without")
    model_index_path = tmp_path / "without" / "model_index.json"
    model_index = json.loads(model_index_path.read_text())
    assert model_index["style_encoder"] == [None, None]
    del model_index["style_encoder"]
    model_index_path.write_text(json.dumps(model_index))
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "without")
    assert loaded.style_encoder is None
    loaded.set_progress_bar_config(disable=True)
    assert (_run(loaded) == _run(plain)).all()


@pytest.mark.parametrize(
    "with_encoder, kwargs, message",
    [
        (False, dict(style_images=_style_set(1)), r"`style_images` were given, but the pipeline has no `style_encoder`"),
        (True, dict(style_images=[]), r"`style_images` must hold at least one style image, but got 0"),
        (True, dict(style_images=[_style_set(1), []], prompt=["a", "b"]), r"`style_images\[1\]` must hold at least one style image, but got 0"),
        (True, dict(style_images=[PIL.Image.new("L", (16, 16))]), r"the style encoder expects 3-channel images \(in_channels=3\), but image 0 has 1 channels"),
        (True, dict(style_images=[np.zeros((16, 16, 4), np.uint8)]), r"expects 3-channel images \(in_channels=3\), but image 0 has 4 channels"),
        (True, dict(style_guidance_scale=2.0), r"`style_guidance_scale` is 2.0, but no `style_images` were given"),
        (True, dict(style_images=[_style_set(1)] * 3, prompt=["a", "b"]), r"`style_images` holds 3 sets \(one per prompt\), but there are 2 prompts"),
        (True, dict(style_images=_style_set(1), guess_mode=True, guidance_scale=3.0, style_guidance_scale=2.0), r"`guess_mode` cannot be combined"),
        (True, dict(style_images=_style_set(1), style_guidance_scale=2.0, uncertainty_guidance_scale=2.0), r"`uncertainty_guidance_scale` \(2.0\) cannot be combined with `style_guidance_scale` > 1"),
    ],
)
def test_bad_style_input_is_a_clear_error_before_any_work(with_encoder, kwargs, message):
    pipeline = _pipeline(style_encoder=_style_encoder() if with_encoder else None)
    calls = []
    for module in (pipeline.unet, pipeline.text_encoder, pipeline.controlnet, pipeline.style_encoder):
        if module is not None:
            module.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=message):
        _run(pipeline, **kwargs)
    assert calls == []


def test_mlp_encoder_refuses_more_images_than_its_slots_before_any_work():
    pipeline = _pipeline(style_encoder=_style_encoder(aggregation="mlp", max_style_images=2))
    with pytest.raises(ValueError, match=r"`style_images` holds 3 images, but the style encoder's `mlp` aggregation takes at most max_style_images=2"):
        _run(pipeline, style_images=_style_set(1, count=3))


def test_constructor_refuses_a_style_encoder_of_another_width():
    with pytest.raises(ValueError, match=r"`style_encoder` makes tokens of width 64, but the UNet's cross_attention_dim is 32"):
        _pipeline(style_encoder=_style_encoder(cross_attention_dim=64))


def test_model_cpu_offload_with_a_style_encoder_gives_the_same_image():
    pipeline = _pipeline(style_encoder=_style_encoder())
    arguments = dict(style_images=_style_set(1), guidance_scale=3.0, style_guidance_scale=2.0)
    reference = _run(pipeline, **arguments)
    pipeline.enable_model_cpu_offload(device="cpu")  # the style encoder is in model_cpu_offload_seq
    assert (_run(pipeline, **arguments) == reference).all()
