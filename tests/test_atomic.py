"""diffusers_uncertainty.atomic: folders staged beside their destination and renamed or merged in, and
`save_pretrained_atomic` for models and pipelines."""

import os

import pytest
import torch

import diffusers_uncertainty.atomic as atomic
from diffusers_uncertainty.atomic import atomic_folder, atomic_new_folder, save_pretrained_atomic, umask


def _tree(folder) -> dict:
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name)).read()
        for root, _, files in os.walk(folder)
        for name in files
    }


def _assert_same_weights(loaded, model) -> None:
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def _record_replaces(monkeypatch) -> list[tuple[str, str]]:
    """Record every rename `atomic` makes, as (source, destination) paths."""
    calls, replace = [], os.replace

    def recording_replace(source, destination):
        calls.append((os.fspath(source), os.fspath(destination)))
        replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", recording_replace)
    return calls


def test_a_new_folder_is_one_rename_with_the_mode_mkdir_gives(tmp_path, monkeypatch):
    calls = _record_replaces(monkeypatch)
    with atomic_folder(tmp_path / "out") as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out-")
        (staging / "a.txt").write_text("new")
    assert _tree(tmp_path / "out") == {"a.txt": "new"}
    assert calls == [(str(staging), str(tmp_path / "out"))]
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_an_error_in_the_block_leaves_the_folder_as_it_was_and_no_staging(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("old")
    for merge in (False, True):
        with pytest.raises(RuntimeError, match="interrupted"):
            with atomic_folder(tmp_path / "out", merge=merge) as staging:
                (staging / "a.txt").write_text("new")
                raise RuntimeError("interrupted")
        assert _tree(tmp_path / "out") == {"a.txt": "old"}
        assert sorted(os.listdir(tmp_path)) == ["out"]


def test_without_merge_the_whole_folder_is_replaced(tmp_path):
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "a.txt").write_text("old")
    (tmp_path / "out" / "sub" / "stale.txt").write_text("old")
    with atomic_folder(tmp_path / "out") as staging:
        (staging / "a.txt").write_text("new")
    assert _tree(tmp_path / "out") == {"a.txt": "new"}
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_merge_replaces_written_entries_keeps_the_others_and_moves_the_last_entries_out_first_and_in_last(
    tmp_path, monkeypatch
):
    out = tmp_path / "out"
    (out / "unet").mkdir(parents=True)
    (out / "checkpoint-3").mkdir()
    (out / "unet" / "stale.txt").write_text("old")
    (out / "model_index.json").write_text("old")
    (out / "notes.txt").write_text("kept")
    calls = _record_replaces(monkeypatch)
    with atomic_folder(out, merge=True, last=("model_index.json",)) as staging:
        (staging / "unet").mkdir()
        (staging / "unet" / "weights.bin").write_text("new")
        (staging / "model_index.json").write_text("new")
        (staging / "vae.txt").write_text("new")
    assert _tree(out) == {"unet/weights.bin": "new", "model_index.json": "new", "vae.txt": "new", "notes.txt": "kept"}
    assert (out / "checkpoint-3").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # The old index leaves before any component changes, the new one arrives after all of them.
    assert calls[0][0] == str(out / "model_index.json") and calls[-1] == (str(staging / "model_index.json"),
                                                                         str(out / "model_index.json"))
    assert [destination for _, destination in calls[1:-1] if destination.startswith(str(out))] == [
        str(out / "unet"), str(out / "vae.txt")
    ]


def test_a_file_in_the_way_is_refused_before_the_block_runs(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ValueError, match=r"Expected a folder \(or a new path\) to write, but .*out is a file"):
        with atomic_folder(tmp_path / "out"):
            raise AssertionError("the block must not run")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_new_folder_refuses_a_non_empty_folder_with_the_argument_name(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("old")
    with pytest.raises(ValueError, match=r"`--work_dir` must be an empty or new folder, but .*out is not empty"):
        with atomic_new_folder(tmp_path / "out", "--work_dir"):
            raise AssertionError("the block must not run")
    (tmp_path / "empty").mkdir()
    with atomic_new_folder(tmp_path / "empty") as staging:
        (staging / "b.txt").write_text("new")
    assert _tree(tmp_path / "empty") == {"b.txt": "new"}


def test_save_pretrained_atomic_replaces_a_pipeline_and_keeps_its_checkpoints(tmp_path, monkeypatch):
    from diffusers_uncertainty import build_tiny_pipeline

    pipeline = build_tiny_pipeline()
    output_dir = tmp_path / "out"
    save_pretrained_atomic(pipeline, output_dir)
    assert (output_dir / "model_index.json").is_file() and (output_dir / "unet").is_dir()
    (output_dir / "checkpoint-3").mkdir()
    (output_dir / "unet" / "stale.txt").write_text("old")
    calls = _record_replaces(monkeypatch)
    save_pretrained_atomic(pipeline, output_dir)
    assert (output_dir / "checkpoint-3").is_dir() and not (output_dir / "unet" / "stale.txt").exists()
    assert calls[-1][1] == str(output_dir / "model_index.json")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    # renamed from a private temporary folder, but with the usual permissions
    assert os.stat(output_dir / "unet").st_mode & 0o777 == 0o777 & ~umask()
    loaded = type(pipeline).from_pretrained(output_dir)
    _assert_same_weights(loaded.unet, pipeline.unet)


def test_save_pretrained_atomic_writes_a_models_config_last(tmp_path, monkeypatch):
    from diffusers_uncertainty import build_tiny_pipeline

    controlnet = build_tiny_pipeline().controlnet
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "style_encoder").mkdir()  # another model saved into the same folder stays
    calls = _record_replaces(monkeypatch)
    save_pretrained_atomic(controlnet, tmp_path / "out")
    assert calls[-1][1] == str(tmp_path / "out" / "config.json")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "diffusion_pytorch_model.safetensors", "style_encoder"]
    _assert_same_weights(type(controlnet).from_pretrained(tmp_path / "out"), controlnet)
