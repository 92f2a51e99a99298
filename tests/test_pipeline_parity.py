"""Parity with diffusers' `StableDiffusionControlNetPipeline`: every argument of its `__call__`, custom timesteps and
sigmas, IP-Adapters, and the properties diffusers' generic pipeline tests ask of every pipeline (construction from
some components, `components`, dict/tuple outputs), written for this pipeline."""

import inspect

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from diffusers_uncertainty import StableDiffusionDualControlPipeline, build_tiny_components, prepare_semantic_map


def _pair(components, **extra):
    ours = StableDiffusionDualControlPipeline(**components, **extra)
    stock = StableDiffusionControlNetPipeline(**components, **extra, requires_safety_checker=False)
    for pipeline in (ours, stock):
        pipeline.set_progress_bar_config(disable=True)
    return ours, stock


def _maps(num_classes=4, size=16):
    labels = torch.randint(0, num_classes, (1, size, size), generator=torch.Generator().manual_seed(1))
    uncertainty = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(2))
    one_hot, _ = prepare_semantic_map(labels, num_classes, size, size)
    return dict(semantic_map=labels, uncertainty_map=uncertainty), dict(image=[one_hot, uncertainty])


def _both(ours, stock, **kwargs):
    ours_maps, stock_maps = _maps()
    common = dict(prompt="a scan", output_type="np", **kwargs)
    mine = ours(**ours_maps, **common, generator=torch.Generator().manual_seed(0)).images
    theirs = stock(**stock_maps, **common, generator=torch.Generator().manual_seed(0)).images
    return mine, theirs


def test_call_accepts_every_argument_of_the_stock_controlnet_pipeline():
    stock = set(inspect.signature(StableDiffusionControlNetPipeline.__call__).parameters)
    ours = set(inspect.signature(StableDiffusionDualControlPipeline.__call__).parameters)
    # `image` (the control image) is our two maps, `controlnet_conditioning_scale` our two per-branch scales; `kwargs` carries only
    # diffusers' deprecated `callback`/`callback_steps`.
    renamed = {"image", "controlnet_conditioning_scale", "kwargs"}
    assert stock - renamed <= ours, sorted(stock - renamed - ours)
    assert {"semantic_map", "uncertainty_map", "semantic_conditioning_scale", "uncertainty_conditioning_scale"} <= ours


@pytest.mark.parametrize("argument", ["timesteps", "sigmas"])
def test_custom_timesteps_and_sigmas_mean_what_they_mean_in_the_stock_pipeline(argument):
    components = build_tiny_components(num_classes=4)
    components["scheduler"] = EulerDiscreteScheduler.from_config(components["scheduler"].config)
    ours, stock = _pair(components)
    values = [999, 700, 400, 100] if argument == "timesteps" else [14.0, 4.0, 1.0, 0.3]
    mine, theirs = _both(ours, stock, **{argument: values})
    assert np.array_equal(mine, theirs)
    assert ours._num_timesteps == stock._num_timesteps == len(ours.scheduler.timesteps)
    if argument == "timesteps":
        assert ours.scheduler.timesteps.tolist() == values
    default, _ = _both(ours, stock, num_inference_steps=4)
    assert not np.array_equal(mine, default)


def test_custom_timesteps_are_refused_by_a_scheduler_without_them_before_any_work(tiny_pipeline):
    calls = []
    tiny_pipeline.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="`timesteps` was given, but the scheduler DDIMScheduler does not take custom timesteps"):
        tiny_pipeline("a scan", uncertainty_map=0.5, timesteps=[900, 500])
    with pytest.raises(ValueError, match="Pass either `timesteps` or `sigmas`, not both."):
        tiny_pipeline("a scan", uncertainty_map=0.5, timesteps=[900], sigmas=[1.0])
    assert calls == []


def _ip_adapter_state_dict(unet, image_embed_dim, seed=0):
    """Random weights in the layout of an IP-Adapter checkpoint (`image_proj` + `ip_adapter`) for `unet`."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(4 * cross, image_embed_dim, generator=generator) * 0.1,
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    ip_adapter, key_id = {}, 1
    channels = list(unet.config.block_out_channels)
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = channels[::-1][int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        for projection in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{key_id}.{projection}.weight"] = torch.randn(hidden, cross, generator=generator) * 0.1
        key_id += 2  # the checkpoints number self- and cross-attention processors together
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.fixture
def ip_adapter_components():
    components = build_tiny_components(num_classes=4)
    config = CLIPVisionConfig(
        hidden_size=32, projection_dim=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=32, patch_size=8,
    )
    torch.manual_seed(0)
    components["image_encoder"] = CLIPVisionModelWithProjection(config).eval()
    components["feature_extractor"] = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return components


def test_ip_adapter_image_acts_on_the_unet_as_in_the_stock_pipeline(ip_adapter_components):
    ours, stock = _pair(ip_adapter_components)
    without, _ = _both(ours, stock, num_inference_steps=3)
    ours.unet._load_ip_adapter_weights([_ip_adapter_state_dict(ours.unet, image_embed_dim=24)])
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))

    ours.set_ip_adapter_scale(0.0)
    at_zero, _ = _both(ours, stock, num_inference_steps=3, ip_adapter_image=image)
    np.testing.assert_allclose(at_zero, without, atol=1e-4)  # diffusers' own tolerance: another attention path
    ours.set_ip_adapter_scale(42.0)
    mine, theirs = _both(ours, stock, num_inference_steps=3, ip_adapter_image=image)
    assert np.array_equal(mine, theirs)
    assert np.abs(mine - without).max() > 1e-2

    # Pre-computed embeddings ([negative, positive] with guidance) mean the same as the image.
    embeds = ours.prepare_ip_adapter_image_embeds(image, None, torch.device("cpu"), 1, True)
    from_embeds, _ = _both(ours, stock, num_inference_steps=3, ip_adapter_image_embeds=embeds)
    assert np.array_equal(from_embeds, mine)


def test_ip_adapter_embeddings_follow_the_branches_when_uncertainty_guidance_leaves_one_out(ip_adapter_components):
    from test_pipeline_dual_control import guided_steps_outside_the_window

    pipeline = StableDiffusionDualControlPipeline(**ip_adapter_components)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.unet._load_ip_adapter_weights([_ip_adapter_state_dict(pipeline.unet, image_embed_dim=24)])
    pipeline.set_ip_adapter_scale(42.0)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    call = dict(**_maps()[0], ip_adapter_image=image, guidance_scale=3.0,
                control_guidance_start=[0.0, 0.5], control_guidance_end=[1.0, 1.0])
    _, plain_latents, _ = guided_steps_outside_the_window(pipeline, **call)
    batches, latents, _ = guided_steps_outside_the_window(pipeline, uncertainty_guidance_scale=2.5, **call)
    assert batches["unet"] == [2, 2, 3]  # [negative, image] while the uncertainty control is off, then + zero map
    torch.testing.assert_close(latents[:2], plain_latents[:2], rtol=0, atol=1e-5)
    assert not torch.allclose(latents[2], plain_latents[2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ip_adapter_image=torch.zeros(1, 3, 32, 32)), "the UNet has no IP-Adapter: load one with `pipe.load_ip_adapter"),
        (dict(ip_adapter_image_embeds=torch.zeros(2, 1, 24)), r"`ip_adapter_image_embeds` must be a list of 3D or 4D tensors \(one per IP-Adapter\), but got Tensor\."),
        (dict(ip_adapter_image_embeds=[torch.zeros(2, 24)]), r"but got list of \[\(2, 24\)\]\."),
        (
            dict(ip_adapter_image=torch.zeros(1, 3, 32, 32), ip_adapter_image_embeds=[torch.zeros(2, 1, 24)]),
            "Pass either `ip_adapter_image` or `ip_adapter_image_embeds`, not both.",
        ),
    ],
)
def test_bad_ip_adapter_input_is_a_clear_error(ip_adapter_components, kwargs, message):
    pipeline = StableDiffusionDualControlPipeline(**ip_adapter_components)
    if "ip_adapter_image_embeds" in kwargs:
        pipeline.unet._load_ip_adapter_weights([_ip_adapter_state_dict(pipeline.unet, image_embed_dim=24)])
    with pytest.raises(ValueError, match=message):
        pipeline("a scan", uncertainty_map=0.5, num_inference_steps=2, **kwargs)


def test_encode_prompt_works_with_only_the_text_components(tiny_components, tiny_pipeline):
    text_only = {name: None for name in tiny_components}
    text_only.update(text_encoder=tiny_components["text_encoder"], tokenizer=tiny_components["tokenizer"])
    pipeline = StableDiffusionDualControlPipeline(**text_only)
    alone = pipeline.encode_prompt("a scan", torch.device("cpu"), 1, True, "blurry")
    full = tiny_pipeline.encode_prompt("a scan", torch.device("cpu"), 1, True, "blurry")
    assert all(torch.equal(a, b) for a, b in zip(alone, full))
    with pytest.raises(ValueError, match=r"This call needs the pipeline's `unet`, but the pipeline was built with unet=None\."):
        pipeline("a scan", uncertainty_map=0.5)


def test_components_rebuild_the_pipeline_and_outputs_agree_as_dict_and_tuple(tiny_pipeline):
    expected = set(inspect.signature(StableDiffusionDualControlPipeline.__init__).parameters) - {
        "self",
        "requires_safety_checker",
    }
    assert set(tiny_pipeline.components) == expected
    rebuilt = StableDiffusionDualControlPipeline(**tiny_pipeline.components)
    rebuilt.set_progress_bar_config(disable=True)
    maps, _ = _maps()
    arguments = dict(prompt="a scan", num_inference_steps=2, output_type="np", **maps)
    as_dict = tiny_pipeline(**arguments, generator=torch.Generator().manual_seed(0))
    as_tuple = rebuilt(**arguments, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert np.array_equal(as_dict.images, as_tuple[0])
    assert np.array_equal(as_dict.semantic_maps, as_tuple[1]) and as_tuple[2] is None
