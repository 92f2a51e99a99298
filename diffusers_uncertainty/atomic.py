"""Atomic writes: every file and folder the package writes goes to a temporary name beside its destination first and
is renamed into place only when complete, so an interrupted run never leaves a half-written file or folder that a
later load would read. Renamed entries get the permissions an ordinary `open(path, "w")` / `mkdir` would give
(temporary ones are private).
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import PIL.Image


TEMPORARY_PREFIX = ".tmp-"  # of every temporary file (a crash may leave one; its writer's next run may delete it)


def umask() -> int:
    """The process's file-creation mask (temporary files and folders are private; renamed ones get the usual
    permissions `0o666 & ~umask()` / `0o777 & ~umask()`)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """`0o666` less the process's umask: the mode `open(path, "w")` gives a new file."""
    return 0o666 & ~umask()


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike):
    r"""
    Yield a temporary path beside `path` (same suffix); when the block ends without an error it is renamed to
    `path`, otherwise removed.

    Args:
        path (`str` or `os.PathLike`):
            The destination; its folder is created if missing.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=os.path.splitext(path)[1], dir=folder)
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    r"""
    Write a UTF-8 text file atomically.

    Args:
        path (`str` or `os.PathLike`):
            Destination.
        text (`str`):
            Content.
    """
    with atomic_write_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    r"""
    Write JSON (indented, trailing newline) atomically.

    Args:
        path (`str` or `os.PathLike`):
            Destination.
        data:
            A JSON-serialisable object.
    """
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_image_atomic(path: str | os.PathLike, image: PIL.Image.Image) -> None:
    r"""
    Save a PIL image atomically; the format follows the destination's extension.

    Args:
        path (`str` or `os.PathLike`):
            Destination, e.g. `grid.png`.
        image (`PIL.Image.Image`):
            The image.
    """
    with atomic_write_path(path) as temporary:
        image.save(temporary, format=PIL.Image.registered_extensions()[os.path.splitext(os.fspath(path))[1].lower()])


def check_new_folder(path: str | os.PathLike, argument: str = "--output_dir") -> None:
    r"""
    Raise unless `path` is absent or an empty folder (call it before any work that would end in [`atomic_new_folder`]).

    Args:
        path (`str` or `os.PathLike`):
            The folder to be written.
        argument (`str`, defaults to `"--output_dir"`):
            Name used in the error message.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"`{argument}` must be an empty or new folder, but {path} is not empty.")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, merge: bool = False, last: tuple[str, ...] = ()):
    r"""
    Yield an empty staging folder beside `path` for the block to fill; when the block ends without an error the
    staged content takes `path`'s place, otherwise the staging folder is removed and `path` is untouched.

    If `path` is absent or an empty folder, that is one rename. Otherwise:

    - `merge=False`: the old folder is moved aside, the staged one renamed in, the old one deleted, so `path` is at
      every moment the complete old folder or the complete new one (a training `checkpoint-{step}`).
    - `merge=True`: each entry the block wrote replaces its namesake in `path` and entries it did not write are kept
      (a pipeline folder's `checkpoint-*`). The entries named in `last` are moved out first and in last, so a folder
      that holds them is complete (a pipeline's `model_index.json`, a model's `config.json`).

    Args:
        path (`str` or `os.PathLike`):
            The folder to write; its parent is created if missing.
        merge (`bool`, defaults to `False`):
            Replace the entries written and keep the others, instead of replacing the whole folder.
        last (`tuple[str, ...]`, *optional*):
            With `merge`, the entries that mark the folder as complete.
    """
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"Expected a folder (or a new path) to write, but {path} is a file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    os.chmod(staging, 0o777 & ~umask())  # the mode `mkdir` gives (mkdtemp's is private): it may become `path`
    trash = None
    try:
        yield staging
        if not path.exists() or not any(path.iterdir()):
            if path.exists():
                path.rmdir()
            os.replace(staging, path)
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{path.name}-old-", dir=path.parent))
        if not merge:
            os.replace(path, trash / path.name)
            os.replace(staging, path)
            return
        for name in last:
            if os.path.lexists(path / name):
                os.replace(path / name, trash / name)
        for name in sorted(os.listdir(staging), key=lambda name: (name in last, name)):
            if os.path.lexists(path / name):
                os.replace(path / name, trash / name)
            os.replace(staging / name, path / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_new_folder(path: str | os.PathLike, argument: str = "--output_dir"):
    r"""
    [`atomic_folder`] for a folder that must be absent or empty (see [`check_new_folder`]): an interrupted run
    leaves no half-built folder.

    Args:
        path (`str` or `os.PathLike`):
            The folder to be written; its parent is created if missing.
        argument (`str`, defaults to `"--output_dir"`):
            Name used in the error message.
    """
    check_new_folder(path, argument)
    with atomic_folder(path) as staging:
        yield staging


def save_pretrained_atomic(obj, output_dir: str | os.PathLike, **kwargs) -> None:
    r"""
    `obj.save_pretrained` into a staging folder, then moved into `output_dir` with [`atomic_folder`]`(merge=True)`:
    the files and folders it writes replace their namesakes, its config file (`obj.config_name`: `config.json` for a
    model, `model_index.json` for a pipeline) comes last, and other content of `output_dir` (`checkpoint-*`
    folders) is kept.

    Args:
        obj:
            A model ([`~diffusers.ModelMixin`]) or pipeline ([`~diffusers.DiffusionPipeline`]).
        output_dir (`str` or `os.PathLike`):
            The destination folder.
        **kwargs:
            Passed to `save_pretrained`.
    """
    with atomic_folder(output_dir, merge=True, last=(obj.config_name,)) as staging:
        obj.save_pretrained(staging, **kwargs)
