"""`diffusers-uncertainty prepare fda-copies`: a labeled folder doubled with FDA copies that keep their labels."""

import numpy as np
import pytest
from PIL import Image

from diffusers_uncertainty.cli import main


def write_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def command(tmp_path, *extra):
    return ["prepare", "fda-copies", "--labeled_dir", str(tmp_path / "src"), "--target_dir", str(tmp_path / "target"),
            "--output_dir", str(tmp_path / "out"), *extra]


def test_copies_keep_labels_and_take_the_target_colour(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):  # mid-range images, so that the transfer needs no clipping
        write_image(tmp_path / "src" / "images" / f"{stem}.png", rng.integers(70, 130, (16, 16, 3), dtype=np.uint8))
        write_image(tmp_path / "src" / "labels" / f"{stem}.png", rng.integers(0, 2, (16, 16), dtype=np.uint8))
    target = rng.integers(150, 190, (16, 16, 3), dtype=np.uint8)
    target[..., 2] = 60  # a colour cast the copies must take
    write_image(tmp_path / "target" / "t.png", target)

    assert main(command(tmp_path, "--beta", "0.05")) == 0
    assert f"Wrote 2 labeled images and 2 FDA copies (beta 0.05) to {tmp_path / 'out'}." in capsys.readouterr().out
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.png", "b.png", "fda_a.png", "fda_b.png"]
    for stem in ("a", "b"):
        original = np.asarray(Image.open(tmp_path / "src" / "images" / f"{stem}.png"))
        label = np.asarray(Image.open(tmp_path / "src" / "labels" / f"{stem}.png"))
        copy = np.asarray(Image.open(out / "images" / f"fda_{stem}.png")).astype(float)
        assert np.array_equal(np.asarray(Image.open(out / "images" / f"{stem}.png")), original)
        for name in (f"{stem}.png", f"fda_{stem}.png"):
            assert np.array_equal(np.asarray(Image.open(out / "labels" / name)), label)
        # beta 0.05 of 16 px keeps only the zero frequency: the copy is the original shifted to the target's mean.
        np.testing.assert_allclose(copy.mean(axis=(0, 1)), target.mean(axis=(0, 1)), atol=0.5)
        np.testing.assert_allclose(copy - copy.mean(axis=(0, 1)), original - original.mean(axis=(0, 1)), atol=0.6)


def test_bad_input_is_refused_before_writing(tmp_path):
    write_image(tmp_path / "src" / "images" / "a.png", np.zeros((16, 16, 3), np.uint8))
    write_image(tmp_path / "src" / "labels" / "a.png", np.zeros((16, 16), np.uint8))
    write_image(tmp_path / "target" / "t.png", np.zeros((12, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"must share one size, got sizes \[\(16, 12\), \(16, 16\)\]"):
        main(command(tmp_path))
    with pytest.raises(ValueError, match=r"`--beta` must be in \(0, 1\], got 0.0"):
        main(command(tmp_path, "--beta", "0"))
    (tmp_path / "src" / "labels" / "a.png").unlink()
    with pytest.raises(ValueError, match=r"`--labeled_dir`: 1 image\(s\) have no label map"):
        main(command(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "target"]  # nothing written
