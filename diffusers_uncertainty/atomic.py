"""Atomic file writes: every file the package writes goes to a temporary name beside its destination first and is
renamed into place only when complete, so an interrupted run never leaves a half-written file that a later load
would read. Renamed files get the permissions an ordinary `open(path, "w")` would give (temporary files are private).
"""

import contextlib
import json
import os
import tempfile

import PIL.Image


def default_file_mode() -> int:
    """`0o666` less the process's umask: the mode `open(path, "w")` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


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
