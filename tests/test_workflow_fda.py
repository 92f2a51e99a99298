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
