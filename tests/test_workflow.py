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


def test_camvid_config_points_at_the_shared_data():
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "configs" / "camvid_daydusk.yaml"
    config = load_config(path, smoke=True, overrides={"output_dir": "unused"})
    assert config["data"]["root"].endswith("shared/data/camvid_daydusk")
    assert config["data"]["num_classes"] == 11 and config["data"]["ignore_index"] == 11


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
