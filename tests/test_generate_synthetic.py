"""`examples/generate_synthetic_dataset.py` and `diffusers_uncertainty.synthesis` at tiny scale.

The two `accelerate launch` runs (1 and 2 processes) are module fixtures shared by several tests; the other runs call
the script's `main` in-process (faster, same code path), with one torch thread like the launched runs, so that their
floating-point results are comparable.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_uncertainty import (
    StableDiffusionDualControlPipeline,
    UncertaintyControlNetModel,
    build_tiny_components,
    build_tiny_pipeline,
)
from diffusers_uncertainty.conditioning import prepare_semantic_map, prepare_uncertainty_map
from diffusers_uncertainty.synthesis import (
    plan_shards,
    plan_work_items,
    sample_seed,
    shard_columns,
    shard_filename,
    shards_for_process,
    write_shard,
)
from example_scripts import load_example


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "generate_synthetic_dataset.py"
IGNORE_INDEX = 255
NUM_LABELS, SAMPLES_PER_LABEL, BATCH_SIZE = 3, 3, 2  # 9 samples, 5 shards (the last one has 1 sample)


def load_script():
    return load_example("generate_synthetic_dataset")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthesis")
    build_tiny_pipeline(root / "pipeline", num_classes=4, ignore_index=IGNORE_INDEX)
    rng = np.random.default_rng(0)
    (root / "labels").mkdir()
    for index in range(NUM_LABELS):
        label = rng.integers(0, 4, size=(12, 20)).astype(np.uint8)  # not the output size: resized with nearest
        label[:2, :3] = IGNORE_INDEX
        PIL.Image.fromarray(label).save(root / "labels" / f"frame_{index}.png")
    (root / "bank").mkdir()
    np.save(root / "bank" / "a.npy", rng.uniform(0.0, 0.5, size=(10, 10)).astype(np.float32))
    PIL.Image.fromarray((rng.uniform(0.0, 0.5, size=(24, 24)) * 65535).astype(np.uint16)).save(root / "bank" / "b.png")
    PIL.Image.fromarray((rng.uniform(0.0, 0.5, size=(16, 16)) * 255).astype(np.uint8)).save(root / "bank" / "c.png")
    (root / "empty").mkdir()
    return root


def base_args(workspace, output_dir, *extra):
    return [
        str(arg)
        for arg in (
            "--pretrained_model_name_or_path", workspace / "pipeline",
            "--label_dir", workspace / "labels",
            "--uncertainty_bank", workspace / "bank",
            "--samples_per_label", SAMPLES_PER_LABEL,
            "--num_inference_steps", 2,
            "--guidance_scale", 2.0,
            "--prompt", "dusk road",
            "--resolution", 16,
            "--seed", 7,
            "--batch_size", BATCH_SIZE,
            "--output_dir", output_dir,
            *extra,
        )
    ]


def accelerate_launch(args, num_processes):
    launcher = Path(sys.executable).parent / "accelerate"
    launcher = [str(launcher), "launch"] if launcher.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    command = launcher + [
        "--num_processes", str(num_processes), "--num_machines", "1", "--cpu", "--mixed_precision", "no",
        "--dynamo_backend", "no", str(SCRIPT), *args,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"generate_synthetic_dataset.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def one_process(workspace):
    output_dir = workspace / "one_process"
    log = accelerate_launch(base_args(workspace, output_dir), num_processes=1)
    return {"dir": output_dir, "log": log}


@pytest.fixture(scope="module")
def two_processes(workspace):
    output_dir = workspace / "two_processes"
    log = accelerate_launch(base_args(workspace, output_dir), num_processes=2)
    return {"dir": output_dir, "log": log}


def rows_by_key(dataset):
    """{(source_label_id, sample_index): row with images as arrays}."""
    rows = {}
    for row in dataset:
        key = (row["source_label_id"], row["sample_index"])
        assert key not in rows, f"duplicate sample {key}"
        rows[key] = {
            **row,
            "image": np.asarray(row["image"]),
            "label": np.asarray(row["label"]),
            "uncertainty": np.asarray(row["uncertainty"]),
        }
    return rows


ALL_KEYS = {(label_id, index) for label_id in range(NUM_LABELS) for index in range(SAMPLES_PER_LABEL)}


# ------------------------------------------------------------------------------------------------ planning
def test_shards_are_split_over_processes_without_duplicates_or_gaps():
    items = plan_work_items(num_labels=5, samples_per_label=3, seed=0)
    shards = plan_shards(items, batch_size=4)
    assert [len(shard) for shard in shards] == [4, 4, 4, 3]
    assert [item for shard in shards for item in shard] == items
    for pending in (list(range(4)), [1, 3], [2]):
        for num_processes in (1, 2, 3, 5):
            assigned = [shards_for_process(pending, rank, num_processes) for rank in range(num_processes)]
            flat = [index for part in assigned for index in part]
            assert sorted(flat) == pending and len(set(flat)) == len(flat)
    seeds = [item.seed for item in items]
    assert len(set(seeds)) == len(seeds)
    assert sample_seed(0, 2, 1) == sample_seed(0, 2, 1) != sample_seed(1, 2, 1)
    assert shard_filename(3, 12) == "shard-00003-of-00012.parquet"


def test_write_shard_never_leaves_a_half_written_shard(tmp_path, monkeypatch):
    def failing_to_parquet(self, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "to_parquet", failing_to_parquet)
    path = tmp_path / shard_filename(0, 1)
    items = plan_work_items(num_labels=1, samples_per_label=1, seed=0)
    columns = shard_columns(
        items,
        [PIL.Image.new("RGB", (8, 8))],
        np.zeros((1, 8, 8), dtype=np.int64),
        np.zeros((1, 8, 8), dtype=np.uint16),
        ["level:0.0"],
        ["x.png"],
        dict(prompt="", num_inference_steps=1, guidance_scale=1.0, semantic_conditioning_scale=1.0,
             uncertainty_conditioning_scale=1.0),
    )
    with pytest.raises(OSError, match="disk full"):
        write_shard(columns, path)
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its temporary file


# ----------------------------------------------------------------------------------------- launched runs
def test_two_processes_give_the_same_dataset_as_one(one_process, two_processes):
    one = datasets.load_from_disk(str(one_process["dir"]))
    two = datasets.load_from_disk(str(two_processes["dir"]))
    assert len(one) == len(two) == len(ALL_KEYS)
    rows_one, rows_two = rows_by_key(one), rows_by_key(two)
    assert set(rows_one) == set(rows_two) == ALL_KEYS
    for key in ALL_KEYS:
        a, b = rows_one[key], rows_two[key]
        assert a["seed"] == b["seed"]
        assert a["uncertainty_source"] == b["uncertainty_source"]
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["uncertainty"], b["uncertainty"])
        np.testing.assert_array_equal(a["image"], b["image"])  # same seed, same batch -> the same image
    # 5 shards of at most 2 samples, in the Hub layout, and the parquet files hold the same rows.
    shards = sorted(p.name for p in (one_process["dir"] / "data").iterdir())
    assert shards == [shard_filename(index, 5) for index in range(5)]
    parquet = datasets.load_dataset("parquet", data_files=str(one_process["dir"] / "data" / "*.parquet"), split="train")
    assert parquet["seed"] == one["seed"] and parquet.features == one.features
    # Different samples really differ (seeds and drawn maps are used).
    images = [row["image"] for row in rows_one.values()]
    assert len({image.tobytes() for image in images}) == len(images)
    assert len({row["uncertainty_source"] for row in rows_one.values()}) > 1


def test_columns_round_trip_exactly_and_reproduce_the_images(one_process, workspace, one_thread):
    dataset = datasets.load_from_disk(str(one_process["dir"]))
    assert dataset[0]["label"].mode == "L" and dataset[0]["uncertainty"].mode == "I;16"
    pipeline = StableDiffusionDualControlPipeline.from_pretrained(workspace / "pipeline")
    pipeline.set_progress_bar_config(disable=True)
    for row in dataset.select([0, 4, 8]):
        # The label column is the source map resized exactly as the pipeline conditions on it.
        source = np.asarray(PIL.Image.open(workspace / "labels" / row["source_label_name"]))
        _, expected_label = prepare_semantic_map(source, 4, 16, 16, ignore_index=IGNORE_INDEX)
        np.testing.assert_array_equal(np.asarray(row["label"]), expected_label[0].numpy())
        # The uncertainty column is the drawn bank map at the output size, to 16 bits.
        assert row["uncertainty_source"].startswith("bank:")
        bank_file = workspace / "bank" / row["uncertainty_source"][len("bank:") :]
        raw = np.load(bank_file) if bank_file.suffix == ".npy" else PIL.Image.open(bank_file)
        expected_map = prepare_uncertainty_map(raw, 1, 16, 16)[0, 0].numpy()
        stored = np.asarray(row["uncertainty"]).astype(np.float32) / np.float32(65535)
        np.testing.assert_allclose(stored, expected_map, atol=0.5 / 65535 + 1e-7)
        # Seed + stored maps + settings regenerate the stored image (alone, not in its batch of 2: up to float
        # rounding of a different batch size, i.e. at most one grey level).
        image = pipeline(
            row["prompt"],
            semantic_map=np.asarray(row["label"]).astype(np.int64),
            uncertainty_map=row["uncertainty"],
            num_inference_steps=row["num_inference_steps"],
            guidance_scale=row["guidance_scale"],
            semantic_conditioning_scale=row["semantic_conditioning_scale"],
            uncertainty_conditioning_scale=row["uncertainty_conditioning_scale"],
            generator=[torch.Generator().manual_seed(row["seed"])],
        ).images[0]
        difference = np.abs(np.asarray(image).astype(int) - np.asarray(row["image"]).astype(int))
        assert difference.max() <= 1


def test_output_has_a_card_a_config_and_is_read_by_the_segmentation_trainer(one_process):
    from diffusers_uncertainty.segmentation.data import load_segmentation_data

    out = one_process["dir"]
    card = (out / "README.md").read_text()
    assert "9 samples: 3 label maps x 3 samples each, at 16x16 (HxW)" in card
    assert "`semantic_channels` = 4, `ignore_index` = 255" in card
    assert "| `guidance_scale` | `2.0` |" in card and "| `prompt` | `dusk road` |" in card
    assert "path: data/*.parquet" in card and "$" not in card
    assert (out / "generation_config.json").is_file()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temporary file or folder left
    # What `examples/train_segmentation.py --synthetic_data_dir` does with the folder.
    data = load_segmentation_data(str(out), 4, IGNORE_INDEX, argument="--synthetic_data_dir")
    assert len(data) == 9


# ------------------------------------------------------------------------------------ resume and batch size
def test_interrupted_run_resumes_without_duplicates_and_batch_size_does_not_change_samples(
    one_process, workspace, tmp_path, one_thread
):
    script = load_script()
    output_dir = tmp_path / "resumed"
    # batch size 4: 3 shards; stop after 1, as an interrupted run would.
    script.main(script.parse_args(base_args(workspace, output_dir, "--batch_size", 4, "--max_shards", 1)))
    assert sorted(p.name for p in (output_dir / "data").iterdir()) == [shard_filename(0, 3)]
    assert not (output_dir / "state.json").exists()  # nothing loadable before every shard is there
    first_shard = output_dir / "data" / shard_filename(0, 3)
    first_stat = first_shard.stat()
    # A crash in the middle of writing shard 1 leaves its temporary file.
    (output_dir / "data" / ".tmp-x7k2q9.parquet").write_bytes(b"PAR1 half-written")

    with pytest.raises(ValueError, match="already holds a generation run; pass `--resume`"):
        script.main(script.parse_args(base_args(workspace, output_dir, "--batch_size", 4)))
    with pytest.raises(ValueError, match=r"settings differ .*batch_size: 4 -> 2"):
        script.main(script.parse_args(base_args(workspace, output_dir, "--resume")))

    with pytest.raises(ValueError, match=r"settings differ .*control_guidance_start: \[0\.0\] -> \[0\.0, 0\.5\]"):
        script.main(script.parse_args(base_args(workspace, output_dir, "--batch_size", 4, "--resume",
                                                "--control_guidance_start", 0, 0.5)))
    # A run written before the control-window flags existed (no window in its settings) resumes with the defaults.
    config_path = output_dir / "generation_config.json"
    config = json.loads(config_path.read_text())
    del config["settings"]["control_guidance_start"], config["settings"]["control_guidance_end"]
    config_path.write_text(json.dumps(config))

    script.main(script.parse_args(base_args(workspace, output_dir, "--batch_size", 4, "--resume")))
    assert sorted(p.name for p in (output_dir / "data").iterdir()) == [shard_filename(i, 3) for i in range(3)]
    assert first_shard.stat().st_mtime_ns == first_stat.st_mtime_ns  # kept, not regenerated
    resumed = rows_by_key(datasets.load_from_disk(str(output_dir)))
    assert set(resumed) == ALL_KEYS

    # Same samples as the launched run with batch size 2: same seeds, maps and (up to float rounding) images.
    reference = rows_by_key(datasets.load_from_disk(str(one_process["dir"])))
    for key in ALL_KEYS:
        assert resumed[key]["seed"] == reference[key]["seed"]
        np.testing.assert_array_equal(resumed[key]["label"], reference[key]["label"])
        np.testing.assert_array_equal(resumed[key]["uncertainty"], reference[key]["uncertainty"])
        difference = np.abs(resumed[key]["image"].astype(int) - reference[key]["image"].astype(int))
        assert difference.max() <= 1


# ------------------------------------------------------------------------------------------ other sources
def test_dataset_source_with_constant_level_and_scaled_bank(workspace, tmp_path, one_thread):
    script = load_script()
    labels = [np.asarray(PIL.Image.open(workspace / "labels" / f"frame_{i}.png")) for i in range(NUM_LABELS)]
    source = datasets.Dataset.from_dict(
        {"segmentation": [PIL.Image.fromarray(label) for label in labels]},
        features=datasets.Features({"segmentation": datasets.Image()}),
    )
    source.save_to_disk(str(tmp_path / "source"))
    args = [
        "--pretrained_model_name_or_path", str(workspace / "pipeline"), "--dataset_name", str(tmp_path / "source"),
        "--label_column", "segmentation", "--max_labels", "2", "--uncertainty_level", "0.8",
        "--num_inference_steps", "1", "--resolution", "8", "16", "--batch_size", "3", "--output_dir",
        str(tmp_path / "level"),
    ]
    script.main(script.parse_args(args))
    dataset = datasets.load_from_disk(str(tmp_path / "level"))
    assert len(dataset) == 2 and dataset["source_label_name"] == [f"{tmp_path / 'source'}[0]", f"{tmp_path / 'source'}[1]"]
    assert set(dataset["uncertainty_source"]) == {"level:0.8"}
    assert dataset[0]["image"].size == (16, 8)
    assert set(np.unique(np.asarray(dataset[0]["uncertainty"])).tolist()) == {round(0.8 * 65535)}

    # A bank scaled by 2 stays in [0, 1] (the maps are below 0.5): every stored map is 2x its source.
    script.main(
        script.parse_args(
            base_args(workspace, tmp_path / "scaled", "--uncertainty_scale", 2.0, "--max_labels", 1,
                      "--samples_per_label", 2, "--num_inference_steps", 1)
        )
    )
    for row in datasets.load_from_disk(str(tmp_path / "scaled")):
        bank_file = workspace / "bank" / row["uncertainty_source"][len("bank:") :]
        raw = np.load(bank_file) if bank_file.suffix == ".npy" else PIL.Image.open(bank_file)
        expected = prepare_uncertainty_map(raw, 1, 16, 16)[0, 0].numpy() * 2
        stored = np.asarray(row["uncertainty"]).astype(np.float32) / 65535
        np.testing.assert_allclose(stored, expected, atol=1e-4)


@pytest.mark.parametrize(
    "flags, setting, recorded",
    [
        # The uncertainty control only in the second of 2 steps (semantic in both).
        (["--control_guidance_start", 0, 0.5], {"control_guidance_start": (0.0, 0.5)},
         {"control_guidance_start": [0.0, 0.5], "control_guidance_end": [1.0]}),
        # A large scale: the tiny model's uncertainty control moves a 2-step image by about one grey level.
        (["--uncertainty_guidance_scale", 20.0], {"uncertainty_guidance_scale": 20.0}, {"uncertainty_guidance_scale": 20.0}),
    ],
    ids=["control_windows", "uncertainty_guidance"],
)
def test_generation_settings_reach_the_pipeline_and_are_recorded(workspace, tmp_path, one_thread, flags, setting, recorded):
    # Each stored image is what a direct pipeline call with the setting gives, and not what the call without it gives.
    script = load_script()
    output_dir = tmp_path / "setting"
    script.main(script.parse_args(base_args(workspace, output_dir, "--max_labels", 1, "--samples_per_label", 2, *flags)))
    settings = json.loads((output_dir / "generation_config.json").read_text())["settings"]
    assert {key: settings[key] for key in recorded} == recorded
    pipeline = StableDiffusionDualControlPipeline.from_pretrained(workspace / "pipeline")
    pipeline.set_progress_bar_config(disable=True)
    for row in datasets.load_from_disk(str(output_dir)):
        images = {}
        for name, kwargs in (("with", setting), ("without", {})):
            images[name] = np.asarray(pipeline(
                row["prompt"], semantic_map=np.asarray(row["label"]).astype(np.int64), uncertainty_map=row["uncertainty"],
                num_inference_steps=row["num_inference_steps"], guidance_scale=row["guidance_scale"],
                generator=[torch.Generator().manual_seed(row["seed"])], **kwargs,
            ).images[0]).astype(int)
        stored = np.asarray(row["image"]).astype(int)
        assert np.abs(images["with"] - stored).max() <= 1  # up to float rounding of another batch size
        assert np.abs(images["without"] - stored).max() > 1


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "20"], r"`--resolution` values must be positive multiples of 8, but got \[20\]"),
        (["--uncertainty_level", "1.5"], "Pass exactly one of `--uncertainty_bank` and `--uncertainty_level`"),
        (["--batch_size", "0"], "`--batch_size` must be at least 1, but got 0"),
        (["--control_guidance_start", "0", "0.2", "0.4"], r"`--control_guidance_start` takes one value or two \(semantic, "
                                                          r"uncertainty\), but got 3 values"),
        (["--control_guidance_start", "0", "0.6", "--control_guidance_end", "1", "0.6"],
         r"must satisfy 0 <= start < end <= 1 for every branch, but the uncertainty branch got start=0.6 and end=0.6"),
        (["--uncertainty_guidance_scale", "-0.5"], r"`--uncertainty_guidance_scale` must be a finite number >= 0, but got -0.5"),
        (["--uncertainty_guidance_scale", "2", "--uncertainty_conditioning_scale", "0"],
         r"`--uncertainty_guidance_scale` needs the uncertainty control, but `--uncertainty_conditioning_scale` is 0"),
    ],
)
def test_bad_arguments_are_rejected_by_parse_args(workspace, tmp_path, extra, message):
    script = load_script()
    with pytest.raises(ValueError, match=message):
        script.parse_args(base_args(workspace, tmp_path / "out", *extra))


def test_uncertainty_level_outside_unit_interval(workspace, tmp_path):
    script = load_script()
    args = base_args(workspace, tmp_path / "out")
    index = args.index("--uncertainty_bank")
    args[index : index + 2] = ["--uncertainty_level", "1.5"]
    with pytest.raises(ValueError, match=r"`--uncertainty_level` must lie in \[0, 1\], but got 1.5"):
        script.parse_args(args)


def run_expecting_error(script, args, message, output_dir):
    with pytest.raises(ValueError, match=message):
        script.main(script.parse_args(args))
    assert not output_dir.exists()  # stopped before writing anything


def test_bad_inputs_stop_before_generating(workspace, tmp_path):
    script = load_script()
    out = tmp_path / "out"

    args = base_args(workspace, out)
    args[args.index("--label_dir") + 1] = str(workspace / "empty")
    run_expecting_error(script, args, "expected integer label PNGs in .*empty, but found no image files", out)

    bad_labels = tmp_path / "bad_labels"
    bad_labels.mkdir()
    PIL.Image.fromarray(np.full((16, 16), 7, dtype=np.uint8)).save(bad_labels / "x.png")
    args[args.index("--label_dir") + 1] = str(bad_labels)
    run_expecting_error(
        script, args, r"Label map .*bad_labels/x.png has values \[7\], but the controlnet takes values in \[0, 4\) or ignore_index=255", out
    )

    args = base_args(workspace, out, "--uncertainty_scale", 3.0)
    run_expecting_error(script, args, r"`--uncertainty_scale` 3.0 takes the uncertainty map .* above 1", out)


# ------------------------------------------------------------------------------------------------- Hub
def test_push_to_hub_uploads_card_config_and_parquet(workspace, tmp_path, monkeypatch):
    script = load_script()
    calls = {}

    class RepoUrl:
        repo_id = "someone/camvid-dusk-synthetic"

    def fake_create_repo(repo_id, repo_type, exist_ok, private, token):
        calls["create_repo"] = dict(repo_id=repo_id, repo_type=repo_type, exist_ok=exist_ok, token=token)
        return RepoUrl()

    def fake_upload_folder(repo_id, repo_type, folder_path, allow_patterns, commit_message, token):
        calls["upload_folder"] = dict(repo_id=repo_id, repo_type=repo_type, token=token)
        folder = Path(folder_path)
        calls["files"] = sorted(
            str(path.relative_to(folder))
            for path in folder.rglob("*")
            if path.is_file() and any(path.relative_to(folder).match(pattern) for pattern in allow_patterns)
        )
        calls["card"] = (folder / "README.md").read_text()

    monkeypatch.setattr(script, "create_repo", fake_create_repo)
    monkeypatch.setattr(script, "upload_folder", fake_upload_folder)
    args = base_args(
        workspace, tmp_path / "out", "--max_labels", 1, "--samples_per_label", 1, "--num_inference_steps", 1,
        "--push_to_hub", "--hub_model_id", "someone/camvid-dusk-synthetic", "--hub_token", "hf_xxx",
    )
    script.main(script.parse_args(args))
    assert calls["create_repo"] == dict(
        repo_id="someone/camvid-dusk-synthetic", repo_type="dataset", exist_ok=True, token="hf_xxx"
    )
    assert calls["upload_folder"] == dict(repo_id="someone/camvid-dusk-synthetic", repo_type="dataset", token="hf_xxx")
    assert calls["files"] == ["README.md", "data/shard-00000-of-00001.parquet", "generation_config.json"]
    assert "# someone/camvid-dusk-synthetic" in calls["card"]
    assert "--push_to_hub --hub_model_id someone/camvid-dusk-synthetic" in calls["card"]  # the command line
    assert "hf_xxx" not in calls["card"] and "hf_xxx" not in (tmp_path / "out" / "generation_config.json").read_text()
    assert 'datasets.load_dataset("someone/camvid-dusk-synthetic", split="train")' in calls["card"]


def test_separately_saved_control_replaces_the_pipelines_own(workspace, one_process, tmp_path, one_thread):
    script = load_script()
    other = build_tiny_components(num_classes=4, ignore_index=IGNORE_INDEX, seed=5)["controlnet"]
    other.save_pretrained(tmp_path / "control")
    args = base_args(
        workspace, tmp_path / "out", "--controlnet_model_name_or_path", tmp_path / "control", "--max_labels", 1,
        "--samples_per_label", 1, "--batch_size", 1,
    )
    script.main(script.parse_args(args))
    row = datasets.load_from_disk(str(tmp_path / "out"))[0]
    pipeline = StableDiffusionDualControlPipeline.from_pretrained(
        workspace / "pipeline", controlnet=UncertaintyControlNetModel.from_pretrained(tmp_path / "control")
    )
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        row["prompt"],
        semantic_map=np.asarray(row["label"]).astype(np.int64),
        uncertainty_map=row["uncertainty"],
        num_inference_steps=row["num_inference_steps"],
        guidance_scale=row["guidance_scale"],
        generator=[torch.Generator().manual_seed(row["seed"])],
    ).images[0]
    np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(expected))
    # and it is not what the pipeline's own control gives for the same sample
    own = rows_by_key(datasets.load_from_disk(str(one_process["dir"])))[(0, 0)]
    assert own["seed"] == row["seed"]
    assert not np.array_equal(own["image"], np.asarray(row["image"]))


# ---------------------------------------------------------------------------------------------- style bank
@pytest.fixture(scope="module")
def style_workspace(workspace):
    """A saved tiny style encoder and a style bank of 4 RGB images (plus an `rgba/` bank that is refused)."""
    from diffusers_uncertainty import StyleEncoderModel

    torch.manual_seed(0)
    StyleEncoderModel(backbone="test_resnet", cross_attention_dim=32, num_tokens=2, image_size=16).save_pretrained(
        workspace / "style_encoder"
    )
    rng = np.random.default_rng(3)
    (workspace / "styles").mkdir()
    for index in range(4):
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(workspace / "styles" / f"style_{index}.png")
    (workspace / "rgba").mkdir()
    PIL.Image.new("RGBA", (16, 16)).save(workspace / "rgba" / "a.png")
    return workspace


def style_args(workspace, output_dir, *extra, uncertainty=True):
    args = base_args(
        workspace, output_dir, "--style_bank", workspace / "styles", "--style_images_per_sample", 2,
        "--style_encoder_model_name_or_path", workspace / "style_encoder", *extra,
    )
    if not uncertainty:
        index = args.index("--uncertainty_bank")
        del args[index : index + 2]
    return args


def test_style_bank_datasets_do_not_depend_on_the_process_count_and_record_the_style_files(
    style_workspace, one_process, tmp_path, one_thread
):
    from diffusers_uncertainty.synthesis import StyleBank

    workspace = style_workspace
    accelerate_launch(style_args(workspace, tmp_path / "two", "--style_guidance_scale", 2.0), num_processes=2)
    script = load_script()
    script.main(script.parse_args(style_args(workspace, tmp_path / "one", "--style_guidance_scale", 2.0)))
    one = rows_by_key(datasets.load_from_disk(str(tmp_path / "one")))
    two = rows_by_key(datasets.load_from_disk(str(tmp_path / "two")))
    plain = rows_by_key(datasets.load_from_disk(str(one_process["dir"])))
    bank = StyleBank(workspace / "styles", 2, show_progress=False)
    assert set(one) == set(two) == ALL_KEYS
    for key in ALL_KEYS:
        assert one[key]["style_images"] == two[key]["style_images"] == bank.get(one[key]["seed"])[1]
        assert len(set(one[key]["style_images"])) == 2 and one[key]["style_guidance_scale"] == 2.0
        assert one[key]["uncertainty_source"] == plain[key]["uncertainty_source"]  # combined with the uncertainty bank
        np.testing.assert_array_equal(one[key]["image"], two[key]["image"])
        assert not np.array_equal(one[key]["image"], plain[key]["image"])  # the style changes the image
    assert len({tuple(row["style_images"]) for row in one.values()}) > 1  # samples draw different style sets
    card = (tmp_path / "one" / "README.md").read_text()
    assert "style bank of 4 images in" in card and "2 per sample" in card


def test_style_bank_alone_switches_the_uncertainty_control_off_and_reproduces(style_workspace, tmp_path, one_thread):
    from diffusers_uncertainty import StyleEncoderModel

    workspace = style_workspace
    script = load_script()
    out = tmp_path / "style_only"
    script.main(script.parse_args(style_args(workspace, out, "--max_labels", 1, uncertainty=False)))
    dataset = datasets.load_from_disk(str(out))
    assert len(dataset) == SAMPLES_PER_LABEL
    assert set(dataset["uncertainty_source"]) == {"off"} and set(dataset["uncertainty_conditioning_scale"]) == {0.0}
    pipeline = StableDiffusionDualControlPipeline.from_pretrained(
        workspace / "pipeline", style_encoder=StyleEncoderModel.from_pretrained(workspace / "style_encoder")
    )
    pipeline.set_progress_bar_config(disable=True)
    row = dataset[0]
    image = pipeline(
        row["prompt"],
        semantic_map=np.asarray(row["label"]).astype(np.int64),
        style_images=[PIL.Image.open(workspace / "styles" / name) for name in row["style_images"]],
        num_inference_steps=row["num_inference_steps"],
        guidance_scale=row["guidance_scale"],
        generator=[torch.Generator().manual_seed(row["seed"])],
    ).images[0]
    difference = np.abs(np.asarray(image).astype(int) - np.asarray(row["image"]).astype(int))
    assert difference.max() <= 1  # alone, not in its batch of 2: float rounding only


def test_bad_style_inputs_stop_before_generating(style_workspace, tmp_path):
    workspace = style_workspace
    script = load_script()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"`--style_images_per_sample` applies to the images of `--style_bank`"):
        script.parse_args(base_args(workspace, out, "--style_images_per_sample", 2))
    args = style_args(workspace, out)
    del args[args.index("--style_encoder_model_name_or_path") : args.index("--style_encoder_model_name_or_path") + 2]
    run_expecting_error(script, args, r"`--style_bank` needs a style encoder", out)
    run_expecting_error(
        script, style_args(workspace, out, "--style_images_per_sample", 5),
        r"`--style_images_per_sample` must be between 1 and the 4 images of `--style_bank`, but got 5", out,
    )
    args = style_args(workspace, out)
    args[args.index("--style_bank") + 1] = str(workspace / "rgba")
    args[args.index("--style_images_per_sample") + 1] = "1"
    run_expecting_error(script, args, r"expects 3-channel images \(in_channels=3\), but .*a.png has 4 channels", out)


def test_style_bank_serves_images_with_the_channels_it_checked(tmp_path):
    from diffusers_uncertainty.models import prepare_style_images
    from diffusers_uncertainty.synthesis import StyleBank

    folder = tmp_path / "grey"
    folder.mkdir()
    for index in range(3):
        PIL.Image.fromarray(np.full((12, 12), 40 * index, dtype=np.uint8)).save(folder / f"{index}.png")
    bank = StyleBank(folder, 2, in_channels=1, show_progress=False)
    images, names = bank.get(seed=5)
    assert [image.mode for image in images] == ["L", "L"] and len(set(names)) == 2
    assert prepare_style_images(images, in_channels=1, image_size=8).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"expects 3-channel images .* has 1 channels"):
        StyleBank(folder, 2, in_channels=3, show_progress=False)


def _shard_arguments(index):
    items = plan_work_items(num_labels=1, samples_per_label=2, seed=index)
    rng = np.random.default_rng(index)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in items]
    settings = dict(prompt="p", num_inference_steps=1, guidance_scale=1.0, semantic_conditioning_scale=1.0,
                    uncertainty_conditioning_scale=1.0)
    labels = rng.integers(0, 4, (2, 8, 8))
    codes = rng.integers(0, 65535, (2, 8, 8)).astype(np.uint16)
    return items, images, labels, codes, ["level:0.5"] * 2, ["x.png"] * 2, settings


def test_merge_shards_replaces_an_earlier_merge_and_keeps_the_other_files(tmp_path):
    from diffusers_uncertainty.synthesis import merge_shards

    shards = []
    for index in range(3):
        shards.append(tmp_path / "out" / "data" / f"shard-{index}.parquet")
        write_shard(shard_columns(*_shard_arguments(index)), shards[-1])
    (tmp_path / "out" / "README.md").write_text("card")
    first = merge_shards(shards, tmp_path / "out")
    assert first["seed"] == [row for index in range(3) for row in shard_columns(*_shard_arguments(index))["seed"]]
    (tmp_path / "out" / "data-00001-of-00002.arrow").write_bytes(b"a data file of an earlier, larger merge")
    second = merge_shards(shards[:1], tmp_path / "out")
    assert second["seed"] == shard_columns(*_shard_arguments(0))["seed"]
    assert datasets.load_from_disk(str(tmp_path / "out"))["seed"] == second["seed"]
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    arrow = sorted(path.name for path in (tmp_path / "out").glob("data-*.arrow"))
    assert arrow == sorted(entry["filename"] for entry in state["_data_files"])  # the stale file is gone
    assert (tmp_path / "out" / "README.md").read_text() == "card" and len(list((tmp_path / "out" / "data").iterdir())) == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no staging or trash folder left


def test_background_writer_writes_the_files_of_the_sequential_loop_while_the_caller_goes_on(tmp_path, monkeypatch):
    import threading

    from diffusers_uncertainty.synthesis import BackgroundShardWriter

    for index in range(3):
        write_shard(shard_columns(*_shard_arguments(index)), tmp_path / f"sequential-{index}.parquet")
    release, started = threading.Event(), []
    original = datasets.Dataset.to_parquet

    def held_to_parquet(self, path, **kwargs):
        started.append(path)
        assert release.wait(timeout=30)
        return original(self, path, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "to_parquet", held_to_parquet)
    with BackgroundShardWriter(max_pending=3) as writer:
        for index in range(3):
            writer.submit(tmp_path / f"background-{index}.parquet", *_shard_arguments(index))
        # All three handed over while the first write is still held: the caller was free to generate meanwhile.
        assert not (tmp_path / "background-0.parquet").exists()
        release.set()
    for index in range(3):
        assert (tmp_path / f"background-{index}.parquet").read_bytes() == (tmp_path / f"sequential-{index}.parquet").read_bytes()
    # Each went to a temporary file beside its shard first.
    assert [os.path.dirname(path) for path in started] == [str(tmp_path)] * 3
    assert all(os.path.basename(path).startswith(".tmp-") and path.endswith(".parquet") for path in started)


def test_background_writer_raises_a_failed_write_and_leaves_no_half_written_shard(tmp_path, monkeypatch):
    from diffusers_uncertainty.synthesis import BackgroundShardWriter

    def failing_to_parquet(self, path, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "to_parquet", failing_to_parquet)
    with pytest.raises(OSError, match="disk full"):
        with BackgroundShardWriter(max_pending=1) as writer:
            writer.submit(tmp_path / "a.parquet", *_shard_arguments(0))
            writer.submit(tmp_path / "b.parquet", *_shard_arguments(1))  # waits for a, whose error surfaces here
    assert not (tmp_path / "a.parquet").exists() and not (tmp_path / "b.parquet").exists()
    with pytest.raises(ValueError, match="`max_pending` must be a positive integer, but got 0"):
        BackgroundShardWriter(max_pending=0)
