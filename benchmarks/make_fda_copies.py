"""A labeled folder for training the control with target-looking copies of the labeled images (issue 12's levers).

Why: on MoNuSeg (benchmarks/RESULTS.md) the semantic control, trained on source images only, carries the source look
along with the layout: raising its weight at generation makes the tiles follow their labels and look less like the
target. This writes the labeled folder once more with, beside each source image, a copy given the low-frequency
amplitude spectrum of a random unlabeled target image (Fourier Domain Adaptation, the segmentation side's own
`fourier_domain_adaptation`), with the same label map. A control trained on it (`control.args.train_data_dir`, and
`uncertainty_dir` set to `compute_uncertainty.py`'s maps of it) sees each layout under both looks.

    python benchmarks/make_fda_copies.py --train_data_dir data/monuseg_t8/source/train \
        --target_dir data/monuseg_t8/target/train --output_dir data/monuseg_fda_copies --beta 0.03 --seed 0

Images are processed at their own size (all images and all target images must share one size, as tiles do).
Output: `images/` and `labels/` with the originals (same names) and the copies (`fda_` + name).
"""

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusers_uncertainty.atomic import atomic_new_folder, check_new_folder
from diffusers_uncertainty.data_reader import labeled_folder_records, load_image, unlabeled_folder_records
from diffusers_uncertainty.segmentation.fourier import fourier_domain_adaptation


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def main(input_args=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_data_dir", required=True, help="Labeled folder with images/ and labels/.")
    parser.add_argument("--target_dir", required=True, help="Unlabeled target images (their amplitude spectra).")
    parser.add_argument("--output_dir", required=True, help="New folder to write.")
    parser.add_argument("--beta", type=float, default=0.03, help="FDA window, fraction of the shorter side.")
    parser.add_argument("--seed", type=int, default=0, help="Draws the target image of each copy.")
    args = parser.parse_args(input_args)

    if not 0.0 < args.beta <= 1.0:
        raise ValueError(f"`--beta` must be in (0, 1], got {args.beta}.")
    records = labeled_folder_records(args.train_data_dir)
    targets = unlabeled_folder_records(args.target_dir, "--target_dir")
    check_new_folder(args.output_dir)
    sizes = {load_image(r["image"]).size for r in records + targets}
    if len(sizes) != 1:
        raise ValueError(f"`--train_data_dir` and `--target_dir` images must share one size, got sizes {sorted(sizes)}.")

    target_amplitude = torch.fft.fft2(torch.stack([as_tensor(load_image(r["image"])) for r in targets])).abs()
    generator = torch.Generator().manual_seed(args.seed)
    with atomic_new_folder(args.output_dir) as staging:
        for record in records:
            relative = Path(record["relative_path"])
            image = load_image(record["image"])
            label_path = Path(record["label"])
            choice = torch.randint(len(targets), (1,), generator=generator)
            copy = fourier_domain_adaptation(as_tensor(image)[None], target_amplitude[choice], args.beta).clamp(0, 1)
            copy = Image.fromarray((copy[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8))
            for name, picture in ((relative, image.convert("RGB")), (relative.with_name("fda_" + relative.name), copy)):
                (staging / "images" / name).parent.mkdir(parents=True, exist_ok=True)
                (staging / "labels" / name).parent.mkdir(parents=True, exist_ok=True)
                picture.save((staging / "images" / name).with_suffix(".png"))
                shutil.copyfile(label_path, (staging / "labels" / name).with_suffix(label_path.suffix))
    print(f"Wrote {2 * len(records)} labeled images ({len(records)} FDA copies, beta {args.beta}) to {args.output_dir}.")


if __name__ == "__main__":
    main()
