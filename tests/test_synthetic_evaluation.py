"""`diffusers_uncertainty.synthetic_evaluation` and `examples/evaluate_synthetic.py` on constructed two-domain data:
each measure moves the right way (real images in place of generated ones reach the ceiling, shuffled labels drop
it, target images score as target, KID is near zero within a domain and larger across), the constant-level sets
reproduce the dataset's own images, and bad arguments fail before any work.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn as nn

from diffusers_uncertainty import build_tiny_pipeline
from diffusers_uncertainty.segmentation import create_segmentation_model
from diffusers_uncertainty.synthetic_evaluation import (
    DomainClassifier,
    autoencode_samples,
    domain_images,
    domain_predictions,
    evaluate_synthetic_dataset,
    generate_level_sets,
    kernel_inception_distance,
    read_generation_settings,
    segment_samples,
    synthetic_evaluation_table,
    train_domain_classifier,
)
from example_scripts import load_example


IGNORE_INDEX = 255
PROTOTYPES = torch.tensor([[20, 20, 20], [200, 30, 30], [30, 200, 30]], dtype=torch.float32) / 255


def scene(rng, dusk, height=32, width=40):
    """Dark background (0), a red box (1) and a green box (2); `dusk`: darker, low-contrast and noisy."""
    image = np.full((height, width, 3), 20, np.float64)
    label = np.zeros((height, width), np.uint8)
    for cls in (1, 2):
        h, w = rng.integers(8, 16, size=2)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        image[y : y + h, x : x + w] = PROTOTYPES[cls].numpy() * 255
        label[y : y + h, x : x + w] = cls
    label[0, :3] = IGNORE_INDEX
    if dusk:
        image = image * 0.45 + rng.normal(0, 12, size=image.shape)
    return PIL.Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8)), label


def samples(n, seed, dusk):
    rng = np.random.default_rng(seed)
    out = []
    for index in range(n):
        image, label = scene(rng, dusk)
        out.append({"image": image, "label": label.astype(np.int64), "name": f"{index:03d}"})
    return out


def write_folder(root, items, labels=True):
    (root / "images").mkdir(parents=True)
    if labels:
        (root / "labels").mkdir()
    for item in items:
        item["image"].save(root / "images" / f"{item['name']}.png")
        if labels:
            PIL.Image.fromarray(item["label"].astype(np.uint8)).save(root / "labels" / f"{item['name']}.png")
    return root


def save_dataset(path, items):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    rows = {"image": [i["image"] for i in items], "label": [PIL.Image.fromarray(i["label"].astype(np.uint8)) for i in items]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return path


class ColourSegmenter(nn.Module):
    """Logit of class c = -k * squared distance of the pixel's colour to the class colour: right and confident on
    the clean source scenes, less so on the dark, noisy target ones."""

    output_stride = 1

    def __init__(self, sharpness=10.0):
        super().__init__()
        self.prototypes = nn.Parameter(PROTOTYPES.clone(), requires_grad=False)
        self.sharpness = sharpness

    def forward(self, pixel_values):
        distance = ((pixel_values[:, None] - self.prototypes[None, :, :, None, None]) ** 2).sum(2)
        return -self.sharpness * distance


@pytest.fixture(scope="module")
def domains():
    return {
        "source_train": samples(16, 0, dusk=False), "target_train": samples(16, 1, dusk=True),
        "source_val": samples(8, 2, dusk=False), "target_val": samples(8, 3, dusk=True),
    }


@pytest.fixture(scope="module")
def classifier(domains):
    source = domain_images([s["image"] for s in domains["source_train"]], 32)
    target = domain_images([s["image"] for s in domains["target_train"]], 32)
    return train_domain_classifier(source, target, num_steps=60, batch_size=16, seed=0)


def test_real_images_in_place_of_generated_reach_the_ceiling_and_shuffled_labels_drop_it(domains):
    segmenter = ColourSegmenter()
    real = domains["source_val"]
    ceiling = segment_samples(segmenter, real, 32, 3, IGNORE_INDEX)
    assert ceiling["mIoU"] > 0.95
    # "Generated" images that are exactly the real images of their labels: the very same numbers.
    replaced = [{"image": s["image"].copy(), "label": s["label"].copy(), "name": f"gen{i}"} for i, s in enumerate(real)]
    assert segment_samples(segmenter, replaced, 32, 3, IGNORE_INDEX) == {**ceiling}
    # Labels moved to other images: the images no longer follow them.
    shuffled = [{**s, "label": real[(i + 1) % len(real)]["label"]} for i, s in enumerate(real)]
    assert segment_samples(segmenter, shuffled, 32, 3, IGNORE_INDEX)["mIoU"] < ceiling["mIoU"] - 0.3


def test_source_segmenter_is_more_uncertain_on_target_images(domains):
    segmenter = ColourSegmenter()
    source = segment_samples(segmenter, domains["source_val"], 32, 3, IGNORE_INDEX)
    target = segment_samples(segmenter, domains["target_val"], 32, 3, IGNORE_INDEX)
    assert target["mean_uncertainty"] > 1.5 * source["mean_uncertainty"]
    assert target["mIoU"] < source["mIoU"]


def test_domain_classifier_scores_target_as_target_and_source_as_source(domains, classifier):
    source, _ = domain_predictions(classifier, domain_images([s["image"] for s in domains["source_val"]], 32))
    target, _ = domain_predictions(classifier, domain_images([s["image"] for s in domains["target_val"]], 32))
    assert (target > 0.5).all() and (source <= 0.5).all()


def test_domain_classifier_is_reproducible_and_round_trips(domains, classifier, tmp_path):
    source = domain_images([s["image"] for s in domains["source_train"]], 32)
    target = domain_images([s["image"] for s in domains["target_train"]], 32)
    again = train_domain_classifier(source, target, num_steps=60, batch_size=16, seed=0)
    for a, b in zip(classifier.parameters(), again.parameters()):
        assert torch.equal(a, b)
    classifier.save_pretrained(tmp_path / "classifier")
    loaded = DomainClassifier.from_pretrained(tmp_path / "classifier")
    assert torch.equal(loaded(source), classifier(source))


def test_kid_is_near_zero_within_a_domain_and_larger_across(domains, classifier):
    def features(name):
        return domain_predictions(classifier, domain_images([s["image"] for s in domains[name]], 32))[1]

    source_a, source_b, target = features("source_train"), features("source_val"), features("target_val")
    within = kernel_inception_distance(source_a, source_b, subsets=50, subset_size=8)
    across = kernel_inception_distance(source_a, target, subsets=50, subset_size=8)
    assert across["mean"] > 0 and abs(within["mean"]) < 0.1 * across["mean"]
    assert within["subset_size"] == 8
    # With subsets of the whole sets every subset is the whole set: exactly torchmetrics' polynomial MMD.
    from torchmetrics.image.kid import poly_mmd

    whole = kernel_inception_distance(source_b, target, subsets=3, subset_size=100)
    assert whole["subset_size"] == 8
    assert whole["mean"] == pytest.approx(float(poly_mmd(source_b.double(), target.double())), rel=1e-9)
    with pytest.raises(ValueError, match="KID needs at least 2 images in each set, but got 1 and 8"):
        kernel_inception_distance(source_b[:1], target)


@pytest.fixture(scope="module")
def workspace(domains, tmp_path_factory):
    """Real folders, a saved tiny segmenter, and a dataset generated by generate_synthetic_dataset.py at a constant
    level 0.5 with a tiny pipeline (3 classes)."""
    root = tmp_path_factory.mktemp("synthetic_evaluation")
    folders = {  # the workflow's layout: data/{source,target}/{train,val}
        name: write_folder(root / "data" / name.replace("_", "/"), items, labels="val" in name)
        for name, items in domains.items()
    }
    segmenter = create_segmentation_model(
        "unet", "tu-mobilenetv3_small_050", num_classes=3, ignore_index=IGNORE_INDEX, encoder_depth=3,
        decoder_channels=(16, 8, 8),
    )
    segmenter.save_pretrained(root / "segmenter")
    build_tiny_pipeline(root / "pipeline", num_classes=3, ignore_index=IGNORE_INDEX)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate = load_example("generate_synthetic_dataset")
        generate.main(generate.parse_args([
            "--pretrained_model_name_or_path", str(root / "pipeline"), "--label_dir", str(folders["source_val"]),
            "--uncertainty_level", "0.5", "--num_inference_steps", "2", "--guidance_scale", "1.0",
            "--resolution", "16", "--batch_size", "2", "--max_labels", "3", "--output_dir", str(root / "synthetic"),
        ]))
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "segmenter": root / "segmenter", "synthetic": root / "synthetic", **folders}


def base_args(workspace, output_dir, *extra):
    return [str(arg) for arg in (
        "--synthetic_data_dir", workspace["synthetic"], "--source_segmenter", workspace["segmenter"],
        "--source_train_dir", workspace["source_train"], "--target_train_dir", workspace["target_train"],
        "--source_eval_dir", workspace["source_val"], "--target_eval_dir", workspace["target_val"],
        "--resolution", 32, "--classifier_resolution", 32, "--classifier_steps", 4, "--classifier_batch_size", 4,
        "--kid_subsets", 5, "--batch_size", 2, "--output_dir", output_dir, *extra,
    )]


def test_constant_level_sets_reproduce_the_datasets_own_images(workspace):
    from diffusers_uncertainty import StableDiffusionDualControlPipeline

    pipeline = StableDiffusionDualControlPipeline.from_pretrained(workspace["root"] / "pipeline")
    pipeline.set_progress_bar_config(disable=True)
    rows = datasets.load_from_disk(str(workspace["synthetic"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sets = generate_level_sets(pipeline, rows, read_generation_settings(workspace["synthetic"]), [0.5, 1.0], 3, 2)
    finally:
        torch.set_num_threads(threads)
    assert list(sets) == [0.5, 1.0] and all(len(s) == 3 for s in sets.values())
    for row, same, other in zip(rows, sets[0.5], sets[1.0]):  # one sample per label map: the dataset's order
        assert np.array_equal(np.asarray(same["image"]), np.asarray(row["image"]))
        assert np.array_equal(same["label"], np.asarray(row["label"]))
        assert np.array_equal(other["label"], np.asarray(row["label"]))


def test_script_with_real_images_as_the_dataset_reaches_the_ceiling(workspace, domains, tmp_path, capsys):
    """The workflow's photometric column reads n/a without one; the dataset row equals the real-target row."""
    real_as_generated = save_dataset(tmp_path / "real_as_generated", domains["target_val"])
    script = load_example("evaluate_synthetic")
    args = base_args(workspace, tmp_path / "out", "--uncertainty_levels")
    args[args.index("--synthetic_data_dir") + 1] = str(real_as_generated)
    script.main(script.parse_args(args))
    results = json.loads((tmp_path / "out" / "synthetic_evaluation.json").read_text())
    sets = {entry["name"]: entry for entry in results["sets"]}
    assert list(sets) == ["real_source", "real_target", "dataset"]
    assert sets["dataset"]["fidelity"] == sets["real_target"]["fidelity"]
    assert sets["dataset"]["mean_uncertainty"] == sets["real_target"]["mean_uncertainty"]
    assert sets["dataset"]["target_share"] == sets["real_target"]["target_share"]
    assert sets["real_target"]["kid_to_target"] is None and sets["real_source"]["kid_to_source"] is None
    assert (tmp_path / "out" / "domain_classifier" / "config.json").is_file()
    printed = capsys.readouterr().out
    assert synthetic_evaluation_table(results) in printed
    assert "n/a (no photometric variant)" in printed
    assert "| generated dataset (its own maps) | 8 |" in printed


def test_script_generates_the_levels_and_uses_the_target_segmenter(workspace, tmp_path):
    script = load_example("evaluate_synthetic")
    args = base_args(workspace, tmp_path / "out", "--target_segmenter", workspace["segmenter"],
                     "--uncertainty_levels", "0", "1", "--samples_per_level", "2")
    results = evaluate_synthetic_dataset(**{
        **{key: getattr(script.parse_args(args), key) for key in (
            "synthetic_data_dir", "source_segmenter", "target_segmenter", "source_train_dir", "target_train_dir",
            "source_eval_dir", "target_eval_dir", "output_dir", "uncertainty_levels", "samples_per_level",
            "resolution", "classifier_resolution", "classifier_steps", "classifier_batch_size", "kid_subsets",
            "batch_size")},
        "echo": lambda line: None,
    })
    names = [entry["name"] for entry in results["sets"]]
    assert names == ["real_source", "real_target", "level:0.0", "level:1.0", "autoencoded:real_source",
                     "autoencoded:real_target", "dataset"]
    counts = {entry["name"]: entry["num_images"] for entry in results["sets"]}
    assert counts["level:0.0"] == counts["level:1.0"] == 2 and counts["dataset"] == 3
    assert counts["autoencoded:real_target"] == counts["real_target"]  # every held-out image, through the VAE
    for entry in results["sets"]:  # the same segmenter twice: the two fidelity columns agree
        assert entry["fidelity"]["source_only"] == entry["fidelity"]["target_like"]
    table = synthetic_evaluation_table(results)
    assert "| generated, u = 0 | 2 |" in table and "| generated, u = 1 | 2 |" in table
    assert "| generated dataset (constant level 0.5) | 3 |" in table
    assert f"| real target (held-out, through the base's autoencoder) | {counts['real_target']} |" in table


class _IdentityAutoencoder:
    """Latents are the pixels: what comes out of `autoencode_samples` is then the resized real image itself."""

    device, dtype = torch.device("cpu"), torch.float32

    def encode(self, pixels):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: pixels))

    def decode(self, latents):
        return SimpleNamespace(sample=latents)


def test_autoencoded_samples_are_labeled_like_generated_ones_and_bounded_by_the_autoencoder(domains):
    pipe = build_tiny_pipeline(num_classes=3, ignore_index=IGNORE_INDEX)
    pipe.set_progress_bar_config(disable=True)
    real = domains["target_val"][:3]  # 32 x 40 images and label maps
    out = autoencode_samples(pipe, real, 16, 24, 3, IGNORE_INDEX, batch_size=2)
    assert [sample["image"].size for sample in out] == [(24, 16)] * 3
    # Each label map is resized as the pipeline resizes it for a generated image of that size.
    generated = pipe("", semantic_map=[torch.from_numpy(s["label"]) for s in real], uncertainty_map=0.5,
                     num_inference_steps=1, height=16, width=24, output_type="np")
    for sample, label in zip(out, generated.semantic_maps):
        assert np.array_equal(sample["label"], np.asarray(label))
    # The latent distribution's mode, not a draw: the same images every time.
    again = autoencode_samples(pipe, real, 16, 24, 3, IGNORE_INDEX, batch_size=3)
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(out, again))
    # A lossless autoencoder gives back the resized real image; a real one can only lose from it.
    pipe.vae = _IdentityAutoencoder()
    lossless = autoencode_samples(pipe, real, 32, 40, 3, IGNORE_INDEX)
    for sample, original in zip(lossless, real):
        assert np.abs(np.asarray(sample["image"], np.int16) - np.asarray(original["image"], np.int16)).max() <= 1
        assert np.array_equal(sample["label"], original["label"])


@pytest.mark.parametrize(
    "change, message",
    [
        (("--uncertainty_levels", "0", "1.5"), r"`--uncertainty_levels` must lie in \[0, 1\], but got \[0.0, 1.5\]"),
        (("--uncertainty_levels", "0.5", "0.5"), r"must not repeat a level, but got \[0.5, 0.5\]"),
        (("--samples_per_level", "0"), "`--samples_per_level` must be at least 1, but got 0"),
        (("--classifier_batch_size", "3"), "`--classifier_batch_size` must be even and at least 2, but got 3"),
        (("--kid_subset_size", "1"), "`--kid_subset_size` must be at least 2, but got 1"),
        (("--target_segmenter", "/nonexistent/photometric"), "`--target_segmenter` must be a folder, but '/nonexistent/photometric'"),
    ],
)
def test_bad_arguments_fail_before_any_work(workspace, tmp_path, change, message):
    script = load_example("evaluate_synthetic")
    with pytest.raises(ValueError, match=message):
        script.parse_args(base_args(workspace, tmp_path / "out", *change))
    assert not (tmp_path / "out").exists()


def test_levels_need_the_generation_settings(workspace, domains, tmp_path):
    script = load_example("evaluate_synthetic")
    plain = save_dataset(tmp_path / "plain", domains["target_val"])
    args = base_args(workspace, tmp_path / "out")
    args[args.index("--synthetic_data_dir") + 1] = str(plain)
    with pytest.raises(ValueError, match="has none; pass no levels to evaluate the dataset alone"):
        script.parse_args(args)
    assert not (tmp_path / "out").exists()


def test_generate_with_evaluate_prints_the_table_at_the_end(workspace, tmp_path, capsys):
    generate = load_example("generate_synthetic_dataset")
    output_dir = tmp_path / "synthetic"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate.main(generate.parse_args([
            "--pretrained_model_name_or_path", str(workspace["root"] / "pipeline"),
            "--label_dir", str(workspace["source_val"]), "--uncertainty_level", "0.5", "--num_inference_steps", "2",
            "--guidance_scale", "1.0", "--resolution", "16", "--batch_size", "2", "--max_labels", "3",
            "--output_dir", str(output_dir), "--evaluate", "--evaluate_source_segmenter", str(workspace["segmenter"]),
            "--evaluate_data_root", str(workspace["root"] / "data"), "--evaluate_resolution", "32",
        ]))
    finally:
        torch.set_num_threads(threads)
    results = json.loads((output_dir / "evaluation" / "synthetic_evaluation.json").read_text())
    assert [entry["name"] for entry in results["sets"]] == [
        "real_source", "real_target", "level:0.0", "level:0.5", "level:1.0", "autoencoded:real_source",
        "autoencoded:real_target", "dataset"
    ]
    # The u = 0.5 row regenerates the dataset's own images (a constant 0.5 run): the same numbers.
    sets = {entry["name"]: entry for entry in results["sets"]}
    assert sets["level:0.5"]["fidelity"] == sets["dataset"]["fidelity"]
    assert synthetic_evaluation_table(results) in capsys.readouterr().out
    assert len(datasets.load_from_disk(str(output_dir))) == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--evaluate"], "`--evaluate` needs `--evaluate_source_segmenter`, but it was not given."),
        (["--evaluate_data_root", "data"], "apply to `--evaluate`; pass it to use them."),
        (["--evaluate", "--evaluate_source_segmenter", "SEGMENTER", "--evaluate_data_root", "ROOT/source"],
         r"`--evaluate_data_root` must hold the folders source/train, source/val, target/train and target/val"),
    ],
)
def test_generate_evaluate_flags_fail_before_any_work(workspace, tmp_path, extra, message):
    generate = load_example("generate_synthetic_dataset")
    extra = [arg.replace("SEGMENTER", str(workspace["segmenter"])).replace("ROOT", str(workspace["root"] / "data"))
             for arg in extra]
    with pytest.raises(ValueError, match=message):
        generate.parse_args([
            "--pretrained_model_name_or_path", str(workspace["root"] / "pipeline"), "--label_dir",
            str(workspace["source_val"]), "--uncertainty_level", "0.5", "--output_dir", str(tmp_path / "out"), *extra,
        ])
    assert not (tmp_path / "out").exists()


def test_workflow_plans_the_stage_after_every_segmenter_with_the_photometric_one(tmp_path):
    from diffusers_uncertainty.workflow import load_config, plan

    config = load_config(None, smoke=True, overrides={"output_dir": str(tmp_path)})
    stages = plan(config)
    names = [stage.name for stage in stages]
    index = names.index("synthetic_evaluation")
    assert names[index + 1:] == ["report"]
    assert all(names.index(name) < index for name in names if name.startswith("segmenter"))
    args = stages[index].args
    assert args["target_segmenter"] == tmp_path / "segmenters" / "photometric"
    assert args["synthetic_data_dir"] == tmp_path / "synthetic"
    assert args["source_eval_dir"] == tmp_path / "data" / "source" / "val"
    assert args["uncertainty_levels"] == [0.0, 0.5, 1.0] and args["samples_per_level"] == 2  # smoke applied
    assert args["uncertainty_estimator"] == "entropy"

    assert stages[index].output == args["output_dir"] == tmp_path / "synthetic_evaluation"

    config["variants"] = {"source_only": {}, "synthetic": {"synthetic": True}}
    stages = plan(config)
    args = next(stage for stage in stages if stage.name == "synthetic_evaluation").args
    assert args["target_segmenter"] is None  # no photometric variant: the table says so
    # A variant named `synthetic` (as in the CamVid config) keeps its own evaluation folders.
    assert len({stage.output for stage in stages}) == len(stages)


def test_dial_benchmark_pairs_every_setting_with_the_datasets_own(workspace, tmp_path):
    """benchmarks/bench_uncertainty_dial.py on a run laid out as the workflow lays it out: a setting equal to the
    dataset's own gives the reference row's numbers exactly; another moves the images."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_uncertainty_dial

    run = tmp_path / "run"
    (run / "segmenters").mkdir(parents=True)
    (run / "synthetic").symlink_to(workspace["synthetic"], target_is_directory=True)
    for name in ("photometric", "source_only"):
        (run / "segmenters" / name).symlink_to(workspace["segmenter"], target_is_directory=True)
    script = load_example("evaluate_synthetic")
    script.main(script.parse_args(base_args(workspace, run / "synthetic_evaluation", "--uncertainty_levels")))
    with pytest.raises(ValueError, match=r"`--settings` takes name=value pairs with a name among .*, but got 'strength=2'"):
        bench_uncertainty_dial.parse_args(["--run_dir", str(run), "--output_dir", str(tmp_path), "--settings", "strength=2"])
    with pytest.raises(ValueError, match=r"`--run_dir` .* is not a finished workflow run with a synthetic evaluation"):
        bench_uncertainty_dial.parse_args(["--run_dir", str(tmp_path), "--output_dir", str(tmp_path)])
    args = bench_uncertainty_dial.parse_args([
        "--run_dir", str(run), "--level", "0.5", "--samples", "3", "--batch_size", "2", "--output_dir", str(tmp_path / "dial"),
        "--settings", "uncertainty_conditioning_scale=1", "uncertainty_guidance_scale=20,guidance_scale=1",
    ])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = bench_uncertainty_dial.main(args)
    finally:
        torch.set_num_threads(threads)
    assert [row["setting"] for row in rows] == [{}, {"uncertainty_conditioning_scale": 1.0},
                                                {"uncertainty_guidance_scale": 20.0, "guidance_scale": 1.0}]
    keys = ("target_share", "mean_target_probability", "fidelity")
    assert {key: rows[1][key] for key in keys} == {key: rows[0][key] for key in keys}
    assert rows[2]["mean_target_probability"] != rows[0]["mean_target_probability"]
    saved = json.loads((tmp_path / "dial" / "dial.json").read_text())
    assert saved["rows"] == rows and saved["level"] == 0.5
    assert "| uncertainty_guidance_scale 20, guidance_scale 1 |" in (tmp_path / "dial" / "dial.md").read_text()
