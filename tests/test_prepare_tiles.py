"""`diffusers-uncertainty prepare tiles` on a small dataset in the package's layout."""

import json

import numpy as np
import PIL.Image
import pytest

from diffusers_uncertainty.cli import main
from diffusers_uncertainty.prepare import prepare_tiles, tiles_plan


def write_dataset(root, size=(21, 18)):
    """Two labeled source splits (one named `test`), an unlabeled target split; returns the arrays by file."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, labeled, names in (("source/train", True, ["a", "b"]), ("source/test", True, ["c"]),
                                  ("target/train", False, ["d"])):
        (root / split / "images").mkdir(parents=True)
        if labeled:
            (root / split / "labels").mkdir()
        for name in names:
            image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            PIL.Image.fromarray(image).save(root / split / "images" / f"{name}.png")
            label = None
            if labeled:
                label = rng.integers(0, 2, (size[1], size[0]), dtype=np.uint8) * 255  # 0 and the ignore value
                PIL.Image.fromarray(label).save(root / split / "labels" / f"{name}.png")
            arrays[(split, name)] = (image, label)
    (root / "classes.json").write_text(json.dumps({"classes": ["background", "nucleus"], "ignore_index": 255,
                                                   "size": list(size)}))
    return arrays


def test_tiles_are_exact_crops_of_images_and_labels_with_renamed_splits(tmp_path):
    arrays = write_dataset(tmp_path / "data")
    out = tmp_path / "tiles"
    argv = ["prepare", "tiles", "--input_dir", str(tmp_path / "data"), "--output_dir", str(out), "--grid", "4",
            "--splits", "source/train", "source/test:source/val", "target/train"]
    assert main(argv) == 0

    # 21x18 with a grid of 4: 5x4 tiles, the last column and the last 2 rows of pixels left out.
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/*/*") if p.is_dir()) == [
        "source/train/images", "source/train/labels", "source/val/images", "source/val/labels", "target/train/images"]
    for (split, name), (image, label) in arrays.items():
        split = {"source/test": "source/val"}.get(split, split)
        assert len(list((out / split / "images").glob(f"{name}_r*_c*.png"))) == 16
        for row in range(4):
            for column in range(4):
                tile = f"{name}_r{row}_c{column}.png"
                window = np.s_[row * 4:(row + 1) * 4, column * 5:(column + 1) * 5]
                np.testing.assert_array_equal(np.array(PIL.Image.open(out / split / "images" / tile)), image[window])
                if label is not None:
                    np.testing.assert_array_equal(np.array(PIL.Image.open(out / split / "labels" / tile)),
                                                  label[window])
    classes = json.loads((out / "classes.json").read_text())
    assert classes == {"classes": ["background", "nucleus"], "ignore_index": 255, "size": [5, 4]}
    assert "source/test -> source/val" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".tiles-*"))


def test_every_split_by_default_and_sub_folders_keep_names_apart(tmp_path):
    write_dataset(tmp_path / "data")
    train = tmp_path / "data" / "source/train"
    for folder in ("images", "labels"):  # the same file name in a sub-folder: its tiles must not overwrite a's
        (train / folder / "slide2").mkdir()
        (train / folder / "a.png").rename(train / folder / "slide2" / "a.png")
        (train / folder / "b.png").rename(train / folder / "a.png")
    result = prepare_tiles(tmp_path / "data", tmp_path / "tiles", grid=2, progress=False)
    assert result["splits"] == {"source/test": 4, "source/train": 8, "target/train": 4}
    assert result["tile_sizes"] == [[10, 9]]
    for folder in ("images", "labels"):
        assert sorted(p.relative_to(tmp_path / "tiles/source/train" / folder).as_posix()
                      for p in (tmp_path / "tiles/source/train" / folder).rglob("*.png")) == [
            f"{prefix}a_r{row}_c{column}.png" for prefix in ("", "slide2/") for row in (0, 1) for column in (0, 1)]


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    write_dataset(tmp_path / "data")
    data = tmp_path / "data"
    with pytest.raises(ValueError, match=r"`--grid` must be an integer >= 1 \(tiles per side\), but got 0"):
        tiles_plan(data, 0)
    with pytest.raises(ValueError, match=r"`--splits`: .* has no split 'source/val' \(a folder source/val/images\); "
                                         r"it has \['source/test', 'source/train', 'target/train'\]"):
        tiles_plan(data, 2, ["source/val"])
    with pytest.raises(ValueError, match=r"`--splits` writes two splits to 'source/train'"):
        tiles_plan(data, 2, ["source/train", "source/test:source/train"])
    with pytest.raises(ValueError, match=r"`--grid` 19 cuts .*c\.png \(21x18\) into tiles of less than 1 pixel"):
        tiles_plan(data, 19)
    (data / "source/train/labels/b.png").unlink()
    with pytest.raises(ValueError, match=r"`--input_dir`: 1 image\(s\) have no label map with the same name in "
                                         r".*source/train/labels, e\.g\. \[.*source/train/images/b\.png'\]"):
        prepare_tiles(data, tmp_path / "tiles", 2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_an_unreadable_image_found_while_writing_leaves_nothing_on_disk(tmp_path):
    write_dataset(tmp_path / "data")
    # A valid PNG header with its pixel data cut off: the plan (headers only) accepts it, the cropping fails.
    path = tmp_path / "data" / "target/train/images/d.png"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(OSError):
        prepare_tiles(tmp_path / "data", tmp_path / "out" / "tiles", 2, progress=False)
    assert list((tmp_path / "out").iterdir()) == []

    (tmp_path / "out" / "tiles").mkdir()
    (tmp_path / "out" / "tiles" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=r"`--output_dir` must be an empty or new folder, but .* is not empty"):
        prepare_tiles(tmp_path / "data", tmp_path / "out" / "tiles", 2, progress=False)
    assert [p.name for p in (tmp_path / "out" / "tiles").iterdir()] == ["keep.txt"]


def test_the_monuseg_config_plans_its_stages_on_tiles(tmp_path, capsys):
    from diffusers_uncertainty.workflow import load_config, plan

    data = tmp_path / "monuseg"
    write_dataset(data)
    (data / "target/val/images").mkdir(parents=True)
    (data / "target/val/labels").mkdir()
    for name in ("images", "labels"):
        (data / "source/test" / name / "c.png").rename(data / "target/val" / name / "e.png")
    PIL.Image.new("RGB", (21, 18)).save(data / "source/test/images/c.png")
    PIL.Image.new("L", (21, 18)).save(data / "source/test/labels/c.png")
    tiles = tmp_path / "tiles"
    # The commands of the config's header comment, on this folder.
    assert main(["prepare", "tiles", "--input_dir", str(data), "--output_dir", str(tiles), "--grid", "2", "--splits",
                 "source/train", "source/test:source/val", "target/train", "target/val"]) == 0
    config = load_config("monuseg_ffpe_frozen", smoke=True, overrides={"data": {"root": str(tiles)},
                                                                       "output_dir": str(tmp_path / "run")})
    assert config["data"]["num_classes"] == 2 and config["data"]["ignore_index"] == 255
    stages = {stage.name: stage for stage in plan(config)}
    assert stages["segmenter"].args["validation_data_dir"] == tiles / "source" / "val"
    assert stages["control"].args["max_train_steps"] == 20  # the smoke scale
    assert "segmenter:synthetic_photometric" in stages
