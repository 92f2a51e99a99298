"""End-to-end tests of examples/train_uncertainty_controlnet.py, run as a user runs it: `accelerate launch` in a
subprocess, on a tiny offline base pipeline and tiny data (synthetic, plus a few real CamVid images when the shared
data folder is present)."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from diffusers_uncertainty import StableDiffusionDualControlPipeline, UncertaintyControlNetModel, build_tiny_pipeline
from example_scripts import load_example


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_uncertainty_controlnet.py"
CAMVID = Path(__file__).parents[2] / "shared" / "data" / "camvid_daydusk"
NUM_CLASSES = 4
IGNORE_INDEX = 255


# --------------------------------------------------------------------------------------------- fixtures
def _write_synthetic(folder: Path, count: int, labeled: bool, seed: int, size=(40, 32)) -> list[str]:
    """Random images (and integer label PNGs with some ignore_index pixels) named sample_{i}.png."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    if labeled:
        (folder / "labels").mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        name = f"{folder.name}_{index}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / "images" / name)
        if labeled:
            label = rng.integers(0, NUM_CLASSES, (size[1], size[0]), dtype=np.uint8)
            label[:2] = IGNORE_INDEX
            PIL.Image.fromarray(label).save(folder / "labels" / name)
        names.append(name)
    return names


def _write_maps(names, uncertainty_dir: Path, seed: int, size=(40, 32)):
    """Uncertainty maps for `names`: alternately float .npy and 16-bit PNG."""
    rng = np.random.default_rng(seed)
    uncertainty_dir.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        values = rng.random((size[1], size[0]), dtype=np.float32)
        stem = Path(name).stem
        if index % 2 == 0:
            np.save(uncertainty_dir / f"{stem}.npy", values)
        else:
            PIL.Image.fromarray((values * 65535).astype(np.uint16)).save(uncertainty_dir / f"{stem}.png")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny base pipeline, 4 labeled + 4 unlabeled synthetic samples with uncertainty maps, a validation label,
    and a saved shared-trunk controlnet."""
    root = tmp_path_factory.mktemp("train_controlnet")
    build_tiny_pipeline(root / "base", num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX)
    build_tiny_pipeline(num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX, shared_trunk=True).controlnet.save_pretrained(
        root / "shared_controlnet"
    )
    labeled = _write_synthetic(root / "labeled", 4, labeled=True, seed=0)
    unlabeled = _write_synthetic(root / "unlabeled", 4, labeled=False, seed=1)
    _write_maps(labeled + unlabeled, root / "maps", seed=2)
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_training(*script_args, num_processes: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    """`accelerate launch` the script on CPU in fp32, as a user would.

    Several processes on a CPU-only machine: accelerate's torchrun launcher (`--multi_gpu`) with
    `ACCELERATE_USE_CPU=true`, which gives `DistributedType.MULTI_CPU` with the gloo backend (`--cpu` alone starts
    one process unless MPI is set up).
    """
    distributed = ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *distributed,
        "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(SCRIPT), *[str(arg) for arg in script_args],
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1" if num_processes > 1 else "2")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _base_args(workspace: Path, output_dir: Path, *extra) -> list:
    return [
        "--pretrained_model_name_or_path", workspace / "base",
        "--num_classes", NUM_CLASSES, "--ignore_index", IGNORE_INDEX,
        "--resolution", 16, "--train_batch_size", 2, "--learning_rate", 1e-3, "--lr_warmup_steps", 0,
        "--seed", 0, "--output_dir", output_dir, *extra,
    ]


def _assert_ok(result: subprocess.CompletedProcess):
    assert result.returncode == 0, f"training failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def _weights(folder: Path) -> dict:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def _changed(before: dict, after: dict, prefix: str) -> tuple[int, int]:
    """(number of tensors under `prefix` that changed, number of tensors under `prefix`)."""
    keys = [key for key in before if key.startswith(prefix)]
    return sum(not torch.equal(before[key], after[key]) for key in keys), len(keys)


# ------------------------------------------------------------------------------------------------- tests
def test_semantic_branch_trains_only_semantic_weights_and_output_loads_into_the_pipeline(workspace, tmp_path):
    output_dir = tmp_path / "out"
    result = run_training(
        *_base_args(
            workspace, output_dir,
            "--train_branch", "semantic", "--train_data_dir", workspace / "labeled",
            "--controlnet_model_name_or_path", workspace / "base" / "controlnet", "--max_train_steps", 2,
            "--random_flip",
        )
    )
    _assert_ok(result)
    before, after = _weights(workspace / "base" / "controlnet"), _weights(output_dir)
    changed, total = _changed(before, after, "semantic_controlnet.")
    assert changed > total // 2, f"only {changed} of {total} semantic tensors changed"
    changed, total = _changed(before, after, "uncertainty_controlnet.")
    assert total > 0 and changed == 0, f"{changed} uncertainty tensors changed in semantic mode"

    controlnet = UncertaintyControlNetModel.from_pretrained(output_dir)
    assert controlnet.config.semantic_channels == NUM_CLASSES and controlnet.config.ignore_index == IGNORE_INDEX
    pipeline = StableDiffusionDualControlPipeline.from_pretrained(workspace / "base", controlnet=controlnet)
    pipeline.set_progress_bar_config(disable=True)
    label = np.array(PIL.Image.open(workspace / "labeled" / "labels" / "labeled_0.png"))
    output = pipeline(
        "a scene", semantic_map=label, uncertainty_map=0.5, height=16, width=16, num_inference_steps=2,
        generator=torch.Generator().manual_seed(0), output_type="np",
    )
    assert output.images.shape == (1, 16, 16, 3) and np.isfinite(output.images).all()
    assert output.semantic_maps.shape == (1, 16, 16)


def test_uncertainty_branch_from_scratch_uses_labeled_and_unlabeled_images(workspace, tmp_path):
    output_dir = tmp_path / "out"
    result = run_training(
        *_base_args(
            workspace, output_dir,
            "--train_branch", "uncertainty", "--train_data_dir", workspace / "labeled",
            "--unlabeled_data_dir", workspace / "unlabeled", "--uncertainty_dir", workspace / "maps",
            "--max_train_steps", 2, "--validation_uncertainty_levels", 0.0, 1.0, "--validation_steps", 2,
            "--num_validation_inference_steps", 2,
        )
    )
    _assert_ok(result)
    assert "Num examples = 8 (4 labeled, 4 unlabeled; label maps not used)" in result.stderr
    weights = _weights(output_dir)
    # diffusers zero-initialises the output ("zero") convolutions: only the trained branch's moved away from 0.
    trained = [key for key in weights if key.startswith("uncertainty_controlnet.controlnet_down_blocks")]
    untrained = [key for key in weights if key.startswith("semantic_controlnet.controlnet_down_blocks")]
    assert trained and all(weights[key].abs().max() > 0 for key in trained if key.endswith("weight"))
    assert untrained and all(weights[key].abs().max() == 0 for key in untrained)
    # Validation grid: one row (no label), one column per uncertainty level.
    grid = PIL.Image.open(output_dir / "validation" / "step-2.png")
    assert grid.size == (2 * 16, 16)


def test_joint_shared_trunk_trains_trunk_and_both_embeddings(workspace, tmp_path):
    output_dir = tmp_path / "out"
    result = run_training(
        *_base_args(
            workspace, output_dir,
            "--train_branch", "joint", "--shared_trunk", "--train_data_dir", workspace / "labeled",
            "--unlabeled_data_dir", workspace / "unlabeled", "--uncertainty_dir", workspace / "maps",
            "--labeled_fraction", 0.5, "--controlnet_model_name_or_path", workspace / "shared_controlnet",
            "--max_train_steps", 3, "--gradient_checkpointing", "--snr_gamma", 5.0,
        )
    )
    _assert_ok(result)
    before, after = _weights(workspace / "shared_controlnet"), _weights(output_dir)
    for prefix in ("trunk.", "semantic_embedding.", "uncertainty_embedding."):
        changed, total = _changed(before, after, prefix)
        assert total > 0 and changed > 0, f"no {prefix} tensor changed in joint mode"
    assert UncertaintyControlNetModel.from_pretrained(output_dir).config.shared_trunk


def test_checkpoints_are_pruned_and_resume_latest_continues_from_the_right_step(workspace, tmp_path):
    output_dir = tmp_path / "out"
    common = _base_args(
        workspace, output_dir,
        "--train_branch", "semantic", "--train_data_dir", workspace / "labeled",
        "--checkpointing_steps", 1, "--checkpoints_total_limit", 1,
    )
    first = run_training(*common, "--max_train_steps", 3)
    _assert_ok(first)
    checkpoints = sorted(path.name for path in output_dir.iterdir() if path.name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-3"], checkpoints  # checkpoint-1 and -2 pruned by the limit
    assert (output_dir / "checkpoint-3" / "controlnet" / "config.json").is_file()
    assert not any(path.name.startswith(".") for path in output_dir.iterdir())  # no staging folders left
    step3 = _weights(output_dir / "checkpoint-3" / "controlnet")

    second = run_training(*common, "--max_train_steps", 4, "--resume_from_checkpoint", "latest")
    _assert_ok(second)
    output = second.stdout + second.stderr
    assert f"Resuming from checkpoint {output_dir / 'checkpoint-3'}" in output
    assert "Loaded the controlnet weights of" in output and "All optimizer states loaded successfully" in output
    # Exactly step 4 was run after resuming (2 steps per epoch: the seen batch of epoch 2 is skipped).
    saved = [line.rsplit("/", 1)[-1] for line in output.splitlines() if "Saved state to" in line]
    assert saved == ["checkpoint-4"], saved
    assert "global step 4" in output
    checkpoints = sorted(path.name for path in output_dir.iterdir() if path.name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-4"], checkpoints
    # Step 4 continued from the step-3 weights: the zero convolutions (0 at initialisation) moved one step away from
    # them, not three steps back towards 0 as a fresh start would.
    step4 = _weights(output_dir / "checkpoint-4" / "controlnet")
    keys = [key for key in step3 if "controlnet_down_blocks" in key or "controlnet_mid_block" in key]
    distance = sum(float((step4[key] - step3[key]).norm() ** 2) for key in keys) ** 0.5
    travelled = sum(float(step3[key].norm() ** 2) for key in keys) ** 0.5
    assert travelled > 0 and distance < 0.5 * travelled, (distance, travelled)


def test_device_placement_resumes_mixed_batches_exactly_and_stream_placement_still_trains(workspace, tmp_path):
    """Joint mode (mixed labeled/unlabeled batches, flips) on the latent cache: 4 steps straight, and 2 + 2 resumed
    from checkpoint-2, end with the same weights (cached batches depend on the seed and the step only; the noise comes
    from the restored RNG states). The DataLoader path (`stream`) trains too; both write their throughput."""
    common = [
        "--train_branch", "joint", "--train_data_dir", workspace / "labeled", "--unlabeled_data_dir",
        workspace / "unlabeled", "--uncertainty_dir", workspace / "maps", "--labeled_fraction", 0.5, "--random_flip",
        "--max_train_steps", 4, "--checkpointing_steps", 2, "--logging_steps", 3,
    ]
    straight = tmp_path / "straight"
    result = run_training(*_base_args(workspace, straight, *common, "--dataset_placement", "device"))
    _assert_ok(result)
    assert "Dataset placement = device (--dataset_placement device" in result.stderr
    assert "Latent cache = " in result.stderr and "Num batches each epoch = 4" in result.stderr
    throughput = (straight / "throughput.json").read_text()
    assert '"dataset_placement": "device"' in throughput and '"stage": "controlnet"' in throughput

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    result = run_training(
        *_base_args(workspace, resumed, *common, "--dataset_placement", "device", "--resume_from_checkpoint", "latest")
    )
    _assert_ok(result)
    expected, got = _weights(straight), _weights(resumed)
    assert all(torch.allclose(expected[key], got[key], atol=1e-6) for key in expected)
    changed, total = _changed(_weights(straight / "checkpoint-2" / "controlnet"), expected, "semantic_controlnet.")
    assert changed > 0  # steps 3-4 did train

    stream = tmp_path / "stream"
    result = run_training(*_base_args(workspace, stream, *common[:-6], "--max_train_steps", 2, "--dataset_placement",
                                      "stream"))
    _assert_ok(result)
    assert "Dataset placement = stream" in result.stderr and "Latent cache = " not in result.stderr
    assert '"dataset_placement": "stream"' in (stream / "throughput.json").read_text()


def test_two_process_cpu_run(workspace, tmp_path):
    output_dir = tmp_path / "out"
    result = run_training(
        *_base_args(
            workspace, output_dir,
            "--train_branch", "joint", "--train_data_dir", workspace / "labeled",
            "--unlabeled_data_dir", workspace / "unlabeled", "--uncertainty_dir", workspace / "maps",
            "--max_train_steps", 2, "--train_batch_size", 1,
        ),
        num_processes=2,
    )
    _assert_ok(result)
    assert "DistributedType.MULTI_CPU" in result.stderr and "Num processes: 2" in result.stderr
    assert "Total train batch size (w. parallel, distributed & accumulation) = 2" in result.stderr
    assert (output_dir / "config.json").is_file()
    UncertaintyControlNetModel.from_pretrained(output_dir)


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("label_out_of_range", "has values [7] outside the allowed [0, 4) or --ignore_index 255"),
        ("missing_uncertainty_map", "Missing uncertainty map for image"),
        ("resolution", "`--resolution` must be a positive multiple of 8"),
    ],
)
def test_bad_data_stops_before_any_training_step(workspace, tmp_path, problem, expected):
    data = tmp_path / "data"
    names = _write_synthetic(data, 2, labeled=True, seed=3)
    _write_maps(names, tmp_path / "maps", seed=4)
    resolution = 16
    if problem == "label_out_of_range":
        label = np.array(PIL.Image.open(data / "labels" / names[1]))
        label[5, 5] = 7
        PIL.Image.fromarray(label).save(data / "labels" / names[1])
        expected_file = str(data / "labels" / names[1])
    elif problem == "missing_uncertainty_map":
        missing = next((tmp_path / "maps").glob(Path(names[1]).stem + ".*"))
        missing.unlink()
        expected_file = str(data / "images" / names[1])
    else:
        resolution = 20
        expected_file = None
    output_dir = tmp_path / "out"
    args = _base_args(
        workspace, output_dir,
        "--train_branch", "joint", "--labeled_fraction", 1, "--train_data_dir", data,
        "--uncertainty_dir", tmp_path / "maps", "--max_train_steps", 1,
    )
    args[args.index("--resolution") + 1] = resolution
    result = run_training(*args)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-3000:]
    if expected_file is not None:
        assert expected_file in result.stderr
    assert "Running training" not in result.stderr
    assert not (output_dir / "config.json").exists()


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"CamVid day/dusk data not found at {CAMVID}")
def test_joint_training_on_camvid_day_to_dusk_logs_a_validation_grid(workspace, tmp_path):
    # A few real images: day (labeled source) and dusk (unlabeled target), linked, never copied into the repo.
    labeled, unlabeled = tmp_path / "day", tmp_path / "dusk" / "images"
    (labeled / "images").mkdir(parents=True)
    (labeled / "labels").mkdir()
    unlabeled.mkdir(parents=True)
    day = sorted((CAMVID / "source" / "train" / "images").iterdir())[:3]
    dusk = sorted((CAMVID / "target" / "train" / "images").iterdir())[:3]
    for image in day:
        (labeled / "images" / image.name).symlink_to(image)
        (labeled / "labels" / image.name).symlink_to(CAMVID / "source" / "train" / "labels" / image.name)
    for image in dusk:
        (unlabeled / image.name).symlink_to(image)
    # Certain day maps, uncertain dusk maps (the real ones come from the segmenter, step 2 of the workflow).
    maps = tmp_path / "maps"
    maps.mkdir()
    for image in day:
        np.save(maps / f"{image.stem}.npy", np.full((180, 240), 0.1, dtype=np.float32))
    for image in dusk:
        PIL.Image.fromarray(np.full((180, 240), 230, dtype=np.uint8)).save(maps / image.name)
    validation_label = sorted((CAMVID / "target" / "val" / "labels").iterdir())[0]

    build_tiny_pipeline(tmp_path / "base", num_classes=11, ignore_index=11)
    output_dir = tmp_path / "out"
    result = run_training(
        "--pretrained_model_name_or_path", tmp_path / "base", "--num_classes", 11, "--ignore_index", 11,
        "--train_branch", "joint", "--train_data_dir", labeled, "--unlabeled_data_dir", tmp_path / "dusk",
        "--uncertainty_dir", maps, "--resolution", 32, "--train_batch_size", 2, "--max_train_steps", 2,
        "--seed", 0, "--output_dir", output_dir, "--validation_label", validation_label,
        "--validation_uncertainty_levels", 0.0, 0.5, 1.0, "--validation_steps", 2,
        "--num_validation_inference_steps", 2, "--uncertainty_estimator", "entropy",
    )
    _assert_ok(result)
    # label map + one image per uncertainty level, one row
    assert PIL.Image.open(output_dir / "validation" / "step-2.png").size == (4 * 32, 32)
    events = list((output_dir / "logs").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file written"
    assert max(event.stat().st_size for event in events) > 1000  # scalars and the validation image


def test_push_to_hub_writes_the_card_and_uploads_the_output_folder(workspace, tmp_path, monkeypatch):
    script = load_example("train_uncertainty_controlnet")

    calls = {}

    class RepoUrl:
        repo_id = "someone/camvid-uncertainty-controlnet"

    def fake_create_repo(repo_id, exist_ok, token):
        calls["create_repo"] = dict(repo_id=repo_id, exist_ok=exist_ok, token=token)
        return RepoUrl()

    def fake_upload_folder(repo_id, folder_path, commit_message, token, ignore_patterns):
        calls["upload_folder"] = dict(repo_id=repo_id, ignore_patterns=ignore_patterns)
        calls["files"] = sorted(
            str(path.relative_to(folder_path)) for path in Path(folder_path).rglob("*") if path.is_file()
        )
        calls["card"] = (Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr(script, "create_repo", fake_create_repo)
    monkeypatch.setattr(script, "upload_folder", fake_upload_folder)
    output_dir = tmp_path / "out"
    args = script.parse_args(
        [
            str(arg)
            for arg in _base_args(
                workspace, output_dir,
                "--train_branch", "joint", "--train_data_dir", workspace / "labeled",
                "--unlabeled_data_dir", workspace / "unlabeled", "--uncertainty_dir", workspace / "maps",
                "--max_train_steps", 1, "--report_to", "tensorboard",
                "--validation_label", workspace / "labeled" / "labels" / "labeled_0.png",
                "--validation_uncertainty_levels", 0.0, 1.0, "--num_validation_inference_steps", 2,
                "--push_to_hub", "--hub_model_id", "someone/camvid-uncertainty-controlnet", "--hub_token", "hf_xxx",
                "--uncertainty_estimator", "entropy", "--class_names", "sky", "road", "car", "tree",
            )
        ]
    )
    script.main(args)

    assert calls["create_repo"] == dict(repo_id="someone/camvid-uncertainty-controlnet", exist_ok=True, token="hf_xxx")
    assert calls["upload_folder"]["repo_id"] == "someone/camvid-uncertainty-controlnet"
    assert "checkpoint-*" in calls["upload_folder"]["ignore_patterns"]
    assert {"README.md", "config.json", "diffusion_pytorch_model.safetensors", "validation.png"} <= set(calls["files"])
    card = calls["card"]
    assert f"base_model: {workspace / 'base'}" in card
    assert "semantic and uncertainty branches, jointly" in card and "--train_branch joint" in card
    assert "0: sky, 1: road, 2: car, 3: tree" in card and "`ignore_index` = 255" in card
    assert "Uncertainty estimator of the uncertainty maps: entropy" in card
    assert "labeled folder" in card and "(4 labeled, 4 unlabeled samples)" in card
    assert "1 steps, batch size 2" in card and "labeled fraction 0.5" in card
    assert "![validation grid](./validation.png)" in card
    assert 'UncertaintyControlNetModel.from_pretrained("someone/camvid-uncertainty-controlnet")' in card
    assert "$" not in card.replace("${", "")  # every placeholder filled
    assert "${" not in card
