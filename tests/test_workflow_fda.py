"""The `fda` workflow variant (Fourier domain adaptation to target/train) in both shipped configs, planned and run at
smoke scale."""

import json
from pathlib import Path

from diffusers_uncertainty.workflow import load_config, plan, run_workflow


CAMVID = Path(__file__).parents[1] / "examples" / "configs" / "camvid_daydusk.yaml"


def test_fda_variant_reads_the_unlabeled_target_images_in_both_configs(tmp_path):
    camvid_root = tmp_path / "camvid"  # the folders a data root must hold (the config names no shared path)
    for folder in ("source/train", "source/val", "target/train", "target/val"):
        (camvid_root / folder).mkdir(parents=True)
    for path in (None, CAMVID):
        data = {"data": {"root": str(camvid_root)}} if path is not None else {}
        config = load_config(path, smoke=True, overrides={"output_dir": str(tmp_path), **data})
        stages = {stage.name: stage for stage in plan(config)}
        args = stages["segmenter:fda"].args
        root = Path(config["data"]["root"]) if path is not None else tmp_path / "data"
        assert args["fourier_domain_adaptation"] is True and args["fda_beta"] == 0.03
        assert Path(args["fda_target_dir"]) == root / "target" / "train"
        command = stages["segmenter:fda"].command([])
        assert command[command.index("--fda_target_dir") + 1] == str(root / "target" / "train")
        assert "evaluate:fda:target_val" in stages


def test_the_fda_variant_runs_in_the_workflow(tmp_path):
    config = load_config(None, smoke=True, overrides={"output_dir": str(tmp_path / "run")})
    config["variants"] = {"fda": config["variants"]["fda"]}
    lines = []
    run_workflow(config, only=["data", "segmenter:fda", "evaluate:fda:target_val"], echo=lines.append)
    readme = (tmp_path / "run" / "segmenters" / "fda" / "README.md").read_text()
    assert "fda" in readme
    metrics = json.loads((tmp_path / "run" / "evaluation" / "fda" / "target_val" / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0


def test_control_fda_copies_are_planned_for_the_control_and_its_refinement_rounds(tmp_path):
    import pytest

    config = load_config(None, smoke=True, overrides={"output_dir": str(tmp_path), "refine_rounds": 2,
                                                      "control": {"fda_copies": {"beta": 0.05}}})
    stages = {stage.name: stage for stage in plan(config)}
    names = list(stages)
    assert names.index("fda_copies") < names.index("uncertainty:fda_copies") < names.index("control")
    maps = stages["uncertainty:fda_copies"]
    assert maps.args["data_dir"] == tmp_path / "fda_copies" and maps.args["model"] == tmp_path / "segmenters" / "source_only"
    control = stages["control"].args
    assert control["train_data_dir"] == tmp_path / "fda_copies"
    assert control["uncertainty_dir"] == tmp_path / "uncertainty" / "fda_copies" / "maps"
    assert control["unlabeled_data_dir"] == tmp_path / "data" / "target" / "train"
    # The maps of source/train are still made (generation and the report read source/train's), and round 2
    # fine-tunes the control on its own maps of the copies.
    assert "uncertainty:source_train" in stages
    round_maps = stages["round_2:uncertainty:fda_copies"]
    assert round_maps.args["data_dir"] == tmp_path / "fda_copies"
    assert stages["round_2:control"].args["train_data_dir"] == tmp_path / "fda_copies"
    assert stages["round_2:control"].args["uncertainty_dir"] == tmp_path / "rounds" / "round_2" / "uncertainty" / "fda_copies" / "maps"
    assert "round_2:uncertainty:source_train" not in stages

    # Without the setting nothing changes; bad settings are named.
    plain = {stage.name: stage for stage in plan(dict(config, control={}))}
    assert "fda_copies" not in plain and plain["control"].args["train_data_dir"] == tmp_path / "data" / "source" / "train"
    for value, message in (({"beta": 0}, r"`control.fda_copies.beta` must be a number in \(0, 1\], but got 0"),
                           ({"bta": 0.1}, r"`control.fda_copies` must be true or a mapping with `beta` and `seed`"),
                           ({"seed": "x"}, r"`control.fda_copies.seed` must be an integer, but got 'x'")):
        with pytest.raises(ValueError, match=message):
            plan(dict(config, control={"fda_copies": value}))
    assert {stage.name: stage for stage in plan(dict(config, control={"fda_copies": True}))}["fda_copies"]


def test_the_control_trains_on_fda_copies_in_the_workflow(tmp_path):
    config = load_config(None, smoke=True, overrides={"output_dir": str(tmp_path / "run"),
                                                      "control": {"fda_copies": {"beta": 0.05}}})
    config["variants"] = {"source_only": {}}
    run_workflow(config, only=["data", "base", "segmenter", "fda_copies", "uncertainty", "control"], echo=lambda line: None)
    run = tmp_path / "run"
    sources = sorted(path.name for path in (run / "data" / "source" / "train" / "images").iterdir())
    copies = sorted(path.name for path in (run / "fda_copies" / "images").iterdir())
    assert copies == sorted(sources + [f"fda_{Path(name).with_suffix('.png').name}" for name in sources])
    assert sorted(path.name for path in (run / "uncertainty" / "fda_copies" / "maps").iterdir()) == copies
    assert (run / "control" / ".stage_complete.json").is_file()
