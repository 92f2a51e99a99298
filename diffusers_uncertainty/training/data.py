"""Training data for the dual-control ControlNet: labeled and unlabeled samples, uncertainty maps, paired transforms.

A *record* is a plain dict describing one sample before it is decoded:

* `"name"`: a readable name used in error messages (the image's path for folders, `dataset[i]` for datasets);
* `"image"`: a path, a PIL image or an array;
* `"label"`: an integer label map (path, PIL image or array), or `None` for an unlabeled sample;
* `"uncertainty"`: an uncertainty map in [0, 1] (path to an 8/16-bit PNG or a `.npy`, PIL image or array), or `None`;
* `"caption"`: a string, a list of strings, or `None`.

Folders and `datasets` datasets both become sequences of records, are checked once before training with
[`validate_records`] (so bad data stops a run before the first step, with the offending file named) and are then
served by [`ControlNetTrainingDataset`], which applies one random crop/flip identically to image, label map and
uncertainty map.
"""

import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from ..conditioning import label_maps_to_tensor, prepare_uncertainty_map


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Looked up in this order next to each other in an uncertainty folder.
UNCERTAINTY_EXTENSIONS = (".npy", ".png", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------------ folders
def list_images(folder: str | os.PathLike) -> list[Path]:
    r"""
    All image files below `folder` (recursively), sorted, as paths relative to `folder`.

    Args:
        folder (`str` or `os.PathLike`):
            The folder to scan.
    """
    folder = Path(folder)
    return sorted(
        path.relative_to(folder)
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _read_caption(captions_dir: Path, relative: Path) -> str | None:
    caption_file = captions_dir / relative.with_suffix(".txt")
    if caption_file.is_file():
        return caption_file.read_text(encoding="utf-8").strip()
    return None


def labeled_folder_records(data_dir: str | os.PathLike, argument: str = "--train_data_dir") -> list[dict]:
    r"""
    Records of a labeled folder: `data_dir/images/` and `data_dir/labels/` with the same relative file stems (labels
    are integer PNGs), and optionally `data_dir/captions/<stem>.txt`.

    Args:
        data_dir (`str` or `os.PathLike`):
            The folder holding `images/` and `labels/`.
        argument (`str`, defaults to `"--train_data_dir"`):
            Name used in error messages.

    Raises:
        `ValueError`: if a folder is missing, holds no images, or an image has no label map.
    """
    data_dir = Path(data_dir)
    images_dir, labels_dir = data_dir / "images", data_dir / "labels"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise ValueError(f"`{argument}` must contain `images/` and `labels/` folders, but {folder} does not exist.")
    images = list_images(images_dir)
    if not images:
        raise ValueError(f"`{argument}`: no images ({', '.join(IMAGE_EXTENSIONS)}) found in {images_dir}.")
    labels = {path.with_suffix(""): path for path in list_images(labels_dir)}
    missing = [str(images_dir / path) for path in images if path.with_suffix("") not in labels]
    if missing:
        raise ValueError(
            f"`{argument}`: {len(missing)} image(s) have no label map with the same name in {labels_dir}, "
            f"e.g. {missing[:3]}."
        )
    return [
        {
            "name": str(images_dir / path),
            "relative_path": path,
            "image": str(images_dir / path),
            "label": str(labels_dir / labels[path.with_suffix("")]),
            "uncertainty": None,
            "caption": _read_caption(data_dir / "captions", path),
        }
        for path in images
    ]


def unlabeled_folder_records(data_dir: str | os.PathLike, argument: str = "--unlabeled_data_dir") -> list[dict]:
    r"""
    Records of an unlabeled folder of images: `data_dir/images/` if it exists, else `data_dir` itself (searched
    recursively); optional captions in `data_dir/captions/<stem>.txt`.

    Args:
        data_dir (`str` or `os.PathLike`):
            The folder of images.
        argument (`str`, defaults to `"--unlabeled_data_dir"`):
            Name used in error messages.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"`{argument}` must be a folder of images, but {data_dir} does not exist.")
    images_dir = data_dir / "images" if (data_dir / "images").is_dir() else data_dir
    images = list_images(images_dir)
    if not images:
        raise ValueError(f"`{argument}`: no images ({', '.join(IMAGE_EXTENSIONS)}) found in {images_dir}.")
    return [
        {
            "name": str(images_dir / path),
            "relative_path": path,
            "image": str(images_dir / path),
            "label": None,
            "uncertainty": None,
            "caption": _read_caption(data_dir / "captions", path),
        }
        for path in images
    ]


def attach_uncertainty_maps(
    records: list[dict], uncertainty_dir: str | os.PathLike, argument: str = "--uncertainty_dir"
) -> list[dict]:
    r"""
    Give every folder record the uncertainty map at the same relative path in `uncertainty_dir` (the folder mirrors
    the images: `images/a/b.jpg` -> `uncertainty_dir/a/b.npy` or `.png`, looked up in the order of
    `UNCERTAINTY_EXTENSIONS`). Records without a map keep `"uncertainty": None`; [`validate_records`] reports them
    when the trained branch needs them.

    Args:
        records (`list[dict]`):
            Records from [`labeled_folder_records`] or [`unlabeled_folder_records`].
        uncertainty_dir (`str` or `os.PathLike`):
            The folder of uncertainty maps.
        argument (`str`, defaults to `"--uncertainty_dir"`):
            Name used in error messages.
    """
    uncertainty_dir = Path(uncertainty_dir)
    if not uncertainty_dir.is_dir():
        raise ValueError(f"`{argument}` must be a folder of uncertainty maps, but {uncertainty_dir} does not exist.")
    result = []
    for record in records:
        stem = record["relative_path"].with_suffix("")
        found = None
        for extension in UNCERTAINTY_EXTENSIONS:
            candidate = uncertainty_dir / stem.with_name(stem.name + extension)
            if candidate.is_file():
                found = str(candidate)
                break
        result.append({**record, "uncertainty": found, "uncertainty_hint": str(uncertainty_dir / stem) + ".{npy,png}"})
    return result


# ----------------------------------------------------------------------------------------------- datasets
class DatasetRecords(Sequence):
    r"""
    A `datasets.Dataset` seen as a sequence of records (rows are decoded only when accessed).

    Args:
        dataset (`datasets.Dataset`):
            One split of a dataset.
        image_column (`str`):
            Column of the images.
        label_column (`str`, *optional*):
            Column of the integer label maps; `None` for unlabeled data.
        uncertainty_column (`str`, *optional*):
            Column of the uncertainty maps (images or float arrays in [0, 1]).
        caption_column (`str`, *optional*):
            Column of captions (a string or a list of strings per row).
        description (`str`, defaults to `"dataset"`):
            Name used in error messages and record names, e.g. the `--dataset_name` value.
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        label_column: str | None = None,
        uncertainty_column: str | None = None,
        caption_column: str | None = None,
        description: str = "dataset",
    ):
        columns = {
            "--image_column": image_column,
            "--label_column": label_column,
            "--uncertainty_column": uncertainty_column,
            "--caption_column": caption_column,
        }
        for argument, column in columns.items():
            if column is not None and column not in dataset.column_names:
                raise ValueError(
                    f"`{argument}` value '{column}' not found in the columns of {description}: "
                    f"{', '.join(dataset.column_names)}."
                )
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.uncertainty_column = uncertainty_column
        self.caption_column = caption_column
        self.description = description

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.dataset[int(index)]
        return {
            "name": f"{self.description}[{index}]",
            "image": row[self.image_column],
            "label": row[self.label_column] if self.label_column else None,
            "uncertainty": row[self.uncertainty_column] if self.uncertainty_column else None,
            "caption": row[self.caption_column] if self.caption_column else None,
        }


def select_records(records: Sequence, max_samples: int | None, seed: int | None = None) -> Sequence:
    r"""
    A random subset of at most `max_samples` records (all of them when `max_samples` is `None`), as diffusers'
    scripts do for `--max_train_samples` (`dataset.shuffle(seed).select(range(n))`).

    Args:
        records (`Sequence`):
            The records.
        max_samples (`int`, *optional*):
            Maximum number of records.
        seed (`int`, *optional*):
            Seed of the random choice.
    """
    if max_samples is None or max_samples >= len(records):
        return records
    indices = sorted(random.Random(seed).sample(range(len(records)), max_samples))
    return [records[i] for i in indices]


# ------------------------------------------------------------------------------------------------ decoding
def _open(source, name: str, what: str):
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ValueError(f"The {what} of {name} does not exist: {source}.")
        if str(source).lower().endswith(".npy"):
            return np.load(source)
        with PIL.Image.open(source) as image:
            image.load()
            return image
    if isinstance(source, dict) and ("bytes" in source or "path" in source):  # undecoded `datasets.Image` value
        if source.get("bytes") is not None:
            import io

            return PIL.Image.open(io.BytesIO(source["bytes"]))
        return _open(source["path"], name, what)
    if isinstance(source, list):
        return np.asarray(source)
    return source


def load_image(source, name: str = "image") -> PIL.Image.Image:
    r"""
    Load an RGB image.

    Args:
        source:
            A path, a PIL image or a `(H, W, 3)` uint8 array.
        name (`str`, defaults to `"image"`):
            Used in error messages.
    """
    image = _open(source, name, "image")
    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"The image of {name} must be a path, PIL image or array, but got {type(image).__name__}.")
    return image.convert("RGB")


def load_label(source, name: str = "label map") -> np.ndarray:
    r"""
    Load an integer label map as an `(H, W)` int64 array.

    Args:
        source:
            A path to an integer PNG (mode `"L"`, `"P"`, `"I"` or `"I;16"`), a PIL image, or an integer array.
        name (`str`, defaults to `"label map"`):
            Used in error messages.
    """
    label = _open(source, name, "label map")
    return label_maps_to_tensor(label, argument=f"label map of {name}")[0].numpy()


def load_uncertainty(source, name: str = "uncertainty map") -> np.ndarray:
    r"""
    Load an uncertainty map as an `(H, W)` float32 array with values in [0, 1].

    Args:
        source:
            A path to an 8-bit (divided by 255) or 16-bit (divided by 65535) PNG or to a float `.npy` array, a PIL
            image, or a float array of shape `(H, W)` or `(1, H, W)`.
        name (`str`, defaults to `"uncertainty map"`):
            Used in error messages.
    """
    uncertainty = _open(source, name, "uncertainty map")
    if isinstance(uncertainty, np.ndarray) and uncertainty.ndim == 3 and uncertainty.shape[0] == 1:
        uncertainty = uncertainty[0]
    if isinstance(uncertainty, PIL.Image.Image):
        height, width = uncertainty.height, uncertainty.width
    elif isinstance(uncertainty, np.ndarray) and uncertainty.ndim == 2:
        height, width = uncertainty.shape
    else:
        shape = getattr(uncertainty, "shape", None)
        raise ValueError(
            f"The uncertainty map of {name} must be a single-channel image or an (H, W) float array, but got "
            f"{type(uncertainty).__name__}" + (f" of shape {shape}" if shape is not None else "") + "."
        )
    # The core conversion validates type, dtype, NaN and the [0, 1] range; at its own size nothing is resized.
    maps = prepare_uncertainty_map(uncertainty, 1, height, width, argument=f"uncertainty map of {name}")
    return maps[0, 0].numpy()


# ---------------------------------------------------------------------------------------------- validation
def check_label_values(label: np.ndarray, num_classes: int, ignore_index: int | None, name: str) -> None:
    r"""
    Raise a `ValueError` naming `name` if `label` has values outside `[0, num_classes)` other than `ignore_index`.

    Args:
        label (`np.ndarray`):
            Integer label map.
        num_classes (`int`):
            Number of classes.
        ignore_index (`int`, *optional*):
            The label value of unlabeled pixels.
        name (`str`):
            The label map's name (its file) for the error message.
    """
    valid = (label >= 0) & (label < num_classes)
    if ignore_index is not None:
        valid |= label == ignore_index
    if not valid.all():
        bad = np.unique(label[~valid])[:10].tolist()
        allowed = f"[0, {num_classes})" + (f" or --ignore_index {ignore_index}" if ignore_index is not None else "")
        raise ValueError(
            f"Label map of {name} has values {bad} outside the allowed {allowed} (--num_classes {num_classes})."
        )


def validate_records(
    records: Sequence,
    num_classes: int,
    ignore_index: int | None,
    need_labels: bool,
    need_uncertainty: bool,
    description: str = "training data",
    uncertainty_argument: str = "--uncertainty_dir",
    show_progress: bool = True,
) -> None:
    r"""
    Decode every record once and check it, so that bad data stops a run before training starts: the image opens;
    where needed, the label map exists, has the image's size and only values in `[0, num_classes)` or `ignore_index`;
    where needed, the uncertainty map exists, has the image's size and values in [0, 1].

    Args:
        records (`Sequence`):
            The records to check.
        num_classes (`int`):
            Number of classes.
        ignore_index (`int`, *optional*):
            The label value of unlabeled pixels.
        need_labels (`bool`):
            Check label maps (they must be present).
        need_uncertainty (`bool`):
            Check uncertainty maps (they must be present).
        description (`str`, defaults to `"training data"`):
            What the records are, for the progress bar and messages.
        uncertainty_argument (`str`, defaults to `"--uncertainty_dir"`):
            The argument that supplies the maps, named when one is missing.
        show_progress (`bool`, defaults to `True`):
            Show a tqdm progress bar.

    Raises:
        `ValueError`: naming the first offending file and what is wrong with it.
    """
    for record in tqdm(records, desc=f"Checking {description}", disable=not show_progress):
        name = record["name"]
        image = load_image(record["image"], name)
        size = (image.height, image.width)
        if need_labels:
            if record["label"] is None:
                raise ValueError(f"The label map of {name} is missing.")
            label = load_label(record["label"], name)
            if label.shape != size:
                raise ValueError(
                    f"The label map of {name} has size {label.shape[1]}x{label.shape[0]} (WxH), but the image has "
                    f"size {size[1]}x{size[0]}."
                )
            label_name = record["label"] if isinstance(record["label"], str) else name
            check_label_values(label, num_classes, ignore_index, label_name)
        if need_uncertainty:
            if record["uncertainty"] is None:
                where = record.get("uncertainty_hint")
                raise ValueError(
                    f"Missing uncertainty map for image {name}"
                    + (f": expected {where}" if where else "")
                    + f" (from `{uncertainty_argument}`)."
                )
            uncertainty = load_uncertainty(record["uncertainty"], name)
            if uncertainty.shape != size:
                raise ValueError(
                    f"The uncertainty map of {name} has size {uncertainty.shape[1]}x{uncertainty.shape[0]} (WxH), "
                    f"but the image has size {size[1]}x{size[0]}."
                )


# -------------------------------------------------------------------------------------------- transforms
class PairedTransform:
    r"""
    Resize, crop and flip an image with its label map and uncertainty map, identically. As in diffusers'
    `train_text_to_image.py`: the shorter side is resized to `resolution` (bilinear for the image and the uncertainty
    map, nearest for labels), then a `resolution` x `resolution` centre or random crop, then an optional horizontal
    flip. The image is returned in [-1, 1], the label map as int64, the uncertainty map as float32 in [0, 1].

    Args:
        resolution (`int`):
            Output size, divisible by 8.
        center_crop (`bool`, defaults to `False`):
            Centre crop instead of random crop.
        random_flip (`bool`, defaults to `False`):
            Flip horizontally with probability 0.5.
    """

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = False):
        if resolution <= 0 or resolution % 8 != 0:
            raise ValueError(f"`resolution` must be a positive multiple of 8, but got {resolution}.")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(
        self,
        image: PIL.Image.Image,
        label: np.ndarray | None = None,
        uncertainty: np.ndarray | None = None,
        rng: random.Random | None = None,
    ) -> dict:
        r"""
        Args:
            image (`PIL.Image.Image`):
                RGB image.
            label (`np.ndarray`, *optional*):
                `(H, W)` integer label map of the image's size.
            uncertainty (`np.ndarray`, *optional*):
                `(H, W)` float uncertainty map of the image's size.
            rng (`random.Random`, *optional*):
                Source of the crop position and flip; the `random` module by default.

        Returns:
            `dict` with `pixel_values` `(3, R, R)`, and `labels` `(R, R)` / `uncertainty` `(1, R, R)` when given.
        """
        rng = rng or random
        resolution = self.resolution
        scale = resolution / min(image.width, image.height)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, PIL.Image.BILINEAR)
        if label is not None:
            label = np.asarray(PIL.Image.fromarray(label.astype(np.int32)).resize(size, PIL.Image.NEAREST))
        if uncertainty is not None:
            uncertainty = PIL.Image.fromarray(uncertainty.astype(np.float32)).resize(size, PIL.Image.BILINEAR)
            uncertainty = np.clip(np.asarray(uncertainty), 0.0, 1.0)  # float rounding of a convex combination only

        if self.center_crop:
            top, left = (size[1] - resolution) // 2, (size[0] - resolution) // 2
        else:
            top, left = rng.randint(0, size[1] - resolution), rng.randint(0, size[0] - resolution)
        flip = self.random_flip and rng.random() < 0.5

        def crop(array):
            array = array[top : top + resolution, left : left + resolution]
            return np.ascontiguousarray(array[:, ::-1] if flip else array)

        pixels = crop(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        output = {"pixel_values": torch.from_numpy(pixels).permute(2, 0, 1).contiguous()}
        if label is not None:
            output["labels"] = torch.from_numpy(crop(label).astype(np.int64))
        if uncertainty is not None:
            output["uncertainty"] = torch.from_numpy(crop(uncertainty).astype(np.float32))[None]
        return output


# ------------------------------------------------------------------------------------------------ dataset
class ControlNetTrainingDataset(torch.utils.data.Dataset):
    r"""
    Labeled records followed by unlabeled records, decoded, transformed and tokenized for ControlNet training.

    Every item has `pixel_values` `(3, R, R)` in [-1, 1], `conditioning_one_hot` `(num_classes, R, R)` (all zero
    for unlabeled samples and when labels are not used; `ignore_index` pixels are all zero), `labels` `(R, R)`
    (`ignore_index`, or -1 without one, where unknown), `conditioning_uncertainty` `(1, R, R)` (zeros when not
    used), `is_labeled` (bool) and `input_ids`; with `style_images_per_sample` K > 0 also `style_pixel_values`
    `(K, 3, R, R)` in [-1, 1]: style images of the sample's own domain (labeled records for a labeled sample,
    unlabeled records for an unlabeled one) for the style encoder. The first is the sample's own image under a new
    random crop/flip (the same style, other pixels); the others are random other images of its domain, each under its
    own crop/flip (the image itself again when the domain has a single image).

    Args:
        labeled_records (`Sequence`):
            Records with label maps (may be empty).
        unlabeled_records (`Sequence`):
            Records without label maps (may be empty).
        transform (`PairedTransform`):
            The paired resize/crop/flip.
        tokenizer:
            The text encoder's tokenizer; captions are padded to `tokenizer.model_max_length`.
        num_classes (`int`):
            Number of classes (one-hot channels).
        ignore_index (`int`, *optional*):
            Label value of unlabeled pixels.
        use_labels (`bool`, defaults to `True`):
            Decode the label maps of labeled records (the semantic branch is trained).
        use_uncertainty (`bool`, defaults to `True`):
            Decode the uncertainty maps (the uncertainty branch is trained).
        default_prompt (`str`, defaults to `""`):
            Caption of samples without one.
        proportion_empty_prompts (`float`, defaults to 0.0):
            Probability that a caption is replaced by the empty string (as in diffusers' scripts).
        style_images_per_sample (`int`, defaults to 0):
            Style images per item (`style_pixel_values`); 0 for none.
    """

    def __init__(
        self,
        labeled_records: Sequence,
        unlabeled_records: Sequence,
        transform: PairedTransform,
        tokenizer,
        num_classes: int,
        ignore_index: int | None = None,
        use_labels: bool = True,
        use_uncertainty: bool = True,
        default_prompt: str = "",
        proportion_empty_prompts: float = 0.0,
        style_images_per_sample: int = 0,
    ):
        if style_images_per_sample < 0:
            raise ValueError(f"`style_images_per_sample` must be >= 0, but got {style_images_per_sample}.")
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ValueError(f"`proportion_empty_prompts` must be in [0, 1], but got {proportion_empty_prompts}.")
        if len(labeled_records) + len(unlabeled_records) == 0:
            raise ValueError("The training data is empty: no labeled and no unlabeled records.")
        self.labeled_records = labeled_records
        self.unlabeled_records = unlabeled_records
        self.transform = transform
        self.tokenizer = tokenizer
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.use_labels = use_labels
        self.use_uncertainty = use_uncertainty
        self.default_prompt = default_prompt
        self.proportion_empty_prompts = proportion_empty_prompts
        self.style_images_per_sample = style_images_per_sample

    @property
    def num_labeled(self) -> int:
        return len(self.labeled_records)

    @property
    def num_unlabeled(self) -> int:
        return len(self.unlabeled_records)

    def __len__(self) -> int:
        return self.num_labeled + self.num_unlabeled

    def sample_weights(self, labeled_fraction: float) -> torch.Tensor:
        r"""
        Per-item weights for `torch.utils.data.WeightedRandomSampler` such that a drawn sample is labeled with
        probability `labeled_fraction` (uniform within each group).

        Args:
            labeled_fraction (`float`):
                Expected fraction of labeled samples in a batch, in [0, 1].
        """
        if not 0.0 <= labeled_fraction <= 1.0:
            raise ValueError(f"`labeled_fraction` must be in [0, 1], but got {labeled_fraction}.")
        if self.num_labeled == 0 and labeled_fraction > 0:
            raise ValueError(f"`labeled_fraction` is {labeled_fraction}, but there are no labeled samples.")
        if self.num_unlabeled == 0 and labeled_fraction < 1:
            raise ValueError(f"`labeled_fraction` is {labeled_fraction}, but there are no unlabeled samples.")
        weights = torch.empty(len(self), dtype=torch.float64)
        if self.num_labeled:
            weights[: self.num_labeled] = labeled_fraction / self.num_labeled
        if self.num_unlabeled:
            weights[self.num_labeled :] = (1.0 - labeled_fraction) / self.num_unlabeled
        return weights

    def _caption(self, caption) -> str:
        if random.random() < self.proportion_empty_prompts:
            return ""
        if caption is None or (isinstance(caption, (list, tuple, np.ndarray)) and len(caption) == 0):
            return self.default_prompt
        if isinstance(caption, str):
            return caption
        if isinstance(caption, (list, tuple, np.ndarray)):
            # take a random caption if there are several, as diffusers' scripts do
            return str(random.choice(list(caption)))
        raise ValueError(f"Captions must be strings or lists of strings, but got {type(caption).__name__}.")

    def __getitem__(self, index: int) -> dict:
        is_labeled = index < self.num_labeled
        record = self.labeled_records[index] if is_labeled else self.unlabeled_records[index - self.num_labeled]
        name = record["name"]
        image = load_image(record["image"], name)
        label = load_label(record["label"], name) if (is_labeled and self.use_labels) else None
        uncertainty = load_uncertainty(record["uncertainty"], name) if self.use_uncertainty else None
        sample = self.transform(image, label, uncertainty)
        resolution = self.transform.resolution

        fill = self.ignore_index if self.ignore_index is not None else -1
        labels = sample.get("labels", torch.full((resolution, resolution), fill, dtype=torch.long))
        in_range = (labels >= 0) & (labels < self.num_classes)
        one_hot = torch.nn.functional.one_hot(torch.where(in_range, labels, 0), self.num_classes)
        one_hot = one_hot.permute(2, 0, 1).float() * in_range[None].float()
        input_ids = self.tokenizer(
            self._caption(record.get("caption")),
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        item = {
            "pixel_values": sample["pixel_values"],
            "conditioning_one_hot": one_hot,
            "labels": labels,
            "conditioning_uncertainty": sample.get("uncertainty", torch.zeros(1, resolution, resolution)),
            "is_labeled": torch.tensor(bool(is_labeled and self.use_labels)),
            "input_ids": input_ids,
        }
        if self.style_images_per_sample > 0:
            item["style_pixel_values"] = self._style_images(image, is_labeled, index)
        return item

    def _style_images(self, image: PIL.Image.Image, is_labeled: bool, index: int) -> torch.Tensor:
        """`style_images_per_sample` images of the sample's domain: itself re-cropped, then random others."""
        domain = self.labeled_records if is_labeled else self.unlabeled_records
        own = index if is_labeled else index - self.num_labeled
        others = [i for i in range(len(domain)) if i != own] or [own]
        styles = [self.transform(image)["pixel_values"]]
        for _ in range(self.style_images_per_sample - 1):
            record = domain[random.choice(others)]
            styles.append(self.transform(load_image(record["image"], record["name"]))["pixel_values"])
        return torch.stack(styles)


def collate_fn(examples: list[dict]) -> dict:
    r"""
    Stack the items of [`ControlNetTrainingDataset`] into a batch (as diffusers' `collate_fn`, contiguous floats).

    Args:
        examples (`list[dict]`):
            The items.
    """
    batch = {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
    for key in ("pixel_values", "conditioning_one_hot", "conditioning_uncertainty", "style_pixel_values"):
        if key in batch:
            batch[key] = batch[key].to(memory_format=torch.contiguous_format).float()
    return batch
