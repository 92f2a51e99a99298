"""`benchmarks/gpu_session.sh` refuses bad arguments before it touches anything (its runs are measured on a GPU)."""

import os
import subprocess
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"


def run(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.parametrize(
    "args, env, message",
    [
        ((), {}, "usage: bash benchmarks/gpu_session.sh pack DATA_DIR | device SECONDS"),
        (("upload",), {}, "usage: bash benchmarks/gpu_session.sh pack DATA_DIR | device SECONDS"),
        (("device", "60", "bogus"), {"OUT": "/tmp"}, "PART must be one of workflow generation stages headline, got bogus"),
    ],
)
def test_bad_arguments_are_named(args, env, message):
    result = run(*args, env=env)
    assert result.returncode != 0 and message in result.stderr


def test_pack_checks_the_data_folder_before_writing(tmp_path):
    repo = SCRIPT.parents[1]
    before = {path.name for path in repo.iterdir()}
    (tmp_path / "source" / "train" / "images").mkdir(parents=True)
    result = run("pack", str(tmp_path))
    assert result.returncode == 2
    assert f"DATA_DIR must hold source/val/images/, but {tmp_path}/source/val/images is missing" in result.stderr
    for split in ("source/val", "target/train", "target/val"):
        (tmp_path / split / "images").mkdir(parents=True)
    result = run("pack", str(tmp_path))
    assert result.returncode == 2 and f"DATA_DIR must hold classes.json, but {tmp_path}/classes.json" in result.stderr
    assert {path.name for path in repo.iterdir()} == before  # no .whl/ or .devdata/ made


def test_device_needs_the_packed_data(tmp_path):
    repo = SCRIPT.parents[1]
    if (repo / ".devdata" / "camvid_daydusk").exists():
        pytest.skip("this checkout holds packed data")
    result = run("device", "60", env={"OUT": str(tmp_path)})
    assert result.returncode == 2 and "run the pack part first and carry .devdata" in result.stderr
    assert not any(tmp_path.iterdir())
