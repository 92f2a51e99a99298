"""Image-to-image generation (`init_image` + `strength`): where the schedule starts, what it starts from, errors."""

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_uncertainty import StableDiffusionDualControlPipeline, build_tiny_components


def _image(seed=0, size=16):
    return torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(seed))


def _labels(seed=0, size=16):
    return torch.randint(0, 4, (1, size, size), generator=torch.Generator().manual_seed(seed))


def _pipeline():
    pipeline = StableDiffusionDualControlPipeline(**build_tiny_components(num_classes=4, ignore_index=255))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _unet_inputs(pipeline):
    """Record the latents and timestep of every UNet call."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].detach().clone(), int(args[1])))

    pipeline.unet.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("strength, expected_steps", [(0.5, 4), (0.3, 2), (1.0, 8)])
def test_the_last_strength_of_the_schedule_runs_from_the_noised_encoded_image(strength, expected_steps):
    pipeline = _pipeline()
    image, labels = _image(), _labels()
    calls = _unet_inputs(pipeline)
    pipeline(
        "a scan", semantic_map=labels, uncertainty_map=0.5, init_image=image, strength=strength, num_inference_steps=8,
        guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(3),
    )
    pipeline.scheduler.set_timesteps(8)
    full = pipeline.scheduler.timesteps.tolist()
    assert [t for _, t in calls] == full[8 - expected_steps:]
    # The first UNet input, computed independently: the VAE mean of the image in [-1, 1], scaled, noised to the
    # first timestep with the generator's first draw (DDIM's scale_model_input is the identity).
    with torch.no_grad():
        latents = pipeline.vae.encode(image * 2 - 1).latent_dist.mode() * pipeline.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    expected = pipeline.scheduler.add_noise(latents, noise, torch.tensor([calls[0][1]]))
    assert torch.allclose(calls[0][0], expected, atol=1e-6)


def test_init_image_accepts_pil_and_broadcasts_and_is_deterministic():
    pipeline = _pipeline()
    image = _image()
    pil = PIL.Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    arguments = dict(semantic_map=_labels(), uncertainty_map=0.5, strength=0.5, num_inference_steps=4, output_type="np")
    first = pipeline("a scan", init_image=pil, generator=torch.Generator().manual_seed(0), **arguments).images
    again = pipeline("a scan", init_image=pil, generator=torch.Generator().manual_seed(0), **arguments).images
    assert np.array_equal(first, again)
    other = pipeline("a scan", init_image=_image(seed=1), generator=torch.Generator().manual_seed(0), **arguments).images
    assert not np.allclose(first, other)
    # One image for two label maps; one generator per image.
    two = pipeline(
        "a scan", init_image=pil, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
        **{**arguments, "semantic_map": torch.cat([_labels(), _labels(seed=1)])},
    ).images
    assert two.shape == (2, 16, 16, 3) and np.allclose(two[0], first[0], atol=1e-5)  # batched kernels round apart


def test_without_init_image_the_call_is_unchanged():
    pipeline = _pipeline()
    arguments = dict(semantic_map=_labels(), uncertainty_map=0.5, num_inference_steps=3, output_type="np")
    plain = pipeline("a scan", generator=torch.Generator().manual_seed(0), **arguments).images
    explicit = pipeline("a scan", generator=torch.Generator().manual_seed(0), strength=1.0, init_image=None, **arguments).images
    assert np.array_equal(plain, explicit)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=0.5), r"`strength` 0.5 applies to image-to-image generation, but no `init_image` was given"),
        (dict(init_image=_image(), strength=1.5), r"`strength` must be a number in \(0, 1\], but got 1.5"),
        (dict(init_image=_image(), strength=0.0), r"`strength` must be a number in \(0, 1\], but got 0.0"),
        (dict(init_image=_image(), strength=0.2), r"`strength` 0.2 of 4 denoising steps leaves no step to run"),
        (dict(init_image=_image(), latents=torch.zeros(1, 4, 4, 4)), "Pass either `init_image` .* or `latents`, not both"),
        (
            dict(init_image=torch.cat([_image(), _image(1), _image(2)]), semantic_map=torch.cat([_labels(), _labels(1)])),
            r"Batch sizes must be 1 or equal, but got \{'prompt': 1, 'semantic_map': 2, 'uncertainty_map': 1, 'init_image': 3\}",
        ),
        (
            dict(init_image=_image(), generator=[torch.Generator()] * 3, num_images_per_prompt=2),
            r"a list of generators of length 3, but requested an effective batch size of 2 \(1 x `num_images_per_prompt` 2\)",
        ),
        (  # from noise too
            dict(generator=[torch.Generator()] * 2),
            r"a list of generators of length 2, but requested an effective batch size of 1 \(1 x",
        ),
    ],
)
def test_bad_init_image_input_is_a_clear_error_before_any_model_runs(kwargs, message):
    pipeline = _pipeline()
    calls = []
    for model in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        model.register_forward_pre_hook(lambda *a: calls.append(1))
    pipeline.vae.encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    arguments = dict(semantic_map=_labels(), uncertainty_map=0.5, num_inference_steps=4, output_type="np")
    with pytest.raises(ValueError, match=message):
        pipeline("a scan", **{**arguments, **kwargs})
    assert calls == []
