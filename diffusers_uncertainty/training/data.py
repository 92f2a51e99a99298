"""Training data for the dual-control ControlNet: labeled and unlabeled samples, uncertainty maps, paired transforms.

Samples are *records* (plain dicts, see [`diffusers_uncertainty.data_reader`], the package's one reader of image
folders and datasets). Folders and `datasets` datasets both become sequences of records, are checked once before training with
[`validate_records`] (so bad data stops a run before the first step, with the offending file named) and are then
served by [`ControlNetTrainingDataset`], which applies one random crop/flip identically to image, label map and
uncertainty map.
"""

import random
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

# The reader lives in `diffusers_uncertainty.data_reader` (shared with the segmentation side); its names stay
# importable from here and from `diffusers_uncertainty.training`.
from ..data_reader import (  # noqa: F401
    IMAGE_EXTENSIONS,
    UNCERTAINTY_EXTENSIONS,
    DatasetRecords,
    attach_uncertainty_maps,
    check_label_values,
    labeled_folder_records,
    list_images,
    load_image,
    load_label,
    load_uncertainty,
    unlabeled_folder_records,
    validate_records,
)


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
