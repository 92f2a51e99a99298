import json

import pytest
import torch
from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionControlNetPipeline
from diffusers.models.attention_processor import AttnProcessor
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

from diffusers_uncertainty import (
    UncertaintyControlNetModel,
    build_tiny_components,
    prepare_semantic_map,
    prepare_uncertainty_map,
)
from diffusers_uncertainty.training.performance import HostReadCounter


def _inputs(batch_size=2, size=16, num_classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (batch_size, size, size), generator=generator)
    one_hot, _ = prepare_semantic_map(labels, num_classes, size, size)
    uncertainty = torch.rand(batch_size, 1, size, size, generator=generator)
    return dict(
        sample=torch.randn(batch_size, 4, size // 2, size // 2, generator=generator),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch_size, 16, 32, generator=generator),
        controlnet_cond=[one_hot, uncertainty],
    )


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def _assert_residuals_equal(first, second, atol=0.0):
    down_first, mid_first = first
    down_second, mid_second = second
    assert len(down_first) == len(down_second)
    for a, b in zip(list(down_first) + [mid_first], list(down_second) + [mid_second]):
        assert a.shape == b.shape
        if atol == 0.0:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.fixture(params=[False, True], ids=["separate", "shared_trunk"])
def controlnet(request):
    return build_tiny_components(num_classes=4, shared_trunk=request.param)["controlnet"].eval()


def test_is_a_multicontrolnet_and_lists_two_nets(controlnet):
    assert isinstance(controlnet, MultiControlNetModel)
    assert len(controlnet.nets) == 2
    assert all(isinstance(net, ControlNetModel) for net in controlnet.nets)


@pytest.mark.parametrize("shared_trunk", [False, True])
def test_stock_controlnet_pipeline_gives_the_same_image(shared_trunk):
    from diffusers_uncertainty import StableDiffusionDualControlPipeline

    components = build_tiny_components(num_classes=4, shared_trunk=shared_trunk, ignore_index=255)
    ours = StableDiffusionDualControlPipeline(**components)
    stock = StableDiffusionControlNetPipeline(**components, requires_safety_checker=False)
    for pipeline in (ours, stock):
        pipeline.set_progress_bar_config(disable=True)
    labels = torch.randint(0, 4, (2, 16, 16), generator=torch.Generator().manual_seed(1))
    labels[0, :3] = 255
    uncertainty = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    one_hot, _ = prepare_semantic_map(labels, 4, 16, 16, ignore_index=255)
    common = dict(prompt=["a scan", "a street"], num_inference_steps=3, output_type="np")

    ours_images = ours(
        semantic_map=labels,
        uncertainty_map=uncertainty,
        semantic_conditioning_scale=0.8,
        uncertainty_conditioning_scale=1.3,
        generator=torch.Generator().manual_seed(0),
        **common,
    ).images
    stock_images = stock(
        image=[one_hot, uncertainty],
        controlnet_conditioning_scale=[0.8, 1.3],
        generator=torch.Generator().manual_seed(0),
        **common,
    ).images
    assert ours_images.shape == (2, 16, 16, 3)
    assert (ours_images == stock_images).all()


def test_zero_scale_branch_is_skipped_and_equals_diffusers_at_scale_zero():
    model = build_tiny_components(num_classes=4)["controlnet"].eval()
    reference = MultiControlNetModel([model.semantic_controlnet, model.uncertainty_controlnet])
    inputs = _inputs()
    semantic_calls = _count_calls(model.semantic_controlnet)
    with torch.no_grad():
        ours = model(**inputs, conditioning_scale=[0.0, 0.7])
        assert len(semantic_calls) == 0
        theirs = reference(**inputs, conditioning_scale=[0.0, 0.7], return_dict=False)
        assert len(semantic_calls) == 1
    _assert_residuals_equal(ours, theirs)


def test_both_scales_zero_runs_nothing_and_returns_zeros_of_the_right_shapes(controlnet):
    calls = [_count_calls(net) for net in {id(n): n for n in controlnet.nets}.values()]
    for size in (16, 24):
        inputs = _inputs(size=size)
        with torch.no_grad():
            down, mid = controlnet(**inputs, conditioning_scale=[0.0, 0.0])
            assert sum(len(c) for c in calls) == 0
            real_down, real_mid = controlnet(**inputs, conditioning_scale=[1.0, 1.0])
        for c in calls:
            c.clear()
        assert [d.shape for d in down] == [d.shape for d in real_down]
        assert mid.shape == real_mid.shape
        assert all(not d.any() for d in down) and not mid.any()


def test_separate_branches_sum_their_residuals():
    model = build_tiny_components(num_classes=4)["controlnet"].eval()
    inputs = _inputs()
    kwargs = {k: v for k, v in inputs.items() if k != "controlnet_cond"}
    with torch.no_grad():
        down, mid = model(**inputs, conditioning_scale=[0.5, 2.0])
        sem_down, sem_mid = model.semantic_controlnet(
            **kwargs, controlnet_cond=inputs["controlnet_cond"][0], conditioning_scale=0.5, return_dict=False
        )
        unc_down, unc_mid = model.uncertainty_controlnet(
            **kwargs, controlnet_cond=inputs["controlnet_cond"][1], conditioning_scale=2.0, return_dict=False
        )
    _assert_residuals_equal((down, mid), ([a + b for a, b in zip(sem_down, unc_down)], sem_mid + unc_mid))


def test_shared_trunk_runs_one_trunk_pass_on_the_scaled_sum_of_embeddings():
    model = build_tiny_components(num_classes=4, shared_trunk=True)["controlnet"].eval()
    inputs = _inputs()
    trunk_calls = _count_calls(model.trunk)
    with torch.no_grad():
        down, mid = model(**inputs, conditioning_scale=[0.5, 2.0])
        assert len(trunk_calls) == 1
        semantic, uncertainty = inputs["controlnet_cond"]
        embedding = 0.5 * model.semantic_embedding(semantic) + 2.0 * model.uncertainty_embedding(uncertainty)
        kwargs = {k: v for k, v in inputs.items() if k != "controlnet_cond"}
        expected = model.trunk(**kwargs, controlnet_cond=embedding, conditioning_scale=1.0, return_dict=False)
    _assert_residuals_equal((down, mid), expected)


def test_shared_trunk_has_about_one_controlnet_of_parameters():
    separate = build_tiny_components(num_classes=4)["controlnet"]
    shared = build_tiny_components(num_classes=4, shared_trunk=True)["controlnet"]
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(shared) < 0.6 * count(separate)


@pytest.mark.parametrize("shared_trunk", [False, True])
def test_semantic_mask_switches_the_semantic_branch_off_per_sample(shared_trunk):
    model = build_tiny_components(num_classes=4, shared_trunk=shared_trunk)["controlnet"]
    inputs = _inputs(batch_size=3)
    mask = torch.tensor([True, False, True])
    with torch.no_grad():
        masked_down, masked_mid = model(**inputs, conditioning_scale=[1.0, 1.0], semantic_mask=mask)
        full_down, full_mid = model(**inputs, conditioning_scale=[1.0, 1.0])
        unc_down, unc_mid = model(**inputs, conditioning_scale=[0.0, 1.0])
    for masked, full, uncertainty_only in zip(masked_down + [masked_mid], full_down + [full_mid], unc_down + [unc_mid]):
        # Labeled samples: both branches; unlabeled sample: exactly what the uncertainty branch alone gives.
        assert torch.equal(masked[mask], full[mask])
        if shared_trunk:  # the trunk runs on (0 + uncertainty embedding): equal up to float rounding
            torch.testing.assert_close(masked[~mask], uncertainty_only[~mask], atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(masked[~mask], uncertainty_only[~mask])
    assert not torch.allclose(full_mid[~mask], unc_mid[~mask])


@pytest.mark.parametrize("shared_trunk", [False, True])
def test_semantic_mask_is_never_read_on_the_host(shared_trunk):
    # On an accelerator a host read is a device sync every training step, and data-dependent shapes recompile a
    # compiled control; the mask must act on the device only.
    model = build_tiny_components(num_classes=4, shared_trunk=shared_trunk)["controlnet"]
    inputs = _inputs(batch_size=3)
    with HostReadCounter() as counter:
        down, mid = model(**inputs, conditioning_scale=[1.0, 1.0], semantic_mask=torch.tensor([True, False, True]))
        (mid.sum() + sum(d.sum() for d in down)).backward()
    assert counter.host_reads == 0, counter.host_read_operators


def test_semantic_mask_all_false_gives_the_uncertainty_branch_alone_and_no_semantic_gradient():
    model = build_tiny_components(num_classes=4)["controlnet"]
    inputs = _inputs(batch_size=2)
    down, mid = model(**inputs, conditioning_scale=[1.0, 1.0], semantic_mask=torch.tensor([False, False]))
    with torch.no_grad():
        unc_down, unc_mid = model(**inputs, conditioning_scale=[0.0, 1.0])
    _assert_residuals_equal((down, mid), (unc_down, unc_mid))
    (mid.sum() + sum(d.sum() for d in down)).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.semantic_controlnet.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.uncertainty_controlnet.parameters())


def test_forward_rejects_bad_conditions(controlnet):
    inputs = _inputs()
    with pytest.raises(ValueError, match="`controlnet_cond` must be a list"):
        controlnet(**{**inputs, "controlnet_cond": [inputs["controlnet_cond"][0]]}, conditioning_scale=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"semantic condition must have shape \(2, 4, H, W\).*\(2, 3, 16, 16\)"):
        bad = [inputs["controlnet_cond"][0][:, :3], inputs["controlnet_cond"][1]]
        controlnet(**{**inputs, "controlnet_cond": bad}, conditioning_scale=[1.0, 1.0])
    with pytest.raises(ValueError, match="`conditioning_scale` must be a list"):
        controlnet(**inputs, conditioning_scale=1.0)
    with pytest.raises(ValueError, match="`semantic_mask` must be a boolean tensor of shape \\(2,\\)"):
        controlnet(**inputs, conditioning_scale=[1.0, 1.0], semantic_mask=torch.tensor([1, 0]))


def test_from_unet_copies_the_unet_encoder():
    components = build_tiny_components(num_classes=3)
    unet = components["unet"]
    for shared_trunk in (False, True):
        model = UncertaintyControlNetModel.from_unet(unet, semantic_channels=3, shared_trunk=shared_trunk)
        for net in {id(n): n for n in model.nets}.values():
            for key, value in unet.down_blocks.state_dict().items():
                assert torch.equal(net.down_blocks.state_dict()[key], value)
            # diffusers' zero convolutions: an untrained control adds nothing.
            assert all(not p.any() for p in net.controlnet_down_blocks.parameters())
        assert model.config.semantic_channels == 3 and model.config.uncertainty_channels == 1


def test_from_controlnets_wraps_the_given_modules_with_different_configs(tmp_path):
    unet = build_tiny_components()["unet"]
    semantic = ControlNetModel.from_unet(unet, conditioning_channels=5, conditioning_embedding_out_channels=(16, 32))
    uncertainty = ControlNetModel.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(8, 16))
    model = UncertaintyControlNetModel.from_controlnets(semantic, uncertainty, ignore_index=5)
    assert model.semantic_controlnet is semantic and model.uncertainty_controlnet is uncertainty
    assert model.config.semantic_channels == 5 and model.config.ignore_index == 5
    assert model.config.uncertainty_controlnet_config["conditioning_embedding_out_channels"] == [8, 16] or (
        tuple(model.config.uncertainty_controlnet_config["conditioning_embedding_out_channels"]) == (8, 16)
    )
    model.save_pretrained(tmp_path)
    loaded = UncertaintyControlNetModel.from_pretrained(tmp_path)
    assert loaded.uncertainty_controlnet.controlnet_cond_embedding.conv_in.out_channels == 8
    with pytest.raises(ValueError, match="`uncertainty` must be a diffusers `ControlNetModel`"):
        UncertaintyControlNetModel.from_controlnets(semantic, unet)


@pytest.mark.parametrize("shared_trunk", [False, True])
def test_save_and_load_round_trip_exactly(tmp_path, shared_trunk):
    model = build_tiny_components(num_classes=4, shared_trunk=shared_trunk, ignore_index=7)["controlnet"].eval()
    model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["_class_name"] == "UncertaintyControlNetModel"
    assert saved_config["shared_trunk"] is shared_trunk and saved_config["ignore_index"] == 7
    loaded = UncertaintyControlNetModel.from_pretrained(tmp_path).eval()
    loaded_config = json.loads(loaded.to_json_string())
    assert loaded_config.pop("_name_or_path") == str(tmp_path)
    assert loaded_config == json.loads(model.to_json_string()) == saved_config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[key], restored[key]) for key in original)
    inputs = _inputs()
    with torch.no_grad():
        _assert_residuals_equal(
            model(**inputs, conditioning_scale=[1.0, 0.5]), loaded(**inputs, conditioning_scale=[1.0, 0.5])
        )


def test_gradient_checkpointing_attention_processors_and_dtype_reach_both_branches(controlnet):
    controlnet.enable_gradient_checkpointing()
    nets = {id(n): n for n in controlnet.nets}.values()
    assert all(net.is_gradient_checkpointing for net in nets)
    controlnet.disable_gradient_checkpointing()
    assert not any(net.is_gradient_checkpointing for net in nets)

    processors = controlnet.attn_processors
    names = {name.split(".")[0] for name in processors}
    expected = {"trunk"} if controlnet.config.shared_trunk else {"semantic_controlnet", "uncertainty_controlnet"}
    assert names == expected
    controlnet.set_attn_processor(AttnProcessor())
    assert all(isinstance(p, AttnProcessor) for p in controlnet.attn_processors.values())

    controlnet.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in controlnet.parameters())
    with torch.no_grad():
        inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in _inputs().items()}
        inputs["controlnet_cond"] = [c.double() for c in inputs["controlnet_cond"]]
        down, mid = controlnet(**inputs, conditioning_scale=[1.0, 1.0])
    assert mid.dtype == torch.float64


def test_xformers_without_cuda_is_a_clear_error(controlnet):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises((ModuleNotFoundError, ValueError), match="xformers|cuda|CUDA"):
        controlnet.enable_xformers_memory_efficient_attention()


def test_constructor_rejects_bad_config():
    with pytest.raises(ValueError, match="`semantic_channels` must be a positive integer, but got 0"):
        UncertaintyControlNetModel(semantic_channels=0)
    with pytest.raises(ValueError, match="cannot be used with `shared_trunk=True`"):
        UncertaintyControlNetModel(shared_trunk=True, uncertainty_controlnet_config={})


def test_uncertainty_map_helper_is_what_the_model_expects():
    uncertainty = prepare_uncertainty_map(0.25, 1, 16, 16)
    assert uncertainty.shape == (1, 1, 16, 16) and bool((uncertainty == 0.25).all())


def test_from_controlnet_builds_a_shared_trunk_around_an_existing_controlnet():
    unet = build_tiny_components()["unet"]
    existing = ControlNetModel.from_unet(unet, conditioning_channels=5, conditioning_embedding_out_channels=(16, 32))
    embedding = existing.controlnet_cond_embedding
    model = UncertaintyControlNetModel.from_controlnet(existing, ignore_index=5)
    assert model.config.shared_trunk and model.config.semantic_channels == 5
    assert model.trunk is existing and model.semantic_embedding is embedding
    assert all(not p.any() for p in model.uncertainty_embedding.conv_out.parameters())  # adds nothing untrained
    with pytest.raises(ValueError, match="already the trunk"):
        UncertaintyControlNetModel.from_controlnet(existing)


def test_pipeline_refuses_a_controlnet_whose_embedding_does_not_match_the_vae():
    from diffusers_uncertainty import StableDiffusionDualControlPipeline

    components = build_tiny_components(num_classes=4)
    # The tiny VAE has a factor of 2; diffusers' default embedding (16, 32, 96, 256) reduces by 8.
    components["controlnet"] = UncertaintyControlNetModel.from_unet(components["unet"], semantic_channels=4)
    with pytest.raises(ValueError, match=r"reduces its conditions by 8 .* latents are 1/2 of the image"):
        StableDiffusionDualControlPipeline(**components)


@pytest.mark.parametrize(
    "scales", [[0.8, 1.3], [0.8, 0.0], [0.0, 1.3]], ids=["both", "uncertainty-off", "semantic-off"]
)
def test_embeddings_made_once_give_exactly_the_residuals_of_the_conditions(controlnet, scales):
    from diffusers_uncertainty import ConditionEmbeddings

    inputs = _inputs(batch_size=1)
    made_for = [0.8, 1.3]
    with torch.no_grad():
        # A classifier-free-guidance batch: three copies of the sample and of the conditions.
        batch = dict(
            sample=torch.cat([inputs["sample"]] * 3),
            timestep=inputs["timestep"],
            encoder_hidden_states=torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(5)),
        )
        raw = [torch.cat([cond] * 3) for cond in inputs["controlnet_cond"]]
        embedded = controlnet.embed_conditions(raw, made_for)
        assert isinstance(embedded, ConditionEmbeddings)
        expected = controlnet(**batch, controlnet_cond=raw, conditioning_scale=scales)
        # Counted at their first convolution: a separate branch's embedding module passes an embedding through.
        embedding_calls = [
            _count_calls(module.conv_in)
            for module in controlnet.modules()
            if isinstance(module, ControlNetConditioningEmbedding)
        ]
        assert len(embedding_calls) == 2
        got = controlnet(**batch, controlnet_cond=embedded, conditioning_scale=scales)
    assert sum(len(calls) for calls in embedding_calls) == 0
    _assert_residuals_equal(got, expected)


def test_first_rows_of_embeddings_equal_the_embeddings_of_the_first_rows(controlnet):
    inputs = _inputs(batch_size=1)
    raw = [torch.cat([cond, torch.rand_like(cond)]) for cond in inputs["controlnet_cond"]]  # two different rows
    with torch.no_grad():
        first = controlnet.embed_conditions(raw, [0.8, 1.3]).first_rows(1)
        expected = controlnet.embed_conditions([cond[:1] for cond in raw], [0.8, 1.3])
    # The first sample's embeddings (to rounding: a convolution over a batch of another size is not bitwise equal).
    assert first.scales == expected.scales
    for got, want in zip(first.embeddings, expected.embeddings):
        assert got.shape[0] == 1
        torch.testing.assert_close(got, want)
    assert (first.summed is None) == (expected.summed is None)
    if expected.summed is not None:
        torch.testing.assert_close(first.summed, expected.summed)


def test_separate_branches_skip_their_own_embedding_when_given_embeddings():
    model = build_tiny_components(num_classes=4)["controlnet"].eval()
    inputs = _inputs()
    inner = [_count_calls(net.controlnet_cond_embedding.conv_in) for net in model.nets]
    with torch.no_grad():
        embedded = model.embed_conditions(inputs["controlnet_cond"], [1.0, 1.0])
        assert [len(calls) for calls in inner] == [1, 1]
        for _ in range(3):
            model(**{**inputs, "controlnet_cond": embedded}, conditioning_scale=[1.0, 1.0])
    assert [len(calls) for calls in inner] == [1, 1]
    # The branches stay ordinary ControlNets: fed a tensor, they embed it as diffusers does.
    reference = ControlNetModel.from_config(model.semantic_controlnet.config)
    reference.load_state_dict(model.semantic_controlnet.state_dict())
    cond_inputs = dict(inputs, controlnet_cond=inputs["controlnet_cond"][0])
    with torch.no_grad():
        _assert_residuals_equal(
            model.semantic_controlnet(**cond_inputs, return_dict=False),
            reference.eval()(**cond_inputs, return_dict=False),
        )


def test_embeddings_refuse_another_scale_or_batch(controlnet):
    inputs = _inputs()
    with torch.no_grad():
        embedded = controlnet.embed_conditions(inputs["controlnet_cond"], [1.0, 0.5])
        step = dict(inputs, controlnet_cond=embedded)
        with pytest.raises(ValueError, match="The uncertainty embedding was made for conditioning scale 0.5; a step can use that scale or 0, but got 0.7"):
            controlnet(**step, conditioning_scale=[1.0, 0.7])
        with pytest.raises(ValueError, match=r"The semantic embedding has batch size 2, but `sample` has 4\."):
            controlnet(**dict(step, sample=torch.cat([inputs["sample"]] * 2)), conditioning_scale=[1.0, 0.5])
        with pytest.raises(ValueError, match="`conditioning_scale` must hold Python numbers, but got Tensor"):
            controlnet.embed_conditions(inputs["controlnet_cond"], [torch.tensor(1.0), 0.5])
        with pytest.raises(ValueError, match=r"The semantic condition must have shape \(B, 4, H, W\), but got \(2, 3, 16, 16\)"):
            controlnet.embed_conditions([inputs["controlnet_cond"][0][:, :3], None], [1.0, 0.0])
