"""Latent and prompt caches for diffusion training on a frozen VAE and a frozen text encoder
(`--dataset_placement device` of `examples/train_base_model.py` and `examples/train_uncertainty_controlnet.py`).

Once the VAE is frozen, encoding every batch again is wasted work, and so is decoding and resizing the same PNGs in
DataLoader workers. [`LatentCache`] decodes every record once, resizes it as [`PairedTransform`] does (shorter side
to the resolution), encodes the whole resized image (and its mirror image when flipping is on) and keeps the VAE's
latent *distribution* (`latent_dist.parameters`: mean and log-variance), the label maps and the uncertainty maps as
tensors on the training device. A batch is then a few indexing operations there: random crops at multiples of the
VAE factor in latent space (the pixel crop of the label and uncertainty maps is the same window, `factor` x
larger), flips, and the caption choice, all drawn from a device generator seeded per batch (no host sync, and a
resumed run draws the same batches). [`sample_latents`] samples the latent with the step's random numbers, exactly
as `vae.encode(pixels).latent_dist.sample()` does on the streaming path. [`PromptEmbeddingCache`] runs the frozen
text encoder once per distinct prompt.

Exactness. For the same crop, flip and random numbers (global RNG, as the scripts use), the cached path gives
bit-for-bit the latent, and therefore the loss, of the streaming path *when the crop is the whole resized image*
(e.g. square images at the training resolution): the cache stores the moments the VAE computed for exactly those
pixels (in float32, a lossless upcast of a float16/bfloat16 VAE's output; they are cast back to the VAE's dtype
before sampling) and [`sample_latents`] draws the same `randn` of the same shape in the same order. When the resized
image is larger than the crop, a latent-space crop is *not* the encoding of the pixel crop: the VAE encoder's
convolutions see the pixels around the window instead of zero padding at its border, and its mid-block
self-attention mixes the whole image, so every latent of the window differs somewhat from encoding the crop alone
(for a training target, a crop of the latents of the full image is if anything the better one). Crops also move on
a grid: offsets are multiples of the VAE factor (on the streaming path any pixel), the resized image is first
trimmed (centred) to a multiple of the factor, and a centre crop is the centred latent window. Label and uncertainty
maps are the same arrays [`PairedTransform`] produces, cropped at `factor` x the latent offset (exactly equal for the same
pixel window and flip).
"""

import hashlib
import math
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from tqdm.auto import tqdm

from .data import load_image, load_label, load_uncertainty
from .performance import DATASET_PLACEMENTS, check_dataset_placement  # noqa: F401 (re-exported for the scripts)


# `--dataset_placement auto` keeps the data on the device when its cache takes at most this share of the device's
# memory (of the machine's RAM on the CPU); the rest stays for the models, activations and optimizer states.
DEVICE_MEMORY_FRACTION = 0.25


# ------------------------------------------------------------------------------------------------ placement
def device_memory_bytes(device: torch.device | str) -> int:
    r"""Total memory of `device`: the GPU's for CUDA, the machine's physical RAM otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    r"""`(width, height)` after resizing the shorter side to `resolution` (as [`PairedTransform`] does)."""
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def estimate_cache_bytes(
    num_samples: int,
    first_image_size: tuple[int, int],
    resolution: int,
    vae_factor: int,
    latent_channels: int,
    random_flip: bool,
    labels: bool,
    uncertainty: bool,
) -> int:
    r"""
    Bytes a [`LatentCache`] of `num_samples` images takes on the device, estimated from the size of the first image
    (`(width, height)` before resizing): float32 latent moments (twice with flipping), int32 label maps, float32
    uncertainty maps.
    """
    width, height = resized_size(*first_image_size, resolution)
    latent_h, latent_w = height // vae_factor, width // vae_factor
    per_sample = 2 * latent_channels * latent_h * latent_w * 4 * (2 if random_flip else 1)
    pixels = latent_h * latent_w * vae_factor**2
    per_sample += 4 * pixels * (int(labels) + int(uncertainty))
    return num_samples * per_sample


def choose_dataset_placement(placement: str, estimated_bytes: int, device: torch.device | str) -> str:
    r"""
    `device` or `stream`: `placement` itself unless it is `auto`, which gives `device` when `estimated_bytes` is at
    most `DEVICE_MEMORY_FRACTION` of the device's memory.

    Args:
        placement (`str`):
            `auto`, `device` or `stream`.
        estimated_bytes (`int`):
            From [`estimate_cache_bytes`].
        device (`torch.device` or `str`):
            The training device.
    """
    check_dataset_placement(placement)
    if placement != "auto":
        return placement
    return "device" if estimated_bytes <= DEVICE_MEMORY_FRACTION * device_memory_bytes(device) else "stream"


# ------------------------------------------------------------------------------------------------ sampling
def sample_latents(vae, batch: dict, dtype: torch.dtype) -> torch.Tensor:
    r"""
    Scaled latents of a batch, sampled from the VAE's posterior with the global random numbers: from the cached
    moments (`batch["latent_parameters"]`, cast to `dtype` first) or by encoding `batch["pixel_values"]` in `dtype`.
    Both draw one `randn` of the latent's shape, so the same RNG state gives the same sample for the same moments;
    the result is contiguous either way, so that the noise drawn next with `randn_like` is the same too.

    Args:
        vae (`AutoencoderKL`):
            The frozen VAE (its `scaling_factor` is applied).
        batch (`dict`):
            A cached batch ([`LatentCache.batch`]) or a streamed one (`pixel_values` in [-1, 1]).
        dtype (`torch.dtype`):
            The VAE's dtype (the mixed-precision weight dtype).
    """
    if "latent_parameters" in batch:
        posterior = DiagonalGaussianDistribution(batch["latent_parameters"].to(dtype=dtype))
    else:
        posterior = vae.encode(batch["pixel_values"].to(dtype=dtype)).latent_dist
    # Contiguous on both paths: the step's `torch.randn_like(latents)` lays its numbers out in the memory order of
    # `latents`, and a CPU convolution may hand back channels-last moments.
    return (posterior.sample() * vae.config.scaling_factor).contiguous()


def batch_seed(*parts) -> int:
    r"""A 63-bit seed determined by `parts` (e.g. seed, epoch, batch, process), for a device generator."""
    digest = hashlib.sha256("-".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class DeviceBatchSampler:
    r"""
    Indices of cached batches, drawn on the device. Each epoch is a permutation of the samples (or, with `weights`,
    `num_samples` draws with replacement, as `WeightedRandomSampler`) that depends only on `(seed, epoch)`; process
    `p` of `P` takes batches `p, p + P, ...` of it. Every batch has exactly `batch_size` samples (the last one of an
    epoch wraps around to the start of the permutation), so shapes never change.

    Args:
        num_samples (`int`):
            Size of the dataset.
        batch_size (`int`):
            Samples per batch (per process).
        device (`torch.device`):
            Where the indices live.
        seed (`int`):
            The data seed.
        weights (`torch.Tensor`, *optional*):
            Per-sample weights (for mixed labeled/unlabeled batches).
        drop_last (`bool`, defaults to `False`):
            Leave out the incomplete last batch of an epoch instead of wrapping around.
        num_processes (`int`, defaults to 1), process_index (`int`, defaults to 0):
            Data-parallel sharding.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        device: torch.device | str,
        seed: int,
        weights: torch.Tensor | None = None,
        drop_last: bool = False,
        num_processes: int = 1,
        process_index: int = 0,
    ):
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"`num_samples` and `batch_size` must be positive, but got {num_samples} and {batch_size}.")
        if weights is not None and len(weights) != num_samples:
            raise ValueError(f"`weights` must have {num_samples} entries, but got {len(weights)}.")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.seed = seed
        self.weights = None if weights is None else weights.to(self.device, torch.float64)
        self.num_processes = num_processes
        self.process_index = process_index
        global_batch = batch_size * num_processes
        if drop_last:
            self.batches_per_epoch = max(1, num_samples // global_batch)
        else:
            self.batches_per_epoch = math.ceil(num_samples / global_batch)
        self._epoch, self._order = None, None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def generator(self, *parts) -> torch.Generator:
        r"""A device generator seeded from `(seed, *parts)`."""
        return torch.Generator(device=self.device).manual_seed(batch_seed(self.seed, *parts))

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            generator = self.generator("epoch", epoch)
            if self.weights is None:
                order = torch.randperm(self.num_samples, generator=generator, device=self.device)
            else:
                order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
            self._epoch, self._order = epoch, order
        return self._order

    def indices(self, epoch: int, batch: int) -> torch.Tensor:
        r"""The `batch_size` sample indices of batch `batch` of `epoch` for this process."""
        order = self._epoch_order(epoch)
        start = (batch * self.num_processes + self.process_index) * self.batch_size
        positions = (torch.arange(self.batch_size, device=self.device) + start) % self.num_samples
        return order[positions]


# --------------------------------------------------------------------------------------------------- prompts
class PromptEmbeddingCache:
    r"""
    The frozen text encoder's output for each distinct prompt, computed once. `cache(prompt_ids)` returns the
    embeddings of a batch (`(B, L, D)`): row `i` is bit-for-bit `text_encoder(input_ids_i[None])[0]`, the prompt
    encoded alone; a batched call `text_encoder(input_ids)` of the streaming path agrees up to the rounding of its
    batched matrix products (about 1e-7 relative in float32). `input_ids` holds the tokenized prompts for a text
    encoder that is trained (and must then run every step).

    Args:
        text_encoder:
            The text encoder (on its device and in its dtype).
        tokenizer:
            Its tokenizer; prompts are padded to `tokenizer.model_max_length`.
        prompts (`Sequence[str]`):
            The prompts (duplicates are kept once).
        encode (`bool`, defaults to `True`):
            Compute the embeddings now (not when the text encoder is trained).
    """

    def __init__(self, text_encoder, tokenizer, prompts: Sequence[str], encode: bool = True):
        self.prompts = list(dict.fromkeys(prompts))
        if not self.prompts:
            raise ValueError("`prompts` is empty: no prompt to cache.")
        self.ids = {prompt: index for index, prompt in enumerate(self.prompts)}
        device = text_encoder.device
        self.input_ids = torch.cat([self.tokenize(tokenizer, prompt) for prompt in self.prompts]).to(device)
        self.embeddings = None
        if encode:
            # One prompt at a time: each row is then bit-for-bit `text_encoder(input_ids_of_that_prompt)`. (Rows of a
            # batched call can differ in the last bits, as BLAS kernels depend on the batch size.)
            with torch.no_grad():
                self.embeddings = torch.cat(
                    [text_encoder(ids[None], return_dict=False)[0] for ids in self.input_ids]
                )

    @staticmethod
    def tokenize(tokenizer, prompt: str) -> torch.Tensor:
        r"""`(1, L)` input ids of `prompt`, as the training datasets tokenize captions."""
        return tokenizer(
            prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids

    def index(self, prompt: str) -> int:
        r"""The id of `prompt` (one of the cached prompts)."""
        if prompt not in self.ids:
            raise ValueError(f"The prompt {prompt!r} is not cached; cached prompts: {self.prompts[:5]}.")
        return self.ids[prompt]

    def __call__(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        if self.embeddings is None:
            raise ValueError("The embeddings were not computed (`encode=False`); run the text encoder on `input_ids`.")
        return self.embeddings[prompt_ids]


def record_captions(record: dict, default_prompt: str, name: str | None = None) -> list[str]:
    r"""
    The captions a record may be given (one of them at random per step, as the training datasets do): its caption,
    each of its captions, or `[default_prompt]` without one.
    """
    caption = record.get("caption")
    if caption is None or (isinstance(caption, (list, tuple, np.ndarray)) and len(caption) == 0):
        return [default_prompt]
    if isinstance(caption, str):
        return [caption]
    if isinstance(caption, (list, tuple, np.ndarray)):
        return [str(value) for value in caption]
    raise ValueError(
        f"Captions must be strings or lists of strings, but {name or record.get('name')} has a {type(caption).__name__}."
    )


# ---------------------------------------------------------------------------------------------------- cache
def resize_sample(image: PIL.Image.Image, label=None, uncertainty=None, resolution: int = 64) -> dict:
    r"""
    Resize the shorter side to `resolution` exactly as [`PairedTransform`] does before cropping (bilinear image and
    uncertainty map, nearest label map). Returns float32 `pixels` `(H, W, 3)` in [-1, 1], and int32 `labels` /
    float32 `uncertainty` `(H, W)` when given.
    """
    size = resized_size(image.width, image.height, resolution)
    output = {"pixels": np.asarray(image.resize(size, PIL.Image.BILINEAR), dtype=np.float32) / 127.5 - 1.0}
    if label is not None:
        output["labels"] = np.asarray(PIL.Image.fromarray(label.astype(np.int32)).resize(size, PIL.Image.NEAREST))
    if uncertainty is not None:
        resized = PIL.Image.fromarray(uncertainty.astype(np.float32)).resize(size, PIL.Image.BILINEAR)
        output["uncertainty"] = np.clip(np.asarray(resized), 0.0, 1.0)
    return output


class LatentCache:
    r"""
    A dataset encoded once by a frozen VAE and kept on the device (see the module docstring for what is exact).
    Build it with [`LatentCache.from_records`]; draw batches with [`LatentCache.batch`] (random crops, flips and
    captions) or [`LatentCache.crop`] (given ones).

    Attributes:
        parameters (`torch.Tensor`): `(N, F, 2C, h, w)` float32 latent moments (`F` = 2 with flipping: the image and
            its mirror image encoded separately), zero-padded to the largest latent size.
        latent_sizes (`torch.Tensor`): `(N, 2)` latent height and width of each sample.
        labels (`torch.Tensor` or `None`): `(N, h * f, w * f)` int32 label maps (`label_fill` for unlabeled samples).
        uncertainty (`torch.Tensor` or `None`): `(N, 1, h * f, w * f)` float32 uncertainty maps.
        is_labeled (`torch.Tensor`): `(N,)` bool.
        captions (`torch.Tensor`): `(N, K)` prompt ids of each sample's captions (`caption_counts` of them valid).
        trims (`list[tuple[int, int]]`): `(top, left)` pixels trimmed from each resized image (to a multiple of `f`).
    """

    def __init__(
        self,
        parameters: torch.Tensor,
        latent_sizes: torch.Tensor,
        captions: torch.Tensor,
        caption_counts: torch.Tensor,
        is_labeled: torch.Tensor,
        vae_factor: int,
        resolution: int,
        random_flip: bool,
        center_crop: bool,
        labels: torch.Tensor | None = None,
        uncertainty: torch.Tensor | None = None,
        trims: list | None = None,
        empty_prompt_id: int | None = None,
        proportion_empty_prompts: float = 0.0,
    ):
        if resolution % vae_factor:
            raise ValueError(f"`resolution` must be a multiple of the VAE factor {vae_factor}, but got {resolution}.")
        self.parameters = parameters
        self.latent_sizes = latent_sizes
        self.captions = captions
        self.caption_counts = caption_counts
        self.is_labeled = is_labeled
        self.vae_factor = vae_factor
        self.resolution = resolution
        self.latent_resolution = resolution // vae_factor
        self.random_flip = random_flip
        self.center_crop = center_crop
        self.labels = labels
        self.uncertainty = uncertainty
        self.trims = trims or [(0, 0)] * len(parameters)
        self.empty_prompt_id = empty_prompt_id
        self.proportion_empty_prompts = proportion_empty_prompts

    def __len__(self) -> int:
        return self.parameters.shape[0]

    @property
    def device(self) -> torch.device:
        return self.parameters.device

    def nbytes(self) -> int:
        r"""Bytes the cached tensors take."""
        tensors = (self.parameters, self.labels, self.uncertainty, self.captions)
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)

    @classmethod
    @torch.no_grad()
    def from_records(
        cls,
        vae,
        records: Sequence[dict],
        resolution: int,
        prompt_cache: PromptEmbeddingCache,
        default_prompt: str = "",
        random_flip: bool = False,
        center_crop: bool = False,
        labeled: Sequence[bool] | None = None,
        use_labels: bool = False,
        use_uncertainty: bool = False,
        label_fill: int = -1,
        proportion_empty_prompts: float = 0.0,
        batch_size: int = 16,
        show_progress: bool = True,
    ) -> "LatentCache":
        r"""
        Decode, resize and encode every record once (with the VAE on its device and in its dtype).

        Args:
            vae (`AutoencoderKL`):
                The frozen VAE.
            records (`Sequence[dict]`):
                Records (`image`, `label`, `uncertainty`, `caption`, `name`), labeled ones first.
            resolution (`int`):
                The training crop size (a multiple of the VAE factor).
            prompt_cache (`PromptEmbeddingCache`):
                Holds every caption of the records, `default_prompt`, and `""` if `proportion_empty_prompts` > 0.
            default_prompt (`str`, defaults to `""`):
                Caption of records without one.
            random_flip (`bool`, defaults to `False`):
                Also encode the mirror images; batches flip with probability 0.5.
            center_crop (`bool`, defaults to `False`):
                Batches take the centred window instead of a random one.
            labeled (`Sequence[bool]`, *optional*):
                Which records are labeled (default: none).
            use_labels (`bool`, defaults to `False`):
                Keep the label maps of labeled records.
            use_uncertainty (`bool`, defaults to `False`):
                Keep the uncertainty maps.
            label_fill (`int`, defaults to -1):
                Label value where no label is known (unlabeled records): the `ignore_index`, or -1.
            proportion_empty_prompts (`float`, defaults to 0.0):
                Probability that a sample's caption is replaced by `""` in a batch.
            batch_size (`int`, defaults to 16):
                Images encoded at once.
            show_progress (`bool`, defaults to `True`):
                Show a progress bar.
        """
        if len(records) == 0:
            raise ValueError("`records` is empty: nothing to cache.")
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ValueError(f"`proportion_empty_prompts` must be in [0, 1], but got {proportion_empty_prompts}.")
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution <= 0 or resolution % factor:
            raise ValueError(f"`resolution` must be a positive multiple of the VAE factor {factor}, but got {resolution}.")
        labeled = [False] * len(records) if labeled is None else [bool(value) for value in labeled]
        if len(labeled) != len(records):
            raise ValueError(f"`labeled` must have one entry per record ({len(records)}), but got {len(labeled)}.")

        # Decode and resize on the CPU, trimmed (centred) to a multiple of the VAE factor.
        samples, trims = [], []
        for record, is_labeled in tqdm(
            list(zip(records, labeled)), desc="Caching: decoding", disable=not show_progress
        ):
            name = record["name"]
            label = load_label(record["label"], name) if (use_labels and is_labeled) else None
            uncertainty = load_uncertainty(record["uncertainty"], name) if use_uncertainty else None
            sample = resize_sample(load_image(record["image"], name), label, uncertainty, resolution)
            height, width = sample["pixels"].shape[:2]
            top, left = (height % factor) // 2, (width % factor) // 2
            window = (slice(top, top + height - height % factor), slice(left, left + width - width % factor))
            samples.append({key: value[window] for key, value in sample.items()})
            trims.append((top, left))

        device, dtype = vae.device, vae.dtype
        max_h = max(sample["pixels"].shape[0] for sample in samples) // factor
        max_w = max(sample["pixels"].shape[1] for sample in samples) // factor
        flips = 2 if random_flip else 1
        channels = 2 * vae.config.latent_channels
        parameters = torch.zeros(len(samples), flips, channels, max_h, max_w, device=device, dtype=torch.float32)
        latent_sizes = torch.tensor(
            [[sample["pixels"].shape[0] // factor, sample["pixels"].shape[1] // factor] for sample in samples],
            dtype=torch.long,
        )

        # Encode images of the same size together, as the streaming path does (`pixel_values.to(dtype)`).
        by_size = {}
        for index, sample in enumerate(samples):
            by_size.setdefault(sample["pixels"].shape[:2], []).append(index)
        progress = tqdm(total=len(samples), desc="Caching: encoding", disable=not show_progress)
        for (height, width), indices in by_size.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                pixels = torch.stack([torch.from_numpy(samples[i]["pixels"]).permute(2, 0, 1) for i in chunk])
                pixels = pixels.to(device=device, dtype=dtype)
                views = [pixels, torch.flip(pixels, dims=[-1])][:flips]
                for flip, view in enumerate(views):
                    moments = vae.encode(view).latent_dist.parameters.float()
                    parameters[chunk, flip, :, : height // factor, : width // factor] = moments
                progress.update(len(chunk))
        progress.close()

        labels = uncertainty = None
        pixel_h, pixel_w = max_h * factor, max_w * factor
        if use_labels:
            labels = torch.full((len(samples), pixel_h, pixel_w), label_fill, dtype=torch.int32)
            for index, sample in enumerate(samples):
                if "labels" in sample:
                    height, width = sample["labels"].shape
                    labels[index, :height, :width] = torch.from_numpy(sample["labels"].astype(np.int32))
            labels = labels.to(device)
        if use_uncertainty:
            uncertainty = torch.zeros(len(samples), 1, pixel_h, pixel_w, dtype=torch.float32)
            for index, sample in enumerate(samples):
                height, width = sample["uncertainty"].shape
                uncertainty[index, 0, :height, :width] = torch.from_numpy(sample["uncertainty"].astype(np.float32))
            uncertainty = uncertainty.to(device)

        choices = [
            [prompt_cache.index(caption) for caption in record_captions(record, default_prompt)] for record in records
        ]
        width = max(len(choice) for choice in choices)
        captions = torch.tensor([choice + [choice[0]] * (width - len(choice)) for choice in choices], dtype=torch.long)
        counts = torch.tensor([len(choice) for choice in choices], dtype=torch.long)
        empty_prompt_id = prompt_cache.index("") if proportion_empty_prompts > 0 else None
        return cls(
            parameters, latent_sizes.to(device), captions.to(device), counts.to(device),
            torch.tensor([value and use_labels for value in labeled], dtype=torch.bool, device=device), factor, resolution, random_flip,
            center_crop, labels=labels, uncertainty=uncertainty, trims=trims, empty_prompt_id=empty_prompt_id,
            proportion_empty_prompts=proportion_empty_prompts,
        )

    # ------------------------------------------------------------------------------------------- batches
    def crop(
        self, indices: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, prompt_ids: torch.Tensor
    ) -> dict:
        r"""
        The batch of samples `indices` cut at latent offsets `(top, left)` (the pixel window of the maps is at
        `vae_factor` x these, in the trimmed resized image), mirrored where `flip` (as a pixel crop flipped
        afterwards; only a cache built with `random_flip` holds the mirror images' latents), with captions
        `prompt_ids`. Offsets must leave the window inside each sample (`0 <= top <= h - r`, `0 <= left <= w - r`).

        Returns:
            `dict`: `latent_parameters` `(B, 2C, r, r)` float32 (r = resolution / factor), `prompt_ids` `(B,)`,
            `is_labeled` `(B,)`, and `labels` `(B, R, R)` int64 / `uncertainty` `(B, 1, R, R)` float32 when cached.
        """
        size, factor, device = self.latent_resolution, self.vae_factor, self.device
        steps = torch.arange(size, device=device)
        flip = flip.to(device=device, dtype=torch.bool)
        # The mirror image's latents hold the mirrored window at the mirrored offset.
        latent_left = torch.where(flip, self.latent_sizes[indices, 1] - left - size, left)
        rows = top[:, None] + steps
        cols = latent_left[:, None] + steps
        channels = torch.arange(self.parameters.shape[2], device=device)
        flip_index = flip.long() if self.parameters.shape[1] == 2 else torch.zeros_like(flip, dtype=torch.long)
        parameters = self.parameters[
            indices[:, None, None, None], flip_index[:, None, None, None], channels[None, :, None, None],
            rows[:, None, :, None], cols[:, None, None, :],
        ]
        # Contiguous, as a streamed batch: `randn_like` lays its numbers out in the memory order of its input.
        batch = {"latent_parameters": parameters.contiguous(), "prompt_ids": prompt_ids, "is_labeled": self.is_labeled[indices]}

        pixel_steps = torch.arange(self.resolution, device=device)
        pixel_rows = (top * factor)[:, None] + pixel_steps
        pixel_cols = (left * factor)[:, None] + pixel_steps
        pixel_cols = torch.where(flip[:, None], pixel_cols.flip(-1), pixel_cols)
        if self.labels is not None:
            batch["labels"] = self.labels[indices[:, None, None], pixel_rows[:, :, None], pixel_cols[:, None, :]].long().contiguous()
        if self.uncertainty is not None:
            batch["uncertainty"] = self.uncertainty[
                indices[:, None, None, None], 0, pixel_rows[:, None, :, None], pixel_cols[:, None, None, :]
            ].contiguous()
        return batch

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> dict:
        r"""
        A training batch of samples `indices`: random (or centred) latent windows, flips with probability 0.5 when
        flipping, and a random caption of each sample (`""` with probability `proportion_empty_prompts`), all drawn
        from `generator` (a generator of the cache's device), so no value leaves the device.

        Args:
            indices (`torch.Tensor`):
                `(B,)` sample indices on the device.
            generator (`torch.Generator`):
                The batch's device generator ([`DeviceBatchSampler.generator`]).
        """
        size, device = self.latent_resolution, self.device
        count = indices.shape[0]
        spans = self.latent_sizes[indices] - size + 1  # (B, 2) possible offsets per axis
        if self.center_crop:
            top, left = (spans[:, 0] - 1) // 2, (spans[:, 1] - 1) // 2
        else:
            draws = torch.randint(0, 2**62, (2, count), generator=generator, device=device)
            top, left = draws[0] % spans[:, 0], draws[1] % spans[:, 1]
        if self.random_flip:
            flip = torch.rand(count, generator=generator, device=device) < 0.5
        else:
            flip = torch.zeros(count, dtype=torch.bool, device=device)
        choice = torch.randint(0, 2**62, (count,), generator=generator, device=device) % self.caption_counts[indices]
        prompt_ids = self.captions[indices, choice]
        if self.empty_prompt_id is not None:
            empty = torch.rand(count, generator=generator, device=device) < self.proportion_empty_prompts
            prompt_ids = torch.where(empty, torch.full_like(prompt_ids, self.empty_prompt_id), prompt_ids)
        return self.crop(indices, top, left, flip, prompt_ids)

    def control_conditioning(self, batch: dict, num_classes: int) -> dict:
        r"""
        Add the conditions of `ControlNetTrainingDataset` items to a batch of this cache: `conditioning_one_hot`
        `(B, num_classes, R, R)` float32 (all zero where the label is outside `[0, num_classes)`: `ignore_index`,
        unlabeled samples, or no label maps cached) and `conditioning_uncertainty` `(B, 1, R, R)` (zeros when no maps
        are cached).

        Args:
            batch (`dict`):
                From [`LatentCache.batch`] or [`LatentCache.crop`].
            num_classes (`int`):
                One-hot channels.
        """
        count, resolution, device = batch["latent_parameters"].shape[0], self.resolution, self.device
        if "labels" in batch:
            # A comparison with every class id: a label outside [0, num_classes) matches none, and unlike
            # `F.one_hot` nothing is read on the host (it checks the label range with `.item()` off CUDA).
            classes = torch.arange(num_classes, device=batch["labels"].device).view(1, -1, 1, 1)
            batch["conditioning_one_hot"] = (batch["labels"][:, None] == classes).float()
        else:
            batch["conditioning_one_hot"] = torch.zeros(count, num_classes, resolution, resolution, device=device)
        if "uncertainty" in batch:
            batch["conditioning_uncertainty"] = batch.pop("uncertainty")
        else:
            batch["conditioning_uncertainty"] = torch.zeros(count, 1, resolution, resolution, device=device)
        return batch
