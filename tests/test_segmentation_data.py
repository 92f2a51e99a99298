import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_uncertainty.segmentation import (
    PhotometricAugmentation,
    SegmentationMetrics,
    SegmentationTransform,
    eval_size,
    load_segmentation_data,
    metrics_to_markdown,
)
from example_scripts import load_example


def write_folder(root, n=3, size=(40, 30), label_fn=None):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        label = np.zeros((size[1], size[0]), np.uint8) if label_fn is None else label_fn(i)
        Image.fromarray(label).save(root / "labels" / f"im{i}.png")
    return root


def test_valid_folder_loads(tmp_path):
    def label_fn(i):
        label = np.zeros((30, 40), np.uint8)
        label[:, 20:] = 2
        label[0, 0] = 255
        return label

    data = load_segmentation_data(str(write_folder(tmp_path / "d", label_fn=label_fn)), 3, 255)
    assert len(data) == 3 and data.has_labels
    sample = data[1]
    assert sample["name"] == "im1" and sample["image"].size == (40, 30)
    assert sample["label"].dtype == np.int64 and set(np.unique(sample["label"])) == {0, 2, 255}


def test_label_values_out_of_range_raise_naming_file(tmp_path):
    def label_fn(i):
        label = np.zeros((30, 40), np.uint8)
        if i == 2:
            label[3, 3] = 7
        return label

    root = write_folder(tmp_path / "d", label_fn=label_fn)
    with pytest.raises(ValueError, match=r"Label map of .*im2\.png has values \[7\] outside the allowed \[0, 3\) or --ignore_index 255"):
        load_segmentation_data(str(root), 3, 255, argument="--train_data_dir")


def test_mismatched_image_and_label_size_raises(tmp_path):
    root = write_folder(tmp_path / "d")
    Image.fromarray(np.zeros((31, 40), np.uint8)).save(root / "labels" / "im1.png")
    with pytest.raises(ValueError, match=r"The label map of .*images/im1\.png has size 40x31 \(WxH\), but the image has size 40x30"):
        load_segmentation_data(str(root), 3, 255)


def test_empty_and_incomplete_folders_raise(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "labels").mkdir()
    with pytest.raises(ValueError, match=r"`--train_data_dir`: no images .* found in .*empty/images"):
        load_segmentation_data(str(tmp_path / "empty"), 3, 255, argument="--train_data_dir")
    with pytest.raises(ValueError, match="expected a folder"):
        load_segmentation_data(str(tmp_path / "missing"), 3, 255, argument="--data_dir")
    root = write_folder(tmp_path / "d")
    (root / "labels" / "im0.png").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) have no label map with the same name in .*labels, e\.g\. \['.*images/im0\.png'\]"):
        load_segmentation_data(str(root), 3, 255)
    # Unlabeled use of the same folder is fine.
    assert not load_segmentation_data(str(root), 3, 255, require_labels=False).has_labels


def test_rgb_label_rejected(tmp_path):
    root = write_folder(tmp_path / "d")
    Image.new("RGB", (40, 30)).save(root / "labels" / "im0.png")
    with pytest.raises(ValueError, match=r"PIL images must be integer label maps in mode 'L', 'P', 'I' or 'I;16', but got mode 'RGB'"):
        load_segmentation_data(str(root), 3, 255)


def test_saved_dataset_loads_and_is_checked(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (16, 8), (i * 40, 0, 0)) for i in range(3)]
    labels = [Image.fromarray(np.full((8, 16), i, np.uint8)) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": labels}, features=datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    )
    ds.save_to_disk(str(tmp_path / "syn"))
    data = load_segmentation_data(str(tmp_path / "syn"), 3, 255, argument="--synthetic_data_dir")
    assert len(data) == 3 and data[2]["label"].max() == 2
    with pytest.raises(ValueError, match=r"Label map of --synthetic_data_dir\[2\] has values \[2\] outside the allowed \[0, 2\)"):
        load_segmentation_data(str(tmp_path / "syn"), 2, 255, argument="--synthetic_data_dir")
    ds.remove_columns("label").save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(ValueError, match="expected a label column 'label'"):
        load_segmentation_data(str(tmp_path / "nolabel"), 3, 255)


def test_train_transform_keeps_image_and_label_aligned():
    # The label equals the image's red channel quantised: any misalignment would break the equality.
    red = np.tile((np.arange(48) // 12 * 60).astype(np.uint8), (36, 1))
    image = Image.fromarray(np.stack([red, np.zeros_like(red), np.zeros_like(red)], -1))
    label = (red // 60).astype(np.int64)
    transform = SegmentationTransform(32, train=True)
    for _ in range(5):
        out = transform({"image": image, "label": label, "name": "x"})
        assert out["pixel_values"].shape == (3, 32, 32) and out["labels"].shape == (32, 32)
        predicted = torch.round(out["pixel_values"][0] * 255 / 60).long()
        # Bilinear resampling blurs class borders by a pixel; elsewhere the two agree exactly.
        interior = (out["labels"][:, 1:-1] == out["labels"][:, :-2]) & (out["labels"][:, 1:-1] == out["labels"][:, 2:])
        assert torch.equal(predicted[:, 1:-1][interior], out["labels"][:, 1:-1][interior])


def test_eval_transform_and_size():
    assert eval_size(180, 240, 128, 32) == (128, 160)
    out = SegmentationTransform(128, train=False)({"image": Image.new("RGB", (240, 180)), "label": np.zeros((180, 240), np.int64), "name": "a"})
    assert out["pixel_values"].shape == (3, 128, 160) and out["labels"].shape == (180, 240)
    assert out["original_size"] == (180, 240)


def test_photometric_augmentation_changes_appearance_only():
    torch.manual_seed(0)
    image = torch.rand(3, 16, 16)
    aug = PhotometricAugmentation(p=1.0, blur_p=1.0, noise_p=1.0)
    out = aug(image)
    assert out.shape == image.shape and (out >= 0).all() and (out <= 1).all()
    assert not torch.allclose(out, image)


def test_metrics_match_hand_computation_and_exclude_ignore():
    metrics = SegmentationMetrics(3, ignore_index=9, class_names=["a", "b", "c"])
    labels = torch.tensor([[[0, 0, 1, 1, 9, 9]]])
    preds = torch.tensor([[[0, 1, 1, 1, 2, 0]]])  # predictions on ignored pixels must not count
    metrics.update(preds, labels)
    result = metrics.compute()
    # class 0: TP 1, FN 1, FP 0 -> IoU 1/2, Dice 2/3; class 1: TP 2, FP 1 -> IoU 2/3, Dice 4/5; class 2 absent.
    assert result["per_class"][0]["IoU"] == pytest.approx(0.5)
    assert result["per_class"][1]["IoU"] == pytest.approx(2 / 3)
    assert result["per_class"][2]["IoU"] is None
    assert result["per_class"][1]["Dice"] == pytest.approx(0.8)
    assert result["mIoU"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert result["mDice"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert result["pixel_accuracy"] == pytest.approx(3 / 4)
    assert result["labeled_pixels"] == 4
    table = metrics_to_markdown(result, title="t")
    assert "| b | 66.67 | 80.00 | 2 |" in table and "| c | n/a | n/a | 0 |" in table


def _train_segmentation_script():
    return load_example("train_segmentation")


def test_synthetic_ratio_end_gives_the_last_steps_base_weights(tmp_path):
    train = _train_segmentation_script()
    real, synthetic = write_folder(tmp_path / "real", n=3), write_folder(tmp_path / "synthetic", n=5)
    base = ["--train_data_dir", str(real), "--num_classes", "2", "--resolution", "8", "--synthetic_data_dir", str(synthetic)]
    args = train.parse_args(base + ["--synthetic_ratio", "0.5", "--synthetic_ratio_end", "0.1"])
    _, weights, final_weights, lengths, _ = train.build_training_data(args)
    assert lengths == [3, 5]
    assert sum(weights[3:]) == pytest.approx(0.5) and sum(final_weights[3:]) == pytest.approx(0.1)
    assert final_weights[:3] == pytest.approx([0.9 / 3] * 3) and final_weights[3:] == pytest.approx([0.1 / 5] * 5)
    with pytest.raises(ValueError, match=r"`--synthetic_ratio_end` needs `--synthetic_ratio` \(the fraction at the "
                                         r"first step\)"):
        train.parse_args(base + ["--synthetic_ratio_end", "0"])
    with pytest.raises(ValueError, match=r"`--synthetic_ratio_end` must be in \[0, 1\], got 1.5"):
        train.parse_args(base + ["--synthetic_ratio", "0.5", "--synthetic_ratio_end", "1.5"])


def test_max_synthetic_samples_takes_the_first_samples_one_per_label_map_first(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = _train_segmentation_script()
    real = write_folder(tmp_path / "real", n=3)
    # A generated dataset is stored label map by label map: (label 0, sample 0), (0, 1), (1, 0), ...; the red channel
    # of each image encodes its row.
    rows = [(label_id, sample_index) for label_id in range(3) for sample_index in range(2)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image(),
                                  "source_label_id": datasets.Value("int64"), "sample_index": datasets.Value("int64")})
    datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (16, 8), (row, 0, 0)) for row in range(len(rows))],
         "label": [Image.fromarray(np.zeros((8, 16), np.uint8)) for _ in rows],
         "source_label_id": [label_id for label_id, _ in rows], "sample_index": [index for _, index in rows]},
        features=features,
    ).save_to_disk(str(tmp_path / "generated"))
    plain = write_folder(tmp_path / "plain", n=4)
    base = ["--train_data_dir", str(real), "--num_classes", "2", "--resolution", "8"]

    args = train.parse_args(base + ["--synthetic_data_dir", str(tmp_path / "generated"), str(plain),
                                    "--synthetic_ratio", "0.5", "--max_synthetic_samples", "4"])
    sources, weights, final_weights, lengths, _ = train.build_training_data(args)
    assert lengths == [3, 4]  # the second source is not used at all
    # One sample of each of the three label maps (rows 0, 2, 4), then the second sample of label map 0 (row 1).
    assert [sources[1][i]["image"].getpixel((0, 0))[0] for i in range(4)] == [0, 2, 4, 1]
    assert sum(weights[3:]) == pytest.approx(0.5)  # --synthetic_ratio applies to the samples kept
    assert final_weights is None  # no schedule

    args = train.parse_args(base + ["--synthetic_data_dir", str(tmp_path / "generated"), str(plain),
                                    "--max_synthetic_samples", "8"])
    sources, _, _, lengths, _ = train.build_training_data(args)
    assert lengths == [3, 6, 2]  # the generated dataset whole, then the folder's first two files
    assert sources[2].image_paths == [str(plain / "images" / "im0.png"), str(plain / "images" / "im1.png")]

    args = train.parse_args(base + ["--synthetic_data_dir", str(plain), "--max_synthetic_samples", "5"])
    with pytest.raises(ValueError, match=r"`--max_synthetic_samples` asks for 5 samples, but the synthetic data holds "
                                         r"only 4 \(4 in its sources\)"):
        train.build_training_data(args)
    with pytest.raises(ValueError, match=r"`--max_synthetic_samples` must be at least 1, got 0"):
        train.parse_args(base + ["--synthetic_data_dir", str(plain), "--max_synthetic_samples", "0"])
    with pytest.raises(ValueError, match=r"`--max_synthetic_samples` needs at least one `--synthetic_data_dir`"):
        train.parse_args(base + ["--max_synthetic_samples", "2"])
