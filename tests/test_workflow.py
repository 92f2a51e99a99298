import json
import re
import subprocess
import sys

import pytest

from diffusers_uncertainty.workflow import MARKER, load_config, plan, run_workflow, to_flags


def test_flags_from_a_mapping():
    flags = to_flags({"a": 1, "b": True, "c": [64, 32], "d": None, "e": False, "f": "x y"})
    assert flags == ["--a", "1", "--b", "--c", "64", "32", "--f", "x y"]


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\ndata: {num_classes: 3, resolution: 30}\n")
    with pytest.raises(ValueError, match="`data.resolution` must be divisible by 8, but got 30"):
        load_config(bad)
    bad.write_text("output_dir: x\ndata: {num_classes: 3, resolution: 32}\ncontrl: {}\n")
    with pytest.raises(ValueError, match=r"Unknown config sections \['contrl'\]"):
        load_config(bad)


def test_embedded_default_plans_every_stage_of_the_workflow(tmp_path):
    config = load_config(None, smoke=True, overrides={"output_dir": str(tmp_path)})
    names = [stage.name for stage in plan(config)]
    assert names[:7] == [
        "data",
        "base",
        "segmenter",
        "uncertainty:source_train",
        "uncertainty:target_train",
        "control",
        "generate",
    ]
    assert "segmenter:synthetic_flexseg" in names and names[-1] == "report"
    control = next(stage for stage in plan(config) if stage.name == "control")
    assert control.args["train_branch"] == "joint" and control.args["max_train_steps"] == 3  # smoke applied
    synthetic = next(stage for stage in plan(config) if stage.name == "segmenter:synthetic_flexseg")
    assert synthetic.args["synthetic_data_dir"] == tmp_path / "synthetic"


def test_camvid_config_takes_its_data_from_the_command_line(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from diffusers_uncertainty.cli import main
    from diffusers_uncertainty.workflow import example_script_path, shipped_configs

    path = Path(__file__).parents[1] / "examples" / "configs" / "camvid_daydusk.yaml"
    assert shipped_configs()["camvid_daydusk"] == path  # `--config camvid_daydusk` is this file
    monkeypatch.chdir(tmp_path)
    # The default data root is relative to the working directory; a missing folder names `--data_root`.
    with pytest.raises(ValueError, match=r"The data folder '.*/data/camvid_daydusk' \(`--data_root`, or `data.root` "
                                         r"in the config\) does not exist"):
        load_config("camvid_daydusk", smoke=True)
    root = tmp_path / "prepared"
    for folder in ("source/train", "source/val", "target/train"):
        (root / folder).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"must hold source/train, source/val, target/train, target/val, but has no "
                                         r"target/val\.$"):
        load_config("camvid_daydusk", smoke=True, overrides={"data": {"root": "prepared"}})
    (root / "target" / "val").mkdir()
    config = load_config("camvid_daydusk", smoke=True, overrides={"data": {"root": "prepared"}})
    assert config["data"]["root"] == str(root)
    assert config["data"]["num_classes"] == 11 and config["data"]["ignore_index"] == 11
    assert config == load_config(path, smoke=True, overrides={"data": {"root": str(root)}})
    with pytest.raises(ValueError, match=r"shipped with the package \['camvid_daydusk', 'toy_oct'\], but 'camvid' "
                                         r"does not exist"):
        load_config("camvid")

    # `stages --data_root` plans every stage on that folder, with scripts that exist.
    assert main(["stages", "--config", "camvid_daydusk", "--smoke", "--data_root", "prepared"]) == 0
    listing = capsys.readouterr().out
    assert f"--train_data_dir {root / 'source' / 'train'} " in listing and "to run" in listing
    stages = {stage.name: stage for stage in plan(config)}
    assert stages["segmenter"].args["train_data_dir"] == root / "source" / "train"
    assert stages["control"].command([])[3] == str(example_script_path("train_uncertainty_controlnet.py"))
    with pytest.raises(ValueError, match=r"`name` must be one of the example scripts \[.*'train_segmentation.py'.*\], "
                                         r"but got 'train.py'"):
        example_script_path("train.py")


def test_the_whole_workflow_on_the_embedded_default(tmp_path):
    overrides = {
        "output_dir": str(tmp_path / "run"),
        "variants": {"source_only": {}, "synthetic_flexseg": {"synthetic": True, "synthetic_ratio": 0.5, "flexseg": True}},
    }
    config = load_config(None, smoke=True, overrides=overrides)
    lines = []
    report = run_workflow(config, echo=lines.append)

    assert report.is_file() and (report.parent / "grid.png").is_file()
    text = report.read_text()
    for variant in ("source_only", "synthetic_flexseg"):
        metrics = json.loads((tmp_path / "run" / "evaluation" / variant / "target_val" / "metrics.json").read_text())
        row = re.search(rf"^\| {variant} \| ([0-9.]+) \| ([0-9.]+) \|", text, flags=re.MULTILINE)
        assert row is not None, text
        assert float(row.group(1)) == round(100 * metrics["mIoU"], 1)
        assert float(row.group(2)) == round(100 * metrics["mDice"], 1)
    synthetic = tmp_path / "run" / "synthetic"
    assert (synthetic / MARKER).is_file()

    # A second run finds every stage complete and runs nothing.
    again = []
    run_workflow(config, echo=again.append)
    assert sum("skipped" in line for line in again) == len(plan(config))


def test_command_line_lists_the_stages(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_uncertainty", "stages", "--smoke", "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "train_uncertainty_controlnet.py" in result.stdout and "to run" in result.stdout
    failed = subprocess.run(
        [sys.executable, "-m", "diffusers_uncertainty", "run", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
    )
    assert failed.returncode != 0 and "does not exist" in failed.stderr


def test_latent_diffusion_segmenter_is_planned_with_the_base_and_the_unlabeled_target(tmp_path):
    overrides = {"output_dir": str(tmp_path), "segmenter": {"model": "latent_diffusion"}}
    config = load_config(None, smoke=True, overrides=overrides)
    stages = {stage.name: stage for stage in plan(config)}
    names = list(stages)
    assert names.index("base") < names.index("segmenter")  # the segmenter reads the trained base
    for name in ("segmenter", "segmenter:photometric", "segmenter:synthetic_flexseg"):
        args = stages[name].args
        assert args["model"] == "latent_diffusion" and args["base_model_name_or_path"] == str(tmp_path / "base")
        assert args["adversarial_weight"] == 0.2 and args["unlabeled_data_dir"] == tmp_path / "data" / "target" / "train"
        assert args["decoder_channels"] == 32 and not {"architecture", "encoder_name", "encoder_depth"} & set(args)
        assert args["max_train_steps"] == 4  # the shared args still apply (smoke)
        command = stages[name].command([])
        assert "--model" in command and command[command.index("--model") + 1] == "latent_diffusion"
    assert stages["segmenter:photometric"].args["photometric_augmentation"] is True

    # One variant can choose it while the others stay smp; without alignment there is no unlabeled set.
    overrides = {"output_dir": str(tmp_path), "variants": {"source_only": {}, "iccld": {"model": "latent_diffusion",
                                                                                         "adversarial_weight": 0}}}
    stages = {stage.name: stage for stage in plan(load_config(None, smoke=True, overrides=overrides))}
    assert stages["segmenter"].args["architecture"] == "unet" and "model" not in stages["segmenter"].args
    iccld = stages["segmenter:iccld"].args
    assert iccld["model"] == "latent_diffusion" and "unlabeled_data_dir" not in iccld
    short = load_config(None, smoke=True, overrides={"output_dir": str(tmp_path), "segmenter": "latent_diffusion"})
    args = next(stage for stage in plan(short) if stage.name == "segmenter").args
    assert args["model"] == "latent_diffusion" and args["base_model_name_or_path"] == str(tmp_path / "base")
    with pytest.raises(ValueError, match="`segmenter.model` must be 'smp' or 'latent_diffusion', but got 'vit'"):
        plan(load_config(None, smoke=True, overrides={"output_dir": str(tmp_path), "segmenter": {"model": "vit"}}))


def test_the_workflow_runs_with_the_latent_diffusion_segmenter(tmp_path):
    overrides = {"output_dir": str(tmp_path / "run"), "segmenter": {"model": "latent_diffusion"}}
    config = load_config(None, smoke=True, overrides=overrides)
    config["variants"] = {"source_only": {}}  # (overrides merge into the default variants; replace them)
    # The stages that involve the segmenter (control, generation and report are the default workflow test's).
    lines = []
    run_workflow(config, only=["data", "base", "segmenter", "uncertainty", "evaluate"], echo=lines.append)
    assert not any("control" in line or "generate" in line for line in lines)
    saved = json.loads((tmp_path / "run" / "segmenters" / "source_only" / "config.json").read_text())
    assert saved["_class_name"] == "LatentDiffusionSegmenter"
    assert saved["base_model_name_or_path"] == str(tmp_path / "run" / "base")
    scores = json.loads((tmp_path / "run" / "uncertainty" / "target_train" / "scores.json").read_text())
    assert scores["num_images"] == 8  # the uncertainty maps the control is trained on
    metrics = json.loads((tmp_path / "run" / "evaluation" / "source_only" / "target_val" / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0
