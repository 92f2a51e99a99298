"""LatentDiffusionSegmenter (ICCLD): frozen base, feature shapes over several bases, deterministic evaluation,
save/load, the uncertainty estimators, and adversarial alignment on a two-domain toy set."""

import json
import os

import pytest
import torch

from diffusers_uncertainty.base_model import (
    build_noise_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)
from diffusers_uncertainty.segmentation import (
    EntropyEstimator,
    LatentDiffusionSegmenter,
    MCDropoutEstimator,
    SegmentationModel,
    load_segmenter,
)
from diffusers_uncertainty.segmentation.adversarial import DomainDiscriminator, domain_adversarial_loss
from diffusers_uncertainty.tiny import build_tiny_pipeline


def write_base(folder, vae_channels, unet_channels, cross_attention_dim=32):
    """A diffusers Stable Diffusion folder (vae, unet, scheduler, tokenizer, text_encoder) of the given sizes."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(os.path.join(folder, "tokenizer"), model_max_length=8)
    build_text_encoder(tokenizer, hidden_size=cross_attention_dim).save_pretrained(os.path.join(folder, "text_encoder"))
    build_vae(vae_channels).save_pretrained(os.path.join(folder, "vae"))
    build_unet(unet_channels, cross_attention_dim=cross_attention_dim).save_pretrained(os.path.join(folder, "unet"))
    build_noise_scheduler().save_pretrained(os.path.join(folder, "scheduler"))
    return str(folder)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads; on a shared CPU a second spinning thread makes them far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """The tiny offline base of `build_tiny_pipeline` (VAE factor 2, two UNet levels)."""
    folder = tmp_path_factory.mktemp("tiny_base")
    build_tiny_pipeline(str(folder))
    return str(folder)


def make_model(base, **kwargs):
    torch.manual_seed(0)
    kwargs = {"num_classes": 3, "decoder_channels": 16, "feature_timestep": 20, **kwargs}
    return LatentDiffusionSegmenter(base, **kwargs)


def test_frozen_base_gets_no_gradient_and_does_not_change(tiny_base):
    model = make_model(tiny_base)
    base_before = {f"{i}.{k}": v.clone() for i, m in enumerate((model.vae, model.unet)) for k, v in m.state_dict().items()}
    trainable_before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not any(k.startswith(("vae.", "unet.", "_base", "encoder.", "decoder.")) for k in trainable_before)
    assert not any(p.requires_grad for m in (model.vae, model.unet) for p in m.parameters())
    base_ids = {id(p) for m in (model.vae, model.unet) for p in m.parameters()}
    assert not base_ids & {id(p) for p in model.parameters()}  # an optimizer on model.parameters() cannot touch them

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    pixels, labels = torch.rand(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(pixels).logits, labels)
        loss.backward()
        assert all(p.grad is None for m in (model.vae, model.unet) for p in m.parameters())
        optimizer.step()
        optimizer.zero_grad()
    assert not model.vae.training and not model.unet.training  # model.train() does not reach the base
    after = {f"{i}.{k}": v for i, m in enumerate((model.vae, model.unet)) for k, v in m.state_dict().items()}
    assert all(torch.equal(base_before[k], after[k]) for k in base_before)
    assert any(not torch.equal(trainable_before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "vae_channels, unet_channels, blocks",
    [
        ((16, 32), (16, 32), None),  # VAE factor 2, two UNet levels
        ((16, 32, 32), (16, 32, 32), None),  # factor 4, three levels
        ((16, 16, 32, 32), (16, 32), (1,)),  # factor 8 (Stable Diffusion's), two levels, last up block only
    ],
)
def test_feature_shapes_line_up_for_several_bases(tmp_path, vae_channels, unet_channels, blocks):
    base = write_base(tmp_path / "base", vae_channels, unet_channels)
    model = make_model(base, unet_feature_blocks=blocks).eval()
    vae_factor = 2 ** (len(vae_channels) - 1)
    assert model.vae_factor == vae_factor
    assert model.output_stride == vae_factor * 2 ** (len(unet_channels) - 1)
    # every VAE stride from the latent's down to the full image gets an inter-coder connection
    assert model._skip_strides == [vae_factor // 2**i for i in range(len(vae_channels))]
    height, width = 2 * model.output_stride, 3 * model.output_stride  # not square
    out = model(torch.rand(2, 3, height, width), return_features=True, return_latent_features=True)
    assert out.logits.shape == (2, 3, height, width)
    assert out.features.shape == (2, model.feature_channels, height, width)
    assert out.latent_features.shape == (2, model.latent_channels, height // vae_factor, width // vae_factor)
    with pytest.raises(ValueError, match=f"divisible by {model.output_stride}"):
        model(torch.rand(1, 3, height + 1, width))


def test_eval_is_deterministic_and_training_noise_is_fresh(tiny_base):
    model = make_model(tiny_base, dropout=0.0)
    pixels = torch.rand(3, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        batch = model(pixels).logits
        alone = model(pixels[2:]).logits
        again = model(pixels).logits
    assert torch.equal(batch, again)
    torch.testing.assert_close(batch[2:], alone, atol=1e-5, rtol=1e-5)  # same image, same logits, any batch slot
    model.train()
    with torch.no_grad():
        first, second = model(pixels).logits, model(pixels).logits
    assert not torch.allclose(first, second)  # fresh noise per training call


def test_save_load_round_trip_holds_only_the_trainable_weights(tiny_base, tmp_path):
    model = make_model(tiny_base, class_names=("a", "b", "c"), ignore_index=7).eval()
    model.save_pretrained(tmp_path / "seg")
    assert sorted(os.listdir(tmp_path / "seg")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "seg" / "config.json").read_text())
    assert config["_class_name"] == "LatentDiffusionSegmenter" and config["base_model_name_or_path"] == tiny_base
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "seg" / "diffusion_pytorch_model.safetensors")
    assert set(saved) == set(model.state_dict())
    assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in model.parameters())

    loaded = load_segmenter(str(tmp_path / "seg")).eval()
    assert isinstance(loaded, LatentDiffusionSegmenter) and loaded.config.class_names == ["a", "b", "c"]
    pixels = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, atol=0, rtol=0)

    smp = SegmentationModel(encoder_name="resnet18", encoder_depth=3, decoder_channels=(16, 8, 8), num_classes=3)
    smp.save_pretrained(tmp_path / "smp")
    assert type(load_segmenter(str(tmp_path / "smp"))) is SegmentationModel
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="is not a segmenter: its config's `_class_name` is 'UNet2DModel'"):
        load_segmenter(str(tmp_path / "other"))


def test_lora_weights_train_save_and_load(tiny_base, tmp_path):
    pytest.importorskip("peft")
    model = make_model(tiny_base, lora_rank=2)
    lora = dict(model.lora_parameters)
    assert lora and all(p.requires_grad for p in lora.values())
    assert all(any(p is q for q in model.unet.parameters()) for p in lora.values())  # the same tensors as in the UNet
    model.train()
    loss = model(torch.rand(2, 3, 16, 16)).logits.square().mean()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None for n, p in model.unet.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for p in lora.values():
            p.add_(0.1)
    model.eval().save_pretrained(tmp_path / "seg")
    loaded = LatentDiffusionSegmenter.from_pretrained(tmp_path / "seg").eval()
    for name, parameter in loaded.lora_parameters.items():
        assert torch.equal(parameter, lora[name].detach())
    pixels = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits)


def test_uncertainty_estimators_and_dtype_moves_apply(tiny_base):
    model = make_model(tiny_base, dropout=0.3)
    pixels = torch.rand(2, 3, 16, 16)
    entropy = EntropyEstimator(model)(pixels)
    assert entropy.maps.shape == (2, 16, 16) and 0 <= float(entropy.maps.min()) <= float(entropy.maps.max()) <= 1
    mc = MCDropoutEstimator(model, num_passes=4)(pixels)
    assert float(mc.maps.max()) > 0  # dropout before the head samples
    model.to(torch.float64)
    assert model.vae.dtype == torch.float64 and model.unet.dtype == torch.float64  # `_apply` moves the frozen base
    assert model(pixels.double()).logits.dtype == torch.float64


def test_configuration_errors_name_the_argument(tiny_base, tmp_path):
    with pytest.raises(ValueError, match=r"`feature_timestep` must be in \[0, 1000\).*got 1000"):
        make_model(tiny_base, feature_timestep=1000)
    with pytest.raises(ValueError, match=r"`unet_feature_blocks` must be distinct indices in 0..1.*got \(2,\)"):
        make_model(tiny_base, unet_feature_blocks=(2,))
    with pytest.raises(ValueError, match="`base_model_name_or_path`: expected a diffusers Stable Diffusion pipeline"):
        make_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="`ignore_index` must not be a class index"):
        make_model(tiny_base, ignore_index=1)


def two_domain_batch(generator, n, target):
    """Two halves, class 0 red and class 1 blue (sides drawn at random); the target domain is darker and striped
    (a strong texture shift that per-sample normalisation does not remove)."""
    labels = torch.zeros(n, 16, 16, dtype=torch.long)
    labels[:, :, 8:] = 1
    flip = torch.rand(n, generator=generator) < 0.5
    labels[flip] = 1 - labels[flip]
    colours = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.3, 0.9]])
    images = colours[labels].permute(0, 3, 1, 2) + 0.05 * torch.randn(n, 3, 16, 16, generator=generator)
    if target:
        stripes = (torch.arange(16) // 2 % 2).float().view(1, 1, 16, 1)
        images = 0.5 * images + 0.5 * stripes
    return images.clamp(0, 1), labels


def train_two_domains(base, reverse: bool, steps: int = 60, batch: int = 8, lr: float = 1e-3, disc_lr: float = 1e-2):
    """Segmenter + discriminator trained jointly as in train_segmentation.py; without `reverse` the reversal strength
    is 0 (the discriminator learns, the features are left alone). Returns per-step discriminator accuracy and source
    loss."""
    model = make_model(base, num_classes=2, decoder_channels=16, dropout=0.0, feature_timestep=0)
    torch.manual_seed(1)
    discriminator = DomainDiscriminator(model.latent_channels, hidden_channels=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=disc_lr)
    generator = torch.Generator().manual_seed(0)
    model.train()
    accuracy, source_loss = [], []
    for _ in range(steps):
        source, labels = two_domain_batch(generator, batch, target=False)
        target, _ = two_domain_batch(generator, batch, target=True)
        out = model(torch.cat([source, target]), return_latent_features=True)
        seg = torch.nn.functional.cross_entropy(out.logits[:batch], labels)
        adv = domain_adversarial_loss(discriminator, out.latent_features, torch.tensor([0.0] * batch + [1.0] * batch),
                                      1.0 if reverse else 0.0)
        (seg + adv["loss"]).backward()
        for opt in (optimizer, disc_optimizer):
            opt.step()
            opt.zero_grad()
        accuracy.append(float(adv["accuracy"]))
        source_loss.append(float(seg.detach()))
    return accuracy, source_loss


def test_adversarial_alignment_drives_the_discriminator_toward_chance_while_the_source_loss_falls(tiny_base):
    # feature_timestep 0 in this toy: the tiny random VAE's latents are small next to the noise of any timestep > 0,
    # which would drown the domain signal the test needs.
    plain_accuracy, plain_loss = train_two_domains(tiny_base, reverse=False, steps=100)
    aligned_accuracy, aligned_loss = train_two_domains(tiny_base, reverse=True, steps=100)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    # Without reversal the domains stay separable: the discriminator learns them.
    assert mean(plain_accuracy[-15:]) > 0.8
    # With reversal the features align: after an early peak the discriminator falls back toward chance (0.5) ...
    assert mean(aligned_accuracy[-15:]) < 0.65
    assert mean(aligned_accuracy[-15:]) < max(aligned_accuracy) - 0.1
    assert mean(aligned_accuracy[-15:]) < mean(plain_accuracy[-15:]) - 0.2
    # ... while the segmentation of the source still learns.
    assert mean(aligned_loss[-10:]) < 0.5 * mean(aligned_loss[:10])
    assert mean(plain_loss[-10:]) < 0.5 * mean(plain_loss[:10])
