"""diffusers_uncertainty.training.checkpoints: the `checkpoint-{step}` folders the three training scripts share."""

import os

import pytest

from diffusers_uncertainty.training.checkpoints import (
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from example_scripts import load_example


class StateWriter:
    """Stands in for `accelerate.Accelerator`: `save_state` writes the files it is given into the folder, `load_state`
    and `print` are recorded."""

    def __init__(self):
        self.files, self.fail, self.loaded, self.printed = {}, False, [], []

    def load_state(self, input_dir):
        self.loaded.append(input_dir)

    def print(self, text):
        self.printed.append(text)

    def save_state(self, output_dir):
        for name, text in self.files.items():
            with open(os.path.join(output_dir, name), "w") as handle:
                handle.write(text)
        if self.fail:
            raise OSError("disk full")


def test_list_checkpoints_orders_by_step_and_ignores_other_names(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-x", ".checkpoint-11-abc", "logs"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-12").write_text("a file, not a checkpoint")
    assert list_checkpoints(tmp_path) == ["checkpoint-9", "checkpoint-10"]
    assert checkpoint_step(tmp_path / "checkpoint-10") == 10 and checkpoint_step(f"{tmp_path}/checkpoint-9/") == 9


def test_resolve_checkpoint(tmp_path):
    out = tmp_path / "out"
    assert resolve_checkpoint(None, out) is None
    assert resolve_checkpoint("latest", out) is None  # nothing yet: a new run
    for name in ("checkpoint-2", "checkpoint-10"):
        (out / name).mkdir(parents=True)
    assert resolve_checkpoint("latest", out) == os.path.join(out, "checkpoint-10")
    assert resolve_checkpoint("checkpoint-2", out) == os.path.join(out, "checkpoint-2")
    elsewhere = tmp_path / "copy" / "checkpoint-7"
    elsewhere.mkdir(parents=True)
    assert resolve_checkpoint(str(elsewhere), out) == str(elsewhere)
    with pytest.raises(ValueError, match=r"`--resume_from_checkpoint` must be 'latest' or an existing checkpoint folder "
                                         r"\(a path, or a name in `--output_dir` .*out'\), but 'checkpoint-5' does not exist"):
        resolve_checkpoint("checkpoint-5", out)
    (tmp_path / "weights").mkdir()
    with pytest.raises(ValueError, match=r"must name a `checkpoint-<step>` folder, got .*weights'"):
        resolve_checkpoint(str(tmp_path / "weights"), out)


def test_save_checkpoint_keeps_the_newest_and_replaces_a_checkpoint_whole(tmp_path):
    accelerator, out = StateWriter(), tmp_path / "out"
    for step in (1, 2, 3):
        accelerator.files = {"state.txt": f"step {step}"}
        assert save_checkpoint(accelerator, out, step, total_limit=2) == os.path.join(out, f"checkpoint-{step}")
    assert list_checkpoints(out) == ["checkpoint-2", "checkpoint-3"]
    # Saving a step again replaces its folder as a whole: no file of the old one stays.
    accelerator.files = {"other.txt": "again"}
    save_checkpoint(accelerator, out, 3)
    assert os.listdir(out / "checkpoint-3") == ["other.txt"]
    # A failed save leaves the previous checkpoint as it was and no temporary folder.
    accelerator.files, accelerator.fail = {"other.txt": "half"}, True
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(accelerator, out, 3)
    assert (out / "checkpoint-3" / "other.txt").read_text() == "again"
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_load_checkpoint_restores_the_state_and_returns_its_step(tmp_path):
    accelerator, out = StateWriter(), tmp_path / "out"
    assert load_checkpoint(accelerator, None, out) == 0 and accelerator.printed == []
    assert load_checkpoint(accelerator, "latest", out) == 0 and accelerator.loaded == []
    assert accelerator.printed == [f"No checkpoint in {out} for 'latest'; starting a new training run."]
    for step in (5, 40):
        (out / f"checkpoint-{step}").mkdir(parents=True)
    assert load_checkpoint(accelerator, "latest", out) == 40
    assert load_checkpoint(accelerator, "checkpoint-5", out) == 5
    assert accelerator.loaded == [os.path.join(out, "checkpoint-40"), os.path.join(out, "checkpoint-5")]
    assert accelerator.printed[-1] == f"Resuming from checkpoint {os.path.join(out, 'checkpoint-5')}"


@pytest.mark.parametrize(
    "name, flags",
    [
        ("train_base_model", ["--train_data_dir", "d"]),
        ("train_uncertainty_controlnet",
         ["--pretrained_model_name_or_path", "x", "--num_classes", "4", "--train_branch", "semantic",
          "--train_data_dir", "d"]),
        ("train_segmentation", ["--num_classes", "3", "--train_data_dir", "d"]),
    ],
)
def test_each_training_script_refuses_a_missing_checkpoint_when_parsing(name, flags, tmp_path):
    script = load_example(name)
    flags = [*flags, "--output_dir", str(tmp_path / "out")]
    assert script.parse_args([*flags, "--resume_from_checkpoint", "latest"]).resume_from_checkpoint == "latest"
    with pytest.raises(ValueError, match=r"but 'checkpoint-4' does not exist"):
        script.parse_args([*flags, "--resume_from_checkpoint", "checkpoint-4"])
    with pytest.raises(ValueError, match=r"`--checkpoints_total_limit` must be at least 1"):
        script.parse_args([*flags, "--checkpoints_total_limit", "0"])
