"""Tests of the embedded two-domain toy OCT dataset (diffusers_uncertainty.toy_oct)."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from diffusers_uncertainty.toy_oct import (
    OCT_CLASS_NAMES,
    OCT_IGNORE_INDEX,
    OCT_NUM_CLASSES,
    make_oct_dataset,
    render_oct_sample,
)


COUNTS = {"num_source_train": 4, "num_source_val": 2, "num_target_train": 3, "num_target_val": 2}
SIZE = (48, 64)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy_oct") / "oct"
    make_oct_dataset(root, **COUNTS, size=SIZE, seed=3)
    return root


def _files(root: Path) -> dict:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _read(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image)


def test_layout_counts_and_info(dataset):
    expected = {
        "source/train": (4, True),
        "source/val": (2, True),
        "target/train": (3, False),
        "target/val": (2, True),
    }
    for split, (count, labeled) in expected.items():
        images = sorted((dataset / split / "images").iterdir())
        assert [path.name for path in images] == [f"{index:04d}.png" for index in range(count)]
        assert (dataset / split / "labels").is_dir() == labeled
        if labeled:
            assert sorted(path.name for path in (dataset / split / "labels").iterdir()) == [p.name for p in images]
    assert sorted(path.name for path in dataset.iterdir()) == ["README.md", "dataset_info.json", "source", "target"]
    # nothing temporary left behind, next to the dataset or inside it
    assert [path.name for path in dataset.parent.iterdir()] == ["oct"]
    assert not [path for path in dataset.rglob(".*")]

    info = json.loads((dataset / "dataset_info.json").read_text())
    assert info["class_names"] == list(OCT_CLASS_NAMES) and info["num_classes"] == OCT_NUM_CLASSES == 7
    assert info["ignore_index"] is OCT_IGNORE_INDEX is None
    assert info["size"] == list(SIZE) and info["seed"] == 3
    assert info["splits"]["target/train"] == 3 and info["labeled"]["target/train"] is False
    assert "ignore_index: None" in (dataset / "README.md").read_text()


def test_images_are_grey_rgb_and_labels_are_layered(dataset):
    for split in ("source/train", "target/val"):
        for label_path in sorted((dataset / split / "labels").iterdir()):
            image = _read(dataset / split / "images" / label_path.name)
            label = _read(label_path)
            assert image.shape == (*SIZE, 3) and image.dtype == np.uint8
            assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])
            assert label.shape == SIZE and label.dtype == np.uint8
            # every column goes vitreous -> layers -> choroid: non-decreasing from top to bottom, all classes present
            assert (np.diff(label.astype(int), axis=0) >= 0).all()
            assert label[0].max() == 0 and label[-1].min() == OCT_NUM_CLASSES - 1
            assert set(np.unique(label)) == set(range(OCT_NUM_CLASSES))


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, dataset):
    make_oct_dataset(tmp_path / "again", **COUNTS, size=SIZE, seed=3)
    assert _files(tmp_path / "again") == _files(dataset)
    make_oct_dataset(tmp_path / "other", **COUNTS, size=SIZE, seed=4)
    first, other = _files(dataset), _files(tmp_path / "other")
    assert first["source/train/images/0000.png"] != other["source/train/images/0000.png"]
    # an image depends on (seed, domain, split, index), not on how many images are written
    make_oct_dataset(tmp_path / "more", **{**COUNTS, "num_source_train": 6}, size=SIZE, seed=3)
    assert _files(tmp_path / "more")["source/train/images/0003.png"] == first["source/train/images/0003.png"]


def test_geometry_varies_between_images():
    labels = [render_oct_sample([0, 0, 0, index], SIZE)[1] for index in range(6)]
    surface_rows = [np.argmax(label > 0, axis=0) for label in labels]
    assert len({row.tobytes() for row in surface_rows}) == 6


def _high_frequency_energy(image: np.ndarray) -> float:
    """Mean squared difference of horizontally adjacent pixels, relative to the image's mean squared intensity
    (layers are nearly horizontal, so this is mostly noise)."""
    image = image.astype(np.float64) / 255.0
    return float(np.mean(np.diff(image, axis=1) ** 2) / np.mean(image**2))


def _class_contrast(image: np.ndarray, label: np.ndarray) -> float:
    """Spread between the brightest and the darkest class mean."""
    means = [image[label == value].mean() for value in np.unique(label)]
    return float(max(means) - min(means)) / 255.0


def test_target_domain_is_noisier_and_has_lower_contrast_than_source():
    for index in range(4):
        source, label = render_oct_sample([7, index], SIZE, "source")
        target, same_label = render_oct_sample([7, index], SIZE, "target")
        assert np.array_equal(label, same_label)  # same anatomy, different rendering
        assert _high_frequency_energy(target) > 5 * _high_frequency_energy(source)
        assert _class_contrast(target, label) < 0.75 * _class_contrast(source, label)


def test_refuses_non_empty_folder_unless_overwrite(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        make_oct_dataset(root, 1, 1, 1, 1, size=(32, 32))
    assert sorted(path.name for path in root.iterdir()) == ["notes.txt"]  # nothing written

    make_oct_dataset(root, 2, 1, 1, 1, size=(32, 32), overwrite=True)
    make_oct_dataset(root, 1, 1, 1, 1, size=(32, 32), overwrite=True)  # replaces the dataset, keeps other files
    assert (root / "notes.txt").read_text() == "keep me"
    assert [path.name for path in (root / "source" / "train" / "images").iterdir()] == ["0000.png"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_source_train": 0}, "`num_source_train` must be a positive integer, but got 0"),
        ({"num_target_val": 2.5}, "`num_target_val` must be a positive integer, but got 2.5"),
        ({"size": (16, 64)}, r"`size` must be at least \(32, 32\).*\(16, 64\)"),
        ({"size": 64}, r"`size` must be a \(height, width\) pair of integers, but got 64"),
        ({"seed": -1}, "`seed` must be a non-negative integer, but got -1"),
    ],
)
def test_bad_arguments_raise_before_writing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_oct_dataset(tmp_path / "data", **kwargs)
    assert not (tmp_path / "data").exists()


def test_root_that_is_a_file_raises(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="`root` must be a folder"):
        make_oct_dataset(tmp_path / "file")
