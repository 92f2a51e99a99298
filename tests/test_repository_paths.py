"""README, docs, configs, example scripts and model cards name only what a user's machine has: nothing outside the repository."""

import re
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
CHECKED = sorted(
    [REPO / "README.md"]
    + list((REPO / "docs").rglob("*.md"))
    + list((REPO / "model_cards").rglob("*.md"))
    + list((REPO / "examples" / "configs").rglob("*.yaml"))
    + list((REPO / "examples").glob("*.py"))  # the scripts ship in the wheel; their usage lines are read by users
    + list((REPO / "diffusers_uncertainty" / "configs").rglob("*.yaml"))
    + list((REPO / "benchmarks").glob("*.md"))  # their commands are meant to be re-run
    + list((REPO / "benchmarks").glob("*.py"))
)
# Folders of the machine this project was developed on, which users do not have.
MACHINE_PATHS = re.compile(
    r"\.\./shared\b|(?<![\w.])shared/(data|seeds|DESIGN)|DESIGN\.md|(?<![\w.~-])/(work|home|Users|root|mnt)/"
)
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
RELATIVE_PATH = re.compile(r"(?<![\w./-])((?:\.\./)+[\w./-]*)")


def test_the_checked_files_are_there():
    names = {path.relative_to(REPO).as_posix() for path in CHECKED}
    assert {"README.md", "docs/method.md", "model_cards/controlnet_card.md", "examples/configs/camvid_daydusk.yaml",
            "diffusers_uncertainty/configs/toy_oct.yaml"} <= names


@pytest.mark.parametrize("path", CHECKED, ids=lambda path: path.relative_to(REPO).as_posix())
def test_no_path_leaves_the_repository(path):
    text = path.read_text(encoding="utf-8")
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        for match in MACHINE_PATHS.finditer(line):
            problems.append(f"line {number}: {match.group(0)!r} is not on a user's machine")
        for match in RELATIVE_PATH.finditer(line):
            if not (path.parent / match.group(1)).resolve().is_relative_to(REPO):
                problems.append(f"line {number}: {match.group(1)!r} leaves the repository")
        for match in MARKDOWN_LINK.finditer(line) if path.suffix == ".md" else ():  # (code indexes look alike)
            target = match.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a web address or an anchor of this page
            resolved = (path.parent / target.split("#")[0]).resolve()
            if not resolved.is_relative_to(REPO) or not resolved.exists():
                problems.append(f"line {number}: the link {target!r} does not lead to a file of the repository")
    assert not problems, "\n".join(problems)


def test_the_check_catches_what_it_is_for(tmp_path):
    bad = [
        "[design](../shared/DESIGN.md)",
        "D=/work/shared/data/camvid_daydusk",
        "root: ../../../data/camvid   # relative to this file",
        "see `DESIGN.md`",
    ]
    for line in bad:
        assert MACHINE_PATHS.search(line) or any(
            not (REPO / match.group(1)).resolve().is_relative_to(REPO) for match in RELATIVE_PATH.finditer(line)
        ), line
    assert not MACHINE_PATHS.search("D=data/camvid_daydusk  # --shared_trunk, docs/method.md, ~/work/x")
