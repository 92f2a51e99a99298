import json
import re
import subprocess
import sys

import datasets
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


def test_run_help_names_every_shipped_config():
    from diffusers_uncertainty.cli import build_parser
    from diffusers_uncertainty.workflow import shipped_configs

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    help_text = next(action.help for action in run._actions if "--config" in action.option_strings)
    assert set(shipped_configs()) == {"camvid_daydusk", "monuseg_ffpe_frozen", "toy_oct"}
    assert f"({', '.join(shipped_configs())})" in help_text


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
    with pytest.raises(ValueError, match=r"shipped with the package \['camvid_daydusk', 'monuseg_ffpe_frozen', "
                                         r"'toy_oct'\], but 'camvid' "
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
        row = re.search(rf"^\| {variant} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", text, flags=re.MULTILINE)
        assert row is not None, text
        assert float(row.group(1)) == round(100 * metrics["mIoU"], 1)
        labeled = [entry["IoU"] for entry in metrics["per_class"] if entry["pixels"] > 0]
        assert float(row.group(2)) == round(100 * sum(labeled) / len(labeled), 1)
        assert float(row.group(3)) == round(100 * metrics["mDice"], 1)
    synthetic = tmp_path / "run" / "synthetic"
    assert (synthetic / MARKER).is_file()
    # The stage-time table: one row per stage that ran before the report, with its marker's wall time.
    seconds = json.loads((tmp_path / "run" / "control" / MARKER).read_text())["seconds"]
    assert "## Stage times" in text and f"| control | {seconds:.1f} |" in text

    # A second run finds every stage complete and runs nothing.
    again = []
    run_workflow(config, echo=again.append)
    assert sum("skipped" in line for line in again) == len(plan(config))

    # A generation interrupted after some shards continues on the next run: the missing shard is generated, the
    # finished ones kept, and the dataset is the one the uninterrupted run wrote.
    before = datasets.load_from_disk(str(synthetic))
    shards = sorted((synthetic / "data").glob("*.parquet"))
    kept = {path: path.stat().st_mtime_ns for path in shards[:-1]}
    shards[-1].unlink()
    (synthetic / MARKER).unlink()
    run_workflow(config, only=["generate"], echo=lambda line: None)
    assert (synthetic / MARKER).is_file() and shards[-1].is_file()
    assert {path: path.stat().st_mtime_ns for path in shards[:-1]} == kept
    after = datasets.load_from_disk(str(synthetic))
    assert after["image"] == before["image"] and after["label"] == before["label"]


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


def _numbers(path):
    """The numeric entries of a metrics file (paths differ between two output folders)."""
    def is_path(value):
        return isinstance(value, str) or isinstance(value, list) and all(isinstance(item, str) for item in value)

    return {key: value for key, value in json.loads(path.read_text()).items() if not is_path(value)}


def test_in_process_stages_give_the_same_results_and_markers_as_accelerate_launch(tmp_path):
    variants = {"source_only": {}, "synthetic_flexseg": {"synthetic": True, "synthetic_ratio": 0.5, "flexseg": True}}
    runs = {}
    for mode in (True, False):
        out = tmp_path / ("in_process" if mode else "launched")
        config = load_config(None, smoke=True, overrides={"output_dir": str(out), "launch": {"in_process": mode}})
        config["variants"] = variants
        lines = []
        run_workflow(config, only=["data", "base", "segmenter", "uncertainty", "control", "generate", "evaluate"],
                     echo=lines.append)
        runs[mode] = out
        first_log = (out / "segmenters" / "source_only.log").read_text().splitlines()[1]
        assert first_log == ("(run in the workflow's process)" if mode else "(run with accelerate launch)")
        # diffusers' own logger (configured before the stage) writes into the stage's log either way.
        assert "Model weights saved in" in (out / "control.log").read_text()

    inside, launched = runs[True], runs[False]
    evaluations = sorted(path.relative_to(inside) for path in inside.glob("evaluation/*/*/metrics.json"))
    assert len(evaluations) == 4
    for relative in evaluations:
        assert _numbers(inside / relative) == _numbers(launched / relative), relative
    scores = "uncertainty/target_train/scores.json"
    assert _numbers(inside / scores) == _numbers(launched / scores)
    for marker in inside.glob(f"**/{MARKER}"):
        ours, theirs = (json.loads(path.read_text()) for path in (marker, launched / marker.relative_to(inside)))
        assert set(ours) == set(theirs) and ours["stage"] == theirs["stage"]
        assert ours["command"] == (None if theirs["command"] is None else
                                   [part.replace(str(launched), str(inside)) for part in theirs["command"]])


def test_in_process_stage_failure_raises_with_the_log_and_leaves_logging_as_it_was(tmp_path):
    import logging

    # A file the stage reads is wrong (a flag the pre-flight could check would stop the workflow before the stage).
    classes = tmp_path / "classes.json"
    classes.write_text('{"classes": ["background"]}')
    config = load_config(None, smoke=True, overrides={"output_dir": str(tmp_path / "out"), "launch": {"in_process": True},
                                                      "segmenter": {"args": {"classes_json": str(classes)}}})
    handlers = logging.getLogger().handlers[:]
    with pytest.raises(RuntimeError, match=r"Stage 'segmenter' failed \(ValueError: Expected 7 class names \(`--num_classes`\), "
                                           r"got 1 from `--classes_json` [\s\S]*Last lines"):
        run_workflow(config, only=["data", "segmenter"], echo=lambda line: None)
    assert logging.getLogger().handlers == handlers
    assert not (tmp_path / "out" / "segmenters" / "source_only" / MARKER).exists()


def test_single_process_environment_resolves_accelerate_defaults_without_the_launch_warning(caplog):
    import logging

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    from diffusers_uncertainty.stage_runner import single_process_environment

    launch_args = ["--num_processes", "1"]
    warning = "were not passed to `accelerate launch`"
    launch_logger = logging.getLogger("accelerate.commands.launch")
    level = launch_logger.level
    with caplog.at_level(logging.WARNING):
        _validate_launch_command(launch_command_parser().parse_args([*launch_args, "train.py"]))
    assert warning in caplog.text  # what accelerate itself says for these flags
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        environment = single_process_environment(launch_args, "train.py")
    assert environment is not None and environment["ACCELERATE_MIXED_PRECISION"] == "no"
    assert warning not in caplog.text
    assert launch_logger.level == level


def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about_once_before_any_stage(tmp_path, monkeypatch):
    from diffusers_uncertainty import stage_runner
    from diffusers_uncertainty.stage_runner import emulated_bf16_warning
    from diffusers_uncertainty.workflow import stage_environment

    bf16 = {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_CPU": "False"}
    monkeypatch.setattr(stage_runner, "_cpu_has_bf16_kernels", lambda: False)
    monkeypatch.setattr(stage_runner, "_accelerator_available", lambda: False)
    assert "`--mixed_precision no`" in emulated_bf16_warning(bf16)
    assert emulated_bf16_warning(dict(bf16, ACCELERATE_MIXED_PRECISION="no")) is None
    assert emulated_bf16_warning(None) is None  # a multi-process launch: not resolved here
    monkeypatch.setattr(stage_runner, "_accelerator_available", lambda: True)
    assert emulated_bf16_warning(bf16) is None  # the stages run on the GPU
    assert emulated_bf16_warning(dict(bf16, ACCELERATE_USE_CPU="True")) is not None  # --cpu although a GPU is there
    monkeypatch.setattr(stage_runner, "_cpu_has_bf16_kernels", lambda: True)
    assert emulated_bf16_warning(dict(bf16, ACCELERATE_USE_CPU="True")) is None  # AVX-512 / AMX: bf16 is native

    monkeypatch.setattr(stage_runner, "_cpu_has_bf16_kernels", lambda: False)
    launch = {"args": ["--num_processes", "1", "--mixed_precision", "bf16", "--cpu"]}
    config = load_config(None, smoke=True, overrides={"output_dir": str(tmp_path), "launch": launch})
    assert stage_environment(config)["ACCELERATE_MIXED_PRECISION"] == "bf16"
    lines = []
    run_workflow(config, only=["no stage has this name"], echo=lines.append)
    assert sum("without bf16 instructions" in line for line in lines) == 1 and "without bf16" in lines[0]
    launch["args"][3] = "no"
    lines.clear()
    run_workflow(load_config(None, smoke=True, overrides={"output_dir": str(tmp_path), "launch": launch}),
                 only=["no stage has this name"], echo=lines.append)
    assert not any("bf16" in line for line in lines)


def test_cpu_stages_get_the_physical_cores_instead_of_accelerates_one_thread(tmp_path, monkeypatch):
    import psutil

    from diffusers_uncertainty import stage_runner
    from diffusers_uncertainty.stage_runner import cpu_thread_arguments
    from diffusers_uncertainty.workflow import stage_environment, stage_launch_arguments

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(stage_runner, "_accelerator_available", lambda: False)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 16 if logical else 8)
    one = ["--num_processes", "1"]
    assert cpu_thread_arguments(one) == ["--num_cpu_threads_per_process", "8"]
    assert cpu_thread_arguments(["--num_processes", "2"]) == ["--num_cpu_threads_per_process", "4"]
    assert cpu_thread_arguments([*one, "--cpu"]) == []  # accelerate itself gives --cpu the physical cores
    assert cpu_thread_arguments([*one, "--num_cpu_threads_per_process", "3"]) == []  # the user's choice
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cpu_thread_arguments(one) == []  # the user's choice, which accelerate passes on
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 1)
    assert cpu_thread_arguments(one) == []  # one core: nothing to add

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 16 if logical else 8)
    config = load_config(None, smoke=True, overrides={"output_dir": str(tmp_path), "launch": {"args": one}})
    assert stage_launch_arguments(config) == [*one, "--num_cpu_threads_per_process", "8"]
    assert stage_environment(config)["OMP_NUM_THREADS"] == "8"  # what the in-process stages run with
    lines = []
    run_workflow(config, only=["no stage has this name"], echo=lines.append)
    assert lines[0].startswith("The stages run on the CPU: `--num_cpu_threads_per_process 8` added to `launch.args`")

    monkeypatch.setattr(stage_runner, "_accelerator_available", lambda: True)
    assert stage_launch_arguments(config) == one  # on a GPU, accelerate's one thread per process stays
    assert stage_environment(config)["OMP_NUM_THREADS"] == "1"
    lines.clear()
    run_workflow(config, only=["no stage has this name"], echo=lines.append)
    assert not any("CPU" in line for line in lines)


def test_in_process_is_refused_for_several_processes(tmp_path):
    from diffusers_uncertainty.workflow import stage_environment

    two = {"launch": {"args": ["--num_processes", "2", "--cpu"], "in_process": True}}
    config = load_config(None, smoke=True, overrides={"output_dir": str(tmp_path), **two})
    with pytest.raises(ValueError, match=r"`launch.in_process: true` needs a single local process"):
        stage_environment(config)
    config["launch"]["in_process"] = "auto"
    assert stage_environment(config) is None  # several processes: accelerate launch
    config["launch"] = {"args": ["--num_processes", "1", "--mixed_precision", "bf16"]}
    assert stage_environment(config)["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with pytest.raises(ValueError, match="`launch.in_process` must be 'auto', true or false, but got 'yes'"):
        load_config(None, smoke=True, overrides={"output_dir": str(tmp_path), "launch": {"in_process": "yes"}})


def test_an_unquoted_yaml_no_in_launch_args_is_refused_when_the_config_is_read(tmp_path):
    from diffusers_uncertainty.workflow import launch_arguments

    config = tmp_path / "config.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\ndata: {{num_classes: 2, resolution: 32}}\n"
                      "launch: {args: [--num_processes, 1, --mixed_precision, no]}\n")
    with pytest.raises(ValueError, match=r"`launch.args` item 3 \(after '--mixed_precision'\) is the YAML boolean False: "
                                         r"YAML reads an unquoted no/yes/off/on as true/false. Quote it"):
        load_config(config)
    assert not (tmp_path / "out").exists()
    config.write_text(config.read_text().replace(", no]", ', "no"]'))
    assert launch_arguments(load_config(config)) == ["--num_processes", "1", "--mixed_precision", "no"]
    assert launch_arguments({}) == ["--num_processes", "1"]
    with pytest.raises(ValueError, match=r"`launch.args` must be a list of `accelerate launch` arguments, but got '--cpu'"):
        launch_arguments({"launch": {"args": "--cpu"}})
    with pytest.raises(ValueError, match=r"`launch.args` item 0 must be a string or a number, but got dict"):
        launch_arguments({"launch": {"args": [{"num_processes": 1}]}})


def test_stage_flags_are_checked_against_the_scripts_parsers_before_any_stage_runs(tmp_path):
    from diffusers_uncertainty.workflow import check_stage_flags

    def refused(overrides):
        config = load_config(None, smoke=True, overrides={"output_dir": str(tmp_path / "out"), **overrides})
        with pytest.raises(ValueError) as error:
            run_workflow(config, echo=lambda line: None)
        assert not (tmp_path / "out").exists()  # refused before the first stage wrote anything
        return str(error.value)

    message = refused({"segmenter": {"args": {"max_train_step": 10}}})
    assert message == ("Stage 'segmenter' (train_segmentation.py): the config sets `max_train_step`, but "
                       "train_segmentation.py has no `--max_train_step` flag; did you mean `max_train_steps`?")
    message = refused({"uncertainty": {"args": {"mixed_precision": False}}})  # what YAML makes of `mixed_precision: no`
    assert message.startswith("Stage 'uncertainty:source_train' (compute_uncertainty.py): `mixed_precision` is the YAML "
                              "boolean False, but `--mixed_precision` takes a value")
    message = refused({"uncertainty": {"args": {"estimator": "entropi"}}})
    assert "argument --estimator: invalid choice: 'entropi'" in message and "--estimator entropi" in message
    message = refused({"variants": {"late": {"max_train_steps": "1e4"}}})  # the last stages are checked too
    assert message.startswith("Stage 'segmenter:late' (train_segmentation.py): argument --max_train_steps: invalid int")
    # The scripts' checks across flags run too: here on stages whose inputs earlier stages have yet to write.
    message = refused({"variants": {"late": {"synthetic_ratio_end": 0.0}}})
    assert message.startswith("Stage 'segmenter:late' (train_segmentation.py): `--synthetic_ratio_end` needs "
                              "`--synthetic_ratio` (the fraction at the first step). (its flags: ")
    message = refused({"uncertainty": {"args": {"estimator": "ensemble"}}})
    assert message.startswith("Stage 'uncertainty:source_train' (compute_uncertainty.py): `--estimator ensemble` needs "
                              "at least 2 `--model`, got 1.")
    message = refused({"generate": {"args": {"uncertainty_level": 1.0}}})  # beside the config's uncertainty bank
    assert "(generate_synthetic_dataset.py): Pass exactly one of `--uncertainty_bank` and `--uncertainty_level`" in message
    message = refused({"control": {"args": {"proportion_empty_prompts": 2}}})
    assert "(train_uncertainty_controlnet.py): `--proportion_empty_prompts` must be in [0, 1], but got 2." in message
    for name, scales in (("toy_oct", [None, "smoke"]), ("camvid_daydusk", [None, "smoke", "cpu", "gpu"]),
                         ("monuseg_ffpe_frozen", [None, "smoke"])):  # what ships passes, at every scale
        for scale in scales:
            config = load_config(name, scale=scale, overrides={"output_dir": str(tmp_path / "out"), "data": {"root": None}})
            check_stage_flags(plan(config))


def test_the_data_root_is_checked_before_the_first_stage(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from diffusers_uncertainty.toy_oct import make_oct_dataset
    from diffusers_uncertainty.workflow import check_data_root

    root = tmp_path / "data"
    make_oct_dataset(root, num_source_train=3, num_source_val=2, num_target_train=3, num_target_val=2, size=(32, 32))
    overrides = {"output_dir": str(tmp_path / "out"), "data": {"root": str(root)}}
    assert check_data_root(load_config(None, smoke=True, overrides=overrides)) == 10
    from diffusers_uncertainty.cli import main

    command = ["stages", "--smoke", "--output_dir", str(tmp_path / "out"), "--data_root", str(root)]
    assert main([*command, "--check"]) == 0 and "Checked the data root (10 images)" in capsys.readouterr().out
    num_classes = load_config(None, smoke=True, overrides=overrides)["data"]["num_classes"]
    assert check_data_root(load_config(None, smoke=True, overrides={"output_dir": "x"})) == 0  # the embedded data

    bad = sorted((root / "target" / "val" / "labels").iterdir())[1]
    label = np.array(Image.open(bad))
    label[0, 0] = num_classes  # one pixel of a class the config does not have
    Image.fromarray(label).save(bad)
    lines = []
    with pytest.raises(ValueError) as error:
        run_workflow(load_config(None, smoke=True, overrides=overrides), echo=lines.append)
    assert str(error.value).startswith(f"The data root {str(root)!r} failed its check in target/val (`data.num_classes` "
                                       f"{num_classes}, `data.ignore_index` None): Label map of {bad} has values "
                                       f"[{num_classes}] outside the allowed [0, {num_classes})")
    assert not (tmp_path / "out").exists() and not any("running" in line for line in lines)
    # `stages --check` makes the same checks without running anything; `stages` alone only lists.
    assert main(command) == 0
    with pytest.raises(ValueError, match=r"failed its check in target/val"):
        main([*command, "--check"])
    assert not (tmp_path / "out").exists()

    first = sorted((root / "source" / "val" / "labels").iterdir())[0]
    first.unlink()
    with pytest.raises(ValueError, match=r"failed its check in source/val .*`data root source/val`: 1 image\(s\) have no "
                                         r"label map"):
        check_data_root(load_config(None, smoke=True, overrides=overrides))


def test_a_pretrained_base_that_cannot_be_reached_stops_the_run_before_the_first_stage(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    from diffusers_uncertainty import workflow

    fetched = []

    def offline(repo_id, filename):
        fetched.append((repo_id, filename))
        raise LocalEntryNotFoundError("not in the cache and no connection")

    monkeypatch.setattr(workflow, "hf_hub_download", offline)  # no network in tests: the Hub answers "unreachable"
    overrides = {"output_dir": str(tmp_path / "out"), "base": {"pretrained_model_name_or_path": "someone/sd-typo"}}
    with pytest.raises(ValueError, match=r"`base.pretrained_model_name_or_path` 'someone/sd-typo' is no local folder, "
                                         r"and its `model_index.json` could not be fetched .*LocalEntryNotFoundError"):
        run_workflow(load_config(None, smoke=True, overrides=overrides), echo=lambda line: None)
    assert fetched == [("someone/sd-typo", "model_index.json")] and not (tmp_path / "out").exists()

    folder = tmp_path / "not_a_pipeline"
    folder.mkdir()
    overrides["base"] = {"pretrained_model_name_or_path": str(folder)}
    with pytest.raises(ValueError, match=r"is a folder without `model_index.json`; it must be a saved diffusers pipeline"):
        run_workflow(load_config(None, smoke=True, overrides=overrides), echo=lambda line: None)
    (folder / "model_index.json").write_text("{}")
    workflow.check_pretrained_base(load_config(None, smoke=True, overrides=overrides))  # a saved pipeline passes
    monkeypatch.setattr(workflow, "hf_hub_download", lambda repo_id, filename: str(tmp_path / "cached.json"))
    overrides["base"] = {"pretrained_model_name_or_path": "someone/sd"}
    workflow.check_pretrained_base(load_config(None, smoke=True, overrides=overrides))  # a resolvable id passes
    assert not (tmp_path / "out").exists()


def test_named_scales(tmp_path):
    from pathlib import Path

    path = Path(__file__).parents[1] / "examples" / "configs" / "camvid_daydusk.yaml"
    for folder in ("source/train", "source/val", "target/train", "target/val"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    data = {"data": {"root": str(tmp_path / "data")}}
    gpu = load_config(path, scale="gpu", overrides={"output_dir": str(tmp_path), **data})
    assert gpu["data"]["resolution"] == 128 and gpu["launch"]["args"][-1] == "bf16" and "scales" not in gpu
    assert load_config(path, smoke=True, overrides={"output_dir": "x", **data}) == load_config(
        path, scale="smoke", overrides={"output_dir": "x", **data}
    )
    cpu = load_config(path, scale="cpu", overrides={"output_dir": "x", **data})
    assert cpu["data"]["resolution"] == 64 and cpu["launch"]["args"][-1] == "no"  # the string, not YAML's False
    with pytest.raises(ValueError, match=r"`--scale` must name one of the config's scales \['cpu', 'gpu', 'smoke'\], but got 'tpu'"):
        load_config(path, scale="tpu", overrides={"output_dir": "x", **data})


def test_refinement_rounds_read_the_previous_round_and_rerun_skips_them(tmp_path):
    variants = {"source_only": {}, "synthetic": {"synthetic": True, "synthetic_ratio": 0.5},
                "synthetic_flexseg": {"synthetic": True, "synthetic_ratio": 0.5, "flexseg": True}}
    config = load_config(None, smoke=True, overrides={"output_dir": str(tmp_path), "refine_rounds": 3,
                                                      "refine": {"segmenter": "synthetic",
                                                                 "control": {"args": {"max_train_steps": 2}}}})
    config["variants"] = variants
    stages = {stage.name: stage for stage in plan(config)}
    for round_index, previous in ((2, tmp_path / "segmenters"), (3, tmp_path / "rounds" / "round_2" / "segmenters")):
        folder = tmp_path / "rounds" / f"round_{round_index}"
        uncertainty = stages[f"round_{round_index}:uncertainty:target_train"]
        assert uncertainty.args["model"] == previous / "synthetic" and uncertainty.output == folder / "uncertainty" / "target_train"
        control = stages[f"round_{round_index}:control"].args
        assert control["controlnet_model_name_or_path"] == (tmp_path / "control" if round_index == 2 else
                                                             tmp_path / "rounds" / "round_2" / "control")
        assert control["unlabeled_uncertainty_dir"] == folder / "uncertainty" / "target_train" / "maps"
        assert control["max_train_steps"] == 2
        generate = stages[f"round_{round_index}:generate"].args
        assert generate["controlnet_model_name_or_path"] == folder / "control" and generate["seed"] != 0
        assert stages[f"round_{round_index}:segmenter:synthetic_flexseg"].args["synthetic_data_dir"] == folder / "synthetic"
        assert f"round_{round_index}:segmenter:source_only" not in stages  # no synthetic data: unchanged by rounds

    config["refine_rounds"] = 2
    report = run_workflow(config, echo=lambda line: None)
    text = report.read_text()
    assert "## Iterative refinement" in text
    metrics = json.loads((tmp_path / "rounds" / "round_2" / "evaluation" / "synthetic" / "target_val" /
                          "metrics.json").read_text())
    assert f"| synthetic | 2 | {100 * metrics['mIoU']:.1f} |" in text
    assert json.loads((tmp_path / "rounds" / "round_2" / "uncertainty" / "target_train" / "scores.json").read_text()
                      )["models"] == [str(tmp_path / "segmenters" / "synthetic")]
    again = []
    run_workflow(config, echo=again.append)
    stage_lines = [line for line in again if line.startswith("[")]
    assert len(stage_lines) == len(plan(config)) and all("skipped" in line for line in stage_lines)

    with pytest.raises(ValueError, match=r"`refine.segmenter` must name a variant trained on synthetic data"):
        plan(dict(config, refine={"segmenter": "source_only"}))
    with pytest.raises(ValueError, match="`refine_rounds` must be a positive integer, but got 0"):
        plan(dict(config, refine_rounds=0))

    # refine.match_uncertainty: every round's maps take round 1's distribution of the same split.
    assert "match_reference_dir" not in stages["round_2:uncertainty:target_train"].args
    matched = {stage.name: stage for stage in plan(dict(config, refine_rounds=3, refine={"match_uncertainty": True}))}
    for round_index in (2, 3):
        for split in ("source_train", "target_train"):
            args = matched[f"round_{round_index}:uncertainty:{split}"].args
            assert args["match_reference_dir"] == tmp_path / "uncertainty" / split / "maps"
    with pytest.raises(ValueError, match=r"`refine.match_uncertainty` must be true or false, but got 'yes'"):
        plan(dict(config, refine={"match_uncertainty": "yes"}))


def test_synthetic_filter_variants_read_the_named_segmenter_in_every_round(tmp_path):
    variants = {
        "source_only": {},
        "photometric": {"photometric_augmentation": True},
        "filtered": {"synthetic": True, "photometric_augmentation": True, "synthetic_filter": "photometric",
                     "synthetic_keep_fraction": 0.75},
    }
    config = load_config(None, smoke=True, overrides={"output_dir": str(tmp_path), "variants": variants,
                                                      "refine_rounds": 2})
    stages = {stage.name: stage for stage in plan(config)}
    for name, synthetic in (("segmenter:filtered", tmp_path / "synthetic"),
                            ("round_2:segmenter:filtered", tmp_path / "rounds" / "round_2" / "synthetic")):
        args = stages[name].args
        assert args["synthetic_filter_model"] == tmp_path / "segmenters" / "photometric"  # round 1's, in every round
        assert args["synthetic_data_dir"] == synthetic and args["synthetic_keep_fraction"] == 0.75
        assert "synthetic_filter" not in args and "synthetic" not in args
    flags = to_flags(stages["segmenter:filtered"].args)
    assert flags[flags.index("--synthetic_filter_model") + 1] == str(tmp_path / "segmenters" / "photometric")

    def planned(**variant):
        return plan(dict(config, refine_rounds=1, variants=dict(variants, filtered=variant)))

    with pytest.raises(ValueError, match=r"Variant 'filtered': `synthetic_filter` must name a variant listed before it "
                                         r"and trained without synthetic data .*got 'later'"):
        planned(synthetic=True, synthetic_filter="later", synthetic_keep_fraction=0.5)
    with pytest.raises(ValueError, match=r"`synthetic_filter` needs `synthetic: true` and `synthetic_keep_fraction`"):
        planned(synthetic=True, synthetic_filter="photometric")
    with pytest.raises(ValueError, match=r"`synthetic_keep_fraction` needs `synthetic_filter: <variant>`"):
        planned(synthetic=True, synthetic_keep_fraction=0.5)
    with pytest.raises(ValueError, match=r"trained without synthetic data"):
        plan(dict(config, refine_rounds=1, variants={
            "synthetic": {"synthetic": True},
            "filtered": {"synthetic": True, "synthetic_filter": "synthetic", "synthetic_keep_fraction": 0.5}}))
