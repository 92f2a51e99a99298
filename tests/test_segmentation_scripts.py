"""The segmentation example scripts, run through `accelerate launch` at tiny scale on data written to tmp_path."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from example_scripts import load_example


REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
TINY_MODEL = [
    "--architecture", "unet", "--encoder_name", "tu-mobilenetv3_small_050", "--encoder_depth", "3",
    "--decoder_channels", "16", "8", "8", "--resolution", "32",
]


def scene(rng, height=32, width=40):
    """Dark background (0), red box (1), green box (2); labels follow the colours exactly."""
    image = np.full((height, width, 3), 20, np.uint8)
    label = np.zeros((height, width), np.uint8)
    for cls, colour in ((1, (200, 30, 30)), (2, (30, 200, 30))):
        h, w = rng.integers(6, 14, size=2)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        image[y : y + h, x : x + w] = colour
        label[y : y + h, x : x + w] = cls
    label[0, :3] = 255  # a few void pixels
    return image, label


def write_folder(root, n, seed, labels=True):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    if labels:
        (root / "labels").mkdir()
    for i in range(n):
        image, label = scene(rng)
        Image.fromarray(image).save(root / "images" / f"s{i:02d}.png")
        if labels:
            Image.fromarray(label).save(root / "labels" / f"s{i:02d}.png")
    return root


def write_synthetic_dataset(path, n, seed, bad_value=None):
    import datasets

    rng = np.random.default_rng(seed)
    rows = {"image": [], "label": []}
    for _ in range(n):
        image, label = scene(rng)
        if bad_value is not None:
            label[5, 5] = bad_value
        rows["image"].append(Image.fromarray(image))
        rows["label"].append(Image.fromarray(label))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return path


def accelerate_launch(script, args, num_processes=1):
    launcher = Path(sys.executable).parent / "accelerate"
    launcher = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    if launcher[0] != sys.executable:
        launcher += ["launch"]
    command = launcher + [
        "--num_processes", str(num_processes), "--num_machines", "1", "--cpu", "--mixed_precision", "no",
        "--dynamo_backend", "no", str(EXAMPLES / script),
    ] + [str(a) for a in args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("segdata")
    return {
        "train": write_folder(root / "train", 6, seed=0),
        "val": write_folder(root / "val", 3, seed=1),
        "target": write_folder(root / "target", 5, seed=2, labels=False),
        "synthetic": write_synthetic_dataset(root / "synthetic", 4, seed=3),
    }


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "flexseg"
    args = [
        "--train_data_dir", data["train"], "--synthetic_data_dir", data["synthetic"], "--synthetic_ratio", "0.5",
        "--validation_data_dir", data["val"], "--num_classes", "3", "--ignore_index", "255",
        "--class_names", "background", "red", "green",
        *TINY_MODEL, "--flexseg", "--dice_weight", "0.5", "--photometric_augmentation",
        "--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "2",
        "--learning_rate", "1e-3", "--seed", "0", "--report_to", "tensorboard", "--output_dir", output_dir,
    ]
    log = accelerate_launch("train_segmentation.py", args)
    return {"dir": output_dir, "args": args, "log": log}


def test_training_writes_model_checkpoints_card_and_logs(trained):
    out = trained["dir"]
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    assert not list(out.glob(".tmp-*"))
    card = (out / "README.md").read_text()
    assert "{{" not in card and "flexseg+photometric-augmentation+synthetic" in card
    assert "uncertainty boundary emphasis" in card and "hardness-aware sampling" in card
    metrics = json.loads((out / "validation_metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0 and [c["class"] for c in metrics["per_class"]] == ["background", "red", "green"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 3 and config["ignore_index"] == 255 and config["encoder_depth"] == 3


def test_training_resumes_from_latest_checkpoint(trained):
    args = list(trained["args"])
    args[args.index("--max_train_steps") + 1] = "6"
    log = accelerate_launch("train_segmentation.py", args + ["--resume_from_checkpoint", "latest"])
    assert f"Resuming from checkpoint {trained['dir'] / 'checkpoint-4'}" in log
    assert (trained["dir"] / "checkpoint-6").is_dir()
    # The prototype bank and sampler state were part of the checkpoint.
    assert (trained["dir"] / "checkpoint-4" / "custom_checkpoint_0.pkl").is_file()


def test_evaluate_writes_json_markdown_and_panels(trained, data, tmp_path):
    log = accelerate_launch(
        "evaluate_segmentation.py",
        ["--model", trained["dir"], "--data_dir", data["val"], "--resolution", "32", "--output_dir", tmp_path,
         "--save_visualizations", "2"],
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) >= {"mIoU", "mDice", "pixel_accuracy", "per_class"}
    assert f"mIoU {metrics['mIoU']:.4f}" in log
    assert "| class | IoU | Dice | pixels |" in (tmp_path / "metrics.md").read_text()
    panels = sorted((tmp_path / "visualizations").glob("*.png"))
    assert len(panels) == 2 and Image.open(panels[0]).size == (4 * 40, 32)
    # Labeled pixels counted = all non-void label pixels of the 3 validation images.
    expected = sum(int((np.asarray(Image.open(p)) != 255).sum()) for p in (data["val"] / "labels").glob("*.png"))
    assert metrics["labeled_pixels"] == expected


@pytest.mark.parametrize("estimator,num_processes", [("entropy", 2), ("mc_dropout", 1), ("ensemble", 1)])
def test_compute_uncertainty_writes_maps_and_scores(trained, data, tmp_path, estimator, num_processes):
    models = [trained["dir"]] * (2 if estimator == "ensemble" else 1)
    log = accelerate_launch(
        "compute_uncertainty.py",
        ["--model", *models, "--data_dir", data["target"], "--resolution", "32", "--estimator", estimator,
         "--num_passes", "3", "--batch_size", "2", "--output_dir", tmp_path],
        num_processes=num_processes,
    )
    with open(tmp_path / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [f"s{i:02d}" for i in range(5)]
    summary = json.loads((tmp_path / "scores.json").read_text())
    assert summary["num_images"] == 5 and summary["estimator"] == estimator
    assert f"{summary['mean_score']:.4f}" in log
    for row in rows:
        png = Image.open(tmp_path / "maps" / f"{row['name']}.png")
        array = np.asarray(png)
        assert array.dtype == np.uint16 and array.shape == (32, 40)
        # The per-image score is the mean of the stored map (up to 16-bit quantisation).
        assert float(row["score"]) == pytest.approx(array.mean() / 65535, abs=1e-4)
    if estimator == "ensemble":
        # Two copies of the same model never disagree: mutual information is zero everywhere.
        assert summary["mean_score"] < 1e-4
    if estimator == "entropy":
        from diffusers_uncertainty.segmentation import EntropyEstimator, SegmentationModel
        from diffusers_uncertainty.segmentation.data import image_to_tensor

        model = SegmentationModel.from_pretrained(trained["dir"])
        image = image_to_tensor(Image.open(data["target"] / "images" / "s00.png").convert("RGB"))[None]
        expected = EntropyEstimator(model)(image).maps[0].numpy()
        stored = np.asarray(Image.open(tmp_path / "maps" / "s00.png")) / 65535
        np.testing.assert_allclose(stored, expected, atol=2e-4)


def test_compute_uncertainty_matches_the_distribution_of_reference_maps(trained, data, tmp_path):
    flags = ["--model", trained["dir"], "--data_dir", data["target"], "--resolution", "32", "--batch_size", "2"]
    plain, same, matched = tmp_path / "plain", tmp_path / "same", tmp_path / "matched"
    accelerate_launch("compute_uncertainty.py", [*flags, "--output_dir", plain], num_processes=2)
    # Matched to its own maps, split over 2 processes (the histogram counts every process's images): unchanged.
    accelerate_launch("compute_uncertainty.py", [*flags, "--match_reference_dir", plain, "--output_dir", same],
                      num_processes=2)
    names = sorted(path.name for path in (plain / "maps").glob("*.png"))
    assert len(names) == 5
    for name in names:
        assert np.array_equal(np.asarray(Image.open(plain / "maps" / name)), np.asarray(Image.open(same / "maps" / name)))

    # Matched to lower reference maps: the reference's distribution, the order of the values kept.
    reference = tmp_path / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    reference_values = []
    for index in range(3):
        levels = (rng.beta(1.5, 8.0, size=(32, 40)) * 65535).astype(np.uint16)
        Image.fromarray(levels).save(reference / f"r{index}.png")
        reference_values.append(levels.ravel())
    reference_values = np.concatenate(reference_values) / 65535
    accelerate_launch("compute_uncertainty.py", [*flags, "--match_reference_dir", reference, "--output_dir", matched],
                      num_processes=2)
    before = np.concatenate([np.asarray(Image.open(plain / "maps" / name)).ravel() for name in names])
    after = np.concatenate([np.asarray(Image.open(matched / "maps" / name)).ravel() for name in names])
    assert (np.diff(after[np.argsort(before, kind="stable")].astype(np.int64)) >= 0).all()
    assert after.mean() / 65535 == pytest.approx(reference_values.mean(), abs=0.01)
    assert abs(before.mean() / 65535 - reference_values.mean()) > 0.1
    summary = json.loads((matched / "scores.json").read_text())
    assert summary["match_reference_dir"] == str(reference)
    for name in names:  # the scores are the means of the stored (matched) maps
        stored = np.asarray(Image.open(matched / "maps" / name)).mean() / 65535
        assert summary["scores"][name[:-4]] == pytest.approx(stored, abs=1e-9)


def test_compute_uncertainty_checks_the_reference_before_any_work(trained, data, tmp_path):
    script = load_example("compute_uncertainty")
    flags = ["--model", str(trained["dir"]), "--data_dir", str(data["target"]), "--resolution", "32",
             "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=rf"`--match_reference_dir` must be a folder of uncertainty maps, but "
                                         rf"{tmp_path / 'missing'} does not exist"):
        script.parse_args([*flags, "--match_reference_dir", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    args = script.parse_args([*flags, "--match_reference_dir", str(tmp_path / "empty")])
    with pytest.raises(ValueError, match=r"`--match_reference_dir` must be a folder of 16-bit PNG uncertainty maps"):
        script.main(args)
    assert not (tmp_path / "out").exists()


def _load_train_script():
    return load_example("train_segmentation")


def test_training_stops_on_bad_input_before_training(data, tmp_path):
    train = _load_train_script()
    base = ["--num_classes", "3", "--ignore_index", "255", *TINY_MODEL, "--report_to", "none",
            "--max_train_steps", "1", "--output_dir", str(tmp_path / "out")]
    bad_labels = tmp_path / "bad"
    shutil.copytree(data["train"], bad_labels)
    label = np.asarray(Image.open(bad_labels / "labels" / "s03.png")).copy()
    label[1, 1] = 3
    Image.fromarray(label).save(bad_labels / "labels" / "s03.png")
    with pytest.raises(ValueError, match=r"Label map of .*labels/s03\.png has values \[3\] outside the allowed \[0, 3\)"):
        train.main(train.parse_args(["--train_data_dir", str(bad_labels), *base]))

    bad_synthetic = write_synthetic_dataset(tmp_path / "badsyn", 2, seed=0, bad_value=9)
    with pytest.raises(ValueError, match=r"Label map of --synthetic_data_dir .*\[0\] has values \[9\]"):
        train.main(train.parse_args(["--train_data_dir", str(data["train"]), "--synthetic_data_dir",
                                     str(bad_synthetic), *base]))

    mismatched = tmp_path / "mismatch"
    shutil.copytree(data["train"], mismatched)
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(mismatched / "labels" / "s01.png")
    with pytest.raises(ValueError, match=r"The label map of .*images/s01\.png has size 40x30 \(WxH\), but the image has size"):
        train.main(train.parse_args(["--train_data_dir", str(mismatched), *base]))

    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "labels").mkdir()
    with pytest.raises(ValueError, match=r"`--train_data_dir .*empty`: no images .* found in"):
        train.main(train.parse_args(["--train_data_dir", str(tmp_path / "empty"), *base]))

    with pytest.raises(ValueError, match="--synthetic_ratio"):
        train.parse_args(["--train_data_dir", str(data["train"]), "--synthetic_ratio", "0.5", *base])
    with pytest.raises(ValueError, match=r"Expected 3 class names \(`--num_classes`\), got 2 from `--class_names`\."):
        train.parse_args(["--train_data_dir", str(data["train"]), "--class_names", "a", "b", *base])
    classes_json = tmp_path / "classes.json"
    classes_json.write_text('{"classes": ["a", "b", "c", "d"]}')
    with pytest.raises(ValueError, match=r"Expected 3 class names \(`--num_classes`\), got 4 from `--classes_json` .*classes\.json\."):
        train.parse_args(["--train_data_dir", str(data["train"]), "--classes_json", str(classes_json), *base])
    assert not (tmp_path / "out").exists()  # nothing was trained or written


def test_two_process_flexseg_training_runs(data, tmp_path):
    # Hardness-aware sampling and the prototype bank are synchronised across processes (gather / reduce).
    out = tmp_path / "two"
    accelerate_launch(
        "train_segmentation.py",
        ["--train_data_dir", data["train"], "--synthetic_data_dir", data["synthetic"], "--synthetic_ratio", "0.5",
         "--num_classes", "3", "--ignore_index", "255", *TINY_MODEL, "--flexseg", "--train_batch_size", "2",
         "--max_train_steps", "2", "--checkpointing_steps", "2", "--seed", "0", "--report_to", "none",
         "--output_dir", out],
        num_processes=2,
    )
    assert (out / "diffusion_pytorch_model.safetensors").is_file() and (out / "checkpoint-2").is_dir()


def test_push_to_hub_uploads_model_and_card(data, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class Repo:
        repo_id = "someone/tiny-segmenter"

    def fake_create_repo(repo_id, exist_ok, token):
        calls["create"] = repo_id
        return Repo()

    def fake_upload_folder(repo_id, folder_path, commit_message, ignore_patterns, token):
        calls["upload"] = (repo_id, sorted(os.listdir(folder_path)), ignore_patterns)

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    train = _load_train_script()
    out = tmp_path / "hub"
    train.main(train.parse_args([
        "--train_data_dir", str(data["train"]), "--num_classes", "3", "--ignore_index", "255", *TINY_MODEL,
        "--train_batch_size", "2", "--max_train_steps", "1", "--report_to", "none", "--output_dir", str(out),
        "--push_to_hub", "--hub_model_id", "tiny-segmenter",
    ]))
    assert calls["create"] == "tiny-segmenter"
    repo_id, files, ignore = calls["upload"]
    assert repo_id == "someone/tiny-segmenter"
    assert {"README.md", "config.json", "diffusion_pytorch_model.safetensors"} <= set(files)
    assert "checkpoint-*" in ignore
    card = (out / "README.md").read_text()
    assert 'load_segmenter("someone/tiny-segmenter")' in card and "source-only" in card


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """The tiny offline diffusers base (`build_tiny_pipeline`), saved as a pipeline folder."""
    from diffusers_uncertainty.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny_base")
    build_tiny_pipeline(str(folder))
    return folder


def test_latent_diffusion_segmenter_with_adversarial_alignment_trains_resumes_and_serves(data, tiny_base, tmp_path):
    out = tmp_path / "iccld"
    args = [
        "--model", "latent_diffusion", "--base_model_name_or_path", tiny_base, "--feature_timestep", "10",
        "--decoder_channels", "16", "--adversarial_weight", "0.5", "--unlabeled_data_dir", data["target"],
        "--train_data_dir", data["train"], "--validation_data_dir", data["val"], "--num_classes", "3",
        "--ignore_index", "255", "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2",
        "--checkpointing_steps", "2", "--validation_steps", "2", "--seed", "0", "--report_to", "none",
        "--output_dir", out,
    ]
    log = accelerate_launch("train_segmentation.py", args)
    assert "disc_acc=" in log and "Adversarial alignment on 5 unlabeled images" in log
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "LatentDiffusionSegmenter" and config["base_model_name_or_path"] == str(tiny_base)
    from safetensors.torch import load_file

    weights = load_file(out / "diffusion_pytorch_model.safetensors")
    # Only the segmenter's own weights: no frozen VAE/UNet, no discriminator.
    assert weights and not any(k.startswith(("vae.", "unet.", "net.")) for k in weights)
    assert sum(v.numel() for v in weights.values()) < 100_000
    # The discriminator and its optimizer are part of the training state ...
    assert (out / "checkpoint-2" / "model_1.safetensors").is_file() and (out / "checkpoint-2" / "optimizer_1.bin").is_file()
    assert (out / "checkpoint-2" / "scheduler_1.bin").is_file()
    card = (out / "README.md").read_text()
    assert "{{" not in card and "domain-adversarial alignment" in card and "source-only" not in card
    # ... and training resumes from it.
    args[args.index("--max_train_steps") + 1] = "3"
    log = accelerate_launch("train_segmentation.py", args + ["--resume_from_checkpoint", "latest"])
    assert f"Resuming from checkpoint {out / 'checkpoint-2'}" in log

    # Evaluation and uncertainty maps load it through the same loader as the smp segmenters.
    accelerate_launch("evaluate_segmentation.py", ["--model", out, "--data_dir", data["val"], "--resolution", "32",
                                                   "--output_dir", tmp_path / "eval"])
    assert 0.0 <= json.loads((tmp_path / "eval" / "metrics.json").read_text())["mIoU"] <= 1.0
    accelerate_launch("compute_uncertainty.py", ["--model", out, "--data_dir", data["target"], "--resolution", "32",
                                                 "--estimator", "mc_dropout", "--num_passes", "2",
                                                 "--output_dir", tmp_path / "unc"])
    assert json.loads((tmp_path / "unc" / "scores.json").read_text())["num_images"] == 5


def test_latent_diffusion_flag_combinations_fail_before_any_work(data, tiny_base, tmp_path):
    train = _load_train_script()
    common = ["--train_data_dir", str(data["train"]), "--num_classes", "3", "--resolution", "32",
              "--report_to", "none", "--output_dir", str(tmp_path / "out")]
    latent = ["--model", "latent_diffusion", "--base_model_name_or_path", str(tiny_base)]
    with pytest.raises(ValueError, match="`--model latent_diffusion` needs `--base_model_name_or_path`"):
        train.parse_args(common + ["--model", "latent_diffusion"])
    with pytest.raises(ValueError, match="`--adversarial_weight` is only used with `--model latent_diffusion`"):
        train.parse_args(common + ["--adversarial_weight", "0.1"])
    with pytest.raises(ValueError, match="`--adversarial_weight` 0.1 needs `--unlabeled_data_dir`"):
        train.parse_args(common + latent + ["--adversarial_weight", "0.1"])
    with pytest.raises(ValueError, match="`--unlabeled_data_dir` is only read for adversarial alignment"):
        train.parse_args(common + latent + ["--unlabeled_data_dir", str(data["target"])])
    with pytest.raises(ValueError, match="`--decoder_channels` takes one value"):
        train.parse_args(common + latent + ["--decoder_channels", "16", "8"])
    with pytest.raises(ValueError, match="`--encoder_weights` is for `--model smp`"):
        train.parse_args(common + latent + ["--encoder_weights", "imagenet"])
    with pytest.raises(ValueError, match=r"`--unlabeled_data_dir`: expected a folder"):
        train.main(train.parse_args(common + latent + ["--adversarial_weight", "0.1", "--unlabeled_data_dir",
                                                       str(tmp_path / "missing")]))
    assert not (tmp_path / "out").exists()  # nothing written



def test_compiled_training_saves_a_plain_model_with_the_validation_metrics_it_reported(data, tmp_path):
    """`--torch_compile` compiles the segmenter in place (inductor on the CPU here): the saved model has the eager
    model's keys and reloads to the metrics the compiled run reported (validation and evaluate_segmentation.py pad
    inputs to the same network stride)."""
    output_dir = tmp_path / "compiled"
    accelerate_launch("train_segmentation.py", [
        "--train_data_dir", data["train"], "--validation_data_dir", data["val"], "--num_classes", "3",
        "--ignore_index", "255", *TINY_MODEL, "--train_batch_size", "2", "--max_train_steps", "3",
        "--validation_steps", "3", "--checkpointing_steps", "100", "--seed", "0", "--report_to", "none",
        "--dataset_placement", "device", "--torch_compile", "--output_dir", output_dir,
    ])
    reported = json.loads((output_dir / "validation_metrics.json").read_text())
    from safetensors.torch import load_file

    assert not [key for key in load_file(output_dir / "diffusion_pytorch_model.safetensors") if "_orig_mod" in key]
    accelerate_launch("evaluate_segmentation.py", ["--model", output_dir, "--data_dir", data["val"],
                                                   "--resolution", "32", "--output_dir", tmp_path / "eval"])
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert abs(evaluated["mIoU"] - reported["mIoU"]) < 1e-4
