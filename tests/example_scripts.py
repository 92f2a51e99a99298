"""Load an `examples/` script as a module (its `parse_args` and `main` called in-process by the tests)."""

import importlib.util
from pathlib import Path


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """A fresh module of `examples/<name>.py`."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
