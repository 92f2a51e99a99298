"""Label agreement scores and the synthetic-sample filter of train_segmentation.py."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_uncertainty.segmentation import create_segmentation_model, load_segmentation_data
from diffusers_uncertainty.segmentation.label_agreement import (
    image_mean_iou,
    keep_most_agreeing,
    label_agreement_scores,
    most_agreeing,
)
from example_scripts import load_example


def test_image_mean_iou_counts_classes_present_in_label_or_prediction():
    labels = torch.tensor([[[0, 0, 1, 1]], [[0, 0, 1, 1]], [[2, 2, 2, 2]], [[255, 255, 255, 255]]])
    predictions = torch.tensor([[[0, 0, 1, 1]], [[0, 1, 1, 1]], [[2, 2, 255 % 3, 0]], [[0, 1, 2, 0]]])
    scores = image_mean_iou(predictions, labels, num_classes=3, ignore_index=255)
    assert scores[0] == 1.0
    # class 0: 1 / 2, class 1: 2 / 3; class 2 absent from both
    assert scores[1].item() == pytest.approx((1 / 2 + 2 / 3) / 2)
    # class 2: 2 / 4, class 0: 0 / 2 (predicted, not labeled); 255 % 3 = 0
    assert scores[2].item() == pytest.approx((0 + 2 / 4) / 2)
    assert math.isnan(scores[3].item())  # no labeled pixel
    ignored = torch.tensor([[[0, 255]]])
    assert image_mean_iou(torch.tensor([[[0, 1]]]), ignored, 3, 255).item() == 1.0  # ignored pixels do not count
    with pytest.raises(ValueError, match=r"must both be \(B, H, W\), got \(1, 4\) and \(1, 1, 4\)"):
        image_mean_iou(torch.zeros(1, 4), labels[:1], 3, 255)


def test_most_agreeing_keeps_the_best_share_ties_to_the_earlier_index_nan_last():
    scores = torch.tensor([0.5, float("nan"), 0.9, 0.5, 0.1])
    assert most_agreeing(scores, 0.4) == [0, 2]  # 2 of 5; the tie between 0 and 3 goes to 0
    assert most_agreeing(scores, 0.5) == [0, 2, 3]  # ceil(2.5)
    assert most_agreeing(scores, 0.01) == [2]  # at least one
    assert most_agreeing(scores, 1.0) == [0, 1, 2, 3, 4]
    assert most_agreeing(scores, 0.8) == [0, 2, 3, 4]  # the NaN one goes first
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=rf"`--synthetic_keep_fraction` must be in \(0, 1\], got {bad}"):
            most_agreeing(scores, bad)


def test_keep_most_agreeing_ranks_over_every_source():
    first, second, third = list("abc"), list("de"), list("f")
    scores = [torch.tensor([0.9, 0.1, 0.8]), torch.tensor([0.7, 0.95]), torch.tensor([0.2])]
    kept, indices = keep_most_agreeing([first, second, third], scores, 0.5)
    assert indices == [0, 2, 4]
    assert [list(source) for source in kept] == [["a", "c"], ["e"]]  # the third source is left out
    kept, _ = keep_most_agreeing([first, second], scores[:2], 1.0)
    assert kept[0] is first and kept[1] is second  # whole sources are returned as they are
    with pytest.raises(ValueError, match="one score per sample"):
        keep_most_agreeing([first], [torch.zeros(2)], 0.5)


class RedChannelSegmenter(torch.nn.Module):
    """Predicts class round(red / 100): a segmenter that is right exactly where a label map follows the image."""

    output_stride = 1

    def __init__(self, num_classes=3):
        super().__init__()
        self.centres = torch.nn.Parameter(torch.arange(num_classes, dtype=torch.float32) * 100 / 255)

    def forward(self, pixel_values):
        red = pixel_values[:, :1]
        return SimpleNamespace(logits=-((red - self.centres[None, :, None, None]) ** 2) * 1e4)


def write_labeled_folder(root, labels_follow_image):
    """Images whose red channel is 100 x class; label maps that follow them, or not (per image)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i, follows in enumerate(labels_follow_image):
        classes = np.repeat(np.repeat(rng.integers(0, 3, size=(8, 1)), 4, axis=0), 40, axis=1)  # 32 x 40 stripes
        image = np.zeros((32, 40, 3), np.uint8)
        image[..., 0] = classes * 100
        label = classes if follows else (classes + 1) % 3
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(label.astype(np.uint8)).save(root / "labels" / f"im{i}.png")
    return root


def test_label_agreement_scores_tell_images_that_follow_their_labels(tmp_path):
    follows = [True, False, True, False, True]
    dataset = load_segmentation_data(str(write_labeled_folder(tmp_path / "d", follows)), 3, 255)
    scores = label_agreement_scores(RedChannelSegmenter(), dataset, resolution=32, num_classes=3, ignore_index=255,
                                    batch_size=2)
    assert scores.shape == (5,)
    assert scores[[0, 2, 4]].tolist() == [1.0, 1.0, 1.0]
    assert scores[[1, 3]].max() < 0.5
    unlabeled = load_segmentation_data(str(tmp_path / "d" / "images"), 3, 255, require_labels=False)
    with pytest.raises(ValueError, match="`dataset` must be labeled"):
        label_agreement_scores(RedChannelSegmenter(), unlabeled, 32, 3, 255)


def _train_segmentation_script():
    return load_example("train_segmentation")


def test_train_segmentation_keeps_the_synthetic_samples_its_filter_model_agrees_with(tmp_path):
    train = _train_segmentation_script()
    real = write_labeled_folder(tmp_path / "real", [True] * 2)
    synthetic = write_labeled_folder(tmp_path / "synthetic", [True, False, True, False, True, False])
    filter_model = create_segmentation_model("unet", "tu-mobilenetv3_small_050", num_classes=3, encoder_depth=3,
                                             decoder_channels=(16, 8, 8))
    filter_model.save_pretrained(tmp_path / "filter")
    base = ["--train_data_dir", str(real), "--synthetic_data_dir", str(synthetic), "--num_classes", "3",
            "--resolution", "32", "--architecture", "unet", "--encoder_name", "tu-mobilenetv3_small_050",
            "--encoder_depth", "3", "--decoder_channels", "16", "8", "8"]

    args = train.parse_args(base + ["--synthetic_filter_model", str(tmp_path / "filter"),
                                    "--synthetic_keep_fraction", "0.5", "--max_synthetic_samples", "5"])
    sources, weights, _, lengths, summary = train.build_training_data(args)
    # The same model scoring the first five samples directly: the kept ones are its three best.
    expected_scores = label_agreement_scores(filter_model.eval(), sources[1].dataset, 32, 3, 255)[:5]
    best = sorted(sorted(range(5), key=lambda i: -expected_scores[i].item())[:3])
    assert lengths == [2, 3] and sources[1].indices == best
    assert summary["num_scored"] == 5 and summary["num_kept"] == 3
    assert summary["scores"] == [expected_scores.tolist()]
    assert summary["mean_score_kept"] == pytest.approx(expected_scores[best].mean().item())

    # main() writes the summary next to the model (one training step).
    output_dir = tmp_path / "out"
    args = train.parse_args(base + ["--synthetic_filter_model", str(tmp_path / "filter"),
                                    "--synthetic_keep_fraction", "0.5", "--max_train_steps", "1",
                                    "--report_to", "none", "--output_dir", str(output_dir)])
    train.main(args)
    written = json.loads((output_dir / "synthetic_filter.json").read_text())
    assert written["num_scored"] == 6 and written["num_kept"] == 3

    with pytest.raises(ValueError, match=r"`--synthetic_filter_model` and `--synthetic_keep_fraction` go together, "
                                         r"got only --synthetic_keep_fraction"):
        train.parse_args(base + ["--synthetic_keep_fraction", "0.5"])
    with pytest.raises(ValueError, match=r"`--synthetic_keep_fraction` must be in \(0, 1\], got 0.0"):
        train.parse_args(base + ["--synthetic_filter_model", str(tmp_path / "filter"), "--synthetic_keep_fraction", "0"])
    with pytest.raises(ValueError, match=r"`--synthetic_filter_model` needs at least one `--synthetic_data_dir`"):
        train.parse_args(base[:2] + base[4:] + ["--synthetic_filter_model", str(tmp_path / "filter"),
                                                "--synthetic_keep_fraction", "0.5"])
    create_segmentation_model("unet", "tu-mobilenetv3_small_050", num_classes=4, encoder_depth=3,
                              decoder_channels=(16, 8, 8)).save_pretrained(tmp_path / "four")
    args = train.parse_args(base + ["--synthetic_filter_model", str(tmp_path / "four"),
                                    "--synthetic_keep_fraction", "0.5", "--output_dir", str(tmp_path / "never")])
    with pytest.raises(ValueError, match=r"`--synthetic_filter_model` .*four' predicts 4 classes, but `--num_classes` is 3"):
        train.main(args)
    assert not (tmp_path / "never").exists()  # stopped before anything was written
