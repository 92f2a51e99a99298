import json

import pytest
import torch
import torch.nn as nn

from diffusers_uncertainty.segmentation import (
    SEGMENTATION_ARCHITECTURES,
    SegmentationModel,
    create_segmentation_model,
    register_segmentation_architecture,
)


TINY = dict(
    architecture="unet",
    encoder_name="tu-mobilenetv3_small_050",
    encoder_depth=3,
    decoder_channels=(16, 8, 8),
    num_classes=3,
    ignore_index=255,
)


def test_save_load_round_trip_gives_equal_weights_and_outputs(tmp_path):
    torch.manual_seed(0)
    model = SegmentationModel(**TINY, class_names=("a", "b", "c")).eval()
    # Move BatchNorm statistics away from their defaults so that buffers are checked too.
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    model.eval()
    model.save_pretrained(tmp_path / "seg")
    assert (tmp_path / "seg" / "config.json").is_file()
    assert (tmp_path / "seg" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = SegmentationModel.from_pretrained(tmp_path / "seg").eval()
    saved_config = json.loads(loaded.to_json_string())
    saved_config.pop("_name_or_path")
    assert saved_config == json.loads(model.to_json_string())
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
    x = torch.rand(2, 3, 32, 64)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_forward_returns_logits_and_features():
    model = SegmentationModel(**TINY).eval()
    out = model(torch.rand(1, 3, 32, 48), return_features=True)
    assert out.logits.shape == (1, 3, 32, 48)
    assert out.features.shape[1] == model.feature_channels
    assert model(torch.rand(1, 3, 32, 48)).features is None
    logits, = model(torch.rand(1, 3, 32, 48), return_dict=False)
    assert logits.shape == (1, 3, 32, 48)


def test_bad_inputs_raise_clear_errors():
    model = SegmentationModel(**TINY)
    with pytest.raises(ValueError, match="divisible by 8, got 30x32"):
        model(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\)"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="architecture"):
        SegmentationModel(**{**TINY, "architecture": "nope"})
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationModel(**{**TINY, "ignore_index": 1})
    with pytest.raises(ValueError, match="class_names"):
        SegmentationModel(**TINY, class_names=("a",))


@pytest.mark.parametrize("architecture", ["deeplabv3plus", "segformer"])
def test_other_architectures_build_and_run(architecture):
    model = SegmentationModel(
        architecture=architecture, encoder_name="tu-mobilenetv3_small_050", num_classes=3, ignore_index=255
    ).eval()
    out = model(torch.rand(1, 3, 64, 64), return_features=True)
    assert out.logits.shape == (1, 3, 64, 64)
    assert out.features.shape[1] == model.feature_channels


def test_factory_accepts_a_new_architecture():
    class Tiny(nn.Module):
        def __init__(self, encoder_name, encoder_depth, in_channels, num_classes, decoder_channels=None):
            super().__init__()
            self.encoder = nn.Conv2d(in_channels, 4, 3, padding=1)
            self.encoder.output_stride = 1
            self.decoder = nn.ReLU()
            self.segmentation_head = nn.Conv2d(4, num_classes, 1)

    register_segmentation_architecture("test_tiny", Tiny)
    try:
        model = SegmentationModel(architecture="test_tiny", num_classes=2, ignore_index=255)
        assert model(torch.rand(1, 3, 5, 7)).logits.shape == (1, 2, 5, 7)
        assert model.feature_channels == 4
        with pytest.raises(ValueError, match="already registered"):
            register_segmentation_architecture("test_tiny", Tiny)
    finally:
        SEGMENTATION_ARCHITECTURES.pop("test_tiny")


def test_encoder_weights_random_by_default_and_unreachable_weights_keep_random_init(monkeypatch):
    import segmentation_models_pytorch as smp

    calls = []

    def unreachable(*args, **kwargs):
        calls.append(kwargs.get("weights"))
        raise OSError("offline")

    monkeypatch.setattr(smp.encoders, "get_encoder", unreachable)
    torch.manual_seed(0)
    plain = create_segmentation_model(**{k: v for k, v in TINY.items()})
    assert calls == []  # no weights asked, nothing fetched
    torch.manual_seed(0)
    asked = create_segmentation_model(**TINY, encoder_weights="imagenet")
    assert calls == ["imagenet"]
    for a, b in zip(plain.state_dict().values(), asked.state_dict().values()):
        assert torch.equal(a, b)


def test_reachable_encoder_weights_are_loaded(monkeypatch):
    import segmentation_models_pytorch as smp

    real_get_encoder = smp.encoders.get_encoder

    def fake_pretrained(name, in_channels, depth, weights):
        encoder = real_get_encoder(name, in_channels=in_channels, depth=depth, weights=None)
        with torch.no_grad():
            for p in encoder.parameters():
                p.fill_(0.5)
        return encoder

    monkeypatch.setattr(smp.encoders, "get_encoder", fake_pretrained)
    model = SegmentationModel(**TINY)
    assert model.load_encoder_weights("imagenet")
    assert all(torch.all(p == 0.5) for p in model.encoder.parameters())
