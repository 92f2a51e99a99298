"""`checkpoint-{step}` folders of the training scripts: diffusers' layout and its `--checkpointing_steps`,
`--checkpoints_total_limit` and `--resume_from_checkpoint` conventions, with each checkpoint written atomically."""

import logging
import os
import re
import shutil

from ..atomic import atomic_folder


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    r"""
    The `checkpoint-{step}` folder names in `output_dir`, oldest (lowest step) first; other entries are ignored.

    Args:
        output_dir (`str` or `os.PathLike`):
            The training run's output folder (may not exist yet).
    """
    if not os.path.isdir(output_dir):
        return []
    names = [
        name
        for name in os.listdir(output_dir)
        if CHECKPOINT_PATTERN.match(name) and os.path.isdir(os.path.join(output_dir, name))
    ]
    return sorted(names, key=lambda name: int(CHECKPOINT_PATTERN.match(name).group(1)))


def checkpoint_step(path: str | os.PathLike) -> int:
    r"""
    The global step a checkpoint folder was saved at, read from its name `checkpoint-{step}`.

    Args:
        path (`str` or `os.PathLike`):
            The checkpoint folder.
    """
    name = os.path.basename(os.path.normpath(path))
    match = CHECKPOINT_PATTERN.match(name)
    if match is None:
        raise ValueError(f"`--resume_from_checkpoint` must name a `checkpoint-<step>` folder, got {os.fspath(path)!r}.")
    return int(match.group(1))


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> str | None:
    r"""
    The checkpoint folder a run resumes from, or `None` for a new run.

    `"latest"` is the newest `checkpoint-{step}` in `output_dir` (`None` when there is none, so a workflow can always
    pass it); any other value is a checkpoint folder, given as a path or as a name inside `output_dir`. A named
    checkpoint that does not exist is an error (diffusers' scripts start a new run silently there).

    Args:
        resume_from_checkpoint (`str`, *optional*):
            The `--resume_from_checkpoint` value.
        output_dir (`str` or `os.PathLike`):
            The training run's output folder.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return os.path.join(output_dir, checkpoints[-1]) if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, os.path.basename(os.path.normpath(path)))
    if not os.path.isdir(path):
        raise ValueError(
            f"`--resume_from_checkpoint` must be 'latest' or an existing checkpoint folder (a path, or a name in "
            f"`--output_dir` {os.fspath(output_dir)!r}), but {resume_from_checkpoint!r} does not exist."
        )
    checkpoint_step(path)
    return path


def load_checkpoint(accelerator, resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> int:
    r"""
    `accelerator.load_state` from the checkpoint [`resolve_checkpoint`] finds, and its global step; 0 for a new run
    (no `--resume_from_checkpoint`, or `"latest"` with no checkpoint yet).

    Args:
        accelerator (`accelerate.Accelerator`):
            Restores the registered state and runs the load hooks.
        resume_from_checkpoint (`str`, *optional*):
            The `--resume_from_checkpoint` value.
        output_dir (`str` or `os.PathLike`):
            The training run's output folder.
    """
    path = resolve_checkpoint(resume_from_checkpoint, output_dir)
    if path is None:
        if resume_from_checkpoint is not None:
            accelerator.print(f"No checkpoint in {os.fspath(output_dir)} for 'latest'; starting a new training run.")
        return 0
    accelerator.print(f"Resuming from checkpoint {path}")
    accelerator.load_state(path)
    return checkpoint_step(path)


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None = None) -> str:
    r"""
    `accelerator.save_state` into `output_dir/checkpoint-{step}`, written atomically (a staging folder renamed into
    place, so a `checkpoint-*` folder is always complete and `"latest"` never picks a half-written one). First, as in
    diffusers' scripts, the oldest checkpoints are removed so that at most `total_limit` remain with the new one.

    Args:
        accelerator (`accelerate.Accelerator`):
            Saves the registered state (models, optimizers, schedulers, RNG, custom objects) and runs the save hooks.
        output_dir (`str` or `os.PathLike`):
            The training run's output folder.
        step (`int`):
            The global step.
        total_limit (`int`, *optional*):
            `--checkpoints_total_limit`; `None` keeps every checkpoint.

    Returns:
        `str`: the checkpoint folder.
    """
    if total_limit is not None:
        checkpoints = list_checkpoints(output_dir)
        for name in checkpoints[: max(len(checkpoints) - total_limit + 1, 0)]:
            logger.info(f"removing checkpoint {name} (--checkpoints_total_limit {total_limit})")
            shutil.rmtree(os.path.join(output_dir, name))
    save_path = os.path.join(output_dir, f"checkpoint-{step}")
    with atomic_folder(save_path) as staging:
        accelerator.save_state(os.fspath(staging))
    logger.info(f"Saved state to {save_path}")
    return save_path
