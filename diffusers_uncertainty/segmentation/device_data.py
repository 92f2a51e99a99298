"""Segmentation data kept on the accelerator: a dataset that fits in memory is decoded once into uint8 tensors on the
device, and every training batch (random crop, flip, photometric augmentation) or evaluation batch is made there, in
a few batched kernels, instead of per sample in DataLoader workers.

The streaming path ([`SegmentationFolder`] / [`HFSegmentationDataset`] + [`SegmentationTransform`] in DataLoader
workers) stays for data that does not fit; [`choose_dataset_placement`] picks one of the two.

How the device path's training batches relate to the streaming ones: the same distribution, not the same random
draws. Each image is resized once, at decoding, exactly as the streaming transform resizes it (shorter side to
`resolution`, bilinear with antialiasing for the image, nearest for the label) and stored as uint8, so its pixels
differ from the streaming path's float resize by the uint8 rounding only (at most 0.5 / 255); the crop position
(uniform over valid positions), the flip (probability 0.5) and the photometric changes
([`PhotometricAugmentation.batch`]) then follow the streaming distributions, drawn from a `torch.Generator` on the
device instead of Python's `random`. Evaluation batches are exactly the streaming ones: the image converted and
resized with the same torchvision calls, the label at its original size.
"""

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..training.performance import DATASET_PLACEMENTS, check_dataset_placement  # noqa: F401 (re-exported)
from .data import eval_size




def _image_size(dataset: Dataset, index: int) -> Tuple[int, int]:
    """(width, height) of a sample's image, from the file header for folders."""
    image_paths = getattr(dataset, "image_paths", None)
    if image_paths is not None:
        with Image.open(image_paths[index]) as image:
            return image.size
    return dataset[index]["image"].size


def decoded_nbytes(datasets: Sequence[Dataset], resolution: int) -> int:
    """Bytes the device path needs for training data: per image, 3 uint8 channels and an int16 label at the largest
    stored height and width (images are stored with their shorter side resized to `resolution`, padded to one size).

    Args:
        datasets (`Sequence[Dataset]`): [`SegmentationFolder`] / [`HFSegmentationDataset`] sources.
        resolution (`int`): Training resolution.
    """
    count, max_height, max_width = 0, 0, 0
    for dataset in datasets:
        for index in range(len(dataset)):
            width, height = _image_size(dataset, index)
            scale = resolution / min(width, height)
            max_height, max_width = max(max_height, round(height * scale)), max(max_width, round(width * scale))
            count += 1
    return count * max_height * max_width * (3 + 2)


def choose_dataset_placement(placement: str, nbytes: int, budget_bytes: int, device: torch.device) -> str:
    """Where training data lives: `"device"` (decoded once, batches made on the accelerator) or `"stream"` (decoded
    per sample in DataLoader workers). `"auto"` picks `"device"` on an accelerator when the decoded data fits
    `budget_bytes`, else `"stream"` (on the CPU the streaming workers overlap decoding with compute instead).

    Args:
        placement (`str`): `"auto"`, `"device"` or `"stream"`.
        nbytes (`int`): Decoded size of the data ([`decoded_nbytes`]).
        budget_bytes (`int`): Largest decoded size `"auto"` puts on the device.
        device (`torch.device`): The training device.
    """
    check_dataset_placement(placement)
    if placement != "auto":
        return placement
    return "device" if torch.device(device).type != "cpu" and nbytes <= budget_bytes else "stream"


def _decode_all(dataset: Dataset, num_workers: int) -> List[Dict]:
    """Every sample of `dataset`, decoded once (in `num_workers` DataLoader workers when > 0)."""
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers)
    return list(loader)


def _label_dtype(labels: Sequence[torch.Tensor]) -> torch.dtype:
    high = max(int(label.max()) for label in labels)
    low = min(int(label.min()) for label in labels)
    return torch.uint8 if low >= 0 and high < 256 else torch.int32


class DeviceSegmentationDataset:
    """Labeled training images decoded once into uint8 tensors on `device`, with batched random crops, flips and
    photometric augmentation made there (see the module docstring for how they relate to [`SegmentationTransform`]).

    All images are kept in one `(N, 3, H, W)` tensor, padded at the bottom and right to the largest stored size (each
    crop stays inside its own image), so a batch gathers its crops (flips included) with one indexing kernel and no
    host synchronisation.

    Args:
        datasets (`Sequence[Dataset]`): Labeled sources (their samples are indexed in order, as in `ConcatDataset`).
        resolution (`int`): Crop size; the shorter side is resized to it once, at decoding.
        device (`torch.device`): Where the tensors live.
        photometric ([`PhotometricAugmentation`], *optional*): Applied to each batch ([`PhotometricAugmentation.batch`]).
        num_workers (`int`, defaults to 0): DataLoader workers used to decode the images once.
    """

    def __init__(self, datasets: Sequence[Dataset], resolution: int, device, photometric=None, num_workers: int = 0):
        self.resolution = resolution
        self.device = torch.device(device)
        self.photometric = photometric
        images, labels = [], []
        for dataset in datasets:
            if not getattr(dataset, "has_labels", False):
                raise ValueError("`DeviceSegmentationDataset` needs labeled sources; got one without labels.")
            for sample in _decode_all(dataset, num_workers):
                image = TF.to_image(sample["image"])  # uint8 (3, H, W)
                label = torch.as_tensor(sample["label"])[None]
                # The streaming transform's resize, on the float image, then stored as uint8.
                image = TF.resize(TF.to_dtype(image, torch.float32, scale=True), resolution, antialias=True)
                images.append(TF.to_dtype(image.clamp(0, 1), torch.uint8, scale=True))
                labels.append(TF.resize(label, resolution, interpolation=TF.InterpolationMode.NEAREST)[0])
        height = max(image.shape[-2] for image in images)
        width = max(image.shape[-1] for image in images)
        self.images = torch.zeros(len(images), 3, height, width, dtype=torch.uint8)
        self.labels = torch.zeros(len(images), height, width, dtype=_label_dtype(labels))
        for i, (image, label) in enumerate(zip(images, labels)):
            self.images[i, :, : image.shape[-2], : image.shape[-1]] = image
            self.labels[i, : label.shape[-2], : label.shape[-1]] = label
        self.images, self.labels = self.images.to(self.device), self.labels.to(self.device)
        self.heights = torch.tensor([image.shape[-2] for image in images], device=self.device)
        self.widths = torch.tensor([image.shape[-1] for image in images], device=self.device)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held on the device."""
        return sum(t.numel() * t.element_size() for t in (self.images, self.labels))

    def batch(self, indices: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """A training batch of the given samples: random `resolution` crop, random horizontal flip, photometric
        augmentation, all on the device.

        Args:
            indices (`torch.LongTensor` of shape `(batch,)`): Sample indices.
            generator (`torch.Generator`, *optional*): On the device; the source of every random draw.

        Returns:
            `Dict`: `pixel_values` `(batch, 3, R, R)` float in `[0, 1]`, `labels` `(batch, R, R)` int64, `index`.
        """
        indices = indices.to(self.device)
        resolution, device = self.resolution, self.device
        batch = indices.numel()
        u = torch.rand(batch, 3, device=device, generator=generator)
        # Uniform crop offsets in 0..H-R and 0..W-R of each image's own size (as random.randint), flip with
        # probability 0.5.
        top = (u[:, 0] * (self.heights[indices] - resolution + 1)).long()
        left = (u[:, 1] * (self.widths[indices] - resolution + 1)).long()
        flip = u[:, 2] < 0.5
        steps = torch.arange(resolution, device=device)
        rows = top[:, None] + steps
        cols = left[:, None] + torch.where(flip[:, None], steps.flip(0), steps)
        channels = torch.arange(3, device=device)
        pixel_values = self.images[indices[:, None, None, None], channels[None, :, None, None],
                                   rows[:, None, :, None], cols[:, None, None, :]]
        labels = self.labels[indices[:, None, None], rows[:, :, None], cols[:, None, :]].long()
        pixel_values = TF.to_dtype(pixel_values, torch.float32, scale=True)
        if self.photometric is not None:
            pixel_values = self.photometric.batch(pixel_values, generator=generator)
        return {"pixel_values": pixel_values.contiguous(), "labels": labels, "index": indices}

    def batches(
        self,
        batch_size: int,
        sampler=None,
        generator: Optional[torch.Generator] = None,
        augment_generator: Optional[torch.Generator] = None,
        drop_last: bool = True,
        num_processes: int = 1,
        process_index: int = 0,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """One pass of training batches, as a `DataLoader` with `shuffle=True` (a random permutation, drawn on the
        device) or with `sampler` ([`HardnessAwareSampler`]: `len(sampler)` draws, one batch at a time with its `draw`,
        so that every batch sees the updates made before it).
        With several processes, each takes its slice of every global batch of `batch_size * num_processes` draws, as
        accelerate shards a prepared loader.

        Args:
            batch_size (`int`): Samples per process and batch.
            sampler ([`HardnessAwareSampler`], *optional*): Index sampler; `None` for a random permutation.
            generator (`torch.Generator`, *optional*): On the device; draws the sample order (give every process the
                same seed so that they slice the same global batches).
            augment_generator (`torch.Generator`, *optional*): On the device; draws crops, flips and photometric
                changes (a per-process seed keeps processes' augmentations independent); defaults to `generator`.
            drop_last (`bool`, defaults to `True`): Drop an incomplete last batch.
            num_processes (`int`, defaults to 1): Data-parallel processes.
            process_index (`int`, defaults to 0): This process.
        """
        global_size = batch_size * num_processes
        if sampler is None:
            chunks = torch.randperm(len(self), device=self.device, generator=generator).split(global_size)
        else:
            # Drawn batch by batch on the sampler's device, so each batch sees the updates of the steps before it.
            full, rest = divmod(len(sampler), global_size)
            chunks = (sampler.draw(size).to(self.device) for size in [global_size] * full + [rest] * (rest > 0))
        for chunk in chunks:
            if chunk.numel() == 0:
                return
            if chunk.numel() < global_size and drop_last:
                return
            mine = chunk[process_index * batch_size : (process_index + 1) * batch_size]
            if mine.numel():
                yield self.batch(mine, augment_generator if augment_generator is not None else generator)


class EvaluationImages:
    """Evaluation (or inference) images decoded once and kept as uint8 on `device`, served in batches of images of
    the same original size, converted and resized on the device with the streaming evaluation transform's calls
    ([`SegmentationTransform`] with `train=False`): same inputs, same outputs.

    Args:
        dataset (`Dataset`): [`SegmentationFolder`] / [`HFSegmentationDataset`] (labeled or not).
        resolution (`int`): Shorter side of the network input.
        multiple (`int`): Divisor of the network input size (the network stride).
        device (`torch.device`): Where the tensors live.
        batch_size (`int`): Images per batch.
        indices (`Sequence[int]`, *optional*): Only these samples (e.g. one process's share).
        num_workers (`int`, defaults to 0): DataLoader workers used to decode the images once.
    """

    def __init__(
        self,
        dataset: Dataset,
        resolution: int,
        multiple: int,
        device,
        batch_size: int,
        indices: Optional[Sequence[int]] = None,
        num_workers: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
        self.resolution, self.multiple, self.batch_size = resolution, multiple, batch_size
        self.device = torch.device(device)
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        subset = torch.utils.data.Subset(dataset, self.indices)
        self.names, self.images, self.labels = [], [], []
        for sample in _decode_all(subset, num_workers):
            self.names.append(sample["name"])
            self.images.append(TF.to_image(sample["image"]).to(self.device))
            if "label" in sample:
                self.labels.append(torch.as_tensor(sample["label"]).to(self.device))
        self.has_labels = len(self.labels) == len(self.images)

    def _groups(self) -> Dict[Tuple[int, int], List[int]]:
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, image in enumerate(self.images):
            groups.setdefault(tuple(image.shape[-2:]), []).append(i)
        return groups

    @property
    def num_images(self) -> int:
        """Number of images."""
        return len(self.images)

    def __len__(self) -> int:
        """Number of batches of a pass."""
        return sum(-(-len(members) // self.batch_size) for members in self._groups().values())

    def __iter__(self) -> Iterator[Dict]:
        """Batches `{"pixel_values", "labels" (if labeled), "original_size", "names", "indices"}`: images of one
        original size, at most `batch_size`, in dataset order within each size (`indices` are dataset indices)."""
        for size, members in self._groups().items():
            input_size = list(eval_size(*size, self.resolution, self.multiple))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                images = torch.stack([self.images[i] for i in chunk])
                pixel_values = TF.resize(TF.to_dtype(images, torch.float32, scale=True), input_size, antialias=True)
                batch = {
                    "pixel_values": pixel_values,
                    "original_size": size,
                    "names": [self.names[i] for i in chunk],
                    "indices": [self.indices[i] for i in chunk],
                }
                if self.has_labels:
                    batch["labels"] = torch.stack([self.labels[i] for i in chunk]).long()
                yield batch


class StreamedEvaluationBatches:
    """The streaming counterpart of [`EvaluationImages`]: each pass reads a DataLoader over
    `TransformedDataset(..., SegmentationTransform(train=False))` with `list_collate` and regroups its batches by
    original size into the same batch format, on `device`.

    Args:
        dataloader (`DataLoader`): Evaluation loader with `list_collate`.
        device (`torch.device`): Where the batches go.
    """

    def __init__(self, dataloader: DataLoader, device):
        self.dataloader = dataloader
        self.device = torch.device(device)

    def __iter__(self) -> Iterator[Dict]:
        for batch in self.dataloader:
            groups: Dict[Tuple[int, int], List[int]] = {}
            for i, size in enumerate(batch["original_size"]):
                groups.setdefault(tuple(size), []).append(i)
            for size, members in groups.items():
                out = {
                    "pixel_values": torch.stack([batch["pixel_values"][i] for i in members]).to(self.device),
                    "original_size": size,
                    "names": [batch["name"][i] for i in members],
                    "indices": [batch["index"][i] for i in members],
                }
                if "labels" in batch:
                    out["labels"] = torch.stack([batch["labels"][i] for i in members]).to(self.device)
                yield out
