"""End-to-end tests of examples/train_base_model.py (run as a user runs it: `accelerate launch` in a subprocess, on a
tiny toy OCT dataset at resolution 32) and unit tests of diffusers_uncertainty.base_model."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from diffusers_uncertainty import StableDiffusionDualControlPipeline, UncertaintyControlNetModel
from diffusers_uncertainty.base_model import (
    BaseModelTrainingDataset,
    build_tokenizer,
    build_unet,
    build_vae,
    reconstruction_error,
)
from diffusers_uncertainty.toy_oct import OCT_NUM_CLASSES, make_oct_dataset
from example_scripts import load_example


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_base_model.py"
# A tiny model: VAE factor 8 (Stable Diffusion's, 4 levels), 2 UNet levels, text width 16.
TINY = [
    "--vae_block_out_channels", 8, 16, 16, 16, "--unet_block_out_channels", 16, 32, "--norm_num_groups", 4,
    "--unet_attention_head_dim", 4, "--cross_attention_dim", 16, "--text_encoder_heads", 2,
    "--tokenizer_max_length", 16,
]
VAE_STEPS, UNET_STEPS = 8, 4  # checkpoint-5 falls in the VAE stage, checkpoint-10 in the UNet stage


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_training(*script_args, timeout: int = 240) -> subprocess.CompletedProcess:
    """`accelerate launch --num_processes 1 --cpu` the script in fp32, as a user would."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(SCRIPT), *[str(arg) for arg in script_args],
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="2")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _assert_ok(result: subprocess.CompletedProcess):
    assert result.returncode == 0, f"training failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def _scratch_args(data: Path, output_dir: Path, *extra) -> list:
    return [
        "--train_data_dir", data / "source" / "train", data / "target" / "train", "--resolution", 32, *TINY,
        "--vae_train_steps", VAE_STEPS, "--unet_train_steps", UNET_STEPS, "--train_batch_size", 4,
        "--vae_learning_rate", 3e-3, "--learning_rate", 1e-3, "--seed", 0, "--checkpointing_steps", 5,
        "--num_validation_images", 1, "--num_inference_steps", 2, "--output_dir", output_dir, *extra,
    ]


def _weights(folder: Path) -> dict:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def _images(data: Path) -> torch.Tensor:
    """The source and target training images at 32x32 (centre crops), in [-1, 1]."""
    records = [
        {"name": str(path), "image": str(path), "caption": None}
        for split in ("source", "target")
        for path in sorted((data / split / "train" / "images").iterdir())
    ]
    with tempfile.TemporaryDirectory() as folder:
        dataset = BaseModelTrainingDataset(records, 32, build_tokenizer(folder), center_crop=True)
        return torch.stack([dataset[index]["pixel_values"] for index in range(len(dataset))])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy OCT dataset (4 source + 4 target training images at 32x64) and one from-scratch training run."""
    root = tmp_path_factory.mktemp("base_model")
    make_oct_dataset(root / "oct", 4, 1, 4, 1, size=(32, 64), seed=0)
    result = run_training(*_scratch_args(root / "oct", root / "runs" / "base"))
    _assert_ok(result)
    return root, result


# ------------------------------------------------------------------------------------------------- tests
def test_output_is_a_stable_diffusion_folder_that_generates_and_takes_a_dual_control(trained):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    root, result = trained
    output_dir = root / "runs" / "base"
    assert "VAE stage done" in result.stdout and "UNet stage done" in result.stdout
    index = json.loads((output_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    # nothing temporary left beside or inside the output folder; checkpoints complete
    assert sorted(path.name for path in (root / "runs").iterdir()) == ["base"]
    assert not [path for path in output_dir.iterdir() if path.name.startswith(".")]
    assert {path.name for path in output_dir.glob("checkpoint-*")} == {"checkpoint-5", "checkpoint-10"}
    for name in ("vae", "unet", "base_model_state.json"):
        assert (output_dir / "checkpoint-5" / name).exists()
    assert (output_dir / "samples.png").is_file()
    # The default placement (auto) keeps this small dataset's latents on the device; the throughput record says so.
    assert "Dataset placement of the UNet stage = device (--dataset_placement auto" in result.stderr
    throughput = json.loads((output_dir / "throughput.json").read_text())
    assert throughput["stage"] == "unet" and throughput["dataset_placement"] == "device"
    assert throughput["warmup_steps"] == 10 and throughput["steps_per_second"] is None  # 4 UNet steps: too few
    assert throughput["vae_stage"] is None
    assert json.loads((output_dir / "training_summary.json").read_text())["dataset_placement"] == "device"

    pipeline = StableDiffusionPipeline.from_pretrained(output_dir)
    pipeline.set_progress_bar_config(disable=True)
    assert isinstance(pipeline.scheduler, DDIMScheduler) and pipeline.safety_checker is None
    assert pipeline.vae_scale_factor == 8 and pipeline.unet.config.sample_size == 4
    assert pipeline.vae.config.scaling_factor != 0.18215  # measured on the data, not the default
    image = pipeline("", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)  # the default size is the training resolution
    image = pipeline("", height=48, width=64, num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (48, 64, 3) and np.isfinite(image).all()

    controlnet = UncertaintyControlNetModel.from_unet(pipeline.unet, semantic_channels=OCT_NUM_CLASSES)
    dual = StableDiffusionDualControlPipeline.from_pretrained(output_dir, controlnet=controlnet)
    dual.set_progress_bar_config(disable=True)
    out = dual("", semantic_map=torch.randint(0, OCT_NUM_CLASSES, (32, 32)), uncertainty_map=0.5, num_inference_steps=2)
    assert out.images[0].size == (32, 32) and out.semantic_maps.shape == (1, 32, 32)


def test_vae_training_lowers_the_loss_and_the_reconstruction_error(trained):
    root, _ = trained
    output_dir = root / "runs" / "base"
    summary = json.loads((output_dir / "training_summary.json").read_text())
    losses = summary["vae_losses"]
    assert len(losses) == VAE_STEPS and len(summary["unet_losses"]) == UNET_STEPS
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
    vae = summary["vae"]
    assert vae["reconstruction_error_after"] < 0.9 * vae["reconstruction_error_before"]

    # Independently of the script's own numbers: the saved VAE reconstructs the data better than a fresh one.
    from diffusers import AutoencoderKL

    images = _images(root / "oct")
    trained_vae = AutoencoderKL.from_pretrained(output_dir / "vae")
    torch.manual_seed(0)
    fresh_vae = AutoencoderKL.from_config(trained_vae.config)
    assert reconstruction_error(trained_vae, images) < 0.9 * reconstruction_error(fresh_vae, images)


def test_fine_tuning_the_produced_base_keeps_the_vae_and_changes_the_unet(trained):
    root, _ = trained
    base = root / "runs" / "base"
    output_dir = root / "finetuned"
    result = run_training(
        "--pretrained_model_name_or_path", base, "--skip_vae_training", "--train_data_dir", root / "oct" / "target" / "train",
        "--resolution", 32, "--unet_train_steps", 2, "--train_batch_size", 2, "--learning_rate", 1e-3, "--seed", 1,
        "--default_prompt", "home oct", "--num_validation_images", 0, "--output_dir", output_dir,
    )
    _assert_ok(result)
    assert "VAE stage done" not in result.stdout
    before, after = _weights(base / "vae"), _weights(output_dir / "vae")
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert json.loads((output_dir / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(
        json.loads((base / "vae" / "config.json").read_text())["scaling_factor"]
    )
    before, after = _weights(base / "unet"), _weights(output_dir / "unet")
    assert sum(not torch.equal(before[key], after[key]) for key in before) > len(before) // 2
    assert (output_dir / "tokenizer" / "tokenizer.json").read_bytes() == (base / "tokenizer" / "tokenizer.json").read_bytes()

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(output_dir)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline("home oct", num_inference_steps=2).images[0].size == (32, 32)


def test_resuming_from_a_checkpoint_reproduces_the_uninterrupted_run(trained):
    """checkpoint-5 is inside the VAE stage; resuming there gives the same final weights as the full run."""
    root, _ = trained
    base = root / "runs" / "base"
    resumed = root / "resumed"
    resumed.mkdir()
    shutil.copytree(base / "checkpoint-5", resumed / "checkpoint-5")
    result = run_training(*_scratch_args(root / "oct", resumed, "--resume_from_checkpoint", "latest"))
    _assert_ok(result)
    assert "Resuming from checkpoint" in result.stdout
    for component in ("vae", "unet"):
        expected, got = _weights(base / component), _weights(resumed / component)
        assert all(torch.allclose(expected[key], got[key], atol=1e-5) for key in expected), component
    summary = json.loads((resumed / "training_summary.json").read_text())
    assert summary["vae_losses"] == pytest.approx(json.loads((base / "training_summary.json").read_text())["vae_losses"])


def test_resuming_inside_the_unet_stage_on_the_device_path_reproduces_the_uninterrupted_run(trained):
    """checkpoint-10 is at UNet step 2 of 4: the resumed run rebuilds the latent cache from the checkpoint's VAE and
    draws the same cached batches (they depend on the seed and the step only), so the weights match."""
    root, _ = trained
    base = root / "runs" / "base"
    resumed = root / "resumed_unet"
    resumed.mkdir()
    shutil.copytree(base / "checkpoint-10", resumed / "checkpoint-10")
    result = run_training(*_scratch_args(root / "oct", resumed, "--resume_from_checkpoint", "latest"))
    _assert_ok(result)
    assert "Resuming from checkpoint" in result.stdout and "VAE stage done" not in result.stdout
    assert "Latent cache = " in result.stderr
    expected, got = _weights(base / "unet"), _weights(resumed / "unet")
    assert all(torch.allclose(expected[key], got[key], atol=1e-6) for key in expected)
    summary = json.loads((resumed / "training_summary.json").read_text())
    assert summary["unet_losses"] == pytest.approx(json.loads((base / "training_summary.json").read_text())["unet_losses"])


def test_stream_placement_is_the_dataloader_path_and_writes_its_throughput(trained):
    """`--dataset_placement stream` (the VAE encodes every batch): fine-tuning the produced base, 12 UNet steps so
    that the meter measures 2 after its 10 warm-up steps."""
    root, _ = trained
    output_dir = root / "stream"
    result = run_training(
        "--pretrained_model_name_or_path", root / "runs" / "base", "--skip_vae_training",
        "--train_data_dir", root / "oct" / "target" / "train", "--resolution", 32, "--unet_train_steps", 12,
        "--train_batch_size", 2, "--seed", 1, "--num_validation_images", 0, "--dataset_placement", "stream",
        "--logging_steps", 5, "--output_dir", output_dir,
    )
    _assert_ok(result)
    assert "Dataset placement of the UNet stage = stream" in result.stderr and "Latent cache = " not in result.stderr
    assert "UNet stage: Steady-state throughput:" in result.stdout
    throughput = json.loads((output_dir / "throughput.json").read_text())
    assert throughput["dataset_placement"] == "stream" and throughput["measured_steps"] == 2
    assert throughput["steps_per_second"] > 0 and throughput["samples_per_step"] == 2
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert len(summary["unet_losses"]) == 12 and all(np.isfinite(summary["unet_losses"]))  # every step, 5 at a time


def test_empty_data_folder_fails_before_training(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    result = run_training(
        "--train_data_dir", tmp_path / "empty", "--resolution", 32, *TINY, "--output_dir", tmp_path / "out", timeout=120
    )
    assert result.returncode != 0
    assert "ValueError: `--train_data_dir`: no images" in result.stderr
    assert "Steps" not in result.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ in-process checks
def _load_script():
    return load_example("train_base_model")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "36"], "`--resolution` must be a positive multiple of 8, but got 36"),
        (["--resolution", "40"], r"`--resolution` must be a multiple of 16 \(the VAE downsamples by 8, the UNet by 2"),
        (["--vae_train_steps", "0"], "`--vae_train_steps` must be positive when building a new base model"),
        (["--skip_vae_training"], "`--skip_vae_training` keeps a pretrained VAE: it needs `--pretrained_model_name_or_path`"),
        (["--unet_block_out_channels", "10", "32"], r"`--unet_block_out_channels` must be positive multiples of 4, but got \[10, 32\]"),
        (["--train_batch_size", "0"], "`--train_batch_size` must be a positive integer, but got 0"),
        (["--dataset_placement", "gpu"], "`--dataset_placement` must be one of auto, device, stream, but got 'gpu'"),
        (["--logging_steps", "0"], "`--logging_steps` must be a positive integer, but got 0"),
        (["--torch_compile_mode", "reduce-overhead"], "`--torch_compile_mode reduce-overhead` needs `--torch_compile`"),
        (["--torch_compile", "--torch_compile_mode", "fast"],
         "`--torch_compile_mode` must be one of default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs, "
         "but got 'fast'"),
    ],
)
def test_bad_arguments_raise_at_parse_time(tmp_path, extra, message):
    module = _load_script()
    args = ["--train_data_dir", str(tmp_path), *[str(value) for value in TINY], "--resolution", "32", *extra]
    with pytest.raises(ValueError, match=message):
        module.parse_args(args)


def test_no_data_source_raises():
    module = _load_script()
    with pytest.raises(ValueError, match="Training needs images: specify `--train_data_dir`"):
        module.parse_args(["--resolution", "32"])


def test_builders_validate_sizes_and_match_stable_diffusion_layout():
    vae = build_vae((8, 16, 16, 16), norm_num_groups=4)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8 and vae.config.latent_channels == 4
    unet = build_unet((16, 32, 32), cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    assert unet.config.down_block_types == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    with pytest.raises(ValueError, match=r"`vae_block_out_channels` must be multiples of 8 .*got \[12, 16\]"):
        build_vae((12, 16))
    with pytest.raises(ValueError, match="`unet_block_out_channels` must have at least 2 levels"):
        build_unet((16,), norm_num_groups=4, attention_head_dim=4)


def test_dataset_name_records_with_captions(tmp_path):
    """`--dataset_name` (here a local image folder with a metadata.csv) gives records with captions."""
    folder = tmp_path / "hf"
    folder.mkdir()
    rows = ["file_name,text"]
    for index in range(3):
        PIL.Image.fromarray(np.full((24, 40, 3), 40 * index, dtype=np.uint8)).save(folder / f"{index}.png")
        rows.append(f"{index}.png,scan {index}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    module = _load_script()
    args = module.parse_args(
        ["--dataset_name", str(folder), "--caption_column", "text", "--resolution", "16", *[str(v) for v in TINY],
         "--cache_dir", str(tmp_path / "cache")]
    )
    records = module.make_records(args)
    assert len(records) == 3 and sorted(record["caption"] for record in records) == ["scan 0", "scan 1", "scan 2"]
    tokenizer = build_tokenizer(tmp_path / "tokenizer", model_max_length=16)
    item = BaseModelTrainingDataset(records, 16, tokenizer, seed=0)[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["input_ids"].shape == (16,)
    assert tokenizer.decode(item["input_ids"], skip_special_tokens=True).replace(" ", "") == records[0]["caption"].replace(" ", "")

    bad = module.parse_args(["--dataset_name", str(folder), "--caption_column", "caption", "--resolution", "16",
                             *[str(v) for v in TINY], "--cache_dir", str(tmp_path / "cache")])
    with pytest.raises(ValueError, match="`--caption_column` value 'caption' not found"):
        module.make_records(bad)
