import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import ControlNetModel

from diffusers_uncertainty import StableDiffusionDualControlPipeline, build_tiny_components


def _labels(batch_size=1, size=16, seed=0, num_classes=4):
    return torch.randint(0, num_classes, (batch_size, size, size), generator=torch.Generator().manual_seed(seed))


def _run(pipeline, **kwargs):
    arguments = dict(prompt="a scan", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    arguments.update(kwargs)
    return pipeline(**arguments)


def test_output_is_images_with_aligned_label_maps(tiny_pipeline):
    labels = _labels(batch_size=2, size=8)
    labels[1, 0, 0] = 255  # ignore_index
    output = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.5, height=16, width=16)
    assert output.images.shape == (2, 16, 16, 3)
    assert output.semantic_maps.shape == (2, 16, 16) and output.semantic_maps.dtype == np.int64
    expected = labels.repeat_interleave(2, 1).repeat_interleave(2, 2).numpy()
    assert (output.semantic_maps == expected).all()
    assert output.nsfw_content_detected is None
    pil = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.5, output_type="pil", height=16, width=16)
    assert isinstance(pil.images[0], PIL.Image.Image) and pil.images[0].size == (16, 16)
    tensors = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.5, output_type="pt", height=16, width=16)
    assert torch.is_tensor(tensors.semantic_maps) and tuple(tensors.images.shape) == (2, 3, 16, 16)


def test_each_control_changes_the_image_and_equivalent_inputs_do_not(tiny_pipeline):
    labels = _labels()
    base = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.2).images
    assert not np.allclose(base, _run(tiny_pipeline, semantic_map=_labels(seed=1), uncertainty_map=0.2).images)
    assert not np.allclose(base, _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.9).images)
    # The same condition given as a constant, a tensor, a PIL image or a one-hot tensor gives the same image.
    constant = torch.full((16, 16), 0.2)
    assert (base == _run(tiny_pipeline, semantic_map=labels, uncertainty_map=constant).images).all()
    pil_labels = PIL.Image.fromarray(labels[0].numpy().astype(np.uint8))
    assert (base == _run(tiny_pipeline, semantic_map=pil_labels, uncertainty_map=0.2).images).all()
    one_hot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    assert (base == _run(tiny_pipeline, semantic_map=one_hot, uncertainty_map=0.2).images).all()


def test_zero_scale_equals_no_map(tiny_pipeline):
    labels = _labels()
    without = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=None).images
    at_zero = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.7, uncertainty_conditioning_scale=0.0).images
    assert (without == at_zero).all()


def test_branch_outside_its_guidance_window_is_not_computed(tiny_pipeline):
    controlnet = tiny_pipeline.controlnet
    calls = {"semantic": 0, "uncertainty": 0}
    controlnet.semantic_controlnet.register_forward_hook(lambda *a: calls.__setitem__("semantic", calls["semantic"] + 1))
    controlnet.uncertainty_controlnet.register_forward_hook(
        lambda *a: calls.__setitem__("uncertainty", calls["uncertainty"] + 1)
    )
    labels = _labels()
    _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.5, num_inference_steps=4, control_guidance_end=(1.0, 0.5))
    assert calls == {"semantic": 4, "uncertainty": 2}
    full = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.5, control_guidance_end=(1.0, 1.0)).images
    default = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.5).images
    assert (full == default).all()


def test_one_prompt_broadcasts_over_label_maps_and_images_per_prompt(tiny_pipeline):
    labels = _labels(batch_size=2)
    output = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=[np.full((16, 16), 0.1, np.float32)] * 2, num_images_per_prompt=2)
    assert output.images.shape[0] == 4
    assert (output.semantic_maps == labels.repeat_interleave(2, 0).numpy()).all()
    single = _run(tiny_pipeline, semantic_map=labels[:1], uncertainty_map=0.1, num_images_per_prompt=3)
    assert (single.semantic_maps == labels[:1].repeat(3, 1, 1).numpy()).all()


def test_guess_mode_callbacks_and_slicing(tiny_pipeline):
    labels = _labels()
    steps = []

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        steps.append(step)
        assert set(callback_kwargs) == {"latents"}
        return callback_kwargs

    base = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.5, callback_on_step_end=on_step_end).images
    assert steps == [0, 1, 2]
    guessed = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.5, guess_mode=True).images
    assert guessed.shape == base.shape and not np.allclose(guessed, base)
    tiny_pipeline.enable_attention_slicing(1)
    tiny_pipeline.vae.enable_slicing()  # diffusers 0.42 moved VAE slicing onto the VAE
    sliced = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.5).images
    np.testing.assert_allclose(sliced, base, atol=1e-5)


def test_model_cpu_offload_gives_the_same_image(tiny_pipeline):
    labels = _labels()
    base = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.5).images
    # Without an accelerator, offload "to" the CPU still installs and runs diffusers' offload hooks.
    tiny_pipeline.enable_model_cpu_offload(device="cpu")
    offloaded = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.5).images
    assert (base == offloaded).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(semantic_map=torch.full((16, 16), 9)), r"`semantic_map` values must be in \[0, 4\) or ignore_index=255, but found \[9\]"),
        (dict(semantic_map=torch.zeros(12, 20, dtype=torch.long)), r"`height` must be divisible by 8, but got 12 \(taken from semantic_map's size"),
        (dict(uncertainty_map=1.2), r"`uncertainty_map` must lie in \[0, 1\], but got 1.2"),
        (dict(uncertainty_map=torch.full((16, 16), float("nan"))), "`uncertainty_map` contains NaN"),
        (
            dict(semantic_map=torch.zeros(2, 16, 16, dtype=torch.long), uncertainty_map=torch.zeros(3, 16, 16)),
            r"Batch sizes must be 1 or equal, but got \{'prompt': 1, 'semantic_map': 2, 'uncertainty_map': 3\}",
        ),
        (dict(semantic_map=torch.zeros(1, 3, 16, 16)), r"shape \(B, 4, H, W\), but got shape \(1, 3, 16, 16\)"),
        (dict(uncertainty_map=torch.zeros(1, 2, 16, 16)), r"\(B, 1, H, W\), but got \(1, 2, 16, 16\)"),
        (dict(uncertainty_map=0.5, height=20), "`height` must be divisible by 8, but got 20"),
        (dict(uncertainty_map=0.5, control_guidance_start=(0.5, 0.0), control_guidance_end=(0.4, 1.0)), "0 <= start < end <= 1"),
        (dict(uncertainty_map=0.5, prompt=None), "Pass `prompt` or `prompt_embeds`"),
        (dict(uncertainty_map=0.5, uncertainty_guidance_scale=-1.0), r"`uncertainty_guidance_scale` must be a finite number >= 0, but got -1.0"),
        (dict(uncertainty_map=0.5, uncertainty_guidance_scale=float("nan")), r"`uncertainty_guidance_scale` must be a finite number >= 0, but got nan"),
        (dict(semantic_map=torch.zeros(16, 16, dtype=torch.long), uncertainty_guidance_scale=2.0), r"`uncertainty_guidance_scale` is 2.0, but no `uncertainty_map` was given"),
        (dict(uncertainty_map=0.5, uncertainty_conditioning_scale=0.0, uncertainty_guidance_scale=2.0), r"but `uncertainty_conditioning_scale` is 0: the uncertainty control is off"),
        (dict(uncertainty_map=0.5, guess_mode=True, uncertainty_guidance_scale=2.0), r"`uncertainty_guidance_scale` \(2.0\) cannot be combined with `guess_mode`"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_work(tiny_pipeline, kwargs, message):
    calls = []
    tiny_pipeline.unet.register_forward_hook(lambda *a: calls.append(1))
    tiny_pipeline.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    arguments = dict(prompt="a scan", num_inference_steps=2, output_type="np")
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(**arguments)
    assert calls == []


def _record_guidance_batch(pipeline):
    """The uncertainty condition embedded for the call, the UNet's output and the scheduler's input of every step."""
    seen = {"uncertainty": [], "unet": [], "model_output": []}
    controlnet = pipeline.controlnet
    embed_conditions = controlnet.embed_conditions

    def recording_embed_conditions(conditions, scales):
        seen["uncertainty"].append(conditions[1].clone())
        return embed_conditions(conditions, scales)

    controlnet.embed_conditions = recording_embed_conditions
    pipeline.unet.register_forward_hook(lambda module, args, output: seen["unet"].append(output[0].clone()))
    step = pipeline.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        seen["model_output"].append(model_output.clone())
        return step(model_output, *args, **kwargs)

    pipeline.scheduler.step = recording_step
    return seen


@pytest.mark.parametrize("guidance_scale", [3.0, 1.0], ids=["with_cfg", "without_cfg"])
def test_uncertainty_guidance_adds_a_zero_map_branch_and_combines_it_as_documented(tiny_pipeline, guidance_scale):
    labels = _labels()
    seen = _record_guidance_batch(tiny_pipeline)
    plain = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.7, guidance_scale=guidance_scale)
    # At 1.0 (the default) nothing is added: the same call, the same batch.
    assert (_run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.7, guidance_scale=guidance_scale,
                 uncertainty_guidance_scale=1.0).images == plain.images).all()
    plain_batch = seen["unet"][0].shape[0]
    assert plain_batch == (2 if guidance_scale > 1 else 1)
    for values in seen.values():
        values.clear()
    guided = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.7, guidance_scale=guidance_scale,
                  uncertainty_guidance_scale=2.5)
    assert not np.allclose(guided.images, plain.images)
    # One more branch, last, seeing the zero map; the others see the map.
    (condition,) = seen["uncertainty"]
    branches = condition.chunk(plain_batch + 1)
    assert all(torch.equal(branch, torch.full_like(branch, 0.7)) for branch in branches[:-1])
    assert torch.equal(branches[-1], torch.zeros_like(branches[-1]))
    # e = e_guided + (s_u - 1) * (e(text, map) - e(text, zero map)), e_guided the usual (guided) prediction.
    for output, model_output in zip(seen["unet"], seen["model_output"]):
        predictions = output.chunk(plain_batch + 1)
        usual = predictions[0] if plain_batch == 1 else predictions[0] + guidance_scale * (predictions[1] - predictions[0])
        assert torch.equal(model_output, usual + 1.5 * (predictions[-2] - predictions[-1]))
    assert len(seen["model_output"]) == 3


def guided_steps_outside_the_window(pipeline, **kwargs):
    """UNet and control batch sizes and the latents after each step of a call (3 steps)."""
    batches, latents = {"unet": [], "controlnet": []}, []
    hooks = [getattr(pipeline, name).register_forward_hook(lambda module, args, output, name=name: batches[name].append(args[0].shape[0]))
             for name in batches]

    def keep_latents(pipe, step, timestep, callback_kwargs):
        latents.append(callback_kwargs["latents"].clone())
        return {}

    try:
        output = _run(pipeline, callback_on_step_end=keep_latents, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return batches, latents, output.images


@pytest.mark.parametrize(
    "guidance_scale, shared_trunk", [(3.0, False), (1.0, False), (3.0, True)], ids=["with_cfg", "without_cfg", "shared_trunk"]
)
def test_uncertainty_guidance_leaves_out_the_zero_map_branch_outside_the_uncertainty_window(
    tiny_pipeline, guidance_scale, shared_trunk
):
    if shared_trunk:
        tiny_pipeline = StableDiffusionDualControlPipeline(**build_tiny_components(num_classes=4, shared_trunk=True))
        tiny_pipeline.set_progress_bar_config(disable=True)
    # 3 steps, the uncertainty control acts from half-way: off at steps 0 and 1, on at step 2.
    call = dict(semantic_map=_labels(), uncertainty_map=0.7, guidance_scale=guidance_scale,
                control_guidance_start=[0.0, 0.5], control_guidance_end=[1.0, 1.0])
    plain_batches, plain_latents, plain = guided_steps_outside_the_window(tiny_pipeline, **call)
    batches, latents, guided = guided_steps_outside_the_window(tiny_pipeline, uncertainty_guidance_scale=2.5, **call)
    branches = 2 if guidance_scale > 1 else 1
    assert plain_batches["unet"] == [branches] * 3
    assert batches["unet"] == batches["controlnet"] == [branches, branches, branches + 1]
    # Where the zero-map branch is left out the step is the unguided call's (up to the float rounding of conditions
    # embedded in a batch of another size); then guidance acts.
    torch.testing.assert_close(latents[:2], plain_latents[:2], rtol=0, atol=1e-5)
    assert not torch.allclose(latents[2], plain_latents[2]) and not np.allclose(guided, plain)


def test_uncertainty_guidance_is_neutral_at_the_zero_map_and_at_zero_equals_the_zero_map(tiny_pipeline):
    labels = _labels()
    # The map equals the reference: the guidance term vanishes.
    at_zero_map = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.0).images
    guided = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.0, uncertainty_guidance_scale=4.0).images
    np.testing.assert_allclose(guided, at_zero_map, atol=1e-5)
    # Scale 0 without classifier-free guidance: e(text, zero map) + 0 * (...), i.e. the zero map's image.
    plain_zero = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.0, guidance_scale=1.0).images
    none_of_it = _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.9, guidance_scale=1.0,
                      uncertainty_guidance_scale=0.0).images
    np.testing.assert_allclose(none_of_it, plain_zero, atol=1e-5)
    assert not np.allclose(plain_zero, _run(tiny_pipeline, semantic_map=labels, uncertainty_map=0.9, guidance_scale=1.0).images)


def test_a_controlnet_that_is_not_dual_is_refused(tiny_components):
    tiny_components["controlnet"] = ControlNetModel.from_unet(tiny_components["unet"])
    with pytest.raises(ValueError, match="`controlnet` must be an UncertaintyControlNetModel, but got ControlNetModel"):
        StableDiffusionDualControlPipeline(**tiny_components)


@pytest.mark.parametrize("shared_trunk", [False, True], ids=["separate", "shared_trunk"])
def test_condition_embeddings_are_made_once_per_call_and_match_the_stock_pipeline_with_windows(shared_trunk):
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
    from diffusers import StableDiffusionControlNetPipeline

    from diffusers_uncertainty import build_tiny_components, prepare_semantic_map

    components = build_tiny_components(num_classes=4, ignore_index=255, shared_trunk=shared_trunk)
    ours = StableDiffusionDualControlPipeline(**components)
    stock = StableDiffusionControlNetPipeline(**components, requires_safety_checker=False)
    for pipeline in (ours, stock):
        pipeline.set_progress_bar_config(disable=True)
    embeddings = [m for m in components["controlnet"].modules() if isinstance(m, ControlNetConditioningEmbedding)]
    calls = []
    for index, module in enumerate(embeddings):
        module.conv_in.register_forward_hook(lambda *args, index=index: calls.append(index))
    labels = _labels(batch_size=2)
    uncertainty = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    one_hot, _ = prepare_semantic_map(labels, 4, 16, 16)
    common = dict(prompt=["a scan"] * 2, num_inference_steps=4, output_type="np", control_guidance_end=[1.0, 0.5])
    mine = ours(semantic_map=labels, uncertainty_map=uncertainty, generator=torch.Generator().manual_seed(0), **common)
    assert sorted(calls) == [0, 1]  # once per call, not once per step
    theirs = stock(image=[one_hot, uncertainty], generator=torch.Generator().manual_seed(0), **common)
    assert np.array_equal(mine.images, theirs.images)


@pytest.mark.parametrize("shared_trunk", [False, True], ids=["separate", "shared_trunk"])
def test_compiled_unet_and_control_have_no_graph_break_and_no_recompile_from_step_to_step(shared_trunk):
    from torch._dynamo.utils import counters

    from diffusers_uncertainty import build_tiny_components

    pipeline = StableDiffusionDualControlPipeline(**build_tiny_components(num_classes=4, shared_trunk=shared_trunk))
    pipeline.set_progress_bar_config(disable=True)
    labels = _labels(batch_size=2)
    arguments = dict(semantic_map=labels, uncertainty_map=0.5, control_guidance_end=(1.0, 0.5))
    eager = _run(pipeline, **arguments, num_inference_steps=4).images
    torch._dynamo.reset()
    counters.clear()
    # fullgraph=True: a graph break inside either forward raises. The "eager" backend keeps the test quick; graph
    # capture, breaks and guards are those of any backend.
    pipeline.unet = torch.compile(pipeline.unet, fullgraph=True, backend="eager")
    pipeline.controlnet = torch.compile(pipeline.controlnet, fullgraph=True, backend="eager")
    compiled = _run(pipeline, **arguments, num_inference_steps=4).images
    # One graph for the UNet and one per window configuration of the control (both branches, semantic only): none
    # for the individual steps.
    assert counters["stats"]["unique_graphs"] == 3
    assert np.array_equal(compiled, eager)
    # Another call, with other steps, timesteps, maps and seed, reuses the graphs.
    with torch.compiler.set_stance("fail_on_recompile"):
        _run(pipeline, **dict(arguments, semantic_map=_labels(batch_size=2, seed=4)), num_inference_steps=6)
    assert counters["stats"]["unique_graphs"] == 3


@pytest.mark.parametrize("shared_trunk", [False, True], ids=["separate", "shared_trunk"])
def test_denoising_steps_make_no_host_sync_outside_the_scheduler(shared_trunk, monkeypatch):
    """On an accelerator these calls wait for the device; a step must not make any (diffusers' DDIMScheduler makes
    two per step, `prev_timestep >= 0` on a device tensor, in the stock pipeline too)."""
    import sys

    from diffusers_uncertainty import build_tiny_components

    pipeline = StableDiffusionDualControlPipeline(**build_tiny_components(num_classes=4, shared_trunk=shared_trunk))
    pipeline.set_progress_bar_config(disable=True)
    counting, calls = [False], {"scheduler": 0, "elsewhere": []}
    for name in ("item", "__bool__", "tolist", "cpu", "numpy", "nonzero", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if counting[0]:
                caller = sys._getframe(1).f_code.co_filename
                if "diffusers/schedulers" in caller.replace("\\", "/"):
                    calls["scheduler"] += 1
                else:
                    calls["elsewhere"].append(f"{_name} from {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        counting[0] = step < 3  # count from the end of step 0 to the end of step 3: steps 1, 2 (both on), 3 (one off)
        return callback_kwargs

    _run(
        pipeline,
        semantic_map=_labels(),
        uncertainty_map=0.5,
        num_inference_steps=4,
        control_guidance_end=(1.0, 0.5),
        callback_on_step_end=on_step_end,
    )
    assert calls["elsewhere"] == []
    # The patch does see syncs: DDIMScheduler.step's two per step (`prev_timestep >= 0`, in `step` and `_get_variance`).
    assert calls["scheduler"] == 2 * 3
