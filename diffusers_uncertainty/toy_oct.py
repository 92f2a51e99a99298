"""A small, procedurally generated two-domain retinal OCT-like dataset, embedded in the package.

UnIACorN (seed 000) adapts segmentation from clinical **Spectralis** OCT scans (labeled) to **Home-OCT** scans
(unlabeled, noisier, lower contrast). Neither dataset can be shipped, so [`make_oct_dataset`] renders a stand-in
that has the same structure and the same kind of domain gap, deterministically from a seed, in seconds, offline:

* **Label maps** are layered like a retinal B-scan: class 0 (vitreous) at the top, then the retinal layers
  1..5 from the inner limiting membrane down to the retinal pigment epithelium, then class 6 (choroid) down to the
  bottom of the image. Every column's labels are non-decreasing from top to bottom. Each image has its own
  geometry: depth, tilt and curvature of the retina, smoothly undulating layer boundaries, per-layer thickness and,
  in most images, a foveal pit (the inner layers thin out and the inner surface dips).
* **Source domain (Spectralis-like)**: sharp, clean, high contrast, intensity profile A (bright nerve fibre layer
  and RPE, dark nuclear layers), a faint smooth texture, a little additive noise.
* **Target domain (Home-OCT-like)**: the same anatomy rendered with a different, compressed intensity profile B,
  a depth-dependent intensity falloff below the retinal surface, blur, multiplicative speckle noise (gamma
  distributed, as in real OCT) and lower contrast.

Images are grey scans stored as RGB PNGs (the diffusion models take 3 channels); label maps are 8-bit PNGs of class
indices. Every pixel has a class, so there is no ignore index (`OCT_IGNORE_INDEX` is `None`).

Folder layout (the project's standard one, read by the training and segmentation scripts):

    root/source/train/{images,labels}/0000.png ...   labeled source (Spectralis-like)
    root/source/val/{images,labels}/...              labeled source, held out
    root/target/train/images/...                     unlabeled target (Home-OCT-like): no labels folder
    root/target/val/{images,labels}/...              labeled target, for evaluation only
    root/README.md, root/dataset_info.json           class names, ignore_index, sizes, seed, how it was made
"""

import json
import os
from pathlib import Path

import numpy as np
import PIL.Image

from .atomic import atomic_folder, save_image_atomic, write_text_atomic


OCT_CLASS_NAMES = (
    "vitreous",  # 0: background above the retina
    "nerve fibre layer",  # 1: RNFL
    "ganglion cell + inner plexiform layers",  # 2: GCL+IPL
    "inner nuclear + outer plexiform layers",  # 3: INL+OPL
    "outer nuclear layer",  # 4: ONL
    "photoreceptors + RPE",  # 5: IS/OS to RPE
    "choroid",  # 6: below the retina, down to the bottom of the image
)
# Every pixel belongs to a class: no "void" label in this dataset.
OCT_IGNORE_INDEX = None
OCT_NUM_CLASSES = len(OCT_CLASS_NAMES)

# Mean intensity of each class in [0, 1]. Profile A (Spectralis-like): high contrast, reflective RNFL and RPE, dark
# nuclear layers. Profile B (Home-OCT-like): a different and flatter profile (brighter background, weaker layers).
SOURCE_PROFILE = (0.03, 0.85, 0.55, 0.35, 0.12, 0.95, 0.45)
TARGET_PROFILE = (0.15, 0.72, 0.52, 0.42, 0.24, 0.82, 0.40)

# Relative thickness of the retinal layers 1..5 (they sum to the retinal thickness of each image).
_LAYER_FRACTIONS = np.array([0.12, 0.25, 0.22, 0.23, 0.18])
_DOMAINS = {"source": 0, "target": 1}
_SPLITS = {"train": 0, "val": 1}


# ------------------------------------------------------------------------------------------------ helpers
def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float array with reflected borders (numpy only)."""
    if sigma <= 0:
        return image
    radius = max(1, int(round(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(image, ((radius, radius), (0, 0)), mode="reflect")
    image = sum(weight * padded[radius + offset : radius + offset + image.shape[0]] for offset, weight in zip(offsets, kernel))
    padded = np.pad(image, ((0, 0), (radius, radius)), mode="reflect")
    return sum(
        weight * padded[:, radius + offset : radius + offset + image.shape[1]] for offset, weight in zip(offsets, kernel)
    )


def _smooth_curve(rng: np.random.Generator, x: np.ndarray, amplitude: float, num_waves: int = 3) -> np.ndarray:
    """A random smooth undulation of `x` in [0, 1]: a sum of a few low-frequency sines with random phases."""
    curve = np.zeros_like(x)
    for wave in range(1, num_waves + 1):
        curve += rng.normal(0.0, amplitude / wave) * np.sin(2 * np.pi * (wave * x + rng.random()))
    return curve


def _smooth_field(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """A smooth random field with unit standard deviation and correlation length ~`scale` pixels."""
    field = _gaussian_blur(rng.normal(size=(height, width)), scale)
    return field / (field.std() + 1e-8)


def _check_size(size) -> tuple[int, int]:
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in size)
    ):
        raise ValueError(f"`size` must be a (height, width) pair of integers, but got {size!r}.")
    height, width = int(size[0]), int(size[1])
    if height < 32 or width < 32:
        raise ValueError(f"`size` must be at least (32, 32) so that every layer is visible, but got {(height, width)}.")
    return height, width


# ---------------------------------------------------------------------------------------------- rendering
def sample_layer_boundaries(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    r"""
    Draw the geometry of one B-scan: the depths (in pixels, sub-pixel precision) of the 6 boundaries between the 7
    classes in every column, sorted from top to bottom.

    The inner retinal surface is a tilted parabola (random depth, tilt and curvature) plus a smooth undulation and,
    with probability 0.7, a foveal pit at a random column. The layers below it have random base thicknesses that
    undulate smoothly along the scan; at the fovea the inner layers (1-3) thin out. The last boundary (RPE/choroid)
    is followed by the choroid down to the bottom of the image.

    Args:
        rng (`np.random.Generator`):
            The source of randomness (one per image, for reproducibility).
        size (`tuple[int, int]`):
            `(height, width)` of the image.

    Returns:
        `np.ndarray`: `(6, width)` float array of boundary depths, non-decreasing along the first axis.
    """
    height, width = _check_size(size)
    x = (np.arange(width) + 0.5) / width
    top = rng.uniform(0.18, 0.30) + rng.uniform(-0.08, 0.08) * (x - 0.5) + rng.uniform(0.0, 0.25) * (x - 0.5) ** 2
    top = top + _smooth_curve(rng, x, 0.012)
    thickness = rng.uniform(0.36, 0.46)  # retinal thickness as a fraction of the height
    fractions = _LAYER_FRACTIONS * rng.uniform(0.8, 1.2, size=5)
    fractions /= fractions.sum()

    layers = np.stack([thickness * fraction * (1.0 + _smooth_curve(rng, x, 0.08)) for fraction in fractions])
    if rng.random() < 0.7:  # foveal pit: the inner layers thin out and the surface dips
        centre, width_fovea = rng.uniform(0.35, 0.65), rng.uniform(0.06, 0.12)
        pit = np.exp(-0.5 * ((x - centre) / width_fovea) ** 2)
        inner_before = layers[:3].sum(axis=0)
        layers[:3] *= 1.0 - 0.8 * pit
        top = top + 0.6 * (inner_before - layers[:3].sum(axis=0))
    layers = np.clip(layers, 0.004, None)  # every layer stays present (at least a fraction of a pixel)
    boundaries = np.concatenate([top[None], top[None] + np.cumsum(layers, axis=0)], axis=0)
    return boundaries * height


def render_label_map(boundaries: np.ndarray, height: int) -> np.ndarray:
    r"""
    Rasterise boundary depths into a label map: a pixel's class is the number of boundaries above its centre.

    Args:
        boundaries (`np.ndarray`):
            `(num_boundaries, width)` depths in pixels from [`sample_layer_boundaries`].
        height (`int`):
            Image height.

    Returns:
        `np.ndarray`: `(height, width)` uint8 label map, non-decreasing down every column.
    """
    centres = np.arange(height, dtype=np.float64)[:, None, None] + 0.5
    return (centres >= boundaries[None]).sum(axis=1).astype(np.uint8)


def render_oct_image(
    boundaries: np.ndarray, height: int, domain: str, rng: np.random.Generator
) -> np.ndarray:
    r"""
    Render the grey B-scan of one geometry in the style of `domain`.

    Intensities follow the class profile of the domain with anti-aliased boundaries (a pixel cut by a boundary gets
    the mixture of both classes), modulated by a faint smooth texture (stronger in the choroid, for its vessels).
    `"source"` then adds a slight blur (sigma 0.5 px) and weak additive noise; `"target"` applies an exponential
    falloff with depth below the retinal surface, a blur (sigma 1.0 px), multiplicative gamma speckle (6 looks,
    relative standard deviation 0.41), a contrast reduction toward mid grey (x0.7) and additive noise.

    Args:
        boundaries (`np.ndarray`):
            `(6, width)` boundary depths in pixels from [`sample_layer_boundaries`].
        height (`int`):
            Image height.
        domain (`str`):
            `"source"` (Spectralis-like) or `"target"` (Home-OCT-like).
        rng (`np.random.Generator`):
            The source of randomness.

    Returns:
        `np.ndarray`: `(height, width)` uint8 image.
    """
    if domain not in _DOMAINS:
        raise ValueError(f"`domain` must be 'source' or 'target', but got {domain!r}.")
    profile = np.asarray(SOURCE_PROFILE if domain == "source" else TARGET_PROFILE)
    width = boundaries.shape[1]
    rows = np.arange(height, dtype=np.float64)[:, None]
    # Soft steps: the fraction of each pixel (rows [y, y+1)) lying below each boundary.
    coverage = np.clip(rows[None] + 1.0 - boundaries[:, None, :], 0.0, 1.0)
    image = profile[0] + (np.diff(profile)[:, None, None] * coverage).sum(axis=0)
    choroid = coverage[-1]
    texture = 0.05 * _smooth_field(rng, height, width, 2.0) + 0.15 * choroid * _smooth_field(rng, height, width, 1.5)
    image = image * (1.0 + texture)

    if domain == "source":
        image = _gaussian_blur(image, 0.5) + rng.normal(0.0, 0.015, size=image.shape)
    else:
        depth = np.clip(rows - boundaries[0][None], 0.0, None) / height
        image = image * np.exp(-rng.uniform(0.8, 1.3) * depth)
        image = _gaussian_blur(image, 1.0)
        looks = 6.0
        image = image * rng.gamma(looks, 1.0 / looks, size=image.shape)
        image = 0.5 + 0.7 * (image - 0.5) + rng.normal(0.0, 0.02, size=image.shape)
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_oct_sample(
    seed: int | list[int], size: tuple[int, int] = (64, 128), domain: str = "source"
) -> tuple[np.ndarray, np.ndarray]:
    r"""
    Render one `(image, label map)` pair from a seed.

    Args:
        seed (`int` or `list[int]`):
            Seed of the image's random generator (`np.random.default_rng` accepts a list of integers).
        size (`tuple[int, int]`, defaults to `(64, 128)`):
            `(height, width)`.
        domain (`str`, defaults to `"source"`):
            `"source"` (Spectralis-like) or `"target"` (Home-OCT-like).

    Returns:
        `tuple[np.ndarray, np.ndarray]`: `(height, width)` uint8 grey image and `(height, width)` uint8 label map.
    """
    height, _ = _check_size(size)
    rng = np.random.default_rng(seed)
    boundaries = sample_layer_boundaries(rng, size)
    return render_oct_image(boundaries, height, domain, rng), render_label_map(boundaries, height)


# ---------------------------------------------------------------------------------------------- writing
def _readme(info: dict) -> str:
    classes = "\n".join(f"| {index} | {name} |" for index, name in enumerate(info["class_names"]))
    splits = "\n".join(f"| `{split}` | {count} | {'yes' if split != 'target/train' else 'no'} |" for split, count in info["splits"].items())
    height, width = info["size"]
    return f"""# Toy two-domain retinal OCT dataset

Procedurally generated by `diffusers_uncertainty.toy_oct.make_oct_dataset` (seed {info["seed"]}): a small stand-in
for the UnIACorN setting, labeled Spectralis OCT (source) and unlabeled Home-OCT (target). Every image has its own
layered retina geometry (depth, tilt, curvature, undulating layer boundaries, usually a foveal pit).

- **source** (Spectralis-like): sharp, clean, high contrast, intensity profile A.
- **target** (Home-OCT-like): intensity profile B, depth falloff, blur, multiplicative speckle, lower contrast.

Images: {width}x{height} (WxH) grey scans stored as RGB PNGs. Labels: 8-bit PNGs of class indices, non-decreasing
from top to bottom in every column. ignore_index: {info["ignore_index"]} (every pixel has a class).

| split | images | labels |
|---|---|---|
{splits}

`target/train` is the unlabeled target set; `target/val` is labeled for evaluation only.

| class | name |
|---|---|
{classes}
"""


def _write_split(folder: Path, domain: str, split: str, count: int, size, seed: int, labeled: bool) -> None:
    (folder / "images").mkdir(parents=True)
    if labeled:
        (folder / "labels").mkdir()
    for index in range(count):
        # One generator per image, keyed by (seed, domain, split, index): an image does not depend on the counts.
        image, label = render_oct_sample([seed, _DOMAINS[domain], _SPLITS[split], index], size, domain)
        rgb = np.repeat(image[:, :, None], 3, axis=2)
        save_image_atomic(folder / "images" / f"{index:04d}.png", PIL.Image.fromarray(rgb))
        if labeled:
            save_image_atomic(folder / "labels" / f"{index:04d}.png", PIL.Image.fromarray(label))


def make_oct_dataset(
    root: str | os.PathLike,
    num_source_train: int = 32,
    num_source_val: int = 8,
    num_target_train: int = 32,
    num_target_val: int = 8,
    size: tuple[int, int] = (64, 128),
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    r"""
    Write the toy two-domain OCT dataset (see the module docstring) to `root`.

    The whole dataset is first written into a temporary folder beside `root` (every PNG itself written to a
    temporary file and renamed), then moved into place, so an interrupted call leaves nothing half-written in
    `root`. The same arguments always give byte-identical files.

    Args:
        root (`str` or `os.PathLike`):
            Destination folder. It must not exist or be empty, unless `overwrite=True`.
        num_source_train (`int`, defaults to 32):
            Labeled source training images.
        num_source_val (`int`, defaults to 8):
            Labeled source validation images.
        num_target_train (`int`, defaults to 32):
            Unlabeled target training images.
        num_target_val (`int`, defaults to 8):
            Labeled target validation images (for evaluation).
        size (`tuple[int, int]`, defaults to `(64, 128)`):
            `(height, width)` of every image, each at least 32.
        seed (`int`, defaults to 0):
            Seed of the whole dataset (non-negative).
        overwrite (`bool`, defaults to `False`):
            Allow a non-empty `root`: the dataset's own entries (`source/`, `target/`, `README.md`,
            `dataset_info.json`) are replaced, anything else in `root` is left alone.

    Returns:
        `dict`: the contents of `dataset_info.json` (class names, `ignore_index`, `num_classes`, split sizes, size,
        seed) plus `"root"`.

    Raises:
        `ValueError`: for a bad count, size or seed, or a non-empty `root` without `overwrite=True` (raised before
        anything is written).
    """
    counts = {
        "num_source_train": num_source_train,
        "num_source_val": num_source_val,
        "num_target_train": num_target_train,
        "num_target_val": num_target_val,
    }
    for name, value in counts.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, but got {value!r}.")
    height, width = _check_size(size)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer, but got {seed!r}.")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"`root` must be a folder, but {root} is a file.")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise ValueError(
            f"`root` ({root}) is not empty; pass `overwrite=True` to replace the dataset in it, or choose an empty or "
            "new folder."
        )

    info = {
        "name": "toy two-domain retinal OCT (Spectralis-like source, Home-OCT-like target)",
        "class_names": list(OCT_CLASS_NAMES),
        "num_classes": OCT_NUM_CLASSES,
        "ignore_index": OCT_IGNORE_INDEX,
        "size": [height, width],
        "seed": int(seed),
        "splits": {
            "source/train": int(num_source_train),
            "source/val": int(num_source_val),
            "target/train": int(num_target_train),
            "target/val": int(num_target_val),
        },
        "labeled": {"source/train": True, "source/val": True, "target/train": False, "target/val": True},
        "generator": "diffusers_uncertainty.toy_oct.make_oct_dataset",
    }

    # Only the dataset's own entries are replaced in an existing folder; `dataset_info.json` last marks it complete.
    with atomic_folder(root, merge=True, last=("dataset_info.json",)) as staging:
        for split_name, count in info["splits"].items():
            domain, split = split_name.split("/")
            _write_split(staging / domain / split, domain, split, count, (height, width), seed, info["labeled"][split_name])
        write_text_atomic(staging / "dataset_info.json", json.dumps(info, indent=2) + "\n")
        write_text_atomic(staging / "README.md", _readme(info))
    return {**info, "root": str(root)}
