"""The package stands on its own: its wheel, installed into a fresh virtual environment outside the checkout, runs a
tiny workflow from an empty folder to its report.

The wheel is built offline (`--no-build-isolation`, setuptools from the `test` extra) from a copy of the checkout,
so stale build folders cannot leak into it. The fresh environment sees the dependencies already installed here
through a `.pth` file (no network), while the package itself comes only from the wheel.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml


REPO = Path(__file__).resolve().parents[1]
BUILD_LEFTOVERS = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "outputs", "runs"
)


def expected_wheel_files() -> set[str]:
    """What the wheel must hold: the package, plus examples/ and model_cards/ mapped into it (see pyproject.toml)."""
    files = {f"diffusers_uncertainty/{path.relative_to(REPO / 'diffusers_uncertainty').as_posix()}"
             for pattern in ("*.py", "configs/*.yaml") for path in (REPO / "diffusers_uncertainty").rglob(pattern)
             if "__pycache__" not in path.parts}
    files |= {f"diffusers_uncertainty/examples/{path.name}" for path in (REPO / "examples").glob("*.py")}
    files |= {f"diffusers_uncertainty/examples/configs/{path.name}"
              for path in (REPO / "examples" / "configs").glob("*.yaml")}
    files |= {f"diffusers_uncertainty/model_cards/{path.name}" for path in (REPO / "model_cards").glob("*.md")}
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    source = tmp_path_factory.mktemp("source") / "diffusers-uncertainty"
    shutil.copytree(REPO, source, ignore=BUILD_LEFTOVERS)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist,
         source],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("diffusers_uncertainty-*.whl")
    return wheel


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh environment outside the checkout: the wheel installed into it, the other dependencies seen from here."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # This interpreter's import path minus the checkout: its site-packages and whatever they add (.pth files in a
    # folder named by a .pth file are not run, so naming the folders is what makes nested set-ups work too).
    outer = [entry for entry in dict.fromkeys(sys.path)
             if entry and Path(entry).is_dir() and Path(entry).resolve() != REPO]
    Path(purelib, "dependencies_from_the_test_environment.pth").write_text("\n".join(outer) + "\n")
    # --ignore-installed: pip must not touch the checkout's own (editable) install, which it sees through the .pth.
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--ignore-installed",
         "-q", wheel],
        check=True,
        capture_output=True,
    )
    return venv


def clean_env() -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    return env


def test_the_wheel_holds_the_package_the_example_scripts_and_the_card_templates(wheel):
    with zipfile.ZipFile(wheel) as archive:
        files = {name for name in archive.namelist() if ".dist-info/" not in name}
        (entry_points,) = [archive.read(name).decode() for name in archive.namelist()
                           if name.endswith(".dist-info/entry_points.txt")]
    assert files == expected_wheel_files()
    assert "diffusers-uncertainty = diffusers_uncertainty.cli:main" in entry_points


def test_the_installed_wheel_runs_a_tiny_workflow_from_an_empty_folder(venv, tmp_path):
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = clean_env()

    where = subprocess.run(
        [bin_dir / "python", "-c", "import diffusers_uncertainty as d; from diffusers_uncertainty.workflow import "
         "example_script_path as e; print(d.__file__); print(e('train_segmentation.py'))"],
        cwd=empty, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()
    installed = venv.resolve()
    assert all(Path(path).resolve().is_relative_to(installed) for path in where), where  # not the checkout

    # The card templates sit where the scripts look for them (`<script folder>/../model_cards`).
    for template in ("controlnet_card.md", "dataset_card.md", "segmenter_card.md"):
        assert (Path(where[1]).parents[1] / "model_cards" / template).is_file(), template

    # A user config in the empty folder: the embedded default at its smoke scale, one segmenter (every example
    # script still runs once; the source + synthetic segmenter is the workflow tests' business).
    config = yaml.safe_load((REPO / "diffusers_uncertainty" / "configs" / "toy_oct.yaml").read_text())
    config["variants"] = {"source_only": {}}
    (empty / "tiny.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [bin_dir / "diffusers-uncertainty", "run", "--config", "tiny.yaml", "--smoke"],
        cwd=empty, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = empty / "outputs" / "toy_oct"
    assert f"Report: {run / 'report' / 'report.md'}" in result.stdout
    report = (run / "report" / "report.md").read_text()
    assert "| source_only |" in report
    # The scripts of the wheel filled the card templates it carries.
    for card in ("segmenters/source_only/README.md", "synthetic/README.md"):
        assert (run / card).is_file(), card
    assert sorted(path.name for path in empty.iterdir()) == ["outputs", "tiny.yaml"]
