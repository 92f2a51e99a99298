"""Measures of a generated labeled dataset, from models the workflow trains itself (no Inception or CLIP weights):

- **label fidelity**: mIoU (and per class) of a segmenter on the generated images against the labels they were
  generated from, with the source-only segmenter and with a segmenter trained on target-like (photometric) images,
  next to the same segmenters on real labeled source and target images (the ceiling);
- **target likeness**: a small [`DomainClassifier`] trained here on real source vs unlabeled target images (its
  held-out accuracy reported) gives the share of generated images classified as target, and its pooled features give
  the kernel inception distance (KID, torchmetrics' polynomial-kernel MMD) to real target and to real source images;
- **uncertainty match**: the source segmenter's mean uncertainty on generated images, on real target and on real
  source images.

Besides the dataset itself (uncertainty maps from the bank of real target maps), a few images are generated again
at constant uncertainty levels from the same label maps and seeds, so the measures can be read per level; and the
held-out real images are passed through the base model's autoencoder at the generated size (encoded, decoded): no
generated image can do better than these, so they tell a base that limits the synthetic data from a control that does.
`examples/evaluate_synthetic.py` runs [`evaluate_synthetic_dataset`] from the command line; the workflow runs it as a
stage and its report shows [`synthetic_evaluation_table`].
"""

import contextlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .atomic import save_pretrained_atomic, write_json_atomic, write_text_atomic


RESULTS_NAME = "synthetic_evaluation.json"
TABLE_NAME = "synthetic_evaluation.md"
CLASSIFIER_FOLDER = "domain_classifier"
GENERATION_CONFIG = "generation_config.json"  # written by examples/generate_synthetic_dataset.py
UNCERTAINTY_ESTIMATOR_CHOICES = ("entropy", "mc_dropout")


# ------------------------------------------------------------------------------------------- domain classifier
class DomainClassifier(ModelMixin, ConfigMixin):
    r"""
    A small image classifier, source (0) vs target (1): stride-2 3x3 convolutions with SiLU, global average pooling
    (the features used for KID), then one linear logit. No normalisation layer, so a global change of brightness or
    contrast (what often tells the domains apart) reaches the pooled features unchanged.

    Args:
        in_channels (`int`, defaults to 3):
            Image channels.
        block_out_channels (`tuple[int]`, defaults to `(16, 32, 64, 128)`):
            Width of each stride-2 convolution; the last one is the feature size.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, block_out_channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        if in_channels < 1 or not block_out_channels or any(width < 1 for width in block_out_channels):
            raise ValueError(
                f"`in_channels` and every `block_out_channels` entry must be positive, but got {in_channels} and "
                f"{list(block_out_channels)}."
            )
        layers, channels = [], in_channels
        for width in block_out_channels:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.SiLU()]
            channels = width
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 1)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        r"""
        Pooled features, `(batch, block_out_channels[-1])`.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch, in_channels, height, width)`):
                Images in [0, 1].
        """
        return self.encoder(pixel_values).mean(dim=(2, 3))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        r"""
        Domain logits, `(batch,)` (> 0: target).

        Args:
            pixel_values (`torch.Tensor` of shape `(batch, in_channels, height, width)`):
                Images in [0, 1].
        """
        return self.head(self.features(pixel_values))[:, 0]


def domain_images(images: Sequence[PIL.Image.Image], resolution: int) -> torch.Tensor:
    r"""
    The classifier's view of images: the centred square of side the shorter side, resized to `resolution`, so
    images of any aspect ratio (real 4:3 frames, square generated ones) are seen undistorted.

    Args:
        images (`Sequence[PIL.Image.Image]`):
            The images (converted to RGB).
        resolution (`int`):
            Side of the square input.

    Returns:
        `torch.Tensor`: `(N, 3, resolution, resolution)` float32 in [0, 1].
    """
    tensors = []
    for image in images:
        tensor = TF.to_image(image.convert("RGB"))
        side = min(tensor.shape[-2:])
        tensor = TF.resize(TF.center_crop(tensor, [side, side]), [resolution, resolution], antialias=True)
        tensors.append(TF.to_dtype(tensor, torch.float32, scale=True).as_subclass(torch.Tensor))
    return torch.stack(tensors)


def train_domain_classifier(
    source: torch.Tensor,
    target: torch.Tensor,
    num_steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    block_out_channels: Sequence[int] = (16, 32, 64, 128),
) -> DomainClassifier:
    r"""
    Train a [`DomainClassifier`] on real source vs real (unlabeled) target images. Every batch holds as many images
    of each domain (the domains' sizes often differ a lot), each randomly cropped (at least half its side) and
    flipped, so the classifier learns appearance rather than layout. Runs on the device of `source`.

    Args:
        source (`torch.Tensor`), target (`torch.Tensor`):
            `(N, 3, R, R)` images in [0, 1] from [`domain_images`], on one device.
        num_steps (`int`, defaults to 300):
            Optimisation steps (AdamW).
        batch_size (`int`, defaults to 32):
            Images per step, half of each domain (even, at least 2).
        learning_rate (`float`, defaults to 1e-3):
            AdamW learning rate.
        seed (`int`, defaults to 0):
            Seeds the initialisation, the batches and the augmentation (the global RNG is restored afterwards).
        block_out_channels (`Sequence[int]`, defaults to `(16, 32, 64, 128)`):
            The classifier's widths.

    Returns:
        [`DomainClassifier`]: in eval mode, on the device of `source`.
    """
    if source.ndim != 4 or target.ndim != 4 or source.shape[1:] != target.shape[1:]:
        raise ValueError(
            f"`source` and `target` must be (N, C, R, R) images of one size, but got {tuple(source.shape)} and "
            f"{tuple(target.shape)}."
        )
    if len(source) == 0 or len(target) == 0:
        raise ValueError(f"Both domains need images, but got {len(source)} source and {len(target)} target images.")
    if num_steps < 1:
        raise ValueError(f"`num_steps` must be at least 1, but got {num_steps}.")
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"`batch_size` must be even and at least 2 (half of each domain), but got {batch_size}.")
    device = source.device
    half = batch_size // 2
    augment = T.Compose(
        [T.RandomResizedCrop(source.shape[-1], scale=(0.25, 1.0), ratio=(1.0, 1.0), antialias=True),
         T.RandomHorizontalFlip()]
    )
    domains = torch.cat([torch.zeros(half), torch.ones(half)]).to(device)
    with torch.random.fork_rng(devices=[]):  # every random draw here is on the CPU, on any device
        torch.manual_seed(seed)
        model = DomainClassifier(in_channels=source.shape[1], block_out_channels=tuple(block_out_channels)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
        model.train()
        for _ in range(num_steps):
            picks = [
                images[torch.randint(len(images), (half,))] for images in (source, target)
            ]
            batch = torch.stack([augment(image) for image in torch.cat(picks)])
            loss = F.binary_cross_entropy_with_logits(model(batch), domains)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def domain_predictions(classifier: DomainClassifier, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Probability of being a target image, and the pooled features, of every image (computed in float32).

    Args:
        classifier ([`DomainClassifier`]):
            A trained classifier.
        images (`torch.Tensor`):
            `(N, 3, R, R)` from [`domain_images`].
        batch_size (`int`, defaults to 64):
            Images per forward pass.

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: `(N,)` probabilities and `(N, D)` features, on the CPU.
    """
    device = next(classifier.parameters()).device
    probabilities, features = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        pooled = classifier.features(batch)
        probabilities.append(torch.sigmoid(classifier.head(pooled)[:, 0]).cpu())
        features.append(pooled.cpu())
    return torch.cat(probabilities), torch.cat(features)


def kernel_inception_distance(
    real_features: torch.Tensor, fake_features: torch.Tensor, subsets: int = 100, subset_size: int = 100, seed: int = 0
) -> dict:
    r"""
    KID between two sets of already extracted features, computed by `torchmetrics`'
    `KernelInceptionDistance` (polynomial kernel of degree 3, gamma = 1 / D, unbiased MMD averaged over random
    subsets); the features pass through it unchanged (`feature=nn.Identity()`).

    Args:
        real_features (`torch.Tensor`), fake_features (`torch.Tensor`):
            `(N, D)` and `(M, D)` features.
        subsets (`int`, defaults to 100):
            Number of random subsets.
        subset_size (`int`, defaults to 100):
            Subset size, lowered to the size of the smaller set when that is smaller.
        seed (`int`, defaults to 0):
            Seeds the subsets (the global RNG is restored afterwards).

    Returns:
        `dict`: `mean`, `std` (over subsets) and the `subset_size` used.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real_features), len(fake_features))
    if size < 2:
        raise ValueError(
            f"KID needs at least 2 images in each set, but got {len(real_features)} and {len(fake_features)}."
        )
    with warnings.catch_warnings():  # the features here are small: keeping them all is what we want
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        metric = KernelInceptionDistance(feature=nn.Identity(), subsets=subsets, subset_size=size)
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std), "subset_size": size}


# ------------------------------------------------------------------------------------------------ segmenters
@torch.no_grad()
def segment_samples(
    segmenter: nn.Module,
    samples: Sequence[dict],
    resolution: int,
    num_classes: int,
    ignore_index: int,
    class_names: Sequence[str] | None = None,
    estimator: str = "entropy",
    batch_size: int = 8,
    autocast: Callable = contextlib.nullcontext,
) -> dict:
    r"""
    Run a segmenter on labeled samples as `examples/evaluate_segmentation.py` does (shorter side resized to
    `resolution`, probabilities resized back, metrics at the labels' size) and measure its uncertainty on them.

    Args:
        segmenter (`torch.nn.Module`):
            A loaded segmenter (`output_stride` is the input-size divisor; 32 if it has none).
        samples (`Sequence[dict]`):
            `{"image": PIL.Image, "label": (H, W) int array, "name": str}`, as the segmentation datasets yield.
        resolution (`int`):
            Shorter side of the network input.
        num_classes (`int`), ignore_index (`int`):
            The label space.
        class_names (`Sequence[str]`, *optional*):
            For the per-class metrics.
        estimator (`str`, defaults to `"entropy"`):
            `"entropy"` or `"mc_dropout"` (see `segmentation/uncertainty.py`); the prediction is the estimator's
            mean probability (the plain softmax for `"entropy"`).
        batch_size (`int`, defaults to 8):
            Images per forward pass.
        autocast (`Callable`, defaults to `contextlib.nullcontext`):
            Context of the forward passes (e.g. `accelerator.autocast`).

    Returns:
        `dict`: the `SegmentationMetrics` results (`mIoU`, `per_class`, ...) plus `mean_uncertainty` (mean over
        images of the per-image mean map value) and `num_images`.
    """
    from .segmentation import UNCERTAINTY_ESTIMATORS, SegmentationMetrics, SegmentationTransform

    if estimator not in UNCERTAINTY_ESTIMATOR_CHOICES:
        raise ValueError(f"`estimator` must be one of {UNCERTAINTY_ESTIMATOR_CHOICES}, but got {estimator!r}.")
    if len(samples) == 0:
        raise ValueError("`samples` is empty.")
    device = next(segmenter.parameters()).device
    transform = SegmentationTransform(resolution, train=False, multiple=getattr(segmenter, "output_stride", 32))
    uncertainty = UNCERTAINTY_ESTIMATORS[estimator](segmenter)
    metrics = SegmentationMetrics(num_classes, ignore_index, class_names)
    scores = []
    for start in range(0, len(samples), batch_size):
        batch = [transform(sample) for sample in samples[start : start + batch_size]]
        shapes = {}
        for index, item in enumerate(batch):  # one forward pass per input size
            shapes.setdefault(tuple(item["pixel_values"].shape), []).append(index)
        for indices in shapes.values():
            pixel_values = torch.stack([batch[i]["pixel_values"] for i in indices]).to(device)
            with autocast():
                output = uncertainty(pixel_values)
            for row, i in enumerate(indices):
                labels = batch[i]["labels"]
                probs = output.probs[row : row + 1].float()
                if tuple(probs.shape[-2:]) != tuple(labels.shape):
                    probs = F.interpolate(probs, size=tuple(labels.shape), mode="bilinear", align_corners=False)
                metrics.update(probs.argmax(1).cpu(), labels[None])
                scores.append(float(output.scores[row]))
    return {**metrics.compute(), "mean_uncertainty": float(np.mean(scores)), "num_images": len(samples)}


# ------------------------------------------------------------------------------------------ generated sets
def read_generation_settings(synthetic_data_dir: str | os.PathLike) -> dict | None:
    r"""
    The `settings` of `generation_config.json` in a dataset written by `examples/generate_synthetic_dataset.py`, or
    `None` when the folder has none.

    Args:
        synthetic_data_dir (`str` or `os.PathLike`):
            The dataset folder.
    """
    path = Path(synthetic_data_dir) / GENERATION_CONFIG
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["settings"]


def check_level_generation(settings: dict | None, synthetic_data_dir, levels: Sequence[float]) -> None:
    r"""
    Raise a `ValueError` when the sets at constant uncertainty levels cannot be generated like the dataset.

    Args:
        settings (`dict`, *optional*):
            From [`read_generation_settings`].
        synthetic_data_dir:
            The dataset folder (for the message).
        levels (`Sequence[float]`):
            The requested levels.
    """
    if not levels:
        return
    if settings is None:
        raise ValueError(
            f"`uncertainty_levels` {list(levels)}: images at constant levels are generated with the settings of the "
            f"dataset's `{GENERATION_CONFIG}`, but {str(synthetic_data_dir)!r} has none; pass no levels to evaluate "
            "the dataset alone."
        )
    if settings.get("style_bank"):
        raise ValueError(
            f"`uncertainty_levels` {list(levels)}: the dataset in {str(synthetic_data_dir)!r} was generated with a "
            "style bank, which the constant-level sets cannot reproduce; pass no levels to evaluate the dataset alone."
        )


def load_generation_pipeline(settings: dict, device: torch.device | str, dtype: torch.dtype = torch.float32):
    r"""
    The dual-control pipeline a dataset was generated with (`pretrained_model_name_or_path` and
    `controlnet_model_name_or_path` of its settings).

    Args:
        settings (`dict`):
            From [`read_generation_settings`].
        device (`torch.device` or `str`):
            Where it runs.
        dtype (`torch.dtype`, defaults to `torch.float32`):
            Weights' dtype.
    """
    from .models import UncertaintyControlNetModel
    from .pipelines import StableDiffusionDualControlPipeline

    kwargs = {"dtype": dtype, "revision": settings.get("revision"), "variant": settings.get("variant")}
    if settings.get("controlnet_model_name_or_path"):
        kwargs["controlnet"] = UncertaintyControlNetModel.from_pretrained(
            settings["controlnet_model_name_or_path"], dtype=dtype, revision=settings.get("revision")
        )
    pipeline = StableDiffusionDualControlPipeline.from_pretrained(settings["pretrained_model_name_or_path"], **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def generate_level_sets(
    pipeline, dataset, settings: dict, levels: Sequence[float], samples_per_level: int, batch_size: int = 8
) -> dict[float, list[dict]]:
    r"""
    Generate the dataset's first `samples_per_level` samples again (one per label map first: rows ordered by sample
    index, then label map), with the same label map, seed and generation settings (control windows and starting
    source image included: [`dataset_generation_arguments`]), at each constant uncertainty level: only the
    uncertainty differs from the dataset's own images.

    Args:
        pipeline ([`StableDiffusionDualControlPipeline`]):
            The pipeline the dataset was generated with.
        dataset (`datasets.Dataset`):
            The generated dataset (`label`, `source_label_id`, `sample_index`, `seed` columns).
        settings (`dict`):
            From [`read_generation_settings`].
        levels (`Sequence[float]`):
            Uncertainty levels in [0, 1].
        samples_per_level (`int`):
            Images per level.
        batch_size (`int`, defaults to 8):
            Images per pipeline call.

    Returns:
        `dict[float, list[dict]]`: per level, samples `{"image", "label", "name"}`.
    """
    from .data_reader import load_image
    from .synthesis import (
        ConstantUncertainty,
        WorkItem,
        dataset_generation_arguments,
        dataset_source_images,
        generate_batch,
        quantize_uncertainty,
    )

    order = sorted(
        range(len(dataset)), key=lambda i: (dataset[i]["sample_index"], dataset[i]["source_label_id"])
    )[:samples_per_level]
    rows = [dataset[i] for i in order]
    items = [WorkItem(row["source_label_id"], row["sample_index"], row["seed"]) for row in rows]
    labels = [torch.from_numpy(np.asarray(row["label"]).astype(np.int64)) for row in rows]
    generation = dataset_generation_arguments(settings)
    source_images = dataset_source_images(settings)
    sets = {}
    for level in levels:
        source = ConstantUncertainty(level, argument="uncertainty_levels")
        samples = []
        for start in range(0, len(items), batch_size):
            batch_items, batch_labels = items[start : start + batch_size], torch.stack(labels[start : start + batch_size])
            height, width = batch_labels.shape[-2:]
            maps = torch.stack([source.get(item.seed, height, width)[0] for item in batch_items])
            uncertainty, _ = quantize_uncertainty(maps)
            init_images = None
            if source_images is not None:
                init_images = [load_image(str(source_images[item.label_id])) for item in batch_items]
            images, aligned = generate_batch(
                pipeline, batch_items, batch_labels, uncertainty, init_images=init_images, **generation
            )
            for item, image, label in zip(batch_items, images, aligned):
                name = f"u{level}_label{item.label_id}_sample{item.sample_index}"
                samples.append({"image": image, "label": np.asarray(label, dtype=np.int64), "name": name})
        sets[float(level)] = samples
    return sets


@torch.no_grad()
def autoencode_samples(
    pipeline, samples: Sequence[dict], height: int, width: int, num_classes: int, ignore_index: int | None,
    batch_size: int = 8,
) -> list[dict]:
    r"""
    Labeled real samples passed through the base model's autoencoder at the generated size: each image resized to
    `height` x `width` as the pipeline resizes an `init_image`, encoded (the mode of the latent distribution, as the
    pipeline encodes one) and decoded; its label map resized as the pipeline resizes a `semantic_map` (nearest). A
    generated image is decoded by the same autoencoder, so these bound what any generated image of this base can
    reach: when their fidelity or target likeness is already far below the real images', the base (its size, its
    training) limits the synthetic data, not the control.

    Args:
        pipeline ([`StableDiffusionDualControlPipeline`]):
            The pipeline the dataset was generated with (its `vae` and `image_processor`).
        samples (`Sequence[dict]`):
            `{"image": PIL.Image, "label": (H, W) int array, "name": str}`.
        height (`int`), width (`int`):
            The generated images' size.
        num_classes (`int`), ignore_index (`int`, *optional*):
            The label space.
        batch_size (`int`, defaults to 8):
            Images per autoencoder pass.

    Returns:
        `list[dict]`: samples `{"image", "label", "name"}` at `height` x `width`.
    """
    from .conditioning import prepare_semantic_map

    vae, processor = pipeline.vae, pipeline.image_processor
    out = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        pixels = processor.preprocess([sample["image"] for sample in batch], height=height, width=width)
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        images = processor.postprocess(vae.decode(latents).sample, output_type="pil")
        for sample, image in zip(batch, images):  # one label map a call: real images may differ in size
            label = np.asarray(sample["label"]).astype(np.int64)
            _, resized = prepare_semantic_map(label, num_classes, height, width, ignore_index, argument="label")
            out.append({"image": image, "label": resized[0].numpy(), "name": f"autoencoded_{sample['name']}"})
    return out


# ------------------------------------------------------------------------------------------- the evaluation
def check_evaluation_arguments(
    synthetic_data_dir, source_segmenter, source_train_dir, target_train_dir, source_eval_dir, target_eval_dir,
    target_segmenter=None, uncertainty_levels: Sequence[float] = (), samples_per_level: int = 16,
    resolution: int = 256, classifier_resolution: int = 64, classifier_steps: int = 300, classifier_batch_size: int = 32,
    kid_subsets: int = 100, kid_subset_size: int = 100, batch_size: int = 8, max_samples: int | None = None,
    uncertainty_estimator: str = "entropy",
) -> None:
    r"""
    Every check of [`evaluate_synthetic_dataset`]'s arguments that needs no model or image: run before any work.
    Argument names in the messages are those of `examples/evaluate_synthetic.py`. `synthetic_data_dir=None` skips
    the checks of the dataset (for a dataset not generated yet). The checks that read no file are
    [`check_evaluation_settings`].
    """
    check_evaluation_settings(
        uncertainty_levels, samples_per_level, resolution, classifier_resolution, classifier_steps,
        classifier_batch_size, kid_subsets, kid_subset_size, batch_size, max_samples, uncertainty_estimator,
    )
    folders = {
        "--synthetic_data_dir": synthetic_data_dir, "--source_segmenter": source_segmenter,
        "--source_train_dir": source_train_dir, "--target_train_dir": target_train_dir,
        "--source_eval_dir": source_eval_dir, "--target_eval_dir": target_eval_dir,
        "--target_segmenter": target_segmenter,
    }
    for name, folder in folders.items():
        if folder is not None and not os.path.isdir(folder):
            raise ValueError(f"`{name}` must be a folder, but {str(folder)!r} does not exist or is not a folder.")
    for name, folder in (("--source_segmenter", source_segmenter), ("--target_segmenter", target_segmenter)):
        if folder is not None and not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"`{name}` must be a saved segmenter folder with a config.json, but {str(folder)!r} has none.")
    if synthetic_data_dir is not None:
        check_level_generation(read_generation_settings(synthetic_data_dir), synthetic_data_dir, uncertainty_levels)


def check_evaluation_settings(
    uncertainty_levels: Sequence[float] = (), samples_per_level: int = 16, resolution: int = 256,
    classifier_resolution: int = 64, classifier_steps: int = 300, classifier_batch_size: int = 32,
    kid_subsets: int = 100, kid_subset_size: int = 100, batch_size: int = 8, max_samples: int | None = None,
    uncertainty_estimator: str = "entropy",
) -> None:
    r"""
    The checks of [`evaluate_synthetic_dataset`]'s settings that read no file (so a workflow can run them before the
    stages that write the folders). Arguments as in [`evaluate_synthetic_dataset`].
    """
    for level in uncertainty_levels:
        if not 0.0 <= float(level) <= 1.0:  # also rejects NaN
            raise ValueError(f"`--uncertainty_levels` must lie in [0, 1], but got {list(uncertainty_levels)}.")
    if len(set(map(float, uncertainty_levels))) != len(uncertainty_levels):
        raise ValueError(f"`--uncertainty_levels` must not repeat a level, but got {list(uncertainty_levels)}.")
    positive = {
        "--samples_per_level": samples_per_level, "--resolution": resolution,
        "--classifier_resolution": classifier_resolution, "--classifier_steps": classifier_steps,
        "--kid_subsets": kid_subsets, "--batch_size": batch_size,
    }
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"`{name}` must be at least 1, but got {value}.")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"`--max_samples` must be at least 1, but got {max_samples}.")
    if classifier_batch_size < 2 or classifier_batch_size % 2:
        raise ValueError(f"`--classifier_batch_size` must be even and at least 2, but got {classifier_batch_size}.")
    if kid_subset_size < 2:
        raise ValueError(f"`--kid_subset_size` must be at least 2, but got {kid_subset_size}.")
    if uncertainty_estimator not in UNCERTAINTY_ESTIMATOR_CHOICES:
        raise ValueError(
            f"`--uncertainty_estimator` must be one of {UNCERTAINTY_ESTIMATOR_CHOICES}, but got {uncertainty_estimator!r}."
        )


def data_root_folders(root: str | os.PathLike, argument: str = "--evaluate_data_root") -> dict:
    r"""
    The real-image folders of a data root in the workflow's layout (`source/train`, `source/val`, `target/train`,
    `target/val`), as the keyword arguments of [`evaluate_synthetic_dataset`].

    Args:
        root (`str` or `os.PathLike`):
            The data root.
        argument (`str`, defaults to `"--evaluate_data_root"`):
            Name used in error messages.
    """
    folders = {
        "source_train_dir": Path(root) / "source" / "train",
        "target_train_dir": Path(root) / "target" / "train",
        "source_eval_dir": Path(root) / "source" / "val",
        "target_eval_dir": Path(root) / "target" / "val",
    }
    missing = [str(folder.relative_to(root)) for folder in folders.values() if not folder.is_dir()]
    if missing:
        raise ValueError(
            f"`{argument}` must hold the folders source/train, source/val, target/train and target/val, but "
            f"{str(root)!r} lacks {missing}."
        )
    return folders


def evaluate_synthetic_dataset(
    synthetic_data_dir: str | os.PathLike,
    source_segmenter: str | os.PathLike,
    source_train_dir: str | os.PathLike,
    target_train_dir: str | os.PathLike,
    source_eval_dir: str | os.PathLike,
    target_eval_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    target_segmenter: str | os.PathLike | None = None,
    uncertainty_levels: Sequence[float] = (0.0, 0.5, 1.0),
    samples_per_level: int = 16,
    max_samples: int | None = None,
    resolution: int = 256,
    uncertainty_estimator: str = "entropy",
    classifier_resolution: int = 64,
    classifier_steps: int = 300,
    classifier_batch_size: int = 32,
    kid_subsets: int = 100,
    kid_subset_size: int = 100,
    batch_size: int = 8,
    seed: int = 0,
    device: torch.device | str = "cpu",
    autocast: Callable = contextlib.nullcontext,
    pipeline=None,
    pipeline_dtype: torch.dtype = torch.float32,
    echo: Callable = print,
) -> dict:
    r"""
    Measure a generated dataset (see the module docstring) and write `synthetic_evaluation.json` (every number,
    per-class IoU included), `synthetic_evaluation.md` (the table and per-class tables) and the trained
    `domain_classifier/` into `output_dir`. Every argument is checked before any work.

    Args:
        synthetic_data_dir (`str` or `os.PathLike`):
            A dataset saved with `save_to_disk` (`image`, `label` columns), e.g. by `generate_synthetic_dataset.py`.
        source_segmenter (`str` or `os.PathLike`):
            The segmenter trained on the labeled source (fidelity, uncertainty).
        source_train_dir (`str` or `os.PathLike`), target_train_dir (`str` or `os.PathLike`):
            Real source and (unlabeled) target images the domain classifier trains on.
        source_eval_dir (`str` or `os.PathLike`), target_eval_dir (`str` or `os.PathLike`):
            Held-out labeled real images: the ceilings, the classifier's held-out accuracy, the KID references and
            the uncertainty references.
        output_dir (`str` or `os.PathLike`):
            Where the results go.
        target_segmenter (`str` or `os.PathLike`, *optional*):
            A segmenter trained on target-like images (the workflow's photometric variant); its column reads n/a
            without one.
        uncertainty_levels (`Sequence[float]`, defaults to `(0.0, 0.5, 1.0)`):
            Constant levels at which `samples_per_level` images are generated again (needs the dataset's
            `generation_config.json` and the models it names).
        samples_per_level (`int`, defaults to 16):
            Images per level.
        max_samples (`int`, *optional*):
            Evaluate only the dataset's first N samples (all by default).
        resolution (`int`, defaults to 256):
            Segmenters' input shorter side (as in their training).
        uncertainty_estimator (`str`, defaults to `"entropy"`):
            `"entropy"` or `"mc_dropout"`.
        classifier_resolution (`int`, defaults to 64), classifier_steps (`int`, defaults to 300),
        classifier_batch_size (`int`, defaults to 32):
            The domain classifier's input size, training steps and batch size.
        kid_subsets (`int`, defaults to 100), kid_subset_size (`int`, defaults to 100):
            KID subsets (the size is lowered to the smaller set's size when needed).
        batch_size (`int`, defaults to 8):
            Images per segmenter pass and per pipeline call.
        seed (`int`, defaults to 0):
            Seeds the classifier and the KID subsets.
        device (`torch.device` or `str`, defaults to `"cpu"`):
            Where the models run.
        autocast (`Callable`, defaults to `contextlib.nullcontext`):
            Context of the segmenters' forward passes (e.g. `accelerator.autocast`).
        pipeline ([`StableDiffusionDualControlPipeline`], *optional*):
            The pipeline the dataset was generated with, if already loaded; otherwise loaded from the settings when
            there are `uncertainty_levels`. Whenever a pipeline is at hand and the dataset has its
            `generation_config.json` (the generated size), the held-out real images are also measured after its
            autoencoder ([`autoencode_samples`]: the sets `autoencoded:real_source`, `autoencoded:real_target`).
        pipeline_dtype (`torch.dtype`, defaults to `torch.float32`):
            Weights' dtype when the pipeline is loaded here.
        echo (`Callable`, defaults to `print`):
            Where progress lines go.

    Returns:
        `dict`: the results (as written to `synthetic_evaluation.json`).
    """
    import datasets

    from .segmentation import load_segmentation_data, load_segmenter

    uncertainty_levels = [float(level) for level in uncertainty_levels]
    check_evaluation_arguments(
        synthetic_data_dir, source_segmenter, source_train_dir, target_train_dir, source_eval_dir, target_eval_dir,
        target_segmenter, uncertainty_levels, samples_per_level, resolution, classifier_resolution, classifier_steps,
        classifier_batch_size, kid_subsets, kid_subset_size, batch_size, max_samples, uncertainty_estimator,
    )
    device = torch.device(device)
    segmenters = {"source_only": load_segmenter(str(source_segmenter)).to(device).eval()}
    if target_segmenter is not None:
        segmenters["target_like"] = load_segmenter(str(target_segmenter)).to(device).eval()
    config = segmenters["source_only"].config
    num_classes, ignore_index = config.num_classes, config.ignore_index
    for name, model in segmenters.items():
        if (model.config.num_classes, model.config.ignore_index) != (num_classes, ignore_index):
            raise ValueError(
                f"`--target_segmenter` predicts {model.config.num_classes} classes (ignore_index "
                f"{model.config.ignore_index}), but `--source_segmenter` {num_classes} (ignore_index {ignore_index})."
            )
    class_names = getattr(config, "class_names", None)

    def load(folder, argument, labels=True):
        return load_segmentation_data(
            str(folder), num_classes, ignore_index, require_labels=labels, argument=argument
        )

    # Every input is opened (and checked) before anything is computed.
    seconds, clock = {}, time.perf_counter()
    synthetic = load(synthetic_data_dir, "--synthetic_data_dir")
    count = len(synthetic) if max_samples is None else min(max_samples, len(synthetic))
    eval_sets = {"real_source": load(source_eval_dir, "--source_eval_dir"),
                 "real_target": load(target_eval_dir, "--target_eval_dir")}
    train_sets = {"source": load(source_train_dir, "--source_train_dir", labels=False),
                  "target": load(target_train_dir, "--target_train_dir", labels=False)}
    settings = read_generation_settings(synthetic_data_dir)

    sets = {name: [dataset[i] for i in range(len(dataset))] for name, dataset in eval_sets.items()}
    seconds["load"], clock = time.perf_counter() - clock, time.perf_counter()
    if uncertainty_levels:
        echo(f"Generating {samples_per_level} images at each uncertainty level {uncertainty_levels} ...")
        if pipeline is None:
            pipeline = load_generation_pipeline(settings, device, pipeline_dtype)
        rows = datasets.load_from_disk(str(synthetic_data_dir))
        for level, samples in generate_level_sets(pipeline, rows, settings, uncertainty_levels, samples_per_level, batch_size).items():
            sets[f"level:{level}"] = samples
        seconds["generate_levels"], clock = time.perf_counter() - clock, time.perf_counter()
    if pipeline is not None and settings is not None:  # the base's ceiling: held-out real images through its autoencoder
        for name in ("real_source", "real_target"):
            sets[f"autoencoded:{name}"] = autoencode_samples(
                pipeline, sets[name], settings["height"], settings["width"], num_classes, ignore_index, batch_size
            )
        seconds["autoencode"], clock = time.perf_counter() - clock, time.perf_counter()
    sets["dataset"] = [synthetic[i] for i in range(count)]
    description = "its own maps"
    if settings is not None:
        description = (
            "real-map bank" if settings.get("uncertainty_bank")
            else f"constant level {settings['uncertainty_level']}" if settings.get("uncertainty_level") is not None
            else "style bank"
        )

    echo(f"Training the domain classifier ({classifier_steps} steps) ...")
    train_images = {
        name: domain_images([dataset[i]["image"] for i in range(len(dataset))], classifier_resolution).to(device)
        for name, dataset in train_sets.items()
    }
    classifier = train_domain_classifier(
        train_images["source"], train_images["target"], classifier_steps, classifier_batch_size, seed=seed
    )
    save_pretrained_atomic(classifier, os.path.join(output_dir, CLASSIFIER_FOLDER))
    predictions = {
        name: domain_predictions(classifier, domain_images([s["image"] for s in samples], classifier_resolution))
        for name, samples in sets.items()
    }
    source_accuracy = float((predictions["real_source"][0] <= 0.5).float().mean())
    target_accuracy = float((predictions["real_target"][0] > 0.5).float().mean())
    seconds["domain_classifier"], clock = time.perf_counter() - clock, time.perf_counter()

    echo("Segmenting ...")
    results_sets = []
    for name, samples in sets.items():
        fidelity = {
            key: segment_samples(model, samples, resolution, num_classes, ignore_index, class_names,
                                 uncertainty_estimator, batch_size, autocast)
            for key, model in segmenters.items()
        }
        probabilities, features = predictions[name]
        entry = {
            "name": name,
            "num_images": len(samples),
            "fidelity": {key: {k: v for k, v in value.items() if k != "mean_uncertainty"} for key, value in fidelity.items()},
            "target_share": float((probabilities > 0.5).float().mean()),
            "kid_to_target": None if name == "real_target" else kernel_inception_distance(
                predictions["real_target"][1], features, kid_subsets, kid_subset_size, seed),
            "kid_to_source": None if name == "real_source" else kernel_inception_distance(
                predictions["real_source"][1], features, kid_subsets, kid_subset_size, seed),
            "mean_uncertainty": fidelity["source_only"]["mean_uncertainty"],
        }
        if name == "dataset":
            entry["uncertainty"] = description
        results_sets.append(entry)
    seconds["segmenters_and_kid"] = time.perf_counter() - clock

    results = {
        "synthetic_data_dir": str(synthetic_data_dir),
        "segmenters": {"source_only": str(source_segmenter),
                       "target_like": None if target_segmenter is None else str(target_segmenter)},
        "uncertainty_estimator": uncertainty_estimator,
        "resolution": resolution,
        "domain_classifier": {
            "heldout_accuracy": (source_accuracy + target_accuracy) / 2,
            "source_accuracy": source_accuracy,
            "target_accuracy": target_accuracy,
            "train_images": {name: len(images) for name, images in train_images.items()},
            "heldout_images": {"source": len(sets["real_source"]), "target": len(sets["real_target"])},
            "resolution": classifier_resolution,
            "steps": classifier_steps,
        },
        "kid": {"subsets": kid_subsets, "subset_size": kid_subset_size},
        "sets": results_sets,
        "seconds": {phase: round(value, 2) for phase, value in seconds.items()},
    }
    write_json_atomic(os.path.join(output_dir, RESULTS_NAME), results)
    write_text_atomic(os.path.join(output_dir, TABLE_NAME), synthetic_evaluation_markdown(results))
    return results


# ------------------------------------------------------------------- generate_synthetic_dataset.py --evaluate
EVALUATION_ARGUMENTS = (
    "evaluate_source_segmenter", "evaluate_target_segmenter", "evaluate_data_root", "evaluate_resolution",
)


def check_generation_evaluation(args) -> None:
    r"""
    The checks on files of `generate_synthetic_dataset.py --evaluate`, before any generation (the script's
    `check_args` has checked that the flags are given).

    Args:
        args (`argparse.Namespace`):
            The generation script's arguments.
    """
    folders = data_root_folders(args.evaluate_data_root)
    check_evaluation_arguments(
        None, args.evaluate_source_segmenter, **folders, target_segmenter=args.evaluate_target_segmenter,
        resolution=args.evaluate_resolution or 256, batch_size=args.batch_size,
    )


def evaluate_generation(args, pipeline, accelerator) -> dict:
    r"""
    `generate_synthetic_dataset.py --evaluate`: evaluate the finished dataset in `args.output_dir` with the pipeline
    that generated it, into `<output_dir>/evaluation`, and print the table. A dataset generated with a style bank is
    evaluated without the constant-level rows (they would lack its style images).

    Args:
        args (`argparse.Namespace`):
            The generation script's arguments.
        pipeline ([`StableDiffusionDualControlPipeline`]):
            The pipeline that generated the dataset.
        accelerator (`accelerate.Accelerator`):
            The script's accelerator (device and autocast).
    """
    results = evaluate_synthetic_dataset(
        args.output_dir,
        args.evaluate_source_segmenter,
        **data_root_folders(args.evaluate_data_root),
        output_dir=os.path.join(args.output_dir, "evaluation"),
        target_segmenter=args.evaluate_target_segmenter,
        uncertainty_levels=() if args.style_bank else (0.0, 0.5, 1.0),
        resolution=args.evaluate_resolution or 256,
        batch_size=args.batch_size,
        seed=args.seed,
        device=accelerator.device,
        autocast=accelerator.autocast,
        pipeline=pipeline,
    )
    print(synthetic_evaluation_table(results))
    return results


# ---------------------------------------------------------------------------------------------------- tables
def _set_label(entry: dict) -> str:
    name = entry["name"]
    if name == "real_source":
        return "real source (held-out)"
    if name == "real_target":
        return "real target (held-out)"
    if name.startswith("autoencoded:"):
        return f"{_set_label({'name': name.split(':', 1)[1]})[:-1]}, through the base's autoencoder)"
    if name.startswith("level:"):
        return f"generated, u = {float(name.split(':', 1)[1]):g}"
    return f"generated dataset ({entry.get('uncertainty', 'its own maps')})"


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _kid(value) -> str:
    if value is None:
        return "—"
    # Subsets that are the whole sets every time: the spread is rounding noise.
    std = 0.0 if value["std"] <= 1e-9 * abs(value["mean"]) else value["std"]
    return f"{value['mean']:.3g} ± {std:.2g}"


SEGMENTER_LABELS = {"source_only": "source-only", "target_like": "photometric"}


def synthetic_evaluation_table(results: dict) -> str:
    r"""
    The markdown table of a synthetic evaluation: one row per image set (real source and real target first, their
    mIoU being the ceiling; then each constant uncertainty level, the real images through the base's autoencoder
    where measured, and the dataset itself), then one line on the domain classifier.

    Args:
        results (`dict`):
            From [`evaluate_synthetic_dataset`] (or its `synthetic_evaluation.json`).
    """
    target_like = results["segmenters"]["target_like"] is not None
    lines = [
        "| images | n | mIoU, source-only segmenter | mIoU, photometric segmenter | classified as target | "
        "KID to real target | KID to real source | mean uncertainty |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["sets"]:
        fidelity = entry["fidelity"]
        target_column = (
            _percent(fidelity["target_like"]["mIoU"]) if target_like else "n/a (no photometric variant)"
        )
        lines.append(
            f"| {_set_label(entry)} | {entry['num_images']} | {_percent(fidelity['source_only']['mIoU'])} | "
            f"{target_column} | {_percent(entry['target_share'])} | {_kid(entry['kid_to_target'])} | "
            f"{_kid(entry['kid_to_source'])} | {entry['mean_uncertainty']:.4f} |"
        )
    classifier = results["domain_classifier"]
    sizes = sorted({kid["subset_size"] for entry in results["sets"]
                    for kid in (entry["kid_to_target"], entry["kid_to_source"]) if kid is not None})
    sizes = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]}"
    lines += [
        "",
        f"mIoU and 'classified as target' in %; on the real rows the mIoU is the segmenter's ceiling, on the rows "
        "through the base's autoencoder (encoded and decoded at the generated size) the ceiling of any image this "
        "base generates. Domain "
        f"classifier: held-out accuracy {_percent(classifier['heldout_accuracy'])} % (source "
        f"{_percent(classifier['source_accuracy'])} %, target {_percent(classifier['target_accuracy'])} %; trained on "
        f"{classifier['train_images']['source']} source and {classifier['train_images']['target']} target images); "
        f"KID on its features, in its feature units (comparable within this table only): mean ± std over "
        f"{results['kid']['subsets']} subsets of {sizes} images of each set (at most {results['kid']['subset_size']},"
        f" at most the smaller set); uncertainty: {results['uncertainty_estimator']} of the source-only segmenter.",
    ]
    return "\n".join(lines)


def synthetic_evaluation_markdown(results: dict) -> str:
    r"""
    The whole `synthetic_evaluation.md`: the table of [`synthetic_evaluation_table`] and the per-class IoU of every
    set and segmenter.

    Args:
        results (`dict`):
            From [`evaluate_synthetic_dataset`].
    """
    lines = [f"# Synthetic data: `{results['synthetic_data_dir']}`", "", synthetic_evaluation_table(results), "",
             "## Per-class IoU (%)", ""]
    segmenters = [key for key in ("source_only", "target_like") if results["segmenters"][key] is not None]
    columns = [(entry, key) for entry in results["sets"] for key in segmenters]
    lines.append("| class | " + " | ".join(f"{_set_label(e)}, {SEGMENTER_LABELS[key]}" for e, key in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    names = [row["class"] for row in results["sets"][0]["fidelity"]["source_only"]["per_class"]]
    for c, name in enumerate(names):
        values = [_percent(entry["fidelity"][key]["per_class"][c]["IoU"]) for entry, key in columns]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"
