"""The one reader of labeled and unlabeled image data, shared by the segmentation and diffusion sides: listing and
pairing `images/` + `labels/` (+ captions, + uncertainty maps) folders, `datasets` rows seen as records, decoding an
image, an integer label map or an uncertainty map, and checking them.

A *record* is a plain dict describing one sample before it is decoded:

* `"name"`: a readable name used in error messages (the image's path for folders, `dataset[i]` for datasets);
* `"image"`: a path, a PIL image or an array;
* `"label"`: an integer label map (path, PIL image or array), or `None` for an unlabeled sample;
* `"uncertainty"`: an uncertainty map in [0, 1] (path to an 8/16-bit PNG or a `.npy`, PIL image or array), or `None`;
* `"caption"`: a string, a list of strings, or `None`.

Folder records also carry `"relative_path"`, the image's path below its `images/` folder. [`validate_records`] checks
records once before use, so bad data stops a run before the first step, with the offending file named.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
from tqdm.auto import tqdm

from .conditioning import label_maps_to_tensor, prepare_uncertainty_map


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


def _pair_labels(images_dir: Path, labels_dir: Path, images: list[Path]) -> tuple[dict, list[str]]:
    """Label file of each image (same relative stem, any image extension) and the images without one."""
    labels = {path.with_suffix(""): path for path in list_images(labels_dir)}
    missing = [str(images_dir / path) for path in images if path.with_suffix("") not in labels]
    return labels, missing


def _folder_record(data_dir: Path, images_dir: Path, path: Path, label: str | None) -> dict:
    return {
        "name": str(images_dir / path),
        "relative_path": path,
        "image": str(images_dir / path),
        "label": label,
        "uncertainty": None,
        "caption": _read_caption(data_dir / "captions", path),
    }


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
    labels, missing = _pair_labels(images_dir, labels_dir, images)
    if missing:
        raise ValueError(
            f"`{argument}`: {len(missing)} image(s) have no label map with the same name in {labels_dir}, "
            f"e.g. {missing[:3]}."
        )
    return [_folder_record(data_dir, images_dir, path, str(labels_dir / labels[path.with_suffix("")])) for path in images]


def folder_records(data_dir: str | os.PathLike, require_labels: bool, argument: str) -> list[dict]:
    r"""
    Records of a folder used with or without labels: [`labeled_folder_records`] when labels are required; otherwise
    the labels are attached when `labels/` holds one for every image, else every record is unlabeled
    ([`unlabeled_folder_records`]: `data_dir/images/` or `data_dir` itself).

    Args:
        data_dir (`str` or `os.PathLike`):
            The folder.
        require_labels (`bool`):
            Every image must have a label map.
        argument (`str`):
            Name used in error messages.
    """
    if require_labels:
        return labeled_folder_records(data_dir, argument)
    records = unlabeled_folder_records(data_dir, argument)
    data_dir = Path(data_dir)
    images_dir, labels_dir = data_dir / "images", data_dir / "labels"
    if not (images_dir.is_dir() and labels_dir.is_dir()):
        return records
    labels, missing = _pair_labels(images_dir, labels_dir, [r["relative_path"] for r in records])
    if missing:
        return records
    return [{**r, "label": str(labels_dir / labels[r["relative_path"].with_suffix("")])} for r in records]


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
    return [_folder_record(data_dir, images_dir, path, None) for path in images]


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
