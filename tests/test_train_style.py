"""examples/train_uncertainty_controlnet.py --train_style_encoder: a few steps through `accelerate launch` on the
tiny offline pipeline; the style encoder learns, is checkpointed, saved, and feeds the pipeline; bad flags stop at
once; the dataset serves style images of each sample's own domain."""

import json
import random

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_uncertainty import StableDiffusionDualControlPipeline, StyleEncoderModel, UncertaintyControlNetModel
from diffusers_uncertainty import build_tiny_pipeline, write_tiny_tokenizer
from diffusers_uncertainty.training import (
    ControlNetTrainingDataset,
    PairedTransform,
    collate_fn,
    labeled_folder_records,
    unlabeled_folder_records,
)
from test_train_controlnet import (
    IGNORE_INDEX, NUM_CLASSES, _assert_ok, _base_args, _changed, _weights, _write_maps, _write_synthetic, run_training,
)
from test_train_controlnet_units import script  # noqa: F401  (the training script loaded as a module, a fixture)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny base pipeline, 4 labeled + 4 unlabeled samples with uncertainty maps, and a saved style encoder."""
    root = tmp_path_factory.mktemp("train_style")
    build_tiny_pipeline(root / "base", num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX)
    labeled = _write_synthetic(root / "labeled", 4, labeled=True, seed=0)
    unlabeled = _write_synthetic(root / "unlabeled", 4, labeled=False, seed=1)
    _write_maps(labeled + unlabeled, root / "maps", seed=2)
    torch.manual_seed(0)
    StyleEncoderModel(backbone="test_resnet", cross_attention_dim=32, num_tokens=2, image_size=16).save_pretrained(
        root / "style_encoder"
    )
    return root


def test_style_encoder_trains_jointly_with_the_control_and_feeds_the_pipeline(workspace, tmp_path):
    output_dir = tmp_path / "out"
    result = run_training(
        *_base_args(
            workspace, output_dir,
            "--train_branch", "joint", "--train_data_dir", workspace / "labeled",
            "--unlabeled_data_dir", workspace / "unlabeled", "--uncertainty_dir", workspace / "maps",
            "--controlnet_model_name_or_path", workspace / "base" / "controlnet",
            "--train_style_encoder", "--style_encoder_model_name_or_path", workspace / "style_encoder",
            "--style_images_per_sample", 2, "--style_drop_rate", 0.5, "--style_learning_rate", 1e-3,
            "--max_train_steps", 2, "--checkpointing_steps", 2, "--random_flip",
            "--validation_uncertainty_levels", 0.5, "--num_validation_inference_steps", 2,
        )
    )
    _assert_ok(result)
    before, after = _weights(workspace / "style_encoder"), _weights(output_dir / "style_encoder")
    assert before.keys() == after.keys()
    changed, total = _changed(before, after, "")
    assert changed > total // 2, f"only {changed} of {total} style encoder tensors changed"
    for prefix in ("image_encoder.", "projection.", "token_norm."):
        assert _changed(before, after, prefix)[0] > 0, prefix
    controlnet_changed, _ = _changed(_weights(workspace / "base" / "controlnet"), _weights(output_dir), "")
    assert controlnet_changed > 0
    # Checkpoints hold the style encoder too; validation ran with it (in the unlabeled data's style).
    assert (output_dir / "checkpoint-2" / "style_encoder" / "config.json").is_file()
    assert _weights(output_dir / "checkpoint-2" / "style_encoder").keys() == after.keys()
    assert (output_dir / "validation" / "step-2.png").is_file()
    assert "Style encoder = test_resnet, 2 style image(s) per sample" in result.stderr + result.stdout

    style_encoder = StyleEncoderModel.from_pretrained(output_dir / "style_encoder")
    pipeline = StableDiffusionDualControlPipeline.from_pretrained(
        workspace / "base", controlnet=UncertaintyControlNetModel.from_pretrained(output_dir), style_encoder=style_encoder
    )
    pipeline.set_progress_bar_config(disable=True)
    style = [PIL.Image.open(path) for path in sorted((workspace / "unlabeled" / "images").iterdir())[:2]]
    common = dict(prompt="", uncertainty_map=0.5, num_inference_steps=2, output_type="np", height=16, width=16)
    styled = pipeline(style_images=style, generator=torch.Generator().manual_seed(0), **common).images
    plain = pipeline(generator=torch.Generator().manual_seed(0), **common).images
    assert styled.shape == (1, 16, 16, 3) and not np.allclose(styled, plain, atol=1e-4)


def test_a_new_style_encoder_is_built_from_the_flags_and_resumes_from_a_checkpoint(workspace, tmp_path):
    output_dir = tmp_path / "out"
    flags = (
        "--train_branch", "uncertainty", "--unlabeled_data_dir", workspace / "unlabeled",
        "--uncertainty_dir", workspace / "maps",
        "--controlnet_model_name_or_path", workspace / "base" / "controlnet",
        "--train_style_encoder", "--style_backbone", "test_resnet", "--style_num_tokens", 3,
        "--style_aggregation", "set_transformer", "--style_conditioning", "replace", "--style_image_size", 16,
        "--style_images_per_sample", 3, "--checkpointing_steps", 1,
    )
    _assert_ok(run_training(*_base_args(workspace, output_dir, *flags, "--max_train_steps", 1)))
    config = json.loads((output_dir / "style_encoder" / "config.json").read_text())
    assert {k: config[k] for k in ("backbone", "num_tokens", "aggregation", "conditioning_mode", "image_size")} == {
        "backbone": "test_resnet", "num_tokens": 3, "aggregation": "set_transformer", "conditioning_mode": "replace",
        "image_size": 16,
    }
    assert config["cross_attention_dim"] == 32
    step_one = _weights(output_dir / "checkpoint-1" / "style_encoder")
    result = run_training(
        *_base_args(workspace, output_dir, *flags, "--max_train_steps", 2, "--resume_from_checkpoint", "latest")
    )
    _assert_ok(result)
    output = result.stdout + result.stderr
    assert "Resuming from checkpoint" in output and "Loaded the style encoder weights of" in output
    assert "Loaded the controlnet weights of" in output
    assert (output_dir / "checkpoint-2" / "style_encoder" / "config.json").is_file()
    changed, total = _changed(step_one, _weights(output_dir / "style_encoder"), "")
    assert 0 < changed and total == len(step_one)


# ------------------------------------------------------------------------------------------- in-process
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--style_encoder_model_name_or_path", "x"], r"`--style_encoder_model_name_or_path` needs `--train_style_encoder`"),
        (["--style_pretrained_backbone"], r"`--style_pretrained_backbone` needs `--train_style_encoder`"),
        (["--train_style_encoder", "--style_images_per_sample", "0"], r"`--style_images_per_sample` must be a positive integer, but got 0"),
        (["--train_style_encoder", "--style_drop_rate", "1.5"], r"`--style_drop_rate` must be in \[0, 1\], but got 1.5"),
        (["--train_style_encoder", "--validation_style_images", "missing.png"], r"`--validation_style_images` file does not exist: missing.png"),
        (["--train_style_encoder", "--style_pretrained_backbone", "--style_encoder_model_name_or_path", "x"], r"cannot be used with `--style_encoder_model_name_or_path`"),
    ],
)
def test_bad_style_flags_stop_at_once(script, workspace, extra, message):
    arguments = [
        "--pretrained_model_name_or_path", str(workspace / "base"), "--num_classes", "4",
        "--train_branch", "semantic", "--train_data_dir", str(workspace / "labeled"), *extra,
    ]
    with pytest.raises(ValueError, match=message):
        script.parse_args(arguments)


def test_compute_loss_feeds_the_style_tokens_to_unet_and_controlnet_and_drops_to_the_null_style(script):
    pipeline = build_tiny_pipeline(num_classes=4)
    torch.manual_seed(0)
    encoder = StyleEncoderModel(backbone="test_resnet", cross_attention_dim=32, num_tokens=2, image_size=16)
    seen = []
    pipeline.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    generator = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1,
        "conditioning_one_hot": torch.zeros(2, 4, 16, 16),
        "conditioning_uncertainty": torch.rand(2, 1, 16, 16, generator=generator),
        "is_labeled": torch.tensor([False, False]),
        "input_ids": torch.randint(0, 500, (2, 16), generator=generator),
        "style_pixel_values": torch.rand(2, 2, 3, 16, 16, generator=generator) * 2 - 1,
    }
    arguments = (batch, pipeline.vae, pipeline.text_encoder, pipeline.unet, pipeline.controlnet,
                 script.DDPMScheduler.from_config(pipeline.scheduler.config), "uncertainty")
    loss = script.compute_loss(*arguments, style_encoder=encoder, style_conditioning="concat", style_drop_rate=1.0)
    assert seen[-1].shape == (2, 16 + 2, 32)
    assert torch.equal(seen[-1][:, 16:], encoder.get_null_style(2))  # every sample dropped
    loss.backward()
    assert encoder.null_style.grad is not None and encoder.null_style.grad.abs().sum() > 0
    script.compute_loss(*arguments, style_encoder=encoder, style_conditioning="replace", style_drop_rate=0.0)
    assert seen[-1].shape == (2, 2, 32)
    with torch.no_grad():
        torch.testing.assert_close(seen[-1], encoder(batch["style_pixel_values"]).style_embeds)


def test_dataset_serves_style_images_of_the_sample_s_own_domain(workspace, tmp_path):
    labeled = labeled_folder_records(workspace / "labeled")
    unlabeled = unlabeled_folder_records(workspace / "unlabeled")
    # Two constant-colour domains tell the style images' origin from their pixels.
    for records, value in ((labeled, 0), (unlabeled, 255)):
        for record in records:
            path = tmp_path / f"{value}_{len(list(tmp_path.iterdir()))}.png"
            PIL.Image.fromarray(np.full((32, 40, 3), value, np.uint8)).save(path)
            record["image"] = str(path)
    tokenizer = write_tiny_tokenizer(tmp_path / "tokenizer")
    dataset = ControlNetTrainingDataset(
        labeled, unlabeled, PairedTransform(16, random_flip=True), tokenizer, num_classes=NUM_CLASSES,
        ignore_index=IGNORE_INDEX, use_uncertainty=False, style_images_per_sample=3,
    )
    random.seed(0)
    batch = collate_fn([dataset[0], dataset[len(labeled)]])
    assert batch["style_pixel_values"].shape == (2, 3, 3, 16, 16) and batch["style_pixel_values"].dtype == torch.float32
    assert (batch["style_pixel_values"][0] == -1).all()  # labeled sample: labeled-domain images only
    assert (batch["style_pixel_values"][1] == 1).all()  # unlabeled sample: unlabeled-domain images only
    assert "style_pixel_values" not in ControlNetTrainingDataset(
        labeled, unlabeled, PairedTransform(16), tokenizer, num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX,
        use_uncertainty=False,
    )[0]
