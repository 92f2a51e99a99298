"""The whole workflow as one command: base model -> source segmenter -> uncertainty maps -> dual control ->
synthetic data -> segmenters on source + synthetic -> evaluation -> report.

Every stage is one of the example scripts, with its flags taken from one YAML config (each stage's `args:` mapping
is passed through as `--key value` flags). With one process (`launch.args`) a stage runs in the workflow's own
process (the script's `main(parse_args(flags))`, CUDA and the libraries initialised once for all stages); otherwise
it runs with `accelerate launch` exactly as a user would run it (`launch.in_process: false` forces that). A stage
that finished writes `.stage_complete.json` (its command) into its output folder; a later run skips it. A failed
stage leaves no such marker and runs again. The final report is markdown with the metrics table read back from
the evaluations' `metrics.json` files and a PNG grid of label maps, uncertainty maps and generated images.
"""

import copy
import difflib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import yaml
from huggingface_hub import hf_hub_download

from .atomic import write_json_atomic, write_text_atomic
from .data_reader import labeled_folder_records, unlabeled_folder_records, validate_records
from .stage_runner import (
    cpu_thread_arguments,
    emulated_bf16_warning,
    load_script,
    run_in_process,
    run_subprocess,
    single_process_environment,
)


PACKAGE_DIR = Path(__file__).resolve().parent
MARKER = ".stage_complete.json"
# A generate stage interrupted mid-way (its folder holds finished shards but no marker) continues on the next run
# instead of stopping there; the script refuses to resume with other settings, naming them.
RESUME_GENERATION = {"resume": True}
CONFIG_SECTIONS = {
    "output_dir", "data", "launch", "base", "segmenter", "variants", "uncertainty", "control", "generate",
    "evaluate", "report", "scales", "seed", "refine_rounds", "refine",
}


def _examples_dir() -> Path:
    # An installed wheel carries the repository's `examples/` as `diffusers_uncertainty/examples/` (pyproject.toml
    # maps the folder into the package); a checkout (editable install, or the package on PYTHONPATH) has it beside
    # the package. Only the first folder that exists is used, so a wheel never reads an unrelated `examples/`.
    for folder in (PACKAGE_DIR / "examples", PACKAGE_DIR.parent / "examples"):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"The workflow's example scripts are missing: neither {PACKAGE_DIR / 'examples'} nor "
        f"{PACKAGE_DIR.parent / 'examples'} exists; reinstall diffusers-uncertainty."
    )


def example_script_path(name: str) -> Path:
    r"""
    The path of one of the workflow's example scripts, e.g. `"train_segmentation.py"`: the repository's
    `examples/` folder in a checkout, the same files inside the package when installed from a wheel.

    Args:
        name (`str`):
            The script's file name.

    Returns:
        `Path`: an existing file.
    """
    folder = _examples_dir()
    path = folder / name
    if not name.endswith(".py") or path.parent != folder or not path.is_file():
        scripts = sorted(script.name for script in folder.glob("*.py"))
        raise ValueError(f"`name` must be one of the example scripts {scripts}, but got {name!r}.")
    return path


def shipped_configs() -> dict[str, Path]:
    r"""
    The workflow configs that come with the package, by name: the embedded default (`toy_oct`) and those of
    `examples/configs/` (e.g. `camvid_daydusk`). `--config NAME` takes one of them.
    """
    folders = (PACKAGE_DIR / "configs", _examples_dir() / "configs")
    return {path.stem: path for folder in folders for path in sorted(folder.glob("*.yaml"))}


# The folders `plan` reads under `data.root`.
DATA_ROOT_FOLDERS = ("source/train", "source/val", "target/train", "target/val")


def _deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(
    path: str | os.PathLike | None = None,
    smoke: bool = False,
    overrides: dict | None = None,
    scale: str | None = None,
) -> dict:
    r"""
    Read a workflow config.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            A YAML file, or the name of a config shipped with the package (see [`shipped_configs`], e.g.
            `camvid_daydusk`). `None` takes the embedded default (`diffusers_uncertainty/configs/toy_oct.yaml`: the
            procedurally generated two-domain OCT-like data, tiny models, CPU).
        smoke (`bool`, defaults to `False`):
            Short for `scale="smoke"` (a scale that finishes on a small CPU machine).
        overrides (`dict`, *optional*):
            Applied last, e.g. `{"output_dir": "runs/x"}` or `{"data": {"root": "data/camvid_daydusk"}}` (what
            `--output_dir` and `--data_root` do).
        scale (`str`, *optional*):
            A named scale from the config's `scales:` section (e.g. `smoke`, `gpu`), merged over the rest of the
            config before `overrides`.

    Returns:
        `dict`: the merged config; a relative `data.root` is resolved against the working directory, like
        `output_dir`, and must hold `source/train`, `source/val`, `target/train` and `target/val`.
    """
    if path is None:
        text = resources.files("diffusers_uncertainty").joinpath("configs/toy_oct.yaml").read_text()
    else:
        if not Path(path).is_file():
            shipped = shipped_configs()
            if str(path) not in shipped:
                raise ValueError(
                    f"`--config` must be a YAML file or the name of a config shipped with the package "
                    f"{sorted(shipped)}, but {str(path)!r} does not exist."
                )
            path = shipped[str(path)]
        path = Path(path)
        text = path.read_text()
    config = yaml.safe_load(text) or {}
    if not isinstance(config, dict):
        raise ValueError(f"The config must be a YAML mapping, but got {type(config).__name__}.")
    unknown = sorted(set(config) - CONFIG_SECTIONS)
    if unknown:
        raise ValueError(f"Unknown config sections {unknown}; expected some of {sorted(CONFIG_SECTIONS)}.")
    scales = config.pop("scales", None) or {}
    if smoke:
        if scale not in (None, "smoke"):
            raise ValueError(f"`smoke` is short for `scale='smoke'`; it cannot be combined with `scale={scale!r}`.")
        scale = "smoke"
    if scale is not None:
        if scale not in scales:
            raise ValueError(f"`--scale` must name one of the config's scales {sorted(scales)}, but got {scale!r}.")
        config = _deep_merge(config, scales[scale] or {})
    config = _deep_merge(config, overrides or {})

    data = config.setdefault("data", {})
    for key in ("num_classes", "resolution"):
        if not isinstance(data.get(key), int) or data[key] < 1:
            raise ValueError(f"`data.{key}` must be a positive integer, but got {data.get(key)!r}.")
    if data["resolution"] % 8 != 0:
        raise ValueError(f"`data.resolution` must be divisible by 8, but got {data['resolution']}.")
    if data.get("root") is not None:
        root = Path(data["root"]).resolve()
        if not root.is_dir():
            raise ValueError(
                f"The data folder {str(root)!r} (`--data_root`, or `data.root` in the config) does not exist. Pass "
                "`--data_root DIR`; CamVid day -> dusk is built by `diffusers-uncertainty prepare camvid-daydusk`."
            )
        missing = [folder for folder in DATA_ROOT_FOLDERS if not (root / folder).is_dir()]
        if missing:
            raise ValueError(
                f"The data folder {str(root)!r} (`--data_root`, or `data.root` in the config) must hold "
                f"{', '.join(DATA_ROOT_FOLDERS)}, but has no {', '.join(missing)}."
            )
        data["root"] = str(root)
    in_process = (config.get("launch") or {}).get("in_process", "auto")
    if in_process not in ("auto", True, False):
        raise ValueError(f"`launch.in_process` must be 'auto', true or false, but got {in_process!r}.")
    launch_arguments(config)
    if not config.get("output_dir"):
        raise ValueError("`output_dir` must be set in the config (or with `--output_dir`).")
    return config


def launch_arguments(config: dict) -> list[str]:
    r"""
    The config's `launch.args` (default `--num_processes 1`) as `accelerate launch` arguments.

    YAML reads an unquoted `no`, `yes`, `off` or `on` as a boolean, so `[--mixed_precision, no]` would reach
    `accelerate launch` as `False`; such an item is refused with the quoted spelling instead of being turned back into
    a word.

    Args:
        config (`dict`):
            The workflow config (its `launch:` section may be missing).
    """
    args = (config.get("launch") or {}).get("args", ["--num_processes", "1"])
    if not isinstance(args, list):
        raise ValueError(f"`launch.args` must be a list of `accelerate launch` arguments, but got {args!r}.")
    for index, arg in enumerate(args):
        if isinstance(arg, bool):
            after = f" (after {args[index - 1]!r})" if index > 0 else ""
            raise ValueError(
                f"`launch.args` item {index}{after} is the YAML boolean {arg}: YAML reads an unquoted no/yes/off/on as "
                f'true/false. Quote it, e.g. `[--num_processes, 1, --mixed_precision, "no"]`.'
            )
        if not isinstance(arg, (str, int, float)):
            raise ValueError(
                f"`launch.args` item {index} must be a string or a number, but got {type(arg).__name__} {arg!r}."
            )
    return [str(arg) for arg in args]


def stage_launch_arguments(config: dict) -> list[str]:
    r"""
    The `accelerate launch` arguments the script stages run with: [`launch_arguments`], plus
    `--num_cpu_threads_per_process N` when the stages would otherwise compute on one CPU thread each (see
    [`stage_runner.cpu_thread_arguments`]; set that flag, `--cpu` or `OMP_NUM_THREADS` to choose yourself).

    Args:
        config (`dict`):
            From [`load_config`].
    """
    launch_args = launch_arguments(config)
    return launch_args + cpu_thread_arguments(launch_args)


# Flags of train_segmentation.py that only the smp segmenters read; dropped for `model: latent_diffusion`.
SMP_ONLY_FLAGS = ("architecture", "encoder_name", "encoder_depth", "encoder_weights", "decoder_channels")


def segmenter_flags(segmenter: dict, variant: dict, base_path: str, unlabeled_dir: Path) -> dict:
    r"""
    The train_segmentation.py flags of one segmenter: the `segmenter:` section's `args`, then the variant's.

    With `model: latent_diffusion` (in the `segmenter:` section or in the variant) the smp-only flags
    (`architecture`, `encoder_*`, `decoder_channels`) are dropped, the `segmenter.latent_diffusion.args` mapping is
    added (e.g. `feature_timestep`, `decoder_channels`, `adversarial_weight`), then the variant's own flags, and the
    segmenter reads the workflow's base model (`--base_model_name_or_path`). With an `adversarial_weight` above 0 it
    aligns to the unlabeled target images (`--unlabeled_data_dir <root>/target/train`). With
    `fourier_domain_adaptation` (either model) FDA reads the same images (`--fda_target_dir`).

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
    else:
        flags.update(variant)
    if flags.get("fourier_domain_adaptation"):
        # FDA takes its target amplitude spectra from the unlabeled target images.
        flags.setdefault("fda_target_dir", unlabeled_dir)
    return flags


def variant_data_flags(name: str, variant: dict, variants: dict, segmenters_dir: Path, synthetic: Path) -> dict:
    r"""
    A variant's flags with the workflow's own keys turned into train_segmentation.py flags: `synthetic: true` ->
    `--synthetic_data_dir <synthetic>`, `synthetic_filter: <variant>` -> `--synthetic_filter_model` (that variant's
    segmenter scores the synthetic samples; `synthetic_keep_fraction` says how many are kept).

    Args:
        name (`str`):
            The variant.
        variant (`dict`):
            Its mapping in the config's `variants:`.
        variants (`dict`):
            All of them, in order.
        segmenters_dir (`Path`):
            Where round 1 writes the variants' segmenters (`<output_dir>/segmenters`).
        synthetic (`Path`):
            The generated dataset this variant reads.
    """
    flags = dict(variant or {})
    if flags.pop("synthetic", False):
        flags["synthetic_data_dir"] = synthetic
    judge = flags.pop("synthetic_filter", None)
    if judge is None:
        if "synthetic_keep_fraction" in flags:
            raise ValueError(f"Variant {name!r}: `synthetic_keep_fraction` needs `synthetic_filter: <variant>`.")
        return flags
    earlier = list(variants)[: list(variants).index(name)]
    if "synthetic_data_dir" not in flags or "synthetic_keep_fraction" not in flags:
        raise ValueError(
            f"Variant {name!r}: `synthetic_filter` needs `synthetic: true` and `synthetic_keep_fraction` (the share "
            f"of the synthetic samples kept), got {sorted(variant)}."
        )
    if judge not in earlier or (variants[judge] or {}).get("synthetic"):
        raise ValueError(
            f"Variant {name!r}: `synthetic_filter` must name a variant listed before it and trained without synthetic "
            f"data (e.g. `photometric`), got {judge!r}; earlier variants: {earlier}."
        )
    flags["synthetic_filter_model"] = segmenters_dir / judge
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

    @property
    def script_path(self) -> Path:
        """The example script's file (the checkout's `examples/` or the installed wheel's copy)."""
        return example_script_path(self.script)

    def command(self, launch_args: list[str]) -> list[str]:
        """The `accelerate launch` command line of a script stage (what runs it, or its in-process equivalent)."""
        return [sys.executable, "-m", "accelerate.commands.launch", *launch_args, str(self.script_path), *to_flags(self.args)]

    def is_complete(self) -> bool:
        return (self.output / MARKER).is_file()


def check_stage_flags(stages: list[Stage]) -> None:
    r"""
    Check every script stage's flags against its script's parser (`build_parser()`) and its checks across flags
    (`check_args`, where the script has one) before any stage runs, so that a misspelled flag, a value of the wrong
    type or choice, a YAML boolean given for a flag that takes a value (an unquoted `no`) or flags that do not fit
    together fail at once rather than after the stages before it have run. The checks `parse_args` makes on files
    (which earlier stages may still have to write) stay with the stage.

    Args:
        stages (`list[Stage]`):
            From [`plan`].

    Raises:
        `ValueError`: naming the stage, its script and the flag.
    """
    scripts = {}
    for stage in stages:
        if stage.script is None:
            continue
        if stage.script not in scripts:
            scripts[stage.script] = load_script(stage.script_path)
        script = scripts[stage.script]
        parser = script.build_parser()
        where = f"Stage {stage.name!r} ({stage.script})"
        actions = {option[2:]: action for action in parser._actions for option in action.option_strings
                   if option.startswith("--")}
        for key, value in stage.args.items():
            action = actions.get(key)
            if action is None:
                close = difflib.get_close_matches(key, list(actions), n=3)
                hint = f"; did you mean {' or '.join(f'`{name}`' for name in close)}?" if close else "."
                raise ValueError(f"{where}: the config sets `{key}`, but {stage.script} has no `--{key}` flag{hint}")
            if isinstance(value, bool) and action.nargs != 0:
                raise ValueError(
                    f"{where}: `{key}` is the YAML boolean {value}, but `--{key}` takes a value (YAML reads an unquoted "
                    f'no/yes/off/on as true/false); quote it, e.g. `{key}: "no"`.'
                )
        flags = to_flags(stage.args)

        def refuse(message, where=where, flags=flags):
            raise ValueError(f"{where}: {message} (its flags: {' '.join(flags)})")

        parser.error = refuse  # argparse would print the usage and exit the workflow's process
        args = parser.parse_args(flags)
        if hasattr(script, "check_args"):
            try:
                script.check_args(args)
            except ValueError as error:
                refuse(str(error))


def check_data_root(config: dict) -> int:
    r"""
    Decode every image and label map of the config's data root once, before the first stage: a label value outside
    `data.num_classes` (other than `data.ignore_index`), an image without its label map, a label map of another size
    or an unreadable file stops the workflow before the base model trains, not at the first segmenter stage after it.
    The embedded example, whose data its first stage writes, is not checked.

    Args:
        config (`dict`):
            From [`load_config`].

    Returns:
        `int`: the number of images checked.

    Raises:
        `ValueError`: naming the split and the offending file.
    """
    data = config["data"]
    if not data.get("root"):
        return 0
    root = Path(data["root"])
    checked = 0
    for split in DATA_ROOT_FOLDERS:
        labeled = split != "target/train"  # the unlabeled target set
        argument = f"data root {split}"
        try:
            records = (labeled_folder_records if labeled else unlabeled_folder_records)(root / split, argument)
            validate_records(records, data["num_classes"], data.get("ignore_index"), need_labels=labeled,
                             need_uncertainty=False, description=split, show_progress=False)
        except ValueError as error:
            raise ValueError(
                f"The data root {str(root)!r} failed its check in {split} (`data.num_classes` {data['num_classes']}, "
                f"`data.ignore_index` {data.get('ignore_index')}): {error}"
            ) from error
        checked += len(records)
    return checked


def check_pretrained_base(config: dict) -> None:
    r"""
    Check `base.pretrained_model_name_or_path` before the first stage: a local folder must be a saved pipeline (it
    holds `model_index.json`); a Hub id must resolve, its `model_index.json` fetched through `huggingface_hub` and its
    cache (offline with `HF_HUB_OFFLINE=1` once cached). A misspelled id, a gated model without a token or no network
    then fails at once, not at the control stage after the segmenter has trained. Nothing else is downloaded here: the
    stages fetch the weights into the same cache.

    Args:
        config (`dict`):
            From [`load_config`].
    """
    name = (config.get("base") or {}).get("pretrained_model_name_or_path")
    if not name:
        return
    if Path(name).is_dir():
        if not (Path(name) / "model_index.json").is_file():
            raise ValueError(
                f"`base.pretrained_model_name_or_path` {name!r} is a folder without `model_index.json`; it must be a "
                "saved diffusers pipeline (e.g. the `base/` folder of an earlier run) or a Hub model id."
            )
        return
    try:
        hf_hub_download(name, "model_index.json")
    except (OSError, ValueError) as error:  # huggingface_hub's HTTP, cache-miss and repo-id errors
        raise ValueError(
            f"`base.pretrained_model_name_or_path` {name!r} is no local folder, and its `model_index.json` could not "
            f"be fetched from the Hub or found in the huggingface_hub cache ({type(error).__name__}: {error})"
        ) from error


def fda_copies_settings(config: dict) -> dict | None:
    r"""
    `control.fda_copies` checked: `None` when absent, else `{"beta": float, "seed": int}` (`beta` defaults to 0.03,
    `seed` to the config's seed). With it the control is trained on `source/train` plus an FDA copy of each image
    ([`~prepare.prepare_fda_copies`]) instead of `source/train` alone.

    Args:
        config (`dict`):
            A config from [`load_config`].
    """
    settings = (config.get("control") or {}).get("fda_copies")
    if settings is None or settings is False:
        return None
    if settings is True:
        settings = {}
    if not isinstance(settings, dict) or set(settings) - {"beta", "seed"}:
        raise ValueError(
            f"`control.fda_copies` must be true or a mapping with `beta` and `seed`, but got {settings!r}."
        )
    beta = settings.get("beta", 0.03)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta <= 1.0:
        raise ValueError(f"`control.fda_copies.beta` must be a number in (0, 1], but got {beta!r}.")
    seed = settings.get("seed", config.get("seed", 0))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`control.fda_copies.seed` must be an integer, but got {seed!r}.")
    return {"beta": float(beta), "seed": seed}


def _write_fda_copies(root: Path, copies: Path, settings: dict) -> None:
    from .prepare import prepare_fda_copies

    if copies.exists():  # an interrupted earlier attempt (the stage is not complete): start again
        shutil.rmtree(copies)
    prepare_fda_copies(root / "source" / "train", root / "target" / "train", copies, progress=False, **settings)


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

    # The control's labeled data: source/train, or source/train with an FDA copy of each image (`control.fda_copies`).
    control_labeled = {"source/train": root / "source" / "train"}
    fda_copies = fda_copies_settings(config)
    if fda_copies is not None:
        copies = out / "fda_copies"
        control_labeled = {"fda_copies": copies}
        stages.append(Stage("fda_copies", copies, function=lambda: _write_fda_copies(root, copies, fda_copies)))

    uncertainty_args = dict(config.get("uncertainty", {}).get("args") or {})
    maps = {}
    for split, data_dir in {"source/train": root / "source" / "train", "target/train": root / "target" / "train",
                            **control_labeled}.items():
        name = split.replace("/", "_")
        maps[split] = out / "uncertainty" / name
        stages.append(
            Stage(
                f"uncertainty:{name}",
                maps[split],
                "compute_uncertainty.py",
                {"model": source_segmenter, "data_dir": data_dir, "resolution": data["resolution"],
                 "output_dir": maps[split], **uncertainty_args},
            )
        )

    control_args = dict(config.get("control", {}).get("args") or {})
    control = out / "control"
    (control_split, control_dir), = control_labeled.items()
    stages.append(
        Stage(
            "control",
            control,
            "train_uncertainty_controlnet.py",
            {"pretrained_model_name_or_path": base_path, "train_data_dir": control_dir,
             "uncertainty_dir": maps[control_split] / "maps", "unlabeled_data_dir": root / "target" / "train",
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
             "resolution": data["resolution"], "output_dir": synthetic, "seed": seed, **RESUME_GENERATION,
             **generate_args},
        )
    )

    variants = config.get("variants") or {"source_only": {}}
    for name, variant in variants.items():
        if name == "source_only" and not variant:
            folder, train_flags = source_segmenter, None  # the source segmenter: trained above, only evaluated
        else:
            folder = out / "segmenters" / name
            variant = variant_data_flags(name, variant, variants, out / "segmenters", synthetic)
            train_flags = {"seed": seed, **common, **segmenter_flags(segmenter, variant, base_path, unlabeled_dir)}
        stages += segmenter_stages("", name, train_flags, folder, out / "evaluation", root, data["resolution"],
                                   evaluate_args)

    stages += refinement_stages(config, out, root, common, segmenter, base_path, unlabeled_dir, control, variants,
                                uncertainty_args, control_args, generate_args, evaluate_args, control_labeled)

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
        Stage("report", out / "report",
              function=lambda: write_report(config, out, root, base_path, control, maps, stages=stages))
    )
    return stages


def segmenter_stages(prefix: str, name: str, train_flags: dict | None, folder: Path, evaluation_dir: Path, root: Path,
                     resolution: int, evaluate_args: dict) -> list[Stage]:
    r"""
    A variant's segmenter stage (`train_segmentation.py` on `source/train`, validated on `source/val`) and its two
    evaluations (`target/val`, `source/val` under `<evaluation_dir>/<name>/`), names prefixed with `prefix`.

    Args:
        train_flags (`dict`, *optional*):
            The segmenter's flags beyond its data and output folder; `None` when `folder` is trained by another stage
            (only the evaluations are planned).
    """
    stages = []
    if train_flags is not None:
        stages.append(Stage(
            f"{prefix}segmenter:{name}", folder, "train_segmentation.py",
            {"train_data_dir": root / "source" / "train", "validation_data_dir": root / "source" / "val",
             "output_dir": folder, **train_flags}))
    for split in ("target/val", "source/val"):
        evaluation = evaluation_dir / name / split.replace("/", "_")
        stages.append(Stage(
            f"{prefix}evaluate:{name}:{split.replace('/', '_')}", evaluation, "evaluate_segmentation.py",
            {"model": folder, "data_dir": root / split, "resolution": resolution, "output_dir": evaluation,
             **evaluate_args}))
    return stages


def refinement_variant(config: dict) -> str | None:
    r"""
    The variant whose segmenter re-estimates the uncertainty maps in the next refinement round: `refine.segmenter`,
    or by default the last variant trained on synthetic data. `None` when the config has no refinement rounds.

    Args:
        config (`dict`):
            From [`load_config`].
    """
    rounds = config.get("refine_rounds", 1)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"`refine_rounds` must be a positive integer, but got {rounds!r}.")
    if rounds == 1:
        return None
    variants = config.get("variants") or {}
    synthetic = [name for name, variant in variants.items() if (variant or {}).get("synthetic")]
    name = (config.get("refine") or {}).get("segmenter") or (synthetic[-1] if synthetic else None)
    if name not in synthetic:
        raise ValueError(
            f"`refine.segmenter` must name a variant trained on synthetic data ({synthetic}), but got {name!r}; "
            "refinement rounds regenerate the synthetic data, so only those variants are retrained."
        )
    return name


def refinement_stages(config, out, root, common, segmenter, base_path, unlabeled_dir, control, variants,
                      uncertainty_args, control_args, generate_args, evaluate_args, control_labeled) -> list[Stage]:
    r"""
    The stages of refinement rounds 2 .. `refine_rounds` (round 1 is the workflow itself). Round `r` writes
    `<output_dir>/rounds/round_<r>/`: the previous round's segmenter (`refine.segmenter`) re-estimates the uncertainty
    maps of the control's labeled data (`source/train`, or the FDA copies of `control.fda_copies`) and `target/train`,
    the previous round's control is fine-tuned on them (the control's args, then `refine.control.args`, e.g. fewer
    steps), the synthetic data is regenerated with the new control and the
    new target maps (generation seed offset by the round), and every synthetic variant is retrained from scratch
    on it and evaluated. Variants without synthetic data do not change between rounds and are not repeated.

    With `refine.match_uncertainty: true` each round's maps of a split are given the value distribution of round 1's
    maps of that split (`compute_uncertainty.py --match_reference_dir`): the new segmenter decides where a map is
    uncertain, round 1 how uncertain each domain is, so the control is asked for as much target appearance as in
    round 1 (an adapted segmenter is surer on the target, and its raw maps ask for less).
    """
    name = refinement_variant(config)
    if name is None:
        return []
    data, seed = config["data"], config.get("seed", 0)
    refine = config.get("refine") or {}
    match_uncertainty = refine.get("match_uncertainty", False)
    if not isinstance(match_uncertainty, bool):
        raise ValueError(f"`refine.match_uncertainty` must be true or false, but got {match_uncertainty!r}.")
    stages = []
    (control_split, control_dir), = control_labeled.items()
    previous_segmenter, previous_control = out / "segmenters" / name, control
    for round_index in range(2, config["refine_rounds"] + 1):
        folder = out / "rounds" / f"round_{round_index}"
        prefix = f"round_{round_index}:"
        maps = {}
        for split, data_dir in {**control_labeled, "target/train": root / "target" / "train"}.items():
            split_name = split.replace("/", "_")
            maps[split] = folder / "uncertainty" / split_name
            matching = {"match_reference_dir": out / "uncertainty" / split_name / "maps"} if match_uncertainty else {}
            stages.append(Stage(f"{prefix}uncertainty:{split_name}", maps[split], "compute_uncertainty.py",
                                {"model": previous_segmenter, "data_dir": data_dir,
                                 "resolution": data["resolution"], "output_dir": maps[split], **uncertainty_args,
                                 **matching}))
        round_control = folder / "control"
        stages.append(Stage(
            f"{prefix}control", round_control, "train_uncertainty_controlnet.py",
            {"pretrained_model_name_or_path": base_path, "controlnet_model_name_or_path": previous_control,
             "train_data_dir": control_dir, "uncertainty_dir": maps[control_split] / "maps",
             "unlabeled_data_dir": unlabeled_dir, "unlabeled_uncertainty_dir": maps["target/train"] / "maps",
             "output_dir": round_control, "seed": seed, **common, **control_args,
             **((refine.get("control") or {}).get("args") or {})}))
        synthetic = folder / "synthetic"
        stages.append(Stage(
            f"{prefix}generate", synthetic, "generate_synthetic_dataset.py",
            {"pretrained_model_name_or_path": base_path, "controlnet_model_name_or_path": round_control,
             "label_dir": root / "source" / "train" / "labels", "uncertainty_bank": maps["target/train"] / "maps",
             "resolution": data["resolution"], "output_dir": synthetic, **RESUME_GENERATION, **generate_args,
             "seed": seed + 1000 * (round_index - 1)}))
        for variant_name, variant in variants.items():
            if not (variant or {}).get("synthetic"):
                continue
            variant = variant_data_flags(variant_name, variant, variants, out / "segmenters", synthetic)
            train_flags = {"seed": seed, **common, **segmenter_flags(segmenter, variant, base_path, unlabeled_dir)}
            stages += segmenter_stages(prefix, variant_name, train_flags, folder / "segmenters" / variant_name,
                                       folder / "evaluation", root, data["resolution"], evaluate_args)
        previous_segmenter, previous_control = folder / "segmenters" / name, round_control
    return stages


def _run_stage(stage: Stage, launch_args: list[str], environment: dict | None) -> float:
    """Run one stage, its output written to `<output>.log`; raise with the log's tail if it fails. With an
    `environment` (see [`stage_runner.single_process_environment`]) a script stage runs in this process."""
    start = time.perf_counter()
    if stage.function is not None:
        stage.function()
        command = None
    else:
        command = stage.command(launch_args)
        log_path = stage.output.parent / f"{stage.output.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        how = "in the workflow's process" if environment is not None else "with accelerate launch"
        write_text_atomic(log_path, " ".join(command) + f"\n(run {how})\n\n")
        if environment is not None:
            try:
                run_in_process(stage.script_path, to_flags(stage.args), environment, log_path)
                error = None
            except RuntimeError as failure:
                error = str(failure)
        else:
            returncode = run_subprocess(command, log_path)
            error = None if returncode == 0 else f"exit {returncode}"
        if error is not None:
            tail = "".join(open(log_path).readlines()[-40:])
            raise RuntimeError(
                f"Stage {stage.name!r} failed ({error}). Command:\n  {' '.join(command)}\n"
                f"Last lines of {log_path}:\n{tail}"
            )
    stage.output.mkdir(parents=True, exist_ok=True)
    marker = {"stage": stage.name, "command": command, "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(stage.output / MARKER, marker)
    return marker["seconds"]


def stage_environment(config: dict) -> dict | None:
    r"""
    The environment in which the workflow runs script stages in its own process, or `None` when each runs through
    `accelerate launch`.

    `launch.in_process` (`auto`, the default, `true` or `false`) decides: `auto` runs stages in-process whenever
    `launch.args` asks for one local process; `false` always uses `accelerate launch` (a fresh process per stage);
    `true` insists on in-process runs and is refused for a multi-process launch.

    Args:
        config (`dict`):
            From [`load_config`].
    """
    launch = config.get("launch") or {}
    mode = launch.get("in_process", "auto")
    if mode is False:
        return None
    launch_args = stage_launch_arguments(config)
    environment = single_process_environment(launch_args, example_script_path("train_segmentation.py"))
    if environment is None and mode is True:
        raise ValueError(
            f"`launch.in_process: true` needs a single local process, but `launch.args` {launch_args} asks "
            "`accelerate launch` for several processes or a distributed launcher; set `launch.in_process: auto`."
        )
    return environment


def check_workflow(config: dict, stages: list[Stage] | None = None, echo: Callable = print) -> None:
    r"""
    Everything checked before the first stage runs: every script stage's flags ([`check_stage_flags`]), the data
    root's images and label maps ([`check_data_root`]) and a pretrained base ([`check_pretrained_base`]).
    [`run_workflow`] calls it whenever a stage is to run; `diffusers-uncertainty stages --check` runs it alone.

    Args:
        config (`dict`):
            From [`load_config`].
        stages (`list[Stage]`, *optional*):
            From [`plan`] (planned here when not given).
        echo (`Callable`, defaults to `print`):
            Where the progress line goes.

    Raises:
        `ValueError`: the first problem found, named.
    """
    check_stage_flags(plan(config) if stages is None else stages)
    start = time.perf_counter()
    checked = check_data_root(config)
    if checked:
        echo(f"Checked the data root ({checked} images) in {time.perf_counter() - start:.1f} s.")
    check_pretrained_base(config)


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
    launch_args = stage_launch_arguments(config)
    added = launch_args[len(launch_arguments(config)):]
    if added:
        echo(f"The stages run on the CPU: `{' '.join(added)}` added to `launch.args` (`accelerate launch` gives each "
             "process one thread otherwise); set it, `--cpu` or OMP_NUM_THREADS to choose.")
    environment = stage_environment(config)
    warning = emulated_bf16_warning(environment)
    if warning is not None:
        echo(warning)
    selected = [stage for stage in stages if not only or any(stage.name.startswith(prefix) for prefix in only)]
    if any(force or not stage.is_complete() for stage in selected):
        check_workflow(config, stages, echo)
    total_start = time.perf_counter()
    for index, stage in enumerate(stages, start=1):
        label = f"[{index:2d}/{len(stages)}] {stage.name:<34}"
        if stage not in selected:
            continue
        if stage.is_complete() and not force:
            echo(f"{label} skipped (complete: {stage.output})")
            continue
        echo(f"{label} running ...")
        seconds = _run_stage(stage, launch_args, environment)
        echo(f"{label} done in {seconds:.0f} s")
    echo(f"Workflow finished in {time.perf_counter() - total_start:.0f} s.")
    return Path(config["output_dir"]).resolve() / "report" / "report.md"
