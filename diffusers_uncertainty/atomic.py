"""Atomic file writes: every file the package writes goes to a temporary name beside its destination first and is
renamed into place only when complete, so an interrupted run never leaves a half-written file that a later load
would read. Renamed files get the permissions an ordinary `open(path, "w")` would give (temporary files are private).
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import PIL.Image


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """`0o666` less the process's umask: the mode `open(path, "w")` gives a new file."""
    return 0o666 & ~_umask()


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
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
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
def atomic_new_folder(path: str | os.PathLike, argument: str = "--output_dir"):
    r"""
    Yield a temporary folder beside `path`; when the block ends without an error it is renamed to `path` (which must
    be absent or empty, see [`check_new_folder`]), otherwise removed: an interrupted run leaves no half-built folder.

    Args:
        path (`str` or `os.PathLike`):
            The folder to be written; its parent is created if missing.
        argument (`str`, defaults to `"--output_dir"`):
            Name used in the error message.
    """
    path = Path(path)
    check_new_folder(path, argument)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    os.chmod(staging, 0o777 & ~_umask())  # the mode `mkdir` gives; mkdtemp's is private
    try:
        yield staging
        if path.exists():
            path.rmdir()
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
