"""Labeled (and unlabeled) image data for segmentation: folders of `images/` + `labels/` and `datasets` datasets
with `image` / `label` columns, validated before use, plus the train / eval transforms and photometric
augmentation.
"""

import math
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from ..data_reader import DatasetRecords, folder_records, load_image, load_label, validate_records


class SegmentationFolder(Dataset):
    """A folder of images with optional integer label maps: `root/images/*` and `root/labels/<same stem>.png`.

    Listing, pairing, decoding and checking are those of [`diffusers_uncertainty.data_reader`] (the reader the
    diffusion side uses too): files are found recursively, a sample's name is its path below `images/` without the
    extension. Without an `images/` subfolder, the images are the files in `root` (unlabeled use only). Everything is
    checked on construction: non-empty folder, one label per image (same file stem), equal image and label size,
    label values in range.

    Args:
        root (`str`): Folder.
        num_classes (`int`, *optional*): Number of classes; required to check labels.
        ignore_index (`int`, defaults to 255): Label value of unlabeled pixels.
        require_labels (`bool`, defaults to `True`): Labels must exist for every image.
        argument (`str`, defaults to `"data_dir"`): Name of the argument that gave `root`, used in error messages.
    """

    def __init__(
        self,
        root: str,
        num_classes: Optional[int] = None,
        ignore_index: int = 255,
        require_labels: bool = True,
        argument: str = "data_dir",
    ):
        if not os.path.isdir(root):
            raise ValueError(f"`{argument}`: expected a folder, got {root!r} (does not exist or is not a folder).")
        records = folder_records(root, require_labels=require_labels, argument=argument)
        names = [r["relative_path"].with_suffix("").as_posix() for r in records]
        if len(set(names)) != len(names):
            # Names become output file names (uncertainty maps, predictions).
            raise ValueError(f"`{argument}` {root!r}: several images share a file stem.")
        self.root = root
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.records = records
        self.names = names
        self.image_paths = [r["image"] for r in records]
        self.label_paths: Optional[List[str]] = [r["label"] for r in records] if records[0]["label"] else None
        if self.label_paths is not None:
            if num_classes is None:
                raise ValueError("`num_classes` is required to check a labeled folder.")
            validate_records(
                records, num_classes, ignore_index, need_labels=True, need_uncertainty=False, description=argument,
                show_progress=False,
            )

    @property
    def has_labels(self) -> bool:
        """Whether every image has a label map."""
        return self.label_paths is not None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict:
        record = self.records[index]
        sample = {"image": load_image(record["image"], record["name"]), "name": self.names[index]}
        if self.label_paths is not None:
            sample["label"] = load_label(record["label"], record["name"])
        return sample


class HFSegmentationDataset(Dataset):
    """A `datasets.Dataset` with an image column and (optionally) an integer label column, checked on construction.

    Labels may be PIL images (a `datasets.Image` feature) or nested lists / arrays; rows are read as records of
    [`diffusers_uncertainty.data_reader`] (named `<argument>[<index>]` in error messages).

    Args:
        dataset (`datasets.Dataset`): The dataset (one split).
        num_classes (`int`, *optional*): Number of classes; required when labels are used.
        ignore_index (`int`, defaults to 255): Label value of unlabeled pixels.
        image_column (`str`, defaults to `"image"`): Image column.
        label_column (`str`, *optional*, defaults to `"label"`): Label column; `None` for unlabeled data.
        argument (`str`, defaults to `"dataset"`): Argument name used in error messages.
    """

    def __init__(
        self,
        dataset,
        num_classes: Optional[int] = None,
        ignore_index: int = 255,
        image_column: str = "image",
        label_column: Optional[str] = "label",
        argument: str = "dataset",
    ):
        if len(dataset) == 0:
            raise ValueError(f"`{argument}`: the dataset is empty.")
        columns = dataset.column_names
        if image_column not in columns:
            raise ValueError(f"`{argument}`: expected an image column {image_column!r}, got columns {columns}.")
        if label_column is not None and label_column not in columns:
            raise ValueError(f"`{argument}`: expected a label column {label_column!r}, got columns {columns}.")
        self.dataset = dataset
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.image_column = image_column
        self.label_column = label_column
        self.argument = argument
        self.records = DatasetRecords(dataset, image_column, label_column, description=argument)
        if label_column is not None:
            if num_classes is None:
                raise ValueError("`num_classes` is required to check a labeled dataset.")
            validate_records(
                self.records, num_classes, ignore_index, need_labels=True, need_uncertainty=False,
                description=argument, show_progress=False,
            )

    @property
    def has_labels(self) -> bool:
        """Whether the dataset has labels."""
        return self.label_column is not None

    def __getitem__(self, index: int) -> Dict:
        record = self.records[index]
        sample = {"image": load_image(record["image"], record["name"]), "name": f"{index:06d}"}
        if self.label_column is not None:
            sample["label"] = load_label(record["label"], record["name"])
        return sample

    def __len__(self) -> int:
        return len(self.dataset)


def load_segmentation_data(
    source: str,
    num_classes: Optional[int],
    ignore_index: int,
    require_labels: bool = True,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    argument: str = "data_dir",
):
    """Opens a labeled (or unlabeled) source: an `images/` (+ `labels/`) folder, a folder of images, a dataset saved
    with `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a Hub dataset id.

    Args:
        source (`str`): Path or Hub dataset id.
        num_classes (`int`, *optional*): Number of classes (for label checks).
        ignore_index (`int`): Label value of unlabeled pixels.
        require_labels (`bool`, defaults to `True`): Whether labels are needed.
        split (`str`, defaults to `"train"`): Split to use for a `DatasetDict` or Hub dataset.
        image_column (`str`, defaults to `"image"`): Image column of a `datasets` dataset.
        label_column (`str`, defaults to `"label"`): Label column of a `datasets` dataset.
        argument (`str`, defaults to `"data_dir"`): Argument name used in error messages.

    Returns:
        [`SegmentationFolder`] or [`HFSegmentationDataset`]
    """
    is_saved_dataset = os.path.isdir(source) and (
        os.path.isfile(os.path.join(source, "dataset_info.json"))
        or os.path.isfile(os.path.join(source, "dataset_dict.json"))
        or os.path.isfile(os.path.join(source, "state.json"))
    )
    looks_local = os.path.isabs(source) or source.startswith(".") or source.count("/") != 1
    if not os.path.exists(source) and looks_local:
        raise ValueError(
            f"`{argument}`: expected a folder, a saved dataset or a Hub dataset id (`owner/name`), got {source!r}, "
            "which does not exist."
        )
    if os.path.isdir(source) and not is_saved_dataset:
        return SegmentationFolder(source, num_classes, ignore_index, require_labels=require_labels, argument=argument)
    import datasets

    if is_saved_dataset:
        dataset = datasets.load_from_disk(source)
    elif os.path.exists(source):
        raise ValueError(f"`{argument}`: expected a folder or a saved dataset, got the file {source!r}.")
    else:
        dataset = datasets.load_dataset(source, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"`{argument}` {source!r}: expected a split {split!r}, got {list(dataset)}.")
        dataset = dataset[split]
    has_label = label_column in dataset.column_names
    if require_labels and not has_label:
        raise ValueError(
            f"`{argument}` {source!r}: expected a label column {label_column!r}, got columns {dataset.column_names}."
        )
    return HFSegmentationDataset(
        dataset,
        num_classes=num_classes,
        ignore_index=ignore_index,
        image_column=image_column,
        label_column=label_column if has_label else None,
        argument=argument,
    )


def mixture_weights(lengths: Sequence[int], weights: Sequence[float]) -> List[float]:
    """Per-sample base weights for a concatenation of datasets so that dataset `k` is drawn with probability
    proportional to `weights[k]` whatever its size (`weights[k] / lengths[k]` for each of its samples).

    Args:
        lengths (`Sequence[int]`): Dataset sizes.
        weights (`Sequence[float]`): Non-negative dataset weights with a positive sum.

    Returns:
        `List[float]`: one weight per sample of the concatenation.
    """
    if len(lengths) != len(weights):
        raise ValueError(f"Got {len(lengths)} datasets but {len(weights)} weights.")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"Dataset weights must be non-negative with a positive sum, got {list(weights)}.")
    out = []
    for length, weight in zip(lengths, weights):
        out.extend([weight / length] * length)
    return out


class SampleSubset(Dataset):
    """Some samples of a [`SegmentationFolder`] or [`HFSegmentationDataset`], in the given order, with the attributes
    the training data paths read (`has_labels`, and `image_paths` for a folder).

    Args:
        dataset (`Dataset`): The source.
        indices (`Sequence[int]`): Its samples to keep.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = list(indices)
        paths = getattr(dataset, "image_paths", None)
        self.image_paths = None if paths is None else [paths[i] for i in self.indices]

    @property
    def has_labels(self) -> bool:
        """Whether every sample has a label map."""
        return self.dataset.has_labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Dict:
        return self.dataset[self.indices[index]]


def generation_order(dataset: Dataset) -> List[int]:
    """The order in which [`first_samples`] takes a source's samples.

    A dataset written by `examples/generate_synthetic_dataset.py` (columns `sample_index` and `source_label_id`;
    stored label map by label map) is read by sample index, then label map: one sample of every label map before the
    second of any, so that the first N samples spread over the label maps (the order in which `evaluate_synthetic.py`
    takes its constant-level samples). Any other source keeps its stored order (a folder: sorted file names).

    Args:
        dataset (`Dataset`): A [`SegmentationFolder`] or [`HFSegmentationDataset`].
    """
    rows = getattr(dataset, "dataset", None)
    columns = getattr(rows, "column_names", None) or []
    if isinstance(dataset, HFSegmentationDataset) and "sample_index" in columns and "source_label_id" in columns:
        keys = list(zip(rows["sample_index"], rows["source_label_id"]))
        return sorted(range(len(keys)), key=lambda i: (keys[i], i))
    return list(range(len(dataset)))


def first_samples(datasets: Sequence[Dataset], count: int, argument: str = "--max_synthetic_samples") -> List[Dataset]:
    """The first `count` samples of several sources: source after source, each in its [`generation_order`]. A source
    used whole is returned as is, a partly used one as a [`SampleSubset`], an unused one is left out.

    Args:
        datasets (`Sequence[Dataset]`): [`SegmentationFolder`] / [`HFSegmentationDataset`] sources.
        count (`int`): Samples to keep (at least 1, at most their total).
        argument (`str`, defaults to `"--max_synthetic_samples"`): Argument name used in error messages.
    """
    if count < 1:
        raise ValueError(f"`{argument}` must be at least 1, got {count}.")
    total = sum(len(dataset) for dataset in datasets)
    if total < count:
        raise ValueError(
            f"`{argument}` asks for {count} samples, but the synthetic data holds only {total} "
            f"({' + '.join(str(len(dataset)) for dataset in datasets)} in its sources); generate more, or ask for fewer."
        )
    kept, remaining = [], count
    for dataset in datasets:
        if remaining == 0:
            break
        take = min(remaining, len(dataset))
        kept.append(dataset if take == len(dataset) else SampleSubset(dataset, generation_order(dataset)[:take]))
        remaining -= take
    return kept


class PhotometricAugmentation:
    """Random photometric changes of an image tensor in `[0, 1]` (geometry untouched, so labels stay valid):
    brightness, contrast, gamma, Gaussian blur and Gaussian noise, through `torchvision.transforms.v2.functional`.

    Args:
        brightness (`Tuple[float, float]`, defaults to `(0.4, 1.3)`): Range of the brightness factor.
        contrast (`Tuple[float, float]`, defaults to `(0.6, 1.4)`): Range of the contrast factor.
        gamma (`Tuple[float, float]`, defaults to `(0.7, 1.6)`): Range of the gamma exponent.
        blur_sigma (`Tuple[float, float]`, defaults to `(0.1, 1.5)`): Range of the blur standard deviation.
        noise_std (`Tuple[float, float]`, defaults to `(0.0, 0.05)`): Range of the noise standard deviation.
        p (`float`, defaults to 0.8): Probability of each of brightness, contrast and gamma.
        blur_p (`float`, defaults to 0.3): Probability of blurring.
        noise_p (`float`, defaults to 0.3): Probability of adding noise.
    """

    def __init__(
        self,
        brightness: Tuple[float, float] = (0.4, 1.3),
        contrast: Tuple[float, float] = (0.6, 1.4),
        gamma: Tuple[float, float] = (0.7, 1.6),
        blur_sigma: Tuple[float, float] = (0.1, 1.5),
        noise_std: Tuple[float, float] = (0.0, 0.05),
        p: float = 0.8,
        blur_p: float = 0.3,
        noise_p: float = 0.3,
    ):
        self.brightness, self.contrast, self.gamma = brightness, contrast, gamma
        self.blur_sigma, self.noise_std = blur_sigma, noise_std
        self.p, self.blur_p, self.noise_p = p, blur_p, noise_p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Augments one image.

        Args:
            image (`torch.Tensor` of shape `(3, height, width)`): Float image in `[0, 1]`.

        Returns:
            `torch.Tensor`: augmented image in `[0, 1]`.
        """
        if random.random() < self.p:
            image = TF.adjust_brightness(image, random.uniform(*self.brightness))
        if random.random() < self.p:
            image = TF.adjust_contrast(image, random.uniform(*self.contrast))
        if random.random() < self.p:
            image = TF.adjust_gamma(image, random.uniform(*self.gamma))
        if random.random() < self.blur_p:
            sigma = random.uniform(*self.blur_sigma)
            kernel = 2 * math.ceil(3 * sigma) + 1
            image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        if random.random() < self.noise_p:
            image = TF.gaussian_noise(image, sigma=random.uniform(*self.noise_std), clip=True)
        return image

    def batch(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Augments a batch on its device in a few batched kernels: each image gets its own independent draws from the
        same distribution as [`__call__`] (same probabilities, ranges and order of operations; the same torchvision
        formulas: brightness `x * f`, contrast `f * x + (1 - f) * mean(gray(x))`, gamma `x ** g`, a Gaussian kernel
        of size `2 * ceil(3 * sigma) + 1` with reflect padding, additive noise, each clipped to `[0, 1]`). The draws
        come from `generator` (torch), not from Python's `random`, so they are not those of the per-image path.

        Args:
            images (`torch.Tensor` of shape `(batch, 3, height, width)`): Float images in `[0, 1]`.
            generator (`torch.Generator`, *optional*): On the images' device.

        Returns:
            `torch.Tensor`: augmented images in `[0, 1]`.
        """
        batch, device = images.shape[0], images.device

        def draw(probability, value_range):
            u = torch.rand(batch, 2, device=device, generator=generator)
            applied = u[:, 0] < probability
            values = value_range[0] + (value_range[1] - value_range[0]) * u[:, 1]
            return applied, values.view(batch, 1, 1, 1)

        def where(applied, changed, unchanged):
            return torch.where(applied.view(batch, 1, 1, 1), changed, unchanged)

        applied, factor = draw(self.p, self.brightness)
        images = where(applied, (images * factor).clamp(0, 1), images)
        applied, factor = draw(self.p, self.contrast)
        gray = (0.2989 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).mean((-2, -1))
        images = where(applied, (factor * images + (1 - factor) * gray.view(batch, 1, 1, 1)).clamp(0, 1), images)
        applied, gamma = draw(self.p, self.gamma)
        images = where(applied, images.pow(gamma), images)
        applied, sigma = draw(self.blur_p, self.blur_sigma)
        images = where(applied, _blur_batch(images, sigma.view(batch), math.ceil(3 * self.blur_sigma[1])), images)
        applied, noise_std = draw(self.noise_p, self.noise_std)
        noise = torch.randn(images.shape, device=device, generator=generator, dtype=images.dtype)
        images = where(applied, (images + noise * noise_std).clamp(0, 1), images)
        return images


def _blur_batch(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image: torchvision's kernel (size `2 * ceil(3 * sigma) + 1`,
    normalised) in the middle of a kernel of the largest possible radius `radius` (zeros around it; known from the
    sigma range, so no host read), reflect padding."""
    batch, channels, height, width = images.shape
    radii = torch.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = kernel * (offsets[None].abs() <= radii[:, None])
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (batch * channels, K)
    x = torch.nn.functional.pad(images.reshape(1, batch * channels, height, width), [radius] * 4, mode="reflect")
    x = torch.nn.functional.conv2d(x, kernel[:, None, None, :], groups=batch * channels)
    x = torch.nn.functional.conv2d(x, kernel[:, None, :, None], groups=batch * channels)
    return x.reshape(batch, channels, height, width)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image to a float tensor `(3, H, W)` in `[0, 1]`.

    Args:
        image (`PIL.Image.Image`): RGB image.
    """
    return TF.to_dtype(TF.to_image(image), torch.float32, scale=True)


def eval_size(height: int, width: int, resolution: int, multiple: int) -> Tuple[int, int]:
    """Network input size for evaluation: shorter side scaled to `resolution`, aspect ratio kept, both sides
    rounded to the nearest multiple of `multiple` (at least `multiple`).

    Args:
        height (`int`): Original height.
        width (`int`): Original width.
        resolution (`int`): Target length of the shorter side.
        multiple (`int`): Divisor required by the network (its output stride).

    Returns:
        `Tuple[int, int]`: (height, width).
    """
    scale = resolution / min(height, width)
    return (
        max(multiple, int(round(height * scale / multiple)) * multiple),
        max(multiple, int(round(width * scale / multiple)) * multiple),
    )


class SegmentationTransform:
    """Turns a sample `{"image", "label"?, "name"}` into network tensors.

    Training: shorter side resized to `resolution` (bilinear image, nearest label), random `resolution` x
    `resolution` crop, random horizontal flip, optional photometric augmentation. Evaluation: the image resized
    with [`eval_size`]; the label kept at its original size (metrics are computed there).

    Args:
        resolution (`int`): Training crop size / evaluation shorter side.
        train (`bool`): Training or evaluation behaviour.
        multiple (`int`, defaults to 32): Divisor of the evaluation input size.
        photometric (`PhotometricAugmentation`, *optional*): Applied to training images.
    """

    def __init__(self, resolution: int, train: bool, multiple: int = 32, photometric=None):
        if train and resolution % multiple:
            raise ValueError(f"`--resolution` must be divisible by {multiple} (network stride), got {resolution}.")
        self.resolution = resolution
        self.train = train
        self.multiple = multiple
        self.photometric = photometric

    def __call__(self, sample: Dict) -> Dict:
        image = image_to_tensor(sample["image"])
        label = torch.from_numpy(sample["label"])[None] if "label" in sample else None
        out = {"name": sample["name"]}
        if self.train:
            image = TF.resize(image, self.resolution, antialias=True)
            if label is not None:
                label = TF.resize(label, self.resolution, interpolation=TF.InterpolationMode.NEAREST)
            height, width = image.shape[-2:]
            top = random.randint(0, height - self.resolution)
            left = random.randint(0, width - self.resolution)
            image = image[:, top : top + self.resolution, left : left + self.resolution]
            if label is not None:
                label = label[:, top : top + self.resolution, left : left + self.resolution]
            if random.random() < 0.5:
                image = image.flip(-1)
                label = label.flip(-1) if label is not None else None
            if self.photometric is not None:
                image = self.photometric(image)
        else:
            out["original_size"] = tuple(image.shape[-2:])
            image = TF.resize(image, list(eval_size(*image.shape[-2:], self.resolution, self.multiple)), antialias=True)
        out["pixel_values"] = image.contiguous()
        if label is not None:
            out["labels"] = label[0].long().contiguous()
        return out


class TransformedDataset(Dataset):
    """Applies a transform to a dataset's samples and records the sample index (for hardness-aware sampling).

    Args:
        dataset (`torch.utils.data.Dataset`): Source of `{"image", "label"?, "name"}` samples.
        transform (`Callable`): E.g. [`SegmentationTransform`].
    """

    def __init__(self, dataset: Dataset, transform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict:
        out = self.transform(self.dataset[index])
        out["index"] = index
        return out


def concat_datasets(datasets: Sequence[Dataset]) -> Dataset:
    """Concatenates datasets (`torch.utils.data.ConcatDataset`), or returns the only one.

    Args:
        datasets (`Sequence[Dataset]`): Non-empty list.
    """
    return datasets[0] if len(datasets) == 1 else ConcatDataset(list(datasets))


def list_collate(samples: List[Dict]) -> Dict[str, list]:
    """Collates samples of possibly different sizes into lists (for evaluation and uncertainty maps).

    Args:
        samples (`List[Dict]`): Transformed samples.
    """
    return {key: [s[key] for s in samples] for key in samples[0]}
