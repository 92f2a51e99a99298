"""Step 4 of the workflow: labeled synthetic datasets from source label maps and uncertainty maps.

The reusable parts of `examples/generate_synthetic_dataset.py`:

* **Work items and seeds.** Every sample is a work item `(label_id, sample_index)` with its own seed,
  [`sample_seed`]`(seed, label_id, sample_index)`. The seed alone fixes the initial noise and the uncertainty map a
  sample gets, so a sample does not depend on which batch or process generated it.
* **Shards.** Work items are cut, in order, into shards of `batch_size` items ([`plan_shards`]); one shard is one
  pipeline call and one parquet file with a deterministic name (`data/shard-00003-of-00012.parquet`). Shards are
  written to a temporary name and renamed ([`write_shard`]), so a file with the final name is always complete; an
  interrupted run resumes by skipping them. Under several processes the pending shards are dealt out round-robin
  ([`shards_for_process`]): no duplicates, no gaps, and the same shard has the same content whatever the number of
  processes.
* **Label sources** ([`FolderLabelSource`], [`DatasetLabelSource`]), **uncertainty sources**
  ([`ConstantUncertainty`], [`UncertaintyBank`]) and the optional **style bank** ([`StyleBank`]: example images
  of the target domain, a few drawn per sample from its seed for a style encoder), validated before any generation.
* **Overlap** ([`BackgroundShardWriter`]): PNG encoding and shard writing run on a worker thread while the next
  shard generates, so the accelerator does not wait on them.
* **Merging** ([`merge_shards`]): the shards become one `datasets` dataset saved with `save_to_disk` in the output
  folder, loadable with `datasets.load_from_disk(output_dir)`.

On-disk format of a sample (the columns of [`dataset_features`]): `image` (RGB PNG), `label` (integer PNG: 8-bit when
every value fits, else 16-bit), `uncertainty` (16-bit grey PNG, value `round(u * 65535)`), `source_label_id`,
`source_label_name`, `sample_index`, `seed`, `uncertainty_source`, the generation settings and, with a style bank,
`style_images` (the bank files the sample's style came from) and `style_guidance_scale`. Uncertainty maps are
quantised to 16 bits *before* generation, so the stored map is exactly the one the image was generated from.
"""

import io
import json
import math
import os
import random
import shutil
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .atomic import TEMPORARY_PREFIX, atomic_folder, atomic_write_path
from .conditioning import prepare_uncertainty_map
from .data_reader import labeled_folder_records
from .training.data import list_images, load_label, load_uncertainty


UNCERTAINTY_BANK_EXTENSIONS = (".npy", ".png", ".tif", ".tiff")
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".parquet"
UNCERTAINTY_LEVELS = 65535  # 16-bit storage of uncertainty maps


# -------------------------------------------------------------------------------------------- seeds and work
@dataclass(frozen=True)
class WorkItem:
    r"""
    One sample to generate.

    Args:
        label_id (`int`):
            Index of the source label map in the label source.
        sample_index (`int`):
            Index of this sample among the samples of that label map.
        seed (`int`):
            The sample's own seed (see [`sample_seed`]).
    """

    label_id: int
    sample_index: int
    seed: int


def sample_seed(seed: int, label_id: int, sample_index: int) -> int:
    r"""
    The seed of one sample, derived deterministically from the run's seed, the label map and the sample index with
    numpy's `SeedSequence` (well-mixed: neighbouring samples get unrelated seeds).

    Args:
        seed (`int`):
            The run's `--seed` (non-negative).
        label_id (`int`):
            Index of the source label map.
        sample_index (`int`):
            Index of the sample for that label map.

    Returns:
        `int`: a seed in `[0, 2**63)` (fits the int64 `seed` column and `torch.Generator.manual_seed`).
    """
    for name, value in (("seed", seed), ("label_id", label_id), ("sample_index", sample_index)):
        if value < 0:
            raise ValueError(f"`{name}` must be non-negative, but got {value}.")
    state = np.random.SeedSequence([seed, label_id, sample_index]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def plan_work_items(num_labels: int, samples_per_label: int, seed: int) -> list[WorkItem]:
    r"""
    All work items of a run, label map by label map: `(0, 0), (0, 1), ..., (1, 0), ...`.

    Args:
        num_labels (`int`):
            Number of source label maps.
        samples_per_label (`int`):
            Samples generated from each label map.
        seed (`int`):
            The run's seed.
    """
    if num_labels < 1:
        raise ValueError(f"`num_labels` must be at least 1, but got {num_labels}.")
    if samples_per_label < 1:
        raise ValueError(f"`samples_per_label` must be at least 1, but got {samples_per_label}.")
    return [
        WorkItem(label_id, index, sample_seed(seed, label_id, index))
        for label_id in range(num_labels)
        for index in range(samples_per_label)
    ]


def plan_shards(work_items: list[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    r"""
    Cut the work items, in order, into shards of `batch_size` items (the last one may be smaller). Shard `k` always
    holds items `k * batch_size` to `(k + 1) * batch_size - 1`.

    Args:
        work_items (`list[WorkItem]`):
            From [`plan_work_items`].
        batch_size (`int`):
            Items per shard, i.e. images per pipeline call.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, but got {batch_size}.")
    return [work_items[start : start + batch_size] for start in range(0, len(work_items), batch_size)]


def shard_filename(shard_index: int, num_shards: int) -> str:
    r"""
    The deterministic file name of a shard, e.g. `shard-00003-of-00012.parquet`.

    Args:
        shard_index (`int`):
            Index of the shard.
        num_shards (`int`):
            Number of shards of the run.
    """
    return f"{SHARD_PREFIX}{shard_index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def completed_shards(shard_dir: str | os.PathLike, num_shards: int) -> set[int]:
    r"""
    Indices of the shards of a run of `num_shards` shards that exist (completely written) in `shard_dir`.

    Args:
        shard_dir (`str` or `os.PathLike`):
            The folder of shards.
        num_shards (`int`):
            Number of shards of the run.
    """
    return {index for index in range(num_shards) if os.path.isfile(os.path.join(shard_dir, shard_filename(index, num_shards)))}


def remove_temporary_shards(shard_dir: str | os.PathLike) -> list[str]:
    r"""
    Delete half-written shards (temporary files left by an interrupted run). Call it on one process, while no other
    process writes.

    Args:
        shard_dir (`str` or `os.PathLike`):
            The folder of shards.

    Returns:
        `list[str]`: the removed file names.
    """
    if not os.path.isdir(shard_dir):
        return []
    removed = sorted(name for name in os.listdir(shard_dir) if name.startswith(TEMPORARY_PREFIX))
    for name in removed:
        os.remove(os.path.join(shard_dir, name))
    return removed


def shards_for_process(pending: list[int], process_index: int, num_processes: int) -> list[int]:
    r"""
    The shards one process generates: the pending shards dealt out round-robin. Over all processes every pending
    shard is generated exactly once.

    Args:
        pending (`list[int]`):
            Indices of the shards still to generate, in order (the same list on every process).
        process_index (`int`):
            This process's rank.
        num_processes (`int`):
            Number of processes.
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f"`process_index` must be in [0, {num_processes}), but got {process_index}.")
    return list(pending[process_index::num_processes])


# ------------------------------------------------------------------------------------------- label sources
def check_label_values(label: np.ndarray, num_classes: int, ignore_index: int | None, name: str) -> None:
    r"""
    Raise a `ValueError` if `label` holds values the controlnet cannot take: outside `[0, num_classes)` and not
    `ignore_index`.

    Args:
        label (`np.ndarray`):
            Integer label map.
        num_classes (`int`):
            The controlnet's `semantic_channels`.
        ignore_index (`int`, *optional*):
            The controlnet's `ignore_index`.
        name (`str`):
            The label map's name, for the message.
    """
    valid = (label >= 0) & (label < num_classes)
    if ignore_index is not None:
        valid |= label == ignore_index
    if not valid.all():
        bad = np.unique(label[~valid])[:10].tolist()
        allowed = f"[0, {num_classes})" + (f" or ignore_index={ignore_index}" if ignore_index is not None else "")
        raise ValueError(
            f"Label map {name} has values {bad}, but the controlnet takes values in {allowed} (its config's "
            "`semantic_channels` and `ignore_index`)."
        )


class _LabelSource:
    """Shared behaviour of the label sources: a sequence of named integer label maps."""

    argument = "label source"

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, index: int) -> str:
        raise NotImplementedError

    def location(self, index: int) -> str:
        """Where the label map `index` is, for error messages (its name unless a subclass knows better)."""
        return self.name(index)

    def _load(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def load(self, index: int) -> np.ndarray:
        r"""
        The label map `index` as an `(H, W)` int64 array.

        Args:
            index (`int`):
                Index of the label map.
        """
        return self._load(index)

    def select(self, max_labels: int | None):
        r"""
        Keep only the first `max_labels` label maps (all when `None`). Label ids, and so seeds, of the kept maps do
        not change.

        Args:
            max_labels (`int`, *optional*):
                Maximum number of label maps.
        """
        if max_labels is not None:
            if max_labels < 1:
                raise ValueError(f"`--max_labels` must be at least 1, but got {max_labels}.")
            self._limit = min(max_labels, len(self))
        return self

    def validate(self, num_classes: int, ignore_index: int | None, show_progress: bool = True) -> None:
        r"""
        Read every label map once and check its values against the controlnet (raises before any generation).

        Args:
            num_classes (`int`):
                The controlnet's `semantic_channels`.
            ignore_index (`int`, *optional*):
                The controlnet's `ignore_index`.
            show_progress (`bool`, defaults to `True`):
                Show a tqdm progress bar.
        """
        for index in tqdm(range(len(self)), desc="Checking label maps", disable=not show_progress):
            check_label_values(self.load(index), num_classes, ignore_index, self.location(index))


class FolderLabelSource(_LabelSource):
    r"""
    Integer label maps (8-bit or 16-bit PNGs, mode `"L"`, `"P"`, `"I"` or `"I;16"`) in a folder, searched
    recursively and sorted by relative path; the label id of a map is its position in that order. If the folder has a
    `labels/` sub-folder (the layout of the training folders: `images/` + `labels/`), that sub-folder is used.

    Args:
        folder (`str` or `os.PathLike`):
            The folder.
        argument (`str`, defaults to `"--label_dir"`):
            Name used in error messages.
    """

    def __init__(self, folder: str | os.PathLike, argument: str = "--label_dir"):
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"`{argument}` must be a folder of integer label PNGs, but {folder} is not a folder.")
        if (folder / "labels").is_dir():
            folder = folder / "labels"
        self.folder = folder
        self.argument = argument
        self.files = list_images(folder)
        if not self.files:
            raise ValueError(f"`{argument}`: expected integer label PNGs in {folder}, but found no image files.")
        self._limit = len(self.files)

    def __len__(self) -> int:
        return self._limit

    def name(self, index: int) -> str:
        return self.files[index].as_posix()

    def location(self, index: int) -> str:
        return str(self.folder / self.files[index])

    def _load(self, index: int) -> np.ndarray:
        return load_label(str(self.folder / self.files[index]), name=str(self.folder / self.files[index]))

    def image_paths(self) -> list[Path]:
        r"""
        The image of every label map (in label-id order): the file with the same relative stem in the `images/`
        folder beside the `labels/` folder, the layout of the training folders.

        Raises:
            `ValueError` (naming the source's argument): if the label maps are not in a `labels/` folder with an
            `images/` folder beside it, or a label map has no image.
        """
        if self.folder.name != "labels" or not (self.folder.parent / "images").is_dir():
            raise ValueError(
                f"`{self.argument}`: the source images of the label maps are read from `images/` beside `labels/`, "
                f"but {self.folder} is not a `labels/` folder with an `images/` folder beside it."
            )
        records = labeled_folder_records(self.folder.parent, self.argument)
        image_of = {Path(record["label"]): Path(record["image"]) for record in records}
        missing = [str(self.folder / name) for name in self.files[: len(self)] if self.folder / name not in image_of]
        if missing:
            raise ValueError(
                f"`{self.argument}`: {len(missing)} label map(s) have no image with the same name in "
                f"{self.folder.parent / 'images'}, e.g. {missing[:3]}."
            )
        return [image_of[self.folder / name] for name in self.files[: len(self)]]


class DatasetLabelSource(_LabelSource):
    r"""
    The label column of a `datasets.Dataset` (integer PNG images, integer arrays or nested lists); the label id of a
    map is its row index.

    Args:
        dataset (`datasets.Dataset`):
            One split of a dataset.
        label_column (`str`):
            The column of the label maps.
        description (`str`, defaults to `"--dataset_name"`):
            Name used in error messages and label names.
    """

    def __init__(self, dataset, label_column: str, description: str = "--dataset_name"):
        if label_column not in dataset.column_names:
            raise ValueError(
                f"`--label_column` value {label_column!r} not found in the columns of {description}: "
                f"{', '.join(dataset.column_names)}."
            )
        if len(dataset) == 0:
            raise ValueError(f"`--dataset_name`: {description} has no rows.")
        # Only the label column is read: images of the source data are not needed to generate.
        self.dataset = dataset.select_columns([label_column])
        self.label_column = label_column
        self.description = description
        self._limit = len(dataset)

    def __len__(self) -> int:
        return self._limit

    def name(self, index: int) -> str:
        return f"{self.description}[{index}]"

    def _load(self, index: int) -> np.ndarray:
        return load_label(self.dataset[index][self.label_column], name=self.name(index))


def load_dataset_label_source(dataset_name: str, label_column: str = "label", split: str = "train", config_name=None):
    r"""
    Open a `datasets` dataset as a [`DatasetLabelSource`]: a folder written by `save_to_disk` is read with
    `datasets.load_from_disk`, anything else with `datasets.load_dataset` (a Hub id or a local data folder).

    Args:
        dataset_name (`str`):
            The `--dataset_name` value.
        label_column (`str`, defaults to `"label"`):
            Column of the label maps.
        split (`str`, defaults to `"train"`):
            The split to use (for a `DatasetDict`).
        config_name (`str`, *optional*):
            Configuration of a Hub dataset.
    """
    import datasets

    saved = os.path.isdir(dataset_name) and any(
        os.path.isfile(os.path.join(dataset_name, name)) for name in ("state.json", "dataset_dict.json")
    )
    if saved:
        dataset = datasets.load_from_disk(dataset_name)
    else:
        dataset = datasets.load_dataset(dataset_name, config_name)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"`--dataset_split` {split!r} not found in {dataset_name}: splits are {list(dataset)}.")
        dataset = dataset[split]
    return DatasetLabelSource(dataset, label_column, description=dataset_name)


def resize_label_map(label: np.ndarray, height: int, width: int) -> torch.Tensor:
    r"""
    Resize an integer label map to `(height, width)` with nearest-neighbour, exactly as the pipeline does
    (`prepare_semantic_map`: `nearest-exact`), so the stored label is the one the image was generated from.

    Args:
        label (`np.ndarray`):
            `(H, W)` integer label map.
        height (`int`), width (`int`):
            Output size.

    Returns:
        `torch.Tensor`: `(height, width)` int64.
    """
    label = torch.from_numpy(np.asarray(label, dtype=np.int64))
    if tuple(label.shape) == (height, width):
        return label
    return F.interpolate(label[None, None].float(), size=(height, width), mode="nearest-exact")[0, 0].long()


# ------------------------------------------------------------------------------------- uncertainty sources
def quantize_uncertainty(maps: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    r"""
    Quantise uncertainty maps in [0, 1] to 16 bits.

    Args:
        maps (`torch.Tensor`):
            Float maps in [0, 1], any shape.

    Returns:
        `tuple(torch.Tensor, np.ndarray)`: the float32 maps after quantisation (`q / 65535`, the value a 16-bit PNG
        decodes to) and the uint16 codes `q = round(u * 65535)`.
    """
    codes = torch.round(maps.float() * UNCERTAINTY_LEVELS).to(torch.int64).numpy().astype(np.uint16)
    return torch.from_numpy(codes.astype(np.float32) / np.float32(UNCERTAINTY_LEVELS)), codes


class ConstantUncertainty:
    r"""
    The same uncertainty level everywhere, for every sample (`--uncertainty_level`).

    Args:
        level (`float`):
            The level, in [0, 1].
        argument (`str`, defaults to `"--uncertainty_level"`):
            Name used in error messages.
    """

    def __init__(self, level: float, argument: str = "--uncertainty_level"):
        if not 0.0 <= float(level) <= 1.0:  # also rejects NaN
            raise ValueError(f"`{argument}` must lie in [0, 1], but got {level}.")
        self.level = float(level)

    def __len__(self) -> int:
        return 1

    def describe(self) -> str:
        return f"constant level {self.level}"

    def get(self, seed: int, height: int, width: int) -> tuple[torch.Tensor, str]:
        r"""
        The map of a sample.

        Args:
            seed (`int`):
                The sample's seed (unused: the map is constant).
            height (`int`), width (`int`):
                Map size.

        Returns:
            `tuple(torch.Tensor, str)`: the `(1, height, width)` float map and its description.
        """
        return torch.full((1, height, width), self.level, dtype=torch.float32), f"level:{self.level}"


class NoUncertainty(ConstantUncertainty):
    r"""
    No uncertainty control (style conditioning alone): maps of 0 are stored, the branch runs at scale 0 (which the
    control does not compute at all).
    """

    def __init__(self):
        super().__init__(0.0)

    def describe(self) -> str:
        return "off (the uncertainty control is not used)"

    def get(self, seed: int, height: int, width: int) -> tuple[torch.Tensor, str]:
        return super().get(seed, height, width)[0], "off"


class UncertaintyBank:
    r"""
    Real uncertainty maps (e.g. of the target images, from `examples/compute_uncertainty.py`), one drawn at random
    per sample from the sample's seed (`--uncertainty_bank`), optionally multiplied by `scale`
    (`--uncertainty_scale`). Maps are 8-bit PNGs (divided by 255), 16-bit PNGs (divided by 65535) or float `.npy`
    arrays in [0, 1], searched recursively and sorted by relative path. Every map is read and checked when the bank is
    built: a scaled value outside [0, 1] is an error, never clipped.

    Args:
        folder (`str` or `os.PathLike`):
            The folder of maps.
        scale (`float`, defaults to 1.0):
            Factor applied to every map.
        argument (`str`, defaults to `"--uncertainty_bank"`):
            Name used in error messages.
        show_progress (`bool`, defaults to `True`):
            Show a tqdm progress bar while checking.
        cache_size (`int`, defaults to 64):
            Number of decoded maps kept in memory.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        scale: float = 1.0,
        argument: str = "--uncertainty_bank",
        show_progress: bool = True,
        cache_size: int = 64,
    ):
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"`{argument}` must be a folder of uncertainty maps, but {folder} is not a folder.")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"`--uncertainty_scale` must be a positive number, but got {scale}.")
        self.folder = folder
        self.scale = float(scale)
        self.files = sorted(
            path.relative_to(folder)
            for path in folder.rglob("*")
            if path.is_file() and path.suffix.lower() in UNCERTAINTY_BANK_EXTENSIONS
        )
        if not self.files:
            raise ValueError(
                f"`{argument}`: expected uncertainty maps ({', '.join(UNCERTAINTY_BANK_EXTENSIONS)}) in {folder}, "
                "but found none."
            )
        self._cache = OrderedDict()
        self._cache_size = cache_size
        for index in tqdm(range(len(self.files)), desc="Checking uncertainty maps", disable=not show_progress):
            uncertainty = self._read(index)
            high = float(uncertainty.max())
            if high > 1.0:
                raise ValueError(
                    f"`--uncertainty_scale` {self.scale} takes the uncertainty map {folder / self.files[index]} above 1 "
                    f"(its maximum becomes {high:.4f}): scaled maps must stay in [0, 1]. Use a smaller scale."
                )

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        scaled = f", scaled by {self.scale}" if self.scale != 1.0 else ""
        return f"bank of {len(self)} maps in {self.folder}{scaled}"

    def _read(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        path = self.folder / self.files[index]
        uncertainty = load_uncertainty(str(path), name=str(path)) * np.float32(self.scale)
        self._cache[index] = uncertainty
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return uncertainty

    def pick(self, seed: int) -> int:
        r"""
        Index of the map a sample gets: uniform over the bank, drawn from the sample's seed.

        Args:
            seed (`int`):
                The sample's seed.
        """
        return random.Random(seed).randrange(len(self.files))

    def get(self, seed: int, height: int, width: int) -> tuple[torch.Tensor, str]:
        r"""
        The map of a sample, resized as the pipeline resizes maps (bilinear, antialiased when shrinking).

        Args:
            seed (`int`):
                The sample's seed.
            height (`int`), width (`int`):
                Map size.

        Returns:
            `tuple(torch.Tensor, str)`: the `(1, height, width)` float map and `"bank:<relative path>"`.
        """
        index = self.pick(seed)
        maps = prepare_uncertainty_map(self._read(index), 1, height, width, argument=str(self.folder / self.files[index]))
        return maps[0], f"bank:{self.files[index].as_posix()}"


class StyleBank:
    r"""
    Example images of the wanted style (e.g. unlabeled target images), `count` of them drawn per sample from the
    sample's seed (`--style_bank`, `--style_images_per_sample`), without replacement, independently of the
    uncertainty bank's draw. Images are searched recursively and sorted by relative path; every image is opened and its
    channel count checked when the bank is built.

    Args:
        folder (`str` or `os.PathLike`):
            The folder of images (its `images/` sub-folder when there is one).
        count (`int`):
            Style images per sample, at most the number of images in the bank.
        in_channels (`int`, defaults to 3):
            Channels the style encoder expects.
        argument (`str`, defaults to `"--style_bank"`):
            Name used in error messages.
        show_progress (`bool`, defaults to `True`):
            Show a tqdm progress bar while checking.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        count: int,
        in_channels: int = 3,
        argument: str = "--style_bank",
        show_progress: bool = True,
    ):
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"`{argument}` must be a folder of images, but {folder} is not a folder.")
        if (folder / "images").is_dir():
            folder = folder / "images"
        self.folder = folder
        self.files = list_images(folder)
        if not self.files:
            raise ValueError(f"`{argument}`: expected images in {folder}, but found none.")
        if not 1 <= count <= len(self.files):
            raise ValueError(
                f"`--style_images_per_sample` must be between 1 and the {len(self.files)} images of `{argument}`, but "
                f"got {count}."
            )
        self.count = count
        for path in tqdm(self.files, desc="Checking style images", disable=not show_progress):
            channels = len(self._read(path).getbands())
            if channels != in_channels:
                raise ValueError(
                    f"`{argument}`: the style encoder expects {in_channels}-channel images (in_channels={in_channels}), "
                    f"but {folder / path} has {channels} channels."
                )

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, path: Path) -> PIL.Image.Image:
        """An image with its own channels (palette images as RGB): what the channel check saw is what the encoder gets."""
        with PIL.Image.open(self.folder / path) as image:
            return image.convert("RGB") if image.mode == "P" else image.copy()

    def describe(self) -> str:
        return f"style bank of {len(self)} images in {self.folder}, {self.count} per sample"

    def pick(self, seed: int) -> list[int]:
        r"""
        Indices of a sample's style images, drawn from its seed (a stream of its own, not the uncertainty bank's).

        Args:
            seed (`int`):
                The sample's seed.
        """
        return random.Random(f"style_bank:{seed}").sample(range(len(self.files)), self.count)

    def get(self, seed: int) -> tuple[list[PIL.Image.Image], list[str]]:
        r"""
        A sample's style images and their paths relative to the bank.

        Args:
            seed (`int`):
                The sample's seed.
        """
        indices = self.pick(seed)
        images = [self._read(self.files[index]) for index in indices]
        return images, [self.files[index].as_posix() for index in indices]


# ------------------------------------------------------------------------------------------------ encoding
def dataset_features(style: bool = False):
    r"""
    The `datasets.Features` of a generated dataset: `image`, `label` and `uncertainty` are `datasets.Image` columns
    (PNG bytes), the rest metadata and settings.

    Args:
        style (`bool`, defaults to `False`):
            Add the columns of style-conditioned generation: `style_images` (the style bank files of each sample) and
            `style_guidance_scale`.
    """
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.Image(),
            "uncertainty": datasets.Image(),
            "source_label_id": datasets.Value("int64"),
            "source_label_name": datasets.Value("string"),
            "sample_index": datasets.Value("int64"),
            "seed": datasets.Value("int64"),
            "uncertainty_source": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "num_inference_steps": datasets.Value("int32"),
            "guidance_scale": datasets.Value("float32"),
            "semantic_conditioning_scale": datasets.Value("float32"),
            "uncertainty_conditioning_scale": datasets.Value("float32"),
        }
    )
    if style:
        features["style_images"] = datasets.Sequence(datasets.Value("string"))
        features["style_guidance_scale"] = datasets.Value("float32")
    return features


def encode_png(image: PIL.Image.Image | np.ndarray) -> dict:
    r"""
    Encode an image losslessly as PNG, in the form a `datasets.Image` column stores (`{"bytes", "path"}`). Encoding
    here, not in `datasets`, keeps 16-bit maps as 16-bit PNGs (`datasets` would pick TIFF for them).

    Args:
        image (`PIL.Image.Image` or `np.ndarray`):
            An image, a uint8/uint16 `(H, W)` array or a uint8 `(H, W, 3)` array.
    """
    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def encode_label(label: np.ndarray) -> dict:
    r"""
    Encode an integer label map as an 8-bit PNG when all values are in [0, 255], else a 16-bit PNG.

    Args:
        label (`np.ndarray`):
            `(H, W)` integer label map with values in [0, 65535].
    """
    low, high = int(label.min()), int(label.max())
    if low < 0 or high > 65535:
        raise ValueError(f"Label maps are stored as 8/16-bit PNGs: values must be in [0, 65535], but got [{low}, {high}].")
    return encode_png(label.astype(np.uint8 if high <= 255 else np.uint16))


# ---------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_batch(
    pipeline,
    items: list[WorkItem],
    labels: torch.Tensor,
    uncertainty: torch.Tensor,
    prompt: str,
    num_inference_steps: int,
    guidance_scale: float,
    semantic_conditioning_scale: float = 1.0,
    uncertainty_conditioning_scale: float = 1.0,
    uncertainty_guidance_scale: float = 1.0,
    style_images: list[list[PIL.Image.Image]] | None = None,
    style_guidance_scale: float = 1.0,
    control_guidance_start: float | tuple[float, float] = 0.0,
    control_guidance_end: float | tuple[float, float] = 1.0,
    init_images: list[PIL.Image.Image] | None = None,
    strength: float = 1.0,
):
    r"""
    Generate one batch of samples with a single pipeline call: one generator per image, seeded with the image's own
    seed (on the CPU, so noise is the same on any device), so image `i` depends on `items[i]` only (its style tokens
    too: the pipeline encodes each sample's style set on its own).

    Args:
        pipeline ([`StableDiffusionDualControlPipeline`]):
            The pipeline.
        items (`list[WorkItem]`):
            The samples of the batch.
        labels (`torch.Tensor`):
            `(B, H, W)` int64 label maps at the output size.
        uncertainty (`torch.Tensor`):
            `(B, 1, H, W)` float32 uncertainty maps at the output size.
        prompt (`str`):
            The prompt, shared by the batch.
        num_inference_steps (`int`), guidance_scale (`float`), semantic_conditioning_scale (`float`),
        uncertainty_conditioning_scale (`float`), uncertainty_guidance_scale (`float`, defaults to 1.0):
            Passed to the pipeline.
        style_images (`list[list[PIL.Image.Image]]`, *optional*):
            One style set per sample (needs a pipeline with a `style_encoder`).
        style_guidance_scale (`float`, defaults to 1.0):
            Passed to the pipeline with `style_images`.
        control_guidance_start (`float` or a pair, defaults to 0.0), control_guidance_end (`float` or a pair,
        defaults to 1.0):
            The fraction of the steps in which each control acts (a pair: semantic, uncertainty), passed to the
            pipeline.
        init_images (`list[PIL.Image.Image]`, *optional*), strength (`float`, defaults to 1.0):
            One starting image per sample and the fraction of the schedule run from it (image-to-image generation,
            the pipeline's `init_image` and `strength`); `None`: from noise.

    Returns:
        `tuple(list[PIL.Image.Image], np.ndarray)`: the images and the `(B, H, W)` label maps the pipeline returns
        aligned with them.
    """
    if not (len(items) == labels.shape[0] == uncertainty.shape[0]):
        raise ValueError(
            f"`items`, `labels` and `uncertainty` must have the same batch size, but got {len(items)}, "
            f"{labels.shape[0]} and {uncertainty.shape[0]}."
        )
    if style_images is not None and len(style_images) != len(items):
        raise ValueError(f"`style_images` must hold one set per item ({len(items)}), but got {len(style_images)}.")
    if init_images is not None and len(init_images) != len(items):
        raise ValueError(f"`init_images` must hold one image per item ({len(items)}), but got {len(init_images)}.")
    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in items]
    style = {}
    if style_images is not None:
        prompt = [prompt] * len(items)
        style = {"style_images": [list(images) for images in style_images], "style_guidance_scale": style_guidance_scale}
    output = pipeline(
        prompt,
        semantic_map=labels,
        uncertainty_map=uncertainty,
        height=labels.shape[1],
        width=labels.shape[2],
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generators,
        semantic_conditioning_scale=semantic_conditioning_scale,
        uncertainty_conditioning_scale=uncertainty_conditioning_scale,
        uncertainty_guidance_scale=uncertainty_guidance_scale,
        control_guidance_start=control_guidance_start,
        control_guidance_end=control_guidance_end,
        init_image=init_images,
        strength=strength,
        output_type="pil",
        **style,
    )
    return output.images, output.semantic_maps


def dataset_generation_arguments(settings: dict) -> dict:
    r"""
    The [`generate_batch`] keyword arguments a dataset was generated with, from the `settings` of its
    `generation_config.json` (prompt, steps, guidance, branch scales, uncertainty guidance, control windows,
    source-image strength), so that its samples can be generated again alike (at other uncertainty levels, for the
    evaluation and the figures). Settings written before the windows, the strength and the uncertainty guidance
    existed get their defaults.

    Args:
        settings (`dict`):
            The `settings` of a dataset's `generation_config.json`.
    """
    arguments = {
        key: settings[key]
        for key in ("prompt", "num_inference_steps", "guidance_scale", "semantic_conditioning_scale",
                    "uncertainty_conditioning_scale")
    }
    for name in ("control_guidance_start", "control_guidance_end"):
        values = settings.get(name) or [0.0 if name.endswith("start") else 1.0]
        arguments[name] = (values[0], values[-1])  # one value: both branches; two: (semantic, uncertainty)
    arguments["strength"] = settings.get("source_image_strength", 1.0)
    arguments["uncertainty_guidance_scale"] = settings.get("uncertainty_guidance_scale", 1.0)
    return arguments


def dataset_source_images(settings: dict) -> list[Path] | None:
    r"""
    The starting image of every label id of a dataset generated from source images (`source_image_strength` below
    1; see [`FolderLabelSource.image_paths`]), or `None` for a dataset generated from noise.

    Args:
        settings (`dict`):
            The `settings` of a dataset's `generation_config.json`.
    """
    if settings.get("source_image_strength", 1.0) >= 1.0:
        return None
    source = FolderLabelSource(settings["label_dir"], argument="label_dir (of the dataset's generation settings)")
    return source.select(settings.get("max_labels")).image_paths()


class SampleMaps:
    r"""
    The conditions of work items: resized label maps (decoded once per label map and cached) and per-sample
    uncertainty maps quantised to 16 bits.

    Args:
        label_source:
            A [`FolderLabelSource`] or [`DatasetLabelSource`].
        uncertainty_source:
            A [`ConstantUncertainty`] or [`UncertaintyBank`].
        height (`int`), width (`int`):
            Output size.
        cache_size (`int`, defaults to 256):
            Number of resized label maps kept in memory.
    """

    def __init__(self, label_source, uncertainty_source, height: int, width: int, cache_size: int = 256):
        self.label_source = label_source
        self.uncertainty_source = uncertainty_source
        self.height, self.width = height, width
        self._labels = OrderedDict()
        self._cache_size = cache_size

    def label(self, label_id: int) -> torch.Tensor:
        if label_id in self._labels:
            self._labels.move_to_end(label_id)
            return self._labels[label_id]
        label = resize_label_map(self.label_source.load(label_id), self.height, self.width)
        self._labels[label_id] = label
        if len(self._labels) > self._cache_size:
            self._labels.popitem(last=False)
        return label

    def batch(self, items: list[WorkItem]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, list[str]]:
        r"""
        Stack the conditions of a batch.

        Args:
            items (`list[WorkItem]`):
                The samples.

        Returns:
            `tuple`: label maps `(B, H, W)` int64, uncertainty maps `(B, 1, H, W)` float32 (quantised), their uint16
            codes `(B, H, W)` and the description of each uncertainty map.
        """
        labels = torch.stack([self.label(item.label_id) for item in items])
        maps, sources = zip(*(self.uncertainty_source.get(item.seed, self.height, self.width) for item in items))
        uncertainty, codes = quantize_uncertainty(torch.stack(maps))
        return labels, uncertainty, codes[:, 0], list(sources)


def shard_columns(
    items: list[WorkItem],
    images: list[PIL.Image.Image],
    labels: np.ndarray,
    uncertainty_codes: np.ndarray,
    uncertainty_sources: list[str],
    label_names: list[str],
    settings: dict,
    style_names: list[list[str]] | None = None,
) -> dict:
    r"""
    The columns of one shard (see [`dataset_features`]); images and maps are PNG-encoded here.

    Args:
        items (`list[WorkItem]`):
            The samples.
        images (`list[PIL.Image.Image]`):
            Generated images.
        labels (`np.ndarray`):
            `(B, H, W)` label maps aligned with the images.
        uncertainty_codes (`np.ndarray`):
            `(B, H, W)` uint16 uncertainty maps (see [`quantize_uncertainty`]).
        uncertainty_sources (`list[str]`):
            Where each uncertainty map comes from.
        label_names (`list[str]`):
            Name of each sample's source label map.
        settings (`dict`):
            `prompt`, `num_inference_steps`, `guidance_scale`, `semantic_conditioning_scale`,
            `uncertainty_conditioning_scale` (and `style_guidance_scale` with `style_names`): repeated on every row.
        style_names (`list[list[str]]`, *optional*):
            The style bank files of each sample; adds the `style_images` and `style_guidance_scale` columns.
    """
    count = len(items)
    columns = {
        "image": [encode_png(image.convert("RGB")) for image in images],
        "label": [encode_label(np.asarray(label)) for label in labels],
        "uncertainty": [encode_png(code) for code in uncertainty_codes],
        "source_label_id": [item.label_id for item in items],
        "source_label_name": list(label_names),
        "sample_index": [item.sample_index for item in items],
        "seed": [item.seed for item in items],
        "uncertainty_source": list(uncertainty_sources),
    }
    for key in (
        "prompt",
        "num_inference_steps",
        "guidance_scale",
        "semantic_conditioning_scale",
        "uncertainty_conditioning_scale",
    ):
        columns[key] = [settings[key]] * count
    if style_names is not None:
        columns["style_images"] = [list(names) for names in style_names]
        columns["style_guidance_scale"] = [settings["style_guidance_scale"]] * count
    return columns


# ------------------------------------------------------------------------------------------ shards on disk
def write_shard(columns: dict, path: str | os.PathLike) -> None:
    r"""
    Write one shard as a parquet file, atomically ([`~diffusers_uncertainty.atomic.atomic_write_path`]): a file named
    `path` is always complete, a failed write leaves nothing, and a killed process at most a temporary file, which
    [`remove_temporary_shards`] deletes.

    Args:
        columns (`dict`):
            From [`shard_columns`].
        path (`str` or `os.PathLike`):
            The shard's final path.
    """
    import datasets

    dataset = datasets.Dataset.from_dict(columns, features=dataset_features(style="style_images" in columns))
    with atomic_write_path(path) as temporary:
        dataset.to_parquet(temporary)


class BackgroundShardWriter:
    r"""
    Encode and write shards ([`shard_columns`] then [`write_shard`]) on one worker thread while the caller generates
    the next shard: PNG encoding (zlib) and parquet writing release the GIL, so the accelerator is fed while the
    previous batch is being stored. Shards are written in submission order, each atomically as before, so the files
    are exactly those of a sequential loop.

    At most `max_pending` shards wait or are being written (their decoded images are held in memory); `submit`
    blocks beyond that. A failed write is raised again by the next `submit` or by `close`. As a context manager the
    writer waits for every submitted shard on exit, also when the body raised, so no started shard is abandoned.

    Args:
        max_pending (`int`, defaults to 2):
            Shards in flight; 1 still overlaps one shard's writing with the next shard's generation.
    """

    def __init__(self, max_pending: int = 2):
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"`max_pending` must be a positive integer, but got {max_pending!r}.")
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: deque[Future] = deque()

    def submit(self, path: str | os.PathLike, *shard_columns_args, **shard_columns_kwargs) -> None:
        r"""
        Queue `write_shard(shard_columns(*shard_columns_args, **shard_columns_kwargs), path)`.

        Args:
            path (`str` or `os.PathLike`):
                The shard's final path.
            shard_columns_args, shard_columns_kwargs:
                The arguments of [`shard_columns`].
        """
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()
        self._pending.append(
            self._executor.submit(_encode_and_write_shard, path, shard_columns_args, shard_columns_kwargs)
        )

    def close(self) -> None:
        """Wait for every queued shard; raise the first failure."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._executor.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.close()
            return
        # The body failed: still finish the shards already handed over, but report the body's error.
        for future in self._pending:
            future.exception()
        self._pending.clear()
        self._executor.shutdown(wait=True)


def _encode_and_write_shard(path, shard_columns_args, shard_columns_kwargs):
    write_shard(shard_columns(*shard_columns_args, **shard_columns_kwargs), path)


def merge_shards(shard_paths: list[str | os.PathLike], output_dir: str | os.PathLike, cache_dir=None):
    r"""
    Merge complete shards, in the given order, into one dataset saved with `save_to_disk` in `output_dir` (next to
    any other files there), loadable with `datasets.load_from_disk(output_dir)`. The dataset is saved to a staging
    folder and moved in with [`~diffusers_uncertainty.atomic.atomic_folder`]: its `dataset_info.json` and
    `state.json` (which list the data files) leave first and come back last, so no mix of an earlier merge's files
    and this one's is ever loadable; the earlier merge's data files that are not overwritten are deleted afterwards.

    Args:
        shard_paths (`list`):
            Parquet shards, in order.
        output_dir (`str` or `os.PathLike`):
            Where the dataset goes.
        cache_dir (`str`, *optional*):
            `datasets` cache for reading the shards; a temporary folder in `output_dir`, removed afterwards, when
            `None`.

    Returns:
        `datasets.Dataset`: the merged dataset, loaded back from `output_dir`.
    """
    import datasets

    if not shard_paths:
        raise ValueError("`shard_paths` is empty: there is nothing to merge.")
    output_dir = str(output_dir)
    own_cache = cache_dir is None
    cache_dir = cache_dir or os.path.join(output_dir, ".merge-cache.tmp")
    try:
        with atomic_folder(output_dir, merge=True, last=("dataset_info.json", "state.json")) as staging:
            # The parquet files carry their `datasets` features (Image columns) in their schema metadata.
            merged = datasets.Dataset.from_parquet([str(path) for path in shard_paths], cache_dir=cache_dir)
            merged.save_to_disk(staging)
            del merged
    finally:
        if own_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
    with open(os.path.join(output_dir, "state.json"), encoding="utf-8") as handle:
        data_files = {entry["filename"] for entry in json.load(handle)["_data_files"]}
    for name in os.listdir(output_dir):
        if name.startswith("data-") and name.endswith(".arrow") and name not in data_files:
            os.remove(os.path.join(output_dir, name))
    return datasets.load_from_disk(output_dir)
