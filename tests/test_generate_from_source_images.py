"""`generate_synthetic_dataset.py --source_image_strength`: samples start from their label maps' own images."""

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_uncertainty import StableDiffusionDualControlPipeline, build_tiny_pipeline
from diffusers_uncertainty.data_reader import load_image
from diffusers_uncertainty.synthesis import FolderLabelSource, dataset_generation_arguments, dataset_source_images
from diffusers_uncertainty.synthetic_evaluation import generate_level_sets
from example_scripts import load_example


def load_script():
    return load_example("generate_synthetic_dataset")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("from_source_images")
    build_tiny_pipeline(root / "pipeline", num_classes=4, ignore_index=255)
    rng = np.random.default_rng(0)
    for folder in ("labeled/images", "labeled/labels", "labels_only/labels"):
        (root / folder).mkdir(parents=True)
    for index in range(2):
        label = rng.integers(0, 4, size=(12, 20)).astype(np.uint8)
        PIL.Image.fromarray(label).save(root / "labeled" / "labels" / f"frame_{index}.png")
        PIL.Image.fromarray(label).save(root / "labels_only" / "labels" / f"frame_{index}.png")
        image = rng.integers(0, 256, size=(12, 20, 3)).astype(np.uint8)
        PIL.Image.fromarray(image).save(root / "labeled" / "images" / f"frame_{index}.jpg", quality=95)
    return root


def arguments(workspace, output_dir, *extra, label_dir="labeled"):
    return [
        str(arg)
        for arg in (
            "--pretrained_model_name_or_path", workspace / "pipeline",
            "--label_dir", workspace / label_dir,
            "--uncertainty_level", 0.5,
            "--samples_per_label", 2,
            "--num_inference_steps", 4,
            "--guidance_scale", 2.0,
            "--prompt", "dusk road",
            "--resolution", 16,
            "--seed", 3,
            "--batch_size", 3,
            "--output_dir", output_dir,
            *extra,
        )
    ]


def _pipeline(workspace):
    pipeline = StableDiffusionDualControlPipeline.from_pretrained(workspace / "pipeline")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _direct(pipeline, row, **kwargs):
    return np.asarray(pipeline(
        row["prompt"], semantic_map=np.asarray(row["label"]).astype(np.int64), uncertainty_map=row["uncertainty"],
        num_inference_steps=row["num_inference_steps"], guidance_scale=row["guidance_scale"],
        generator=[torch.Generator().manual_seed(row["seed"])], **kwargs,
    ).images[0]).astype(int)


def test_each_sample_is_the_pipeline_started_from_its_label_maps_image(workspace, tmp_path, one_thread):
    script = load_script()
    output_dir = tmp_path / "from_images"
    # The uncertainty control acts from the second of the 2 steps run: the level sets must keep that window too.
    script.main(script.parse_args(arguments(workspace, output_dir, "--source_image_strength", 0.5,
                                            "--control_guidance_start", 0, 0.5)))
    settings = json.loads((output_dir / "generation_config.json").read_text())["settings"]
    assert settings["source_image_strength"] == 0.5
    pipeline = _pipeline(workspace)
    images = sorted((workspace / "labeled" / "images").iterdir())
    dataset = datasets.load_from_disk(str(output_dir))
    assert len(dataset) == 4
    for row in dataset:
        init_image = load_image(str(images[row["source_label_id"]]))
        stored = np.asarray(row["image"]).astype(int)
        window = {"control_guidance_start": (0.0, 0.5)}
        assert np.abs(_direct(pipeline, row, init_image=init_image, strength=0.5, **window) - stored).max() <= 1
        assert np.abs(_direct(pipeline, row, **window) - stored).max() > 1  # not what generation from noise gives
        assert np.abs(_direct(pipeline, row, init_image=init_image, strength=0.5) - stored).max() > 1  # nor unwindowed

    # The level sets of the evaluation are generated alike: at the dataset's own level they are its images.
    levels = generate_level_sets(pipeline, dataset, settings, [0.5], samples_per_level=2, batch_size=2)
    rows = sorted(dataset, key=lambda row: (row["sample_index"], row["source_label_id"]))[:2]
    for sample, row in zip(levels[0.5], rows):
        assert np.abs(np.asarray(sample["image"]).astype(int) - np.asarray(row["image"]).astype(int)).max() <= 1


def test_generation_arguments_of_a_dataset_and_their_defaults_for_older_settings(workspace):
    settings = {"prompt": "p", "num_inference_steps": 4, "guidance_scale": 2.0, "semantic_conditioning_scale": 1.0,
                "uncertainty_conditioning_scale": 0.5, "control_guidance_start": [0.0, 0.4],
                "control_guidance_end": [1.0], "source_image_strength": 0.6, "label_dir": str(workspace / "labeled"),
                "max_labels": 1, "uncertainty_guidance_scale": 2.5}
    assert dataset_generation_arguments(settings) == {
        "prompt": "p", "num_inference_steps": 4, "guidance_scale": 2.0, "semantic_conditioning_scale": 1.0,
        "uncertainty_conditioning_scale": 0.5, "control_guidance_start": (0.0, 0.4), "control_guidance_end": (1.0, 1.0),
        "strength": 0.6, "uncertainty_guidance_scale": 2.5,
    }
    assert dataset_source_images(settings) == [workspace / "labeled" / "images" / "frame_0.jpg"]
    older = {key: settings[key] for key in ("prompt", "num_inference_steps", "guidance_scale",
                                            "semantic_conditioning_scale", "uncertainty_conditioning_scale")}
    assert dataset_generation_arguments(older)["control_guidance_start"] == (0.0, 0.0)
    assert dataset_generation_arguments(older)["strength"] == 1.0 and dataset_source_images(older) is None
    assert dataset_generation_arguments(older)["uncertainty_guidance_scale"] == 1.0


def test_label_maps_are_paired_with_their_images_by_name(workspace, tmp_path):
    for folder in (workspace / "labeled", workspace / "labeled" / "labels"):
        assert [path.name for path in FolderLabelSource(folder).image_paths()] == ["frame_0.jpg", "frame_1.jpg"]
    with pytest.raises(ValueError, match=r"`--label_dir`: the source images .* is not a `labels/` folder with an "
                                         r"`images/` folder beside it"):
        FolderLabelSource(workspace / "labels_only").image_paths()
    partial = tmp_path / "partial"
    for folder in ("images", "labels"):
        (partial / folder).mkdir(parents=True)
    for name in ("a", "b"):
        PIL.Image.fromarray(np.zeros((8, 8), np.uint8)).save(partial / "labels" / f"{name}.png")
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(partial / "images" / "a.png")
    with pytest.raises(ValueError, match=r"1 label map\(s\) have no image with the same name in .*partial/images, "
                                         r"e.g. \['.*partial/labels/b.png'\]"):
        FolderLabelSource(partial).image_paths()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--source_image_strength", "0"], r"`--source_image_strength` must lie in \(0, 1\], but got 0.0"),
        (["--source_image_strength", "1.5"], r"`--source_image_strength` must lie in \(0, 1\], but got 1.5"),
        (["--source_image_strength", "0.2"], r"`--source_image_strength` 0.2 of 4 `--num_inference_steps` leaves no step"),
    ],
)
def test_bad_strength_is_rejected_by_parse_args(workspace, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        load_script().parse_args(arguments(workspace, tmp_path / "out", *extra))


def test_strength_needs_a_label_folder_with_images_and_stops_before_writing(workspace, tmp_path):
    script = load_script()
    args = arguments(workspace, tmp_path / "out", "--source_image_strength", "0.5")
    index = args.index("--label_dir")
    with pytest.raises(ValueError, match="it does not apply to `--dataset_name`"):
        script.parse_args(args[:index] + ["--dataset_name", "some/labels"] + args[index + 2 :])
    out = tmp_path / "no_images"
    with pytest.raises(ValueError, match="is not a `labels/` folder with an `images/` folder beside it"):
        script.main(script.parse_args(arguments(workspace, out, "--source_image_strength", "0.5", label_dir="labels_only")))
    assert not out.exists()


def test_a_run_recorded_before_the_flag_existed_resumes(workspace, tmp_path, one_thread):
    script = load_script()
    output_dir = tmp_path / "older"
    script.main(script.parse_args(arguments(workspace, output_dir, "--max_labels", 1, "--samples_per_label", 1)))
    config_path = output_dir / "generation_config.json"
    config = json.loads(config_path.read_text())
    del config["settings"]["source_image_strength"]
    config_path.write_text(json.dumps(config))
    script.main(script.parse_args(arguments(workspace, output_dir, "--max_labels", 1, "--samples_per_label", 1, "--resume")))
    with pytest.raises(ValueError, match=r"source_image_strength: 1.0 -> 0.5"):
        script.main(script.parse_args(arguments(workspace, output_dir, "--max_labels", 1, "--samples_per_label", 1,
                                                "--resume", "--source_image_strength", "0.5")))
