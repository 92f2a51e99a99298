"""The whole workflow as one command: base model -> source segmenter -> uncertainty maps -> dual control ->
synthetic data -> segmenters on source + synthetic -> evaluation -> report.

Every stage is one of the example scripts, run with `accelerate launch` exactly as a user would run it, with its
flags taken from one YAML config (each stage's `args:` mapping is passed through as `--key value` flags). A stage
that finished writes `.stage_complete.json` (its command) into its output folder; a later run skips it. A failed
stage leaves no such marker and runs again. The final report is markdown with the metrics table read back from
the evaluations' `metrics.json` files and a PNG grid of label maps, uncertainty maps and generated images.
"""

import copy
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import yaml

from .atomic import write_json_atomic


EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
MARKER = ".stage_complete.json"
CONFIG_SECTIONS = {
    "output_dir", "data", "launch", "base", "segmenter", "variants", "uncertainty", "control", "generate",
    "evaluate", "report", "smoke", "seed",
}


def _deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(path: str | os.PathLike | None = None, smoke: bool = False, overrides: dict | None = None) -> dict:
    r"""
    Read a workflow config.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            A YAML file. `None` takes the embedded default (`diffusers_uncertainty/configs/toy_oct.yaml`: the
            procedurally generated two-domain OCT-like data, tiny models, CPU).
        smoke (`bool`, defaults to `False`):
            Apply the config's `smoke:` section on top (a scale that finishes on a small CPU machine).
        overrides (`dict`, *optional*):
            Applied last, e.g. `{"output_dir": "runs/x"}`.

    Returns:
        `dict`: the merged config; relative data paths are resolved against the config file's folder.
    """
    if path is None:
        text = resources.files("diffusers_uncertainty").joinpath("configs/toy_oct.yaml").read_text()
        base_dir = Path.cwd()
    else:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"`--config` must be a YAML file, but {str(path)!r} does not exist.")
        text = path.read_text()
        base_dir = path.resolve().parent
    config = yaml.safe_load(text) or {}
    if not isinstance(config, dict):
        raise ValueError(f"The config must be a YAML mapping, but got {type(config).__name__}.")
    unknown = sorted(set(config) - CONFIG_SECTIONS)
    if unknown:
        raise ValueError(f"Unknown config sections {unknown}; expected some of {sorted(CONFIG_SECTIONS)}.")
    if smoke:
        config = _deep_merge(config, config.get("smoke") or {})
    config = _deep_merge(config, overrides or {})
    config.pop("smoke", None)

    data = config.setdefault("data", {})
    for key in ("num_classes", "resolution"):
        if not isinstance(data.get(key), int) or data[key] < 1:
            raise ValueError(f"`data.{key}` must be a positive integer, but got {data.get(key)!r}.")
    if data["resolution"] % 8 != 0:
        raise ValueError(f"`data.resolution` must be divisible by 8, but got {data['resolution']}.")
    if data.get("root") is not None:
        root = Path(data["root"])
        data["root"] = str(root if root.is_absolute() else (base_dir / root).resolve())
    if not config.get("output_dir"):
        raise ValueError("`output_dir` must be set in the config (or with `--output_dir`).")
    return config


# Flags of train_segmentation.py that only the smp segmenters read; dropped for `model: latent_diffusion`.
SMP_ONLY_FLAGS = ("architecture", "encoder_name", "encoder_depth", "encoder_weights", "decoder_channels")


def segmenter_flags(segmenter: dict, variant: dict, base_path: str, unlabeled_dir: Path) -> dict:
    r"""
    The train_segmentation.py flags of one segmenter: the `segmenter:` section's `args`, then the variant's.

    With `model: latent_diffusion` (in the `segmenter:` section or in the variant) the smp-only flags
    (`architecture`, `encoder_*`, `decoder_channels`) are dropped, the `segmenter.latent_diffusion.args` mapping is
    added (e.g. `feature_timestep`, `decoder_channels`, `adversarial_weight`), then the variant's own flags, and the
    segmenter reads the workflow's base model (`--base_model_name_or_path`). With an `adversarial_weight` above 0 it
    aligns to the unlabeled target images (`--unlabeled_data_dir <root>/target/train`).

    Args:
        segmenter (`dict`):
            The config's `segmenter:` section (`model`, `args`, `latent_diffusion: {args}`).
        variant (`dict`):
            The variant's flags (may hold `model`).
        base_path (`str`):
            The workflow's base model (trained or pretrained).
        unlabeled_dir (`Path`):
            The unlabeled target images.
    """
    model = variant.get("model", segmenter.get("model", "smp"))
    if model not in ("smp", "latent_diffusion"):
        raise ValueError(f"`segmenter.model` must be 'smp' or 'latent_diffusion', but got {model!r}.")
    flags = dict(segmenter.get("args") or {})
    if model == "latent_diffusion":
        flags = {k: v for k, v in flags.items() if k not in SMP_ONLY_FLAGS}
        flags.update((segmenter.get("latent_diffusion") or {}).get("args") or {})
        flags.update(variant)
        flags.update({"model": "latent_diffusion", "base_model_name_or_path": base_path})
        if (flags.get("adversarial_weight") or 0) > 0:
            flags.setdefault("unlabeled_data_dir", unlabeled_dir)
        return flags
    flags.update(variant)
    return flags


def to_flags(args: dict) -> list[str]:
    r"""
    Turn a mapping into command-line flags: `{"a": 1, "b": True, "c": [1, 2], "d": None, "e": False}` ->
    `["--a", "1", "--b", "--c", "1", "2"]`.

    Args:
        args (`dict`):
            Flag names (without dashes) and values.
    """
    flags = []
    for key, value in args.items():
        if value is None or value is False:
            continue
        flags.append(f"--{key}")
        if value is True:
            continue
        if isinstance(value, (list, tuple)):
            flags += [str(item) for item in value]
        else:
            flags.append(str(value))
    return flags


@dataclass
class Stage:
    r"""
    One step of the workflow.

    Args:
        name (`str`):
            Short name, shown in the progress display.
        output (`Path`):
            Folder the stage writes; it is complete when it holds the marker file.
        script (`str`, *optional*):
            Example script run with `accelerate launch`.
        args (`dict`):
            The script's flags.
        function (`Callable`, *optional*):
            In-process alternative to a script: called with no arguments.
    """

    name: str
    output: Path
    script: str | None = None
    args: dict = field(default_factory=dict)
    function: Callable | None = None

    def command(self, launch_args: list[str]) -> list[str]:
        """The `accelerate launch` command line of a script stage."""
        script = EXAMPLES_DIR / self.script
        return [sys.executable, "-m", "accelerate.commands.launch", *launch_args, str(script), *to_flags(self.args)]

    def is_complete(self) -> bool:
        return (self.output / MARKER).is_file()


def plan(config: dict) -> list[Stage]:
    r"""
    The stages for a config, in order. Pure: nothing is run or written.

    Args:
        config (`dict`):
            A config from [`load_config`].
    """
    out = Path(config["output_dir"]).resolve()
    data = config["data"]
    root = Path(data["root"]) if data.get("root") else out / "data"
    common = {"num_classes": data["num_classes"], "ignore_index": data.get("ignore_index"), "resolution": data["resolution"]}
    seed = config.get("seed", 0)
    stages = []

    if not data.get("root"):
        from .toy_oct import make_oct_dataset

        toy_args = dict(data.get("toy_oct") or {})
        stages.append(Stage("data", root, function=lambda: make_oct_dataset(root, seed=seed, overwrite=True, **toy_args)))

    base = config.get("base") or {}
    base_path = base.get("pretrained_model_name_or_path")
    if not base_path:
        base_path = str(out / "base")
        train_dirs = [str(root / "source" / "train"), str(root / "target" / "train")]
        stages.append(
            Stage(
                "base",
                out / "base",
                "train_base_model.py",
                {"train_data_dir": train_dirs, "resolution": data["resolution"], "output_dir": out / "base",
                 "seed": seed, **(base.get("args") or {})},
            )
        )

    segmenter = config.get("segmenter") or {}
    # `segmenter: latent_diffusion` is short for `segmenter: {model: latent_diffusion}` (no shared args).
    segmenter = {"model": segmenter} if isinstance(segmenter, str) else dict(segmenter)
    segmenter["args"] = dict(segmenter.get("args") or {})
    evaluate_args = dict(config.get("evaluate", {}).get("args") or {})
    if (root / "classes.json").is_file():  # class names for the segmenters' cards and metrics (CamVid has one)
        segmenter["args"].setdefault("classes_json", root / "classes.json")
        evaluate_args.setdefault("classes_json", root / "classes.json")
    unlabeled_dir = root / "target" / "train"
    source_segmenter = out / "segmenters" / "source_only"
    stages.append(
        Stage(
            "segmenter",
            source_segmenter,
            "train_segmentation.py",
            {"train_data_dir": root / "source" / "train", "validation_data_dir": root / "source" / "val",
             "output_dir": source_segmenter, "seed": seed, **common,
             **segmenter_flags(segmenter, {}, base_path, unlabeled_dir)},
        )
    )

    uncertainty_args = dict(config.get("uncertainty", {}).get("args") or {})
    maps = {}
    for split in ("source/train", "target/train"):
        name = split.replace("/", "_")
        maps[split] = out / "uncertainty" / name
        stages.append(
            Stage(
                f"uncertainty:{name}",
                maps[split],
                "compute_uncertainty.py",
                {"model": source_segmenter, "data_dir": root / split, "resolution": data["resolution"],
                 "output_dir": maps[split], **uncertainty_args},
            )
        )

    control_args = dict(config.get("control", {}).get("args") or {})
    control = out / "control"
    stages.append(
        Stage(
            "control",
            control,
            "train_uncertainty_controlnet.py",
            {"pretrained_model_name_or_path": base_path, "train_data_dir": root / "source" / "train",
             "uncertainty_dir": maps["source/train"] / "maps", "unlabeled_data_dir": root / "target" / "train",
             "unlabeled_uncertainty_dir": maps["target/train"] / "maps", "output_dir": control, "seed": seed,
             **common, **control_args},
        )
    )

    generate_args = dict(config.get("generate", {}).get("args") or {})
    synthetic = out / "synthetic"
    stages.append(
        Stage(
            "generate",
            synthetic,
            "generate_synthetic_dataset.py",
            {"pretrained_model_name_or_path": base_path, "controlnet_model_name_or_path": control,
             "label_dir": root / "source" / "train" / "labels", "uncertainty_bank": maps["target/train"] / "maps",
             "resolution": data["resolution"], "output_dir": synthetic, "seed": seed, **generate_args},
        )
    )

    variants = config.get("variants") or {"source_only": {}}
    for name, variant in variants.items():
        variant = dict(variant or {})
        if name == "source_only" and not variant:
            folder = source_segmenter
        else:
            folder = out / "segmenters" / name
            if variant.pop("synthetic", False):
                variant["synthetic_data_dir"] = synthetic
            stages.append(
                Stage(
                    f"segmenter:{name}",
                    folder,
                    "train_segmentation.py",
                    {"train_data_dir": root / "source" / "train", "validation_data_dir": root / "source" / "val",
                     "output_dir": folder, "seed": seed, **common,
                     **segmenter_flags(segmenter, variant, base_path, unlabeled_dir)},
                )
            )
        for split in ("target/val", "source/val"):
            evaluation = out / "evaluation" / name / split.replace("/", "_")
            stages.append(
                Stage(
                    f"evaluate:{name}:{split.replace('/', '_')}",
                    evaluation,
                    "evaluate_segmentation.py",
                    {"model": folder, "data_dir": root / split, "resolution": data["resolution"],
                     "output_dir": evaluation, **evaluate_args},
                )
            )

    # Label fidelity, target likeness and uncertainty of the synthetic data (synthetic_evaluation.py). The
    # target-like segmenter is the photometric variant's (the one named `photometric` first), if the config has one.
    photometric = [
        name for name, variant in variants.items()
        if (variant or {}).get("photometric_augmentation") and not (variant or {}).get("synthetic")
    ]
    photometric.sort(key=lambda name: name != "photometric")
    synthetic_evaluation_args = dict(((config.get("evaluate") or {}).get("synthetic") or {}).get("args") or {})
    if uncertainty_args.get("estimator", "entropy") in ("entropy", "mc_dropout"):  # the maps' own estimator
        synthetic_evaluation_args.setdefault("uncertainty_estimator", uncertainty_args.get("estimator", "entropy"))
    stages.append(
        Stage(
            "synthetic_evaluation",
            out / "synthetic_evaluation",
            "evaluate_synthetic.py",
            {"synthetic_data_dir": synthetic, "source_segmenter": source_segmenter,
             "target_segmenter": out / "segmenters" / photometric[0] if photometric else None,
             "source_train_dir": root / "source" / "train", "target_train_dir": root / "target" / "train",
             "source_eval_dir": root / "source" / "val", "target_eval_dir": root / "target" / "val",
             "resolution": data["resolution"], "output_dir": out / "synthetic_evaluation", "seed": seed,
             **synthetic_evaluation_args},
        )
    )

    from .report import write_report

    stages.append(
        Stage("report", out / "report", function=lambda: write_report(config, out, root, base_path, control, maps))
    )
    return stages


def _run_stage(stage: Stage, launch_args: list[str]) -> float:
    """Run one stage, its output streamed into `<output>.log`; raise with the log's tail if it fails."""
    start = time.perf_counter()
    if stage.function is not None:
        stage.function()
        command = None
    else:
        command = stage.command(launch_args)
        log_path = stage.output.parent / f"{stage.output.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "w") as log:
            log.write(" ".join(command) + "\n\n")
            log.flush()
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        if result.returncode != 0:
            tail = "".join(open(log_path).readlines()[-40:])
            raise RuntimeError(
                f"Stage {stage.name!r} failed (exit {result.returncode}). Command:\n  {' '.join(command)}\n"
                f"Last lines of {log_path}:\n{tail}"
            )
    stage.output.mkdir(parents=True, exist_ok=True)
    marker = {"stage": stage.name, "command": command, "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(stage.output / MARKER, marker)
    return marker["seconds"]


def run_workflow(config: dict, only: list[str] | None = None, force: bool = False, echo: Callable = print) -> Path:
    r"""
    Run the stages of a config, skipping those already complete.

    Args:
        config (`dict`):
            From [`load_config`].
        only (`list[str]`, *optional*):
            Run only stages whose name starts with one of these (e.g. `["report"]`).
        force (`bool`, defaults to `False`):
            Run stages even when complete.
        echo (`Callable`, defaults to `print`):
            Where the progress lines go.

    Returns:
        `Path`: the report's markdown file.
    """
    stages = plan(config)
    launch_args = [str(arg) for arg in (config.get("launch") or {}).get("args", ["--num_processes", "1"])]
    total_start = time.perf_counter()
    for index, stage in enumerate(stages, start=1):
        label = f"[{index:2d}/{len(stages)}] {stage.name:<34}"
        if only and not any(stage.name.startswith(prefix) for prefix in only):
            continue
        if stage.is_complete() and not force:
            echo(f"{label} skipped (complete: {stage.output})")
            continue
        echo(f"{label} running ...")
        seconds = _run_stage(stage, launch_args)
        echo(f"{label} done in {seconds:.0f} s")
    echo(f"Workflow finished in {time.perf_counter() - total_start:.0f} s.")
    return Path(config["output_dir"]).resolve() / "report" / "report.md"
