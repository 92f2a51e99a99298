"""The device data path of segmentation (decoded once, batches made on the device) against the streaming path, the
placement choice, and Fourier domain adaptation. CPU only, tiny data written to tmp_path."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader

from diffusers_uncertainty.segmentation import (
    EntropyEstimator,
    PhotometricAugmentation,
    SegmentationTransform,
    TransformedDataset,
    create_segmentation_model,
    load_segmentation_data,
)
from diffusers_uncertainty.segmentation.data import list_collate
from diffusers_uncertainty.segmentation.device_data import (
    DeviceSegmentationDataset,
    EvaluationImages,
    StreamedEvaluationBatches,
    choose_dataset_placement,
    decoded_nbytes,
)
from diffusers_uncertainty.segmentation.fourier import (
    FourierDomainAdaptation,
    fourier_domain_adaptation,
    low_frequency_mask,
)
from diffusers_uncertainty.segmentation.io_utils import resize_probs, uncertainty_to_png16
from example_scripts import load_example


def load_script(name):
    return load_example(name)


def coded_folder(root, sizes, seed=0):
    """Images whose red channel is 40 x the label and whose green channel is 10 x the column (so a crop's position
    and flip can be read back from its pixels)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, (height, width) in enumerate(sizes):
        label = rng.integers(0, 4, (height, width)).astype(np.uint8)
        image = np.zeros((height, width, 3), np.uint8)
        image[..., 0] = label * 40
        image[..., 1] = np.arange(width, dtype=np.uint8)[None] * 10
        Image.fromarray(image).save(root / "images" / f"c{i}.png")
        Image.fromarray(label).save(root / "labels" / f"c{i}.png")
    return root


def scene_folder(root, n, seed, labels=True, size=(32, 40)):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    if labels:
        (root / "labels").mkdir()
    for i in range(n):
        image = rng.integers(0, 60, (*size, 3)).astype(np.uint8)
        label = np.zeros(size, np.uint8)
        for cls, colour in ((1, (200, 30, 30)), (2, (30, 200, 30))):
            h, w = rng.integers(6, 14, size=2)
            y, x = rng.integers(0, size[0] - h), rng.integers(0, size[1] - w)
            image[y : y + h, x : x + w] = colour
            label[y : y + h, x : x + w] = cls
        label[0, :3] = 255
        Image.fromarray(image).save(root / "images" / f"s{i:02d}.png")
        if labels:
            Image.fromarray(label).save(root / "labels" / f"s{i:02d}.png")
    return root


def test_device_batches_keep_image_and_label_aligned_and_cover_every_crop_and_flip(tmp_path):
    # Shorter side = resolution: no resize, so the pixels are the stored ones and alignment is checked exactly.
    sizes = [(16, 20), (16, 20), (22, 16), (16, 16)]
    folder = load_segmentation_data(str(coded_folder(tmp_path / "d", sizes)), 4, 255)
    data = DeviceSegmentationDataset([folder], 16, "cpu")
    # Three stored sizes, padded into one tensor; crops stay inside each image's own size.
    assert len(data) == 4 and data.images.shape == (4, 3, 22, 20) and data.nbytes == 4 * 22 * 20 * 4
    generator = torch.Generator().manual_seed(0)
    offsets, flips = set(), set()
    for _ in range(60):
        batch = data.batch(torch.tensor([0, 2, 1, 3, 0]), generator)
        pixels = torch.round(batch["pixel_values"] * 255).long()
        assert batch["pixel_values"].shape == (5, 3, 16, 16) and batch["labels"].dtype == torch.long
        assert torch.equal(pixels[:, 0] // 40, batch["labels"])  # the label map follows the image exactly
        columns = pixels[0, 1, 0] // 10
        flipped = bool(columns[0] > columns[-1])
        start = int(columns.min())
        assert torch.equal(columns, start + (torch.arange(15, -1, -1) if flipped else torch.arange(16)))
        offsets.add(start)
        for narrow in (1, 3):  # 16 wide: the crop is the whole width, never the padding beside it
            columns = pixels[narrow, 1, 0] // 10
            assert torch.equal(columns, torch.arange(16)) or torch.equal(columns, torch.arange(15, -1, -1))
        flips.add(flipped)
    assert offsets == set(range(5)) and flips == {False, True}  # every crop position 0..W-R and both flips


def test_device_batches_follow_a_sampler_and_slice_global_batches_per_process(tmp_path):
    folder = load_segmentation_data(str(coded_folder(tmp_path / "d", [(16, 16)] * 6)), 4, 255)
    data = DeviceSegmentationDataset([folder], 16, "cpu")
    class FixedSequence:
        """A sampler (the `HardnessAwareSampler` interface: `len` and batched `draw`) replaying a fixed sequence."""

        def __init__(self, values):
            self.values, self.position = values, 0

        def __len__(self):
            return len(self.values)

        def draw(self, count):
            drawn = self.values[self.position : self.position + count]
            self.position = (self.position + count) % len(self.values)
            return torch.tensor(drawn)

    sampler = FixedSequence([5, 4, 3, 2, 1, 0, 5])
    per_process = [
        [b["index"].tolist() for b in data.batches(2, sampler=sampler, num_processes=2, process_index=p)]
        for p in (0, 1)
    ]
    # Global batches of 4 draws: [5, 4, 3, 2] then the incomplete [1, 0, 5], dropped by default.
    assert per_process == [[[5, 4]], [[3, 2]]]
    sampler.position = 0
    kept = [b["index"].tolist() for b in data.batches(2, sampler=sampler, num_processes=2, drop_last=False)]
    assert kept == [[5, 4], [1, 0]]
    order = torch.cat([b["index"] for b in data.batches(3, generator=torch.Generator().manual_seed(1))])
    assert sorted(order.tolist()) == list(range(6))  # a permutation without a sampler


def test_batched_photometric_augmentation_is_torchvisions_per_image_augmentation():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 20, 24)
    # Zero-width ranges and probability 1: every draw is fixed, so both paths must give the same images.
    fixed = PhotometricAugmentation(brightness=(1.2, 1.2), contrast=(0.7, 0.7), gamma=(1.3, 1.3),
                                    blur_sigma=(0.8, 0.8), noise_std=(0.0, 0.0), p=1.0, blur_p=1.0, noise_p=0.0)
    batched = fixed.batch(images)
    for i in range(3):
        torch.testing.assert_close(batched[i], fixed(images[i]), atol=1e-6, rtol=0)
    # Blur with a different sigma per image matches torchvision's kernel for each.
    from diffusers_uncertainty.segmentation.data import _blur_batch

    sigma = torch.tensor([0.1, 0.9, 1.5])
    blurred = _blur_batch(images, sigma, 5)
    for i, s in enumerate(sigma.tolist()):
        size = 2 * math.ceil(3 * s) + 1
        torch.testing.assert_close(blurred[i], TF.gaussian_blur(images[i], [size, size], [s, s]), atol=1e-6, rtol=0)
    # Probabilities 0 leave the batch untouched.
    identity = PhotometricAugmentation(p=0.0, blur_p=0.0, noise_p=0.0)
    assert torch.equal(identity.batch(images), images)


def test_device_and_stream_evaluation_give_the_same_metrics(tmp_path):
    train = load_script("train_segmentation")
    folder = scene_folder(tmp_path / "val", 5, seed=1)
    # Mixed sizes: two images of another size form their own batch on both paths.
    scene_folder(tmp_path / "other", 2, seed=2, size=(40, 48))
    for path in (tmp_path / "other").glob("*/*.png"):
        path.rename(folder / path.parent.name / ("o" + path.name))
    data = load_segmentation_data(str(folder), 3, 255)
    torch.manual_seed(0)
    model = create_segmentation_model("unet", "tu-mobilenetv3_small_050", 3, encoder_depth=3,
                                      decoder_channels=(16, 8, 8), ignore_index=255).eval()
    args = train.parse_args(["--train_data_dir", str(folder), "--num_classes", "3", "--ignore_index", "255",
                             "--resolution", "32"])
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    device = EvaluationImages(data, 32, 32, "cpu", batch_size=3)
    stream = StreamedEvaluationBatches(
        DataLoader(TransformedDataset(data, SegmentationTransform(32, train=False, multiple=32)), batch_size=3,
                   collate_fn=list_collate),
        "cpu",
    )
    on_device = train.evaluate(model, device, args, accelerator)
    streamed = train.evaluate(model, stream, args, accelerator)
    assert on_device == streamed and on_device["labeled_pixels"] > 0
    # The inputs themselves are identical.
    first = next(iter(device))
    expected = SegmentationTransform(32, train=False, multiple=32)(data[first["indices"][0]])["pixel_values"]
    assert torch.equal(first["pixel_values"][0], expected)


def test_dataset_placement_choice_and_bad_values(tmp_path):
    cuda = torch.device("cuda")
    assert choose_dataset_placement("auto", 100, 1000, cuda) == "device"
    assert choose_dataset_placement("auto", 1001, 1000, cuda) == "stream"
    assert choose_dataset_placement("auto", 100, 1000, torch.device("cpu")) == "stream"
    assert choose_dataset_placement("device", 10**12, 0, torch.device("cpu")) == "device"
    assert choose_dataset_placement("stream", 0, 10**12, cuda) == "stream"
    with pytest.raises(ValueError, match="`--dataset_placement` must be one of auto, device, stream, but got 'gpu'"):
        choose_dataset_placement("gpu", 0, 0, cuda)
    train = load_script("train_segmentation")
    base = ["--train_data_dir", "unused", "--num_classes", "3"]
    with pytest.raises(ValueError, match="`--dataset_placement` must be one of auto, device, stream, but got 'gpu'"):
        train.parse_args([*base, "--dataset_placement", "gpu"])
    with pytest.raises(ValueError, match="`--device_data_budget_mb` must be >= 0, got -1.0"):
        train.parse_args([*base, "--device_data_budget_mb", "-1"])
    with pytest.raises(ValueError, match="`--torch_compile_mode reduce-overhead` needs `--torch_compile`"):
        train.parse_args([*base, "--torch_compile_mode", "reduce-overhead"])
    # The estimate: 3 uint8 channels + an int16 label per pixel at the stored size (shorter side -> resolution).
    folder = load_segmentation_data(str(scene_folder(tmp_path / "d", 2, seed=0)), 3, 255)
    assert decoded_nbytes([folder], 16) == 2 * 16 * 20 * 5


def test_fda_keeps_the_phase_and_edges():
    height = width = 32
    source = torch.full((1, 3, height, width), 0.2)
    source[..., 8:20, 10:26] = 0.8  # a bright box: its edges must stay where they are
    target = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.3
    amplitude = torch.fft.fft2(target).abs()
    out = fourier_domain_adaptation(source, amplitude, beta=0.1)
    assert not torch.allclose(out, source, atol=1e-3)
    spectrum_in, spectrum_out = torch.fft.fft2(source), torch.fft.fft2(out)
    strong = (spectrum_in.abs() > 1e-3) & (spectrum_out.abs() > 1e-3)
    phase_difference = torch.angle(spectrum_out * spectrum_in.conj())[strong]
    assert phase_difference.abs().max() < 1e-3  # the phase is the source's
    # The largest horizontal and vertical steps are still at the box's borders.
    gx = (out[..., :, 1:] - out[..., :, :-1]).abs().mean((0, 1, 2))
    gy = (out[..., 1:, :] - out[..., :-1, :]).abs().mean((0, 1, 3))
    assert set(gx.topk(2).indices.tolist()) == {9, 25} and set(gy.topk(2).indices.tolist()) == {7, 19}
    # Outside the window the amplitude is the source's, inside it the target's.
    mask = low_frequency_mask(height, width, 0.1)
    torch.testing.assert_close(spectrum_out.abs()[..., mask], amplitude[..., mask], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(spectrum_out.abs()[..., ~mask], spectrum_in.abs()[..., ~mask], atol=1e-3, rtol=1e-4)


def test_fda_whole_spectrum_gives_the_target_amplitude_and_beta_zero_changes_nothing():
    generator = torch.Generator().manual_seed(0)
    source, target = torch.rand(2, 3, 24, 24, generator=generator), torch.rand(2, 3, 24, 24, generator=generator)
    amplitude = torch.fft.fft2(target).abs()
    assert low_frequency_mask(24, 24, 1.0).all() and not low_frequency_mask(24, 24, 0.0).any()
    out = fourier_domain_adaptation(source, amplitude, beta=1.0)
    torch.testing.assert_close(torch.fft.fft2(out).abs(), amplitude, atol=1e-4, rtol=1e-4)
    assert torch.equal(fourier_domain_adaptation(source, amplitude, beta=0.0), source)
    # Yang & Soatto's window: beta * min side = 2.88 -> |k| <= 2, a 5 x 5 square around the zero frequency.
    assert int(low_frequency_mask(96, 128, 0.03).sum()) == 25


def test_fda_module_computes_target_spectra_once_and_checks_arguments():
    targets = [Image.fromarray(np.full((20, 30, 3), 50 * (i + 1), np.uint8)) for i in range(3)]
    fda = FourierDomainAdaptation(targets, 16, 1.0, "cpu")
    assert fda.target_amplitude.shape == (3, 3, 16, 16)
    images = torch.rand(4, 3, 16, 16)
    out = fda(images, generator=torch.Generator().manual_seed(0))
    # beta 1: each output is a constant image of one of the targets' brightness (the amplitude of a constant).
    for image in out:
        assert torch.allclose(image, image.mean(), atol=1e-5)
        assert min(abs(float(image.mean()) - 50 * (i + 1) / 255) for i in range(3)) < 1e-5
    keep = fda(images, apply=torch.tensor([False, True, False, True]))
    assert torch.equal(keep[0], images[0]) and torch.equal(keep[2], images[2])
    with pytest.raises(ValueError, match=r"`--fda_beta` must be in \[0, 1\], got 1.5"):
        FourierDomainAdaptation(targets, 16, 1.5, "cpu")
    with pytest.raises(ValueError, match="`--fda_target_dir` holds no images"):
        FourierDomainAdaptation([], 16, 0.1, "cpu")
    with pytest.raises(ValueError, match=r"FDA target spectra are 16x16, got images of size 32x16 \(WxH\)"):
        fda(torch.rand(1, 3, 16, 32))
    with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\], got -0.1"):
        fourier_domain_adaptation(images, images, -0.1)
    train = load_script("train_segmentation")
    base = ["--train_data_dir", "unused", "--num_classes", "3"]
    with pytest.raises(ValueError, match="`--fourier_domain_adaptation` needs `--fda_target_dir`"):
        train.parse_args([*base, "--fourier_domain_adaptation"])
    with pytest.raises(ValueError, match=r"`--fda_beta` must be in \[0, 1\], got 2.0"):
        train.parse_args([*base, "--fourier_domain_adaptation", "--fda_target_dir", "x", "--fda_beta", "2"])
    with pytest.raises(ValueError, match="only used with `--fourier_domain_adaptation`"):
        train.parse_args([*base, "--fda_target_dir", "x"])


@pytest.mark.parametrize("placement", ["device", "stream"])
def test_training_with_synthetic_data_and_fda_on_both_placements(tmp_path, placement):
    import datasets

    train = load_script("train_segmentation")
    source = scene_folder(tmp_path / "train", 6, seed=0)
    val = scene_folder(tmp_path / "val", 3, seed=1)
    target = scene_folder(tmp_path / "target", 4, seed=2, labels=False)
    rows = {"image": [], "label": []}
    for path in sorted((scene_folder(tmp_path / "syn_folder", 4, seed=3) / "images").glob("*.png")):
        rows["image"].append(Image.open(path).convert("RGB"))
        rows["label"].append(Image.open(path.parent.parent / "labels" / path.name))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "synthetic"))
    output_dir = tmp_path / "out"
    args = train.parse_args([
        "--train_data_dir", str(source), "--synthetic_data_dir", str(tmp_path / "synthetic"), "--synthetic_ratio", "0.5",
        "--validation_data_dir", str(val), "--num_classes", "3", "--ignore_index", "255",
        "--architecture", "unet", "--encoder_name", "tu-mobilenetv3_small_050", "--encoder_depth", "3",
        "--decoder_channels", "16", "8", "8", "--resolution", "32", "--photometric_augmentation", "--flexseg",
        "--fourier_domain_adaptation", "--fda_target_dir", str(target), "--fda_beta", "0.1",
        "--dataset_placement", placement, "--train_batch_size", "2", "--max_train_steps", "4",
        "--validation_steps", "4", "--checkpointing_steps", "100", "--logging_steps", "2", "--seed", "0",
        "--report_to", "none", "--output_dir", str(output_dir),
    ])
    train.main(args)
    throughput = json.loads((output_dir / "throughput.json").read_text())
    assert throughput["stage"] == "train_segmentation" and throughput["dataset_placement"] == placement
    assert throughput["measured_steps"] == 2 and throughput["steps_per_second"] > 0
    metrics = json.loads((output_dir / "validation_metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0
    assert "fda" in (output_dir / "README.md").read_text()


def test_compute_uncertainty_gives_the_per_image_maps(tmp_path):
    """The batched, decode-once script writes the maps and scores of the former per-image path."""
    folder = scene_folder(tmp_path / "target", 5, seed=2, labels=False)
    scene_folder(tmp_path / "other", 2, seed=4, labels=False, size=(36, 44))
    for path in (tmp_path / "other" / "images").glob("*.png"):
        path.rename(folder / "images" / ("o" + path.name))
    torch.manual_seed(0)
    model = create_segmentation_model("unet", "tu-mobilenetv3_small_050", 3, encoder_depth=3,
                                      decoder_channels=(16, 8, 8), ignore_index=255)
    model.save_pretrained(tmp_path / "model")
    script = load_script("compute_uncertainty")
    script.main(script.parse_args(["--model", str(tmp_path / "model"), "--data_dir", str(folder), "--resolution", "32",
                                   "--batch_size", "3", "--output_dir", str(tmp_path / "out")]))
    # The former path: one image at a time through the evaluation transform, map resized back, clamped.
    model.eval()
    estimator = EntropyEstimator(model)
    data = load_segmentation_data(str(folder), 3, 255, require_labels=False)
    transform = SegmentationTransform(32, train=False, multiple=model.output_stride)
    with open(tmp_path / "out" / "scores.csv") as f:
        scores = {row["name"]: float(row["score"]) for row in csv.DictReader(f)}
    assert len(scores) == 7
    for index in range(len(data)):
        sample = transform(data[index])
        with torch.no_grad():
            uncertainty = estimator(sample["pixel_values"][None]).maps[0]
        full = resize_probs(uncertainty[None, None].float(), sample["original_size"])[0, 0].clamp(0.0, 1.0)
        stored = np.asarray(Image.open(tmp_path / "out" / "maps" / f"{sample['name']}.png"))
        expected = np.asarray(uncertainty_to_png16(full.numpy())).astype(np.int64)
        # Batched convolutions differ from single-image ones in the last float bits (~1e-7), which can move a pixel
        # across a 16-bit rounding boundary; the float maps agree to 1e-6 (their means, the scores, show it).
        assert np.abs(stored.astype(np.int64) - expected).max() <= 1
        assert scores[sample["name"]] == pytest.approx(float(full.mean()), abs=1e-6)


def test_a_device_flexseg_training_step_reads_nothing_on_the_host(tmp_path):
    """Batch draw from the hardness sampler, photometric augmentation, FDA, the FLEX-Seg terms (boundary emphasis,
    bands, prototypes), backward, clipping and the sampler update: no operator reads tensor values on the host (each
    would be a device sync every step on a GPU). The Dice term is left out here: smp's `DiceLoss` one-hot checks its
    labels with `.item()` on the CPU only (not on CUDA)."""
    from diffusers_uncertainty.segmentation import HardnessAwareSampler
    from diffusers_uncertainty.segmentation.losses import FlexSegLoss
    from diffusers_uncertainty.training.performance import HostReadCounter

    folder = load_segmentation_data(str(scene_folder(tmp_path / "d", 6, seed=0)), 3, 255)
    data = DeviceSegmentationDataset([folder], 32, "cpu", photometric=PhotometricAugmentation())
    targets = [Image.fromarray((np.random.default_rng(i).random((32, 40, 3)) * 255).astype(np.uint8)) for i in range(3)]
    fda = FourierDomainAdaptation(targets, 32, beta=0.05, device="cpu")
    model = create_segmentation_model("unet", "resnet18", num_classes=3, ignore_index=255, encoder_depth=3,
                                      decoder_channels=[16, 8, 8])
    loss_fn = FlexSegLoss(3, 255, ube_weight=1.0, band_weight=0.5, proto_weight=0.1, feature_dim=model.feature_channels)
    sampler = HardnessAwareSampler([1.0] * 6, max_hardness=0.5)
    sampler.set_progress(0.5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        with HostReadCounter() as counter:
            batch = next(data.batches(2, sampler=sampler, generator=generator, augment_generator=generator))
            pixel_values = fda(batch["pixel_values"], generator=generator)
            output = model(pixel_values, return_features=loss_fn.needs_features)
            terms = loss_fn(output.logits, batch["labels"], output.features)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            sampler.update(batch["index"], terms["per_sample"])
        assert counter.host_reads == 0, counter.host_read_operators
        model.zero_grad()
