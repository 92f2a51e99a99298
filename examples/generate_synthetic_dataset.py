#!/usr/bin/env python
# coding=utf-8
# Licensed under the Apache License, Version 2.0.
"""Generate a labeled, target-like synthetic dataset with a trained dual-control ControlNet (the synthesis step of docs/method.md).

For every source label map y and every sample index, draw an uncertainty map u (from a bank of real target maps, a
constant level, or a scaled bank map) and generate x' = G(y, u); (x', y) is a labeled sample. The result is a
`datasets` dataset saved in `--output_dir` (`datasets.load_from_disk(output_dir)`, the format
`examples/train_segmentation.py --synthetic_data_dir` reads), plus the same rows as parquet files in
`output_dir/data/` (the Hub layout) and a dataset card.

    accelerate launch examples/generate_synthetic_dataset.py \
        --pretrained_model_name_or_path path/to/pipeline-with-uncertainty-controlnet \
        --label_dir data/camvid_daydusk/source/train/labels \
        --uncertainty_bank maps/target/train --samples_per_label 4 --prompt "a street scene at dusk" \
        --resolution 240 320 --batch_size 8 --output_dir camvid-dusk-synthetic

Work is split in shards of `--batch_size` samples (one pipeline call, one parquet file each), dealt out over the
processes of `accelerate launch --num_processes N`; every sample has its own seed, so the dataset does not depend on
the number of processes. `--resume` continues an interrupted run. The set-up (argument names, Accelerator, logging,
Hub upload) follows diffusers' example scripts, e.g. `examples/controlnet/train_controlnet.py`; see
`docs/synthesis.md` for every flag.

With a style encoder (`--style_encoder_model_name_or_path`, e.g. `<training output>/style_encoder`, or one inside the
pipeline folder), `--style_bank DIR` gives every sample `--style_images_per_sample` example images drawn from DIR with
the sample's seed: images in the style of DIR (e.g. unlabeled target images, or a domain never seen in training). It
combines with an uncertainty source, or replaces it (no `--uncertainty_bank`/`--uncertainty_level`: the uncertainty
control is off).
"""

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from huggingface_hub import create_repo, upload_folder
from tqdm.auto import tqdm

import diffusers
from diffusers.utils.import_utils import is_xformers_available
from diffusers_uncertainty import StableDiffusionDualControlPipeline, StyleEncoderModel, UncertaintyControlNetModel
from diffusers_uncertainty.atomic import write_json_atomic
from diffusers_uncertainty.data_reader import load_image
from diffusers_uncertainty.synthesis import (
    BackgroundShardWriter,
    ConstantUncertainty,
    FolderLabelSource,
    NoUncertainty,
    SampleMaps,
    StyleBank,
    UncertaintyBank,
    completed_shards,
    generate_batch,
    load_dataset_label_source,
    merge_shards,
    plan_shards,
    plan_work_items,
    remove_temporary_shards,
    shard_filename,
    shards_for_process,
)
from diffusers_uncertainty.synthetic_evaluation import (
    EVALUATION_ARGUMENTS,
    check_generation_evaluation,
    evaluate_generation,
)
from diffusers_uncertainty.training import write_model_card


logger = get_logger(__name__)

DEFAULT_DATASET_CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "dataset_card.md"
SHARD_DIR = "data"
CONFIG_NAME = "generation_config.json"
# Arguments that decide the content of the dataset: a resumed run must use the same values.
CONTENT_ARGUMENTS = (
    "pretrained_model_name_or_path",
    "controlnet_model_name_or_path",
    "revision",
    "variant",
    "label_dir",
    "dataset_name",
    "dataset_config_name",
    "dataset_split",
    "label_column",
    "max_labels",
    "uncertainty_bank",
    "uncertainty_level",
    "uncertainty_scale",
    "style_encoder_model_name_or_path",
    "style_bank",
    "style_images_per_sample",
    "style_guidance_scale",
    "samples_per_label",
    "num_inference_steps",
    "guidance_scale",
    "semantic_conditioning_scale",
    "uncertainty_conditioning_scale",
    "uncertainty_guidance_scale",
    "control_guidance_start",
    "control_guidance_end",
    "source_image_strength",
    "prompt",
    "seed",
    "batch_size",
    "resolution",
)


def redact_token(argv: list[str]) -> list[str]:
    """The command line without the value of `--hub_token` (it goes into the public card)."""
    redacted = []
    for index, arg in enumerate(argv):
        if index > 0 and argv[index - 1] == "--hub_token":
            redacted.append("<redacted>")
        elif arg.startswith("--hub_token="):
            redacted.append("--hub_token=<redacted>")
        else:
            redacted.append(arg)
    return redacted


WINDOW_DEFAULTS = {"control_guidance_start": [0.0], "control_guidance_end": [1.0]}
# Settings added after the first runs, with the value those runs used (so that they can be resumed).
LATER_DEFAULTS = {**WINDOW_DEFAULTS, "source_image_strength": 1.0, "uncertainty_guidance_scale": 1.0}


def control_window(values: list[float]) -> tuple[float, float]:
    """`--control_guidance_start/end` as a (semantic, uncertainty) pair: one value applies to both branches."""
    return (values[0], values[-1])


def build_parser():
    """The command line's flags, with their types, defaults and choices (`check_args` adds the checks across
    them, `parse_args` those on files). The workflow checks its stages' flags with both this parser and `check_args`
    before running any stage."""
    parser = argparse.ArgumentParser(description="Generate a labeled synthetic dataset with a dual-control ControlNet.")
    # Model.
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Folder or Hub id of a StableDiffusionDualControlPipeline (a base with an UncertaintyControlNetModel).",
    )
    parser.add_argument(
        "--controlnet_model_name_or_path",
        type=str,
        default=None,
        help="Folder or Hub id of a separately saved UncertaintyControlNetModel; replaces the pipeline's control.",
    )
    parser.add_argument(
        "--style_encoder_model_name_or_path",
        type=str,
        default=None,
        help="Folder or Hub id of a StyleEncoderModel (e.g. <training output_dir>/style_encoder); replaces the"
        " pipeline's own style encoder, if any.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the Hub models.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    parser.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention (CUDA)."
    )
    # Label maps.
    parser.add_argument(
        "--label_dir",
        type=str,
        default=None,
        help="Folder of integer label PNGs (searched recursively; a `labels/` sub-folder is used if present).",
    )
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A `datasets` dataset with label maps: a folder saved with `save_to_disk`, or a Hub id / data folder.",
    )
    parser.add_argument("--dataset_config_name", type=str, default=None, help="Configuration of --dataset_name.")
    parser.add_argument("--dataset_split", type=str, default="train", help="Split of --dataset_name.")
    parser.add_argument("--label_column", type=str, default="label", help="Label-map column of --dataset_name.")
    parser.add_argument("--max_labels", type=int, default=None, help="Use only the first N label maps.")
    # Uncertainty.
    parser.add_argument(
        "--uncertainty_bank",
        type=str,
        default=None,
        help="Folder of real uncertainty maps in [0, 1] (8/16-bit PNG or .npy); one is drawn per sample from its seed.",
    )
    parser.add_argument(
        "--uncertainty_level", type=float, default=None, help="A constant uncertainty level in [0, 1] for every sample."
    )
    parser.add_argument(
        "--uncertainty_scale",
        type=float,
        default=1.0,
        help="Multiply the bank's maps by this factor; a scaled map leaving [0, 1] is an error (never clipped).",
    )
    # Style.
    parser.add_argument(
        "--style_bank",
        type=str,
        default=None,
        help="Folder of style images (its images/ sub-folder if present); each sample gets --style_images_per_sample"
        " of them, drawn with its seed. Needs a style encoder. Without --uncertainty_bank/--uncertainty_level the"
        " uncertainty control is off.",
    )
    parser.add_argument("--style_images_per_sample", type=int, default=1, help="Style images per sample.")
    parser.add_argument(
        "--style_guidance_scale",
        type=float,
        default=1.0,
        help="Classifier-free guidance towards the style against the null style (1: the style in every branch).",
    )
    # Generation.
    parser.add_argument("--samples_per_label", type=int, default=1, help="Samples generated from each label map.")
    parser.add_argument("--prompt", type=str, default="", help="The prompt of every sample.")
    parser.add_argument("--num_inference_steps", type=int, default=30, help="Denoising steps.")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    parser.add_argument("--semantic_conditioning_scale", type=float, default=1.0, help="Semantic control weight.")
    parser.add_argument("--uncertainty_conditioning_scale", type=float, default=1.0, help="Uncertainty control weight.")
    parser.add_argument("--uncertainty_guidance_scale", type=float, default=1.0,
                        help="Guidance towards the uncertainty map against a zero map, in the prediction (the "
                             "pipeline's `uncertainty_guidance_scale`): 1 is off; above 1, one more branch per step.")
    parser.add_argument("--control_guidance_start", type=float, nargs="+", default=WINDOW_DEFAULTS["control_guidance_start"],
                        help="Fraction of the steps after which the controls start acting: one value, or two "
                             "(semantic, uncertainty), e.g. `0 0.4` to add the uncertainty control once the layout is set.")
    parser.add_argument("--control_guidance_end", type=float, nargs="+", default=WINDOW_DEFAULTS["control_guidance_end"],
                        help="Fraction of the steps after which the controls stop acting: one value, or two (semantic, "
                             "uncertainty).")
    parser.add_argument(
        "--source_image_strength",
        type=float,
        default=1.0,
        help="Below 1: start each sample from the image of its label map (`images/` beside the `labels/` of "
        "--label_dir), noised so that this fraction of the steps runs (image-to-image, SDEdit), which keeps the "
        "image's layout while the controls move its look. 1.0: from noise.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the run; every sample derives its own from it.")
    parser.add_argument("--batch_size", type=int, default=4, help="Images per pipeline call (and per shard).")
    parser.add_argument(
        "--resolution",
        type=int,
        nargs="+",
        default=None,
        help="Output size: SIZE or HEIGHT WIDTH, divisible by 8 (label maps are resized with nearest-neighbour). "
        "Defaults to the pipeline's default size.",
    )
    # Output.
    parser.add_argument("--output_dir", type=str, required=True, help="Where the dataset is written.")
    parser.add_argument("--resume", action="store_true", help="Continue an interrupted run in --output_dir.")
    parser.add_argument(
        "--max_shards",
        type=int,
        default=None,
        help="Write at most N new shards in this run (all processes together), then stop; continue with --resume.",
    )
    parser.add_argument(
        "--dataset_card_template",
        type=str,
        default=str(DEFAULT_DATASET_CARD_TEMPLATE),
        help="Template of the dataset card written to output_dir/README.md.",
    )
    parser.add_argument("--push_to_hub", action="store_true", help="Push the dataset to the Hub.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="Hub dataset repository id (owner/name).")
    parser.add_argument("--hub_token", type=str, default=None, help="Token for the Hub.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repository as private.")
    # Evaluation of the finished dataset (diffusers_uncertainty/synthetic_evaluation.py, docs/synthesis.md).
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="At the end, measure label fidelity, target likeness and uncertainty of the dataset (per uncertainty level)"
        " into output_dir/evaluation and print the table. Needs --evaluate_source_segmenter and --evaluate_data_root.",
    )
    parser.add_argument("--evaluate_source_segmenter", type=str, default=None, help="Segmenter trained on the source.")
    parser.add_argument(
        "--evaluate_target_segmenter", type=str, default=None, help="Segmenter trained on target-like images (optional)."
    )
    parser.add_argument(
        "--evaluate_data_root", type=str, default=None, help="Real images: source/{train,val}, target/{train,val}."
    )
    parser.add_argument(
        "--evaluate_resolution", type=int, default=None, help="Segmenters' input shorter side (default 256)."
    )
    return parser


def parse_args(input_args=None):
    parser = build_parser()
    args = parser.parse_args(input_args) if input_args is not None else parser.parse_args()
    # The command line, for the dataset card and generation_config.json (also when `main` is called from Python).
    args.command_line = "accelerate launch examples/generate_synthetic_dataset.py " + shlex.join(
        redact_token([str(arg) for arg in (input_args if input_args is not None else sys.argv[1:])])
    )

    check_args(args)
    # The checks that read files.
    if args.evaluate:
        check_generation_evaluation(args)
    if not os.path.isfile(args.dataset_card_template):
        raise ValueError(f"`--dataset_card_template` must be a file, but {args.dataset_card_template} does not exist.")
    return args


def check_args(args) -> None:
    """Every check across flags that reads no file, so that a bad command stops before any model or data is loaded
    (the workflow runs it on every stage's flags before the first stage).

    Args:
        args (`argparse.Namespace`): From `build_parser().parse_args(...)`.
    """
    if (args.label_dir is None) == (args.dataset_name is None):
        raise ValueError("Pass exactly one of `--label_dir` and `--dataset_name` as the source of label maps.")
    if args.uncertainty_bank is not None and args.uncertainty_level is not None:
        raise ValueError("Pass exactly one of `--uncertainty_bank` and `--uncertainty_level` as the uncertainty source.")
    if args.uncertainty_bank is None and args.uncertainty_level is None and args.style_bank is None:
        raise ValueError(
            "Pass exactly one of `--uncertainty_bank` and `--uncertainty_level` as the uncertainty source (or "
            "`--style_bank` alone for style conditioning without the uncertainty control)."
        )
    if args.style_bank is None:
        for name, default in (("style_images_per_sample", 1), ("style_guidance_scale", 1.0)):
            if getattr(args, name) != default:
                raise ValueError(f"`--{name}` applies to the images of `--style_bank`; pass a bank to use it.")
    if args.style_images_per_sample < 1:
        raise ValueError(f"`--style_images_per_sample` must be at least 1, but got {args.style_images_per_sample}.")
    if args.uncertainty_level is not None and not 0.0 <= args.uncertainty_level <= 1.0:
        raise ValueError(f"`--uncertainty_level` must lie in [0, 1], but got {args.uncertainty_level}.")
    if args.uncertainty_scale != 1.0 and args.uncertainty_bank is None:
        raise ValueError("`--uncertainty_scale` scales the maps of `--uncertainty_bank`; pass a bank to use it.")
    if not args.uncertainty_scale > 0:
        raise ValueError(f"`--uncertainty_scale` must be positive, but got {args.uncertainty_scale}.")
    for name in ("control_guidance_start", "control_guidance_end"):
        if len(getattr(args, name)) not in (1, 2):
            raise ValueError(f"`--{name}` takes one value or two (semantic, uncertainty), but got "
                             f"{len(getattr(args, name))} values.")
    for branch, start, end in zip(("semantic", "uncertainty"), *map(control_window, (args.control_guidance_start,
                                                                                      args.control_guidance_end))):
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(
                f"`--control_guidance_start` and `--control_guidance_end` must satisfy 0 <= start < end <= 1 for "
                f"every branch, but the {branch} branch got start={start} and end={end}."
            )
    if not 0.0 <= args.uncertainty_guidance_scale < float("inf"):
        raise ValueError(f"`--uncertainty_guidance_scale` must be a finite number >= 0, but got {args.uncertainty_guidance_scale}.")
    if args.uncertainty_guidance_scale != 1.0:
        if args.uncertainty_bank is None and args.uncertainty_level is None:
            raise ValueError("`--uncertainty_guidance_scale` guides towards the uncertainty maps; pass "
                             "`--uncertainty_bank` or `--uncertainty_level` to use it.")
        if args.uncertainty_conditioning_scale == 0:
            raise ValueError("`--uncertainty_guidance_scale` needs the uncertainty control, but "
                             "`--uncertainty_conditioning_scale` is 0.")
        if args.style_guidance_scale > 1.0:
            raise ValueError("`--uncertainty_guidance_scale` cannot be combined with `--style_guidance_scale` > 1; set "
                             "one of them to 1.")
    if args.resolution is not None:
        if len(args.resolution) not in (1, 2):
            raise ValueError(f"`--resolution` takes SIZE or HEIGHT WIDTH, but got {len(args.resolution)} values.")
        if any(value <= 0 or value % 8 != 0 for value in args.resolution):
            raise ValueError(f"`--resolution` values must be positive multiples of 8, but got {args.resolution}.")
    if not 0.0 < args.source_image_strength <= 1.0:
        raise ValueError(f"`--source_image_strength` must lie in (0, 1], but got {args.source_image_strength}.")
    if args.source_image_strength < 1.0:
        if args.label_dir is None:
            raise ValueError(
                "`--source_image_strength` below 1 starts from the label maps' own images, which are read from "
                "`--label_dir` (`images/` beside `labels/`); it does not apply to `--dataset_name`."
            )
        if int(args.num_inference_steps * args.source_image_strength) < 1:
            raise ValueError(
                f"`--source_image_strength` {args.source_image_strength} of {args.num_inference_steps} "
                "`--num_inference_steps` leaves no step to run; raise one of them."
            )
    for name in ("samples_per_label", "batch_size", "num_inference_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be at least 1, but got {getattr(args, name)}.")
    for name in ("max_labels", "max_shards"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be at least 1, but got {getattr(args, name)}.")
    if args.seed < 0:
        raise ValueError(f"`--seed` must be non-negative, but got {args.seed}.")
    if args.evaluate:
        for name in ("evaluate_source_segmenter", "evaluate_data_root"):
            if getattr(args, name) is None:
                raise ValueError(f"`--evaluate` needs `--{name}`, but it was not given.")
    elif any(getattr(args, name) is not None for name in EVALUATION_ARGUMENTS):
        raise ValueError(f"`--{'`, `--'.join(EVALUATION_ARGUMENTS)}` apply to `--evaluate`; pass it to use them.")


def content_settings(args, num_labels: int, num_shards: int, height: int, width: int) -> dict:
    """The settings that decide the dataset's content, as written to `generation_config.json`."""
    settings = {name: getattr(args, name) for name in CONTENT_ARGUMENTS}
    settings.update(num_labels=num_labels, num_shards=num_shards, height=height, width=width)
    return settings


def check_resume(args, settings: dict, config_path: str) -> None:
    """Refuse to mix runs: an existing run needs --resume, and a resumed run the same settings."""
    shard_dir = os.path.join(args.output_dir, SHARD_DIR)
    has_run = os.path.isfile(config_path) or (os.path.isdir(shard_dir) and any(os.scandir(shard_dir)))
    if has_run and not args.resume:
        raise ValueError(
            f"`--output_dir` {args.output_dir} already holds a generation run; pass `--resume` to continue it, or "
            "choose another `--output_dir`."
        )
    if args.resume and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as handle:
            previous = json.load(handle)["settings"]
        # Runs written before the control-window and source-image flags existed used their defaults.
        previous = {**LATER_DEFAULTS, **previous}
        changed = {
            key: (previous.get(key), value) for key, value in settings.items() if previous.get(key) != value
        }
        if changed:
            details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
            raise ValueError(
                f"`--resume`: the settings differ from the run in {args.output_dir} ({details}); resuming would mix "
                "two datasets. Use the same settings, or another `--output_dir`."
            )


def write_dataset_card(args, dataset, settings: dict, pipeline, uncertainty_source, style_bank=None) -> None:
    controlnet_config = pipeline.controlnet.config
    source = f"`{args.label_dir}` (folder)" if args.label_dir else f"`{args.dataset_name}` (column `{args.label_column}`)"
    table = "\n".join(f"| `{key}` | `{value}` |" for key, value in sorted(settings.items()))
    repo_id = args.hub_model_id or Path(args.output_dir).name
    write_model_card(
        args.dataset_card_template,
        os.path.join(args.output_dir, "README.md"),
        repo_id=repo_id,
        pretrained_model_name_or_path=args.pretrained_model_name_or_path,
        controlnet=args.controlnet_model_name_or_path or "the pipeline's own `controlnet`",
        label_source=source,
        num_labels=settings["num_labels"],
        samples_per_label=args.samples_per_label,
        num_samples=len(dataset),
        num_classes=controlnet_config.semantic_channels,
        ignore_index=controlnet_config.ignore_index,
        uncertainty=uncertainty_source.describe()
        + (f"; style: {style_bank.describe()} (style encoder `{args.style_encoder_model_name_or_path or 'of the pipeline'}`)" if style_bank else ""),
        height=settings["height"],
        width=settings["width"],
        settings_table=table,
        command=args.command_line,
    )


def style_arguments(style_images, args) -> dict:
    """The style keyword arguments of `generate_batch` (none without a style bank)."""
    if style_images is None:
        return {}
    return {"style_images": list(style_images), "style_guidance_scale": args.style_guidance_scale}


def main(args):
    accelerator = Accelerator()

    # Make one log on every process with the configuration for debugging (as diffusers' scripts do).
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO,
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        # warning, not info as in the training scripts: diffusers logs at info level on every pipeline call that
        # uses CPU generators for a GPU (on purpose here: the same noise on every device).
        diffusers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    show_progress = accelerator.is_local_main_process
    datasets.disable_progress_bars()  # one bar per shard write would drown the "Shards" bar

    # Mixed precision from `accelerate launch --mixed_precision`, as in diffusers' scripts; fp32 by default.
    weight_dtype = torch.float32
    if accelerator.mixed_precision == "fp16":
        weight_dtype = torch.float16
    elif accelerator.mixed_precision == "bf16":
        weight_dtype = torch.bfloat16

    # 1. The pipeline.
    kwargs = {"dtype": weight_dtype, "revision": args.revision, "variant": args.variant}
    if args.controlnet_model_name_or_path:
        kwargs["controlnet"] = UncertaintyControlNetModel.from_pretrained(
            args.controlnet_model_name_or_path, dtype=weight_dtype, revision=args.revision
        )
    if args.style_encoder_model_name_or_path:
        kwargs["style_encoder"] = StyleEncoderModel.from_pretrained(
            args.style_encoder_model_name_or_path, dtype=weight_dtype, revision=args.revision
        )
    pipeline = StableDiffusionDualControlPipeline.from_pretrained(args.pretrained_model_name_or_path, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(accelerator.device)
    if args.enable_xformers_memory_efficient_attention:
        if not is_xformers_available():
            raise ValueError("`--enable_xformers_memory_efficient_attention` needs xformers, but it is not installed.")
        pipeline.enable_xformers_memory_efficient_attention()
    num_classes = pipeline.controlnet.config.semantic_channels
    ignore_index = pipeline.controlnet.config.ignore_index
    if args.resolution is None:
        height = width = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    else:
        height, width = (args.resolution * 2)[:2]

    # 2. Inputs, all checked before any generation (on every process, so all of them stop together).
    if args.label_dir is not None:
        label_source = FolderLabelSource(args.label_dir)
    else:
        label_source = load_dataset_label_source(
            args.dataset_name, args.label_column, args.dataset_split, args.dataset_config_name
        )
    label_source.select(args.max_labels)
    label_source.validate(num_classes, ignore_index, show_progress=show_progress)
    source_images = label_source.image_paths() if args.source_image_strength < 1.0 else None
    if args.uncertainty_bank is not None:
        uncertainty_source = UncertaintyBank(args.uncertainty_bank, args.uncertainty_scale, show_progress=show_progress)
    elif args.uncertainty_level is not None:
        uncertainty_source = ConstantUncertainty(args.uncertainty_level)
    else:
        # Style bank alone: the uncertainty control is switched off (scale 0, not computed); maps of 0 are stored.
        uncertainty_source = NoUncertainty()
    uncertainty_off = isinstance(uncertainty_source, NoUncertainty)
    style_bank = None
    if args.style_bank is not None:
        if pipeline.style_encoder is None:
            raise ValueError(
                "`--style_bank` needs a style encoder: pass `--style_encoder_model_name_or_path` (e.g. the "
                "`style_encoder/` folder of a `--train_style_encoder` training run) or a pipeline folder with one."
            )
        style_config = pipeline.style_encoder.config
        if style_config.aggregation == "mlp" and args.style_images_per_sample > style_config.max_style_images:
            raise ValueError(
                f"`--style_images_per_sample` is {args.style_images_per_sample}, but the style encoder's `mlp` "
                f"aggregation takes at most max_style_images={style_config.max_style_images}."
            )
        style_bank = StyleBank(
            args.style_bank, args.style_images_per_sample, style_config.in_channels, show_progress=show_progress
        )

    # 3. Work items, shards and what is left of an earlier run.
    work_items = plan_work_items(len(label_source), args.samples_per_label, args.seed)
    shards = plan_shards(work_items, args.batch_size)
    settings = content_settings(args, len(label_source), len(shards), height, width)
    shard_dir = os.path.join(args.output_dir, SHARD_DIR)
    config_path = os.path.join(args.output_dir, CONFIG_NAME)
    check_resume(args, settings, config_path)
    accelerator.wait_for_everyone()  # every process has checked the folder before the main process writes to it
    if accelerator.is_main_process:
        os.makedirs(shard_dir, exist_ok=True)
        removed = remove_temporary_shards(shard_dir)
        if removed:
            logger.info(f"Removed {len(removed)} half-written shard(s) of an interrupted run: {removed}")
        write_json_atomic(config_path, {"settings": settings, "command": args.command_line})
    accelerator.wait_for_everyone()
    done = completed_shards(shard_dir, len(shards))
    accelerator.wait_for_everyone()  # every process has listed the finished shards before any new one appears
    pending = [index for index in range(len(shards)) if index not in done]
    if args.max_shards is not None:
        pending = pending[: args.max_shards]
    mine = shards_for_process(pending, accelerator.process_index, accelerator.num_processes)

    logger.info("***** Generating *****")
    logger.info(f"  Label maps = {len(label_source)} ({num_classes} classes, ignore_index {ignore_index})")
    logger.info(f"  Uncertainty = {uncertainty_source.describe()}")
    if style_bank is not None:
        logger.info(f"  Style = {style_bank.describe()}")
    logger.info(f"  Samples = {len(work_items)} ({args.samples_per_label} per label map) at {height}x{width} (HxW)")
    logger.info(
        f"  Shards = {len(shards)} (up to {args.batch_size} samples each); already done {len(done)}, "
        f"this run {len(pending)}"
    )
    logger.info(f"  Processes = {accelerator.num_processes}")

    # 4. Generate: one pipeline call and one parquet file per shard.
    maps = SampleMaps(label_source, uncertainty_source, height, width)
    generation = {
        "prompt": args.prompt,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "semantic_conditioning_scale": args.semantic_conditioning_scale,
        "uncertainty_conditioning_scale": 0.0 if uncertainty_off else args.uncertainty_conditioning_scale,
        "uncertainty_guidance_scale": args.uncertainty_guidance_scale,
        "control_guidance_start": control_window(args.control_guidance_start),
        "control_guidance_end": control_window(args.control_guidance_end),
        "strength": args.source_image_strength,
    }
    # PNG encoding and the parquet write of a shard run on a worker thread while the next shard generates.
    with BackgroundShardWriter() as writer:
        for shard_index in tqdm(mine, desc="Shards", disable=not show_progress):
            items = shards[shard_index]
            labels, uncertainty, codes, uncertainty_sources = maps.batch(items)
            style_images = style_names = None
            if style_bank is not None:
                style_images, style_names = zip(*(style_bank.get(item.seed) for item in items))
            init_images = None
            if source_images is not None:
                init_images = [load_image(str(source_images[item.label_id])) for item in items]
            images, aligned_labels = generate_batch(
                pipeline,
                items,
                labels,
                uncertainty,
                init_images=init_images,
                **generation,
                **style_arguments(style_images, args),
            )
            writer.submit(
                os.path.join(shard_dir, shard_filename(shard_index, len(shards))),
                items,
                images,
                aligned_labels,
                codes,
                uncertainty_sources,
                [label_source.name(item.label_id) for item in items],
                {**generation, "style_guidance_scale": args.style_guidance_scale},
                style_names=style_names,
            )
    accelerator.wait_for_everyone()

    # 5. Merge, card, upload (main process).
    if accelerator.is_main_process:
        finished = completed_shards(shard_dir, len(shards))
        if len(finished) < len(shards):
            logger.info(
                f"Stopped after {len(finished)} of {len(shards)} shards (--max_shards); run again with --resume to "
                "finish and merge."
            )
        else:
            paths = [os.path.join(shard_dir, shard_filename(index, len(shards))) for index in range(len(shards))]
            dataset = merge_shards(paths, args.output_dir)
            write_dataset_card(args, dataset, settings, pipeline, uncertainty_source, style_bank)
            logger.info(f"Saved {len(dataset)} samples to {args.output_dir}: datasets.load_from_disk({args.output_dir!r})")
            if args.push_to_hub:
                repo_id = create_repo(
                    repo_id=args.hub_model_id or Path(args.output_dir).name,
                    repo_type="dataset",
                    exist_ok=True,
                    private=args.private,
                    token=args.hub_token,
                ).repo_id
                upload_folder(
                    repo_id=repo_id,
                    repo_type="dataset",
                    folder_path=args.output_dir,
                    allow_patterns=["README.md", CONFIG_NAME, f"{SHARD_DIR}/*.parquet"],
                    commit_message="Synthetic dataset generated with diffusers-uncertainty",
                    token=args.hub_token,
                )
                logger.info(f"Pushed to https://huggingface.co/datasets/{repo_id}")
            if args.evaluate:
                evaluate_generation(args, pipeline, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    args = parse_args()
    main(args)
