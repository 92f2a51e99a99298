import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from diffusers_uncertainty import StableDiffusionDualControlPipeline, UncertaintyControlNetModel, build_tiny_pipeline


def _generate(pipeline):
    labels = torch.arange(16).remainder(4).repeat(16, 1)
    return pipeline(
        "a scan",
        semantic_map=labels,
        uncertainty_map=0.6,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    pipeline = build_tiny_pipeline(folder, num_classes=4, shared_trunk=True, ignore_index=255)
    return folder, pipeline, _generate(pipeline)


def test_model_index_names_the_plugin_classes(saved_pipeline):
    folder, _, _ = saved_pipeline
    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionDualControlPipeline"
    assert model_index["controlnet"] == ["diffusers_uncertainty", "UncertaintyControlNetModel"]
    assert model_index["safety_checker"] == [None, None]
    assert (folder / "controlnet" / "config.json").is_file()
    assert (folder / "tokenizer" / "tokenizer_config.json").is_file()


def test_folder_round_trips_through_both_loaders(saved_pipeline):
    folder, pipeline, images = saved_pipeline
    for loader in (StableDiffusionDualControlPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(folder)
        assert type(loaded) is StableDiffusionDualControlPipeline
        assert isinstance(loaded.controlnet, UncertaintyControlNetModel) and loaded.controlnet.config.shared_trunk
        for name in ("unet", "vae", "text_encoder", "controlnet"):
            original, restored = getattr(pipeline, name).state_dict(), getattr(loaded, name).state_dict()
            assert all(torch.equal(original[key], restored[key]) for key in original)
        loaded.set_progress_bar_config(disable=True)
        assert (_generate(loaded) == images).all()


def test_controlnet_loads_from_the_pipeline_subfolder(saved_pipeline):
    folder, pipeline, _ = saved_pipeline
    controlnet = UncertaintyControlNetModel.from_pretrained(folder, subfolder="controlnet")
    assert controlnet.config.ignore_index == 255
    original = pipeline.controlnet.state_dict()
    assert all(torch.equal(original[key], value) for key, value in controlnet.state_dict().items())


def test_base_checkpoint_plus_separately_loaded_controlnet(saved_pipeline, tmp_path):
    folder, pipeline, images = saved_pipeline
    # A plain Stable Diffusion folder, as a user's base model would be.
    base = StableDiffusionPipeline(
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        unet=pipeline.unet,
        scheduler=pipeline.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    base.save_pretrained(tmp_path / "base")
    controlnet = UncertaintyControlNetModel.from_pretrained(folder / "controlnet")
    loaded = StableDiffusionDualControlPipeline.from_pretrained(tmp_path / "base", controlnet=controlnet)
    loaded.set_progress_bar_config(disable=True)
    assert (_generate(loaded) == images).all()


def test_hub_id_loads_offline_from_the_local_cache(saved_pipeline, tmp_path, monkeypatch):
    folder, _, images = saved_pipeline
    # Lay the folder out as huggingface_hub's cache does for a downloaded repository.
    repo = tmp_path / "hub" / "models--lab--tiny-dual-control"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for loader in (StableDiffusionDualControlPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained("lab/tiny-dual-control", cache_dir=tmp_path / "hub")
        assert type(loaded) is StableDiffusionDualControlPipeline
        loaded.set_progress_bar_config(disable=True)
        assert (_generate(loaded) == images).all()
    with pytest.raises(Exception):
        StableDiffusionDualControlPipeline.from_pretrained("lab/not-in-the-cache", cache_dir=tmp_path / "hub")


def test_saving_writes_no_half_folders(tmp_path):
    pipeline = build_tiny_pipeline(num_classes=4)
    pipeline.save_pretrained(tmp_path / "out")
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["controlnet", "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert not np.isnan(_generate(StableDiffusionDualControlPipeline.from_pretrained(tmp_path / "out"))).any()
