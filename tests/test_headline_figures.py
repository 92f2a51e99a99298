"""benchmarks/headline_figures.py and the synthetic-count sweep of benchmarks/bench_headline.py, on constructed work
folders (tiny pipeline, CPU, no network)."""

import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_headline  # noqa: E402
import headline_figures  # noqa: E402
from diffusers_uncertainty.workflow import MARKER, plan  # noqa: E402


CLASSES = ["road", "sky", "car"]


def metrics(miou, ious):
    return {"mIoU": miou, "pixel_accuracy": miou + 0.1,
            "per_class": [{"class": name, "IoU": iou} for name, iou in zip(CLASSES, ious)]}


def run(miou, ious):
    return {"target": metrics(miou, ious), "source": metrics(miou + 0.2, ious)}


def constructed_results(config=None):
    """Two seeds; `car` absent from seed 1's target/val (IoU None); the sweep at 0.5x and 1x of 10 images."""
    table = {
        "source_only": {0: run(0.30, [0.5, 0.3, 0.1]), 1: run(0.32, [0.6, 0.3, None])},
        "photometric": {0: run(0.35, [0.55, 0.35, 0.15]), 1: run(0.37, [0.65, 0.3, None])},
        "synthetic": {0: run(0.36, [0.6, 0.35, 0.1]), 1: run(0.38, [0.6, 0.4, None])},
        "synthetic_photometric": {0: run(0.40, [0.7, 0.4, 0.2]), 1: run(0.44, [0.7, 0.5, None])},
        # A sweep row better than every other: never the "best uncertainty-aware row".
        "synthetic_photometric (0.5x)": {0: run(0.50, [0.7, 0.4, 0.2]), 1: run(0.54, [0.7, 0.5, None])},
        "synthetic_photometric (1x)": {0: run(0.42, [0.7, 0.4, 0.2])},
    }
    results = {"seeds": [0, 1], "table": table,
               "synthetic_counts": {"recipe": "synthetic_photometric", "num_source_train": 10,
                                    "generated_samples_per_seed": 20,
                                    "rows": {"synthetic_photometric (0.5x)": {"multiple": 0.5, "samples": 5},
                                             "synthetic_photometric (1x)": {"multiple": 1.0, "samples": 10},
                                             "synthetic_photometric (2x)": {"multiple": 2.0, "samples": 20}}}}
    if config is not None:
        results["config"] = config
    return results


def write_results(work, results):
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(results))  # seed keys become strings, as bench_headline writes them


# --------------------------------------------------------------------------------------------------- plots
def test_plots_write_pngs_of_the_expected_size_and_their_numbers(tmp_path, capsys):
    work = tmp_path / "work"
    write_results(work, constructed_results())
    written = headline_figures.main(headline_figures.parse_args(["--work_dir", str(work)]))
    assert "Skipped grid.png: " in capsys.readouterr().out  # no config, no seed folders: the plots alone
    figures = work / "figures"
    assert sorted(written) == ["figures.md", "per_class_iou.png", "synthetic_count.png"]
    assert Image.open(figures / "per_class_iou.png").size == (1000, 450)
    assert Image.open(figures / "synthetic_count.png").size == (700, 450)

    per_class = json.loads((figures / "per_class_iou.json").read_text())
    assert per_class["rows"] == ["source_only", "photometric", "synthetic_photometric"]  # not the sweep row
    assert per_class["classes"] == CLASSES
    road, sky, car = per_class["values"]["synthetic_photometric"]
    assert road["mean"] == pytest.approx(70.0) and sky["mean"] == pytest.approx(45.0)
    assert sky["sd"] == pytest.approx(statistics.stdev([40.0, 50.0])) and sky["n"] == 2
    assert car["mean"] == pytest.approx(20.0) and car["n"] == 1  # the seed without the class is left out
    assert per_class["values"]["source_only"][0]["mean"] == pytest.approx(55.0)
    with_fda = constructed_results()
    with_fda["table"]["fda"] = {0: run(0.36, [0.6, 0.3, 0.2])}  # the baseline a user tries first: shown where it ran
    assert headline_figures.per_class_summary(with_fda)[0]["rows"] == ["source_only", "photometric", "fda",
                                                                       "synthetic_photometric"]

    sweep = json.loads((figures / "synthetic_count.json").read_text())
    # The 2x sweep row did not run; the recipe's own row reads all 20 generated samples: the point at 2x.
    assert [(p["row"], p["multiple"], p["samples"], p["n"]) for p in sweep["points"]] == [
        ("synthetic_photometric (0.5x)", 0.5, 5, 2), ("synthetic_photometric (1x)", 1.0, 10, 1),
        ("synthetic_photometric", 2.0, 20, 2)]
    assert sweep["points"][0]["mean"] == pytest.approx(52.0) and sweep["points"][0]["sd"] == pytest.approx(
        statistics.stdev([50.0, 54.0]))
    assert sweep["points"][2]["mean"] == pytest.approx(42.0)
    assert sorted(sweep["references"]) == ["photometric", "source_only"]
    assert sweep["references"]["photometric"]["mean"] == pytest.approx(36.0)
    with_2x = constructed_results()
    with_2x["table"]["synthetic_photometric (2x)"] = {0: run(0.41, [0.7, 0.4, 0.2])}  # the same count as the full row
    summary = headline_figures.synthetic_count_summary(with_2x)[0]
    assert [p["row"] for p in summary["points"]][-1] == "synthetic_photometric (2x)"
    assert summary["references"]["synthetic_photometric"]["mean"] == pytest.approx(42.0)
    assert summary["references"]["synthetic_photometric"]["samples"] == 20
    markdown = (figures / "figures.md").read_text()
    assert "| 0.5x | 5 | 2 | 52.0 ± 2.8 | 50.0, 54.0 |" in markdown
    assert "| car | 10.0 | 15.0 | 20.0 |" in markdown  # one seed each: no spread claimed


def test_without_a_sweep_the_count_plot_is_skipped(tmp_path, capsys):
    results = constructed_results()
    del results["synthetic_counts"]
    write_results(tmp_path, results)
    written = headline_figures.main(headline_figures.parse_args(["--work_dir", str(tmp_path), "--output_dir",
                                                                 str(tmp_path / "out")]))
    assert sorted(written) == ["figures.md", "per_class_iou.png"]
    assert "Skipped synthetic_count.png: results.json has no synthetic-count sweep" in capsys.readouterr().out
    assert not (tmp_path / "out" / "synthetic_count.png").exists()


# ------------------------------------------------------------------------------------------------- nearest
def test_an_exact_copy_of_a_real_image_is_its_own_nearest_neighbour():
    rng = np.random.default_rng(0)
    reals = [Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in range(5)]
    index, distance = headline_figures.nearest_image(reals[3].copy(), reals)
    assert index == 3 and distance == pytest.approx(0.0)
    # A brighter copy of image 1 at another size and aspect ratio still finds image 1.
    query = Image.fromarray(np.clip(np.asarray(reals[1], np.int16) + 10, 0, 255).astype(np.uint8)).resize((64, 64))
    assert headline_figures.nearest_image(query, reals)[0] == 1
    assert headline_figures.thumbnail_size(240, 180) == (43, 32) and headline_figures.thumbnail_size(64, 64) == (32, 32)
    with pytest.raises(ValueError, match="`candidates` must hold at least one image, got none"):
        headline_figures.nearest_image(reals[0], [])


# ---------------------------------------------------------------------------------------------------- grid
def tiny_work_folder(root, seed=0):
    """A work folder of one seed with a tiny base + control, a generated dataset's settings and toy data."""
    from diffusers_uncertainty import build_tiny_pipeline

    out = root / "work" / f"seed_{seed}"
    pipeline = build_tiny_pipeline(out / "base", num_classes=4, ignore_index=255)
    pipeline.controlnet.save_pretrained(out / "control")
    settings = {"prompt": "a scan", "num_inference_steps": 2, "guidance_scale": 1.0, "semantic_conditioning_scale": 1.0,
                "uncertainty_conditioning_scale": 1.0, "height": 16, "width": 16, "revision": None, "variant": None,
                "pretrained_model_name_or_path": "/elsewhere/base", "controlnet_model_name_or_path": "/elsewhere/c"}
    (out / "synthetic").mkdir()
    (out / "synthetic" / "generation_config.json").write_text(json.dumps({"settings": settings}))
    for stage in ("base", "control", "synthetic"):
        (out / stage / MARKER).write_text("{}")
    data = root / "data"
    rng = np.random.default_rng(1)
    for split, count in (("source/train", 4), ("source/val", 3), ("target/train", 3)):
        (data / split / "images").mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)).save(data / split / "images" / f"{index}.png")
            if split == "source/val":
                (data / split / "labels").mkdir(exist_ok=True)
                label = rng.integers(0, 4, (12, 20)).astype(np.uint8)
                label[0, :2] = 255
                Image.fromarray(label).save(data / split / "labels" / f"{index}.png")
    (data / "target" / "val").mkdir(parents=True)
    config = {"output_dir": str(out), "data": {"root": str(data), "num_classes": 4, "ignore_index": 255}}
    write_results(root / "work", constructed_results(config))
    return root / "work"


def test_grid_has_a_row_per_label_map_and_six_titled_columns(tmp_path):
    work = tiny_work_folder(tmp_path)
    args = headline_figures.parse_args(["--work_dir", str(work), "--rows", "2", "--tile", "32", "--device", "cpu"])
    written = headline_figures.main(args)
    assert sorted(written) == ["figures.md", "grid.png", "per_class_iou.png", "synthetic_count.png"]
    grid = Image.open(work / "figures" / "grid.png")
    band = headline_figures._title_band(["t"] * 6, 32)  # 16-pixel images enlarged x2 to reach --tile 32
    assert grid.size == (6 * 32, band.height + 2 * 32)
    first_row = np.asarray(grid.convert("RGB"))[band.height : band.height + 32].reshape(32, 6, 32, 3)
    assert not np.array_equal(first_row[:, 1], first_row[:, 3])  # u = 0 and u = 1 differ
    record = json.loads((work / "figures" / "grid.json").read_text())
    assert record["columns"] == ["label map", "u = 0", "u = 0.5", "u = 1", "nearest source/train",
                                 "nearest target/train"]
    assert record["base"] == str(work / "seed_0" / "base")  # the seed's folders, not the paths in the settings
    assert [Path(row["label_map"]).name for row in record["rows"]] == ["0.png", "2.png"]  # evenly spaced
    for row in record["rows"]:
        assert Path(row["nearest_source"]["image"]).parent == tmp_path / "data" / "source" / "train" / "images"
        assert Path(row["nearest_target"]["image"]).parent == tmp_path / "data" / "target" / "train" / "images"
        assert row["nearest_source"]["distance"] >= 0
    assert "L2 distance" in record["nearest_metric"]
    # The row's three levels start from the same noise: with the control's uncertainty scale at 0 they are equal.
    from diffusers_uncertainty.synthetic_evaluation import load_generation_pipeline

    settings = json.loads((work / "seed_0" / "synthetic" / "generation_config.json").read_text())["settings"]
    settings = {**settings, "uncertainty_conditioning_scale": 0.0, "pretrained_model_name_or_path": str(work / "seed_0" / "base"),
                "controlnet_model_name_or_path": str(work / "seed_0" / "control")}
    pipeline = load_generation_pipeline(settings, "cpu")
    label = np.zeros((16, 16), np.int64)
    image, _ = headline_figures.headline_grid(pipeline, [label], [Image.new("RGB", (8, 8))], [Image.new("RGB", (8, 8))],
                                              settings, 4, 255, [7], tile=16)
    tiles = np.asarray(image)[-16:].reshape(16, 6, 16, 3).transpose(1, 0, 2, 3)
    assert np.array_equal(tiles[1], tiles[2]) and np.array_equal(tiles[1], tiles[3])


# ---------------------------------------------------------------------------------------------------- errors
def test_errors_name_what_is_missing(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"`--work_dir`: expected .*results\.json \(written by "
                                         r"benchmarks/bench_headline\.py\), got no such file"):
        headline_figures.main(headline_figures.parse_args(["--work_dir", str(tmp_path)]))
    # Nothing drawable: every figure's reason, before any work.
    write_results(tmp_path, {"seeds": [0], "table": {"source_only": {0: run(0.3, [0.5, 0.3, 0.1])}},
                             "config": {"data": {"root": None, "num_classes": 3}}})
    with pytest.raises(ValueError, match=r"no figure can be drawn: grid\.png: expected finished base, control, "
                                         r"synthetic stage\(s\) in .*seed_0.*per_class_iou\.png: expected finished "
                                         r"evaluations of photometric, an uncertainty-aware row.*synthetic_count\.png"):
        headline_figures.main(headline_figures.parse_args(["--work_dir", str(tmp_path)]))
    assert not (tmp_path / "figures").exists()
    write_results(tmp_path, constructed_results())
    with pytest.raises(ValueError, match=r"`--seed` must be one of the experiment's seeds \[0, 1\], got 5"):
        headline_figures.main(headline_figures.parse_args(["--work_dir", str(tmp_path), "--seed", "5"]))
    with pytest.raises(SystemExit):
        headline_figures.parse_args(["--work_dir", str(tmp_path), "--rows", "0"])
    assert "--rows must be at least 1, got 0" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ImportError, match=r"need matplotlib, which is not installed: run `pip install \"\.\[figures\]\"`"):
        headline_figures.main(headline_figures.parse_args(["--work_dir", str(tmp_path)]))
    assert not (tmp_path / "figures").exists()


# ------------------------------------------------------------------------------------ the sweep (bench_headline)
def test_sweep_rows_are_named_and_counted(tmp_path, capsys):
    assert bench_headline.sweep_variant(0.5) == "synthetic_photometric_0.5x"
    assert bench_headline.sweep_row(2.0) == "synthetic_photometric (2x)"
    assert bench_headline.is_sweep_row("synthetic_photometric (1.5x)")
    assert not bench_headline.is_sweep_row("synthetic_photometric (round 2)")
    assert bench_headline.sweep_samples(0.5, 305) == 153  # 152.5, rounded half up
    assert bench_headline.sweep_samples(2, 305) == 610 and bench_headline.sweep_samples(0.5, 8) == 4
    with pytest.raises(ValueError, match=r"0\.01 x 10 source/train images rounds to 0 synthetic samples"):
        bench_headline.sweep_samples(0.01, 10)
    variants = bench_headline.sweep_variants([0.5, 1], 8)
    assert variants == {
        "synthetic_photometric_0.5x": {"synthetic": True, "synthetic_ratio": 0.5, "photometric_augmentation": True,
                                       "max_synthetic_samples": 4},
        "synthetic_photometric_1x": {"synthetic": True, "synthetic_ratio": 0.5, "photometric_augmentation": True,
                                     "max_synthetic_samples": 8},
    }
    # Enough samples per label map for the largest row, never fewer than the config's; max_labels is made up for.
    assert bench_headline.samples_per_label_for(610, 305, {"samples_per_label": 2}) == 2
    assert bench_headline.samples_per_label_for(610, 305, {"samples_per_label": 1, "max_labels": 40}) == 16
    assert bench_headline.samples_per_label_for(4, 8, {"samples_per_label": 3}) == 3
    with pytest.raises(ValueError, match=r"`generate.args.max_shards` is 1: the generate stage would stop before the "
                                         r"610 samples"):
        bench_headline.samples_per_label_for(610, 305, {"max_shards": 1})

    args = bench_headline.parse_args(["--work_dir", str(tmp_path), "--scale", "smoke", "--synthetic_counts", "0.5", "1",
                                      "--refine_rounds", "1"])
    config = bench_headline.workflow_config(args, tmp_path / "seed_0", 0, {"refine_rounds": 1}, variants)
    stages = {stage.name: stage for stage in plan(config)}
    assert stages["segmenter:synthetic_photometric_0.5x"].args["max_synthetic_samples"] == 4
    assert stages["segmenter:synthetic_photometric_0.5x"].args["synthetic_data_dir"] == tmp_path / "seed_0" / "synthetic"
    assert "evaluate:synthetic_photometric_1x:target_val" in stages
    for bad, message in ((["0.5", "0"], "must be positive"), (["1", "1.0"], "must be distinct")):
        with pytest.raises(SystemExit):
            bench_headline.parse_args(["--work_dir", str(tmp_path), "--synthetic_counts", *bad])
        assert f"--synthetic_counts {message}" in capsys.readouterr().err

    # A dataset generated earlier with another samples_per_label stops the sweep, naming the folder.
    synthetic = tmp_path / "seed_0" / "synthetic"
    synthetic.mkdir(parents=True)
    (synthetic / "generation_config.json").write_text(json.dumps({"settings": {"samples_per_label": 1, "num_labels": 8}}))
    bench_headline.check_generated(synthetic, 2)  # unfinished: the generate stage will run
    (synthetic / MARKER).write_text("{}")
    bench_headline.check_generated(synthetic, 1)
    with pytest.raises(ValueError, match=rf"The generated dataset {synthetic} was made with samples_per_label=1 \(8 "
                                         rf"label maps\), but the synthetic-count sweep needs samples_per_label=2.*delete"):
        bench_headline.check_generated(synthetic, 2)


def test_results_keep_the_sweep_out_of_the_main_rows(tmp_path):
    results = constructed_results()
    table = results["table"]
    assert bench_headline.best_uncertainty_aware(table) == "synthetic_photometric"
    args = bench_headline.parse_args(["--work_dir", str(tmp_path), "--seeds", "0", "1", "--synthetic_counts", "0.5", "1",
                                      "--refine_rounds", "1", "--no_fda"])
    sweep = {"num_source_train": 10, "samples": {0.5: 5, 1.0: 10}, "samples_per_label": 2, "generated_samples": 20}
    text = bench_headline.summarize(args, table, sweep)
    main_table = text.split("Per-class")[0]
    assert "| synthetic_photometric | 2 | 42.0 ± 2.8 |" in main_table and "(0.5x)" not in main_table
    assert "best uncertainty-aware row (synthetic_photometric; ranked on the labeled-classes mean)" in text
    assert "| multiple | synthetic samples | n | target/val mIoU | source/val mIoU |" in text
    assert "| 0.5x | 5 | 2 | 52.0 ± 2.8 | 72.0 ± 2.8 |" in text and "| 1x | 10 | 1 | 42.0 | " in text
    assert "reads every generated sample: 20 per seed" in text


def test_the_labeled_classes_mean_counts_the_same_classes_for_every_row(tmp_path):
    def target(ious, pixels):
        return {"mIoU": 0.0, "pixel_accuracy": 0.5,
                "per_class": [{"class": c, "IoU": i, "pixels": p} for c, i, p in zip(CLASSES, ious, pixels)]}

    # `car` has no labeled pixel: one row predicts it somewhere (IoU 0), the other never (IoU None).
    predicts_car, never = target([0.6, 0.3, 0.0], [10, 5, 0]), target([0.6, 0.3, None], [10, 5, 0])
    assert bench_headline.labeled_classes_mean_iou(predicts_car) == pytest.approx(0.45)
    assert bench_headline.labeled_classes_mean_iou(never) == pytest.approx(0.45)
    assert bench_headline.labeled_classes_mean_iou(metrics(0.3, [0.5, 0.3, 0.1])) is None  # no pixel counts

    table = {"source_only": {0: {"target": predicts_car, "source": predicts_car}},
             "photometric": {0: {"target": never, "source": never}}}
    args = bench_headline.parse_args(["--work_dir", str(tmp_path), "--seeds", "0", "--no_fda", "--refine_rounds", "1"])
    text = bench_headline.summarize(args, table)
    assert "| source_only | 1 | 0.0 | 45.0 | 50.0 | 0.0 |" in text and "| photometric | 1 | 0.0 | 45.0 |" in text


def test_the_best_uncertainty_aware_row_is_ranked_on_the_labeled_classes(tmp_path):
    def target(ious, pixels):
        present = [i for i in ious if i is not None]
        return {"mIoU": sum(present) / len(present), "pixel_accuracy": 0.5,
                "per_class": [{"class": c, "IoU": i, "pixels": p} for c, i, p in zip(CLASSES, ious, pixels)]}

    # `car` has no labeled pixel. synthetic predicts it somewhere (mIoU (0.7 + 0.4 + 0) / 3 = 36.7, labeled classes
    # 55.0); synthetic_photometric never does (mIoU = labeled classes = 50.0): the plain mIoU would pick the latter.
    better, never = target([0.7, 0.4, 0.0], [10, 5, 0]), target([0.6, 0.4, None], [10, 5, 0])
    table = {"synthetic": {0: {"target": better, "source": better}},
             "synthetic_photometric": {0: {"target": never, "source": never}}}
    assert never["mIoU"] > better["mIoU"]
    assert bench_headline.best_uncertainty_aware(table) == "synthetic"
    # A run without pixel counts (metrics written before they were recorded): every row ranks on the plain mIoU.
    table["synthetic_photometric_flexseg"] = {0: run(0.45, [0.5, 0.4, 0.45])}
    assert bench_headline.best_uncertainty_aware(table) == "synthetic_photometric"


def test_the_best_row_is_held_against_the_goal_paired_by_seed(tmp_path):
    def target(miou, labeled):  # road and sky labeled in target/val, car not
        return {"mIoU": miou, "pixel_accuracy": 0.5,
                "per_class": [{"class": c, "IoU": i, "pixels": p} for c, i, p in zip(CLASSES, labeled, [10, 5, 0])]}

    def entry(labeled, source):
        return {"target": target(0.0, [*labeled, None]), "source": {"mIoU": source, "pixel_accuracy": 0.5}}

    table = {  # labeled-classes means: source_only 0.30 / 0.40, photometric 0.40 / 0.50, best 0.45 / 0.52
        "source_only": {0: entry([0.4, 0.2], 0.60), 1: entry([0.5, 0.3], 0.62)},
        "photometric": {0: entry([0.5, 0.3], 0.55), 1: entry([0.6, 0.4], 0.57)},
        "fda": {1: entry([0.7, 0.5], 0.58)},  # only seed 1 finished: compared on seed 1 alone
        "synthetic_fda_filtered_ratio25": {0: entry([0.5, 0.4], 0.56), 1: entry([0.6, 0.44], 0.58)},
    }
    assert bench_headline.best_uncertainty_aware(table) == "synthetic_fda_filtered_ratio25"
    lines = bench_headline.goal_lines(table, "synthetic_fda_filtered_ratio25")
    text = "\n".join(lines)
    assert "| target/val: synthetic_fda_filtered_ratio25 - photometric | 2 | +3.5 ± 2.1 | +5.0 / +2.0 | >= +3.0 | yes |" in text
    assert "| target/val: synthetic_fda_filtered_ratio25 - fda | 1 | -8.0 | -8.0 | none stated | n/a |" in text
    assert "| source/val: synthetic_fda_filtered_ratio25 - source_only | 2 | -4.0 ± 0.0 | -4.0 / -4.0 | >= -3.0 | no |" in text
    assert "semantic_only" not in text  # a row that did not run is left out, not shown as missing data
    assert bench_headline.goal_lines(table, None) == []
    args = bench_headline.parse_args(["--work_dir", str(tmp_path), "--seeds", "0", "1", "--refine_rounds", "1"])
    assert text in bench_headline.summarize(args, table)


def test_no_fda_leaves_out_every_row_with_fda(tmp_path):
    args = bench_headline.parse_args(["--work_dir", str(tmp_path), "--refine_rounds", "1", "--no_fda"])
    assert "fda" not in bench_headline.rows(args) and "synthetic_fda_filtered_ratio25" not in bench_headline.rows(args)
    args = bench_headline.parse_args(["--work_dir", str(tmp_path), "--refine_rounds", "1", "--rows", "fda",
                                      "synthetic_fda_filtered_ratio25"])
    config = bench_headline.workflow_config(args, tmp_path / "seed_0", 0, {"refine_rounds": 1}, bench_headline.rows(args))
    stages = {stage.name: stage for stage in plan(config)}
    segmenter = stages["segmenter:synthetic_fda_filtered_ratio25"].args
    assert segmenter["fourier_domain_adaptation"] and segmenter["synthetic_ratio"] == 0.25
    assert segmenter["synthetic_filter_model"] == tmp_path / "seed_0" / "segmenters" / "fda"
    with pytest.raises(SystemExit):  # its filter segmenter must be among the rows
        bench_headline.parse_args(["--work_dir", str(tmp_path), "--refine_rounds", "1", "--rows",
                                   "synthetic_fda_filtered_ratio25"])


def test_the_decay_row_schedules_the_synthetic_ratio_and_its_flags_parse(tmp_path):
    from diffusers_uncertainty.workflow import check_stage_flags

    args = bench_headline.parse_args(["--work_dir", str(tmp_path), "--refine_rounds", "1", "--rows", "photometric",
                                      "synthetic_photometric_filtered_decay"])
    config = bench_headline.workflow_config(args, tmp_path / "seed_0", 0, {"refine_rounds": 1}, bench_headline.rows(args))
    stages = plan(config)
    segmenter = {stage.name: stage for stage in stages}["segmenter:synthetic_photometric_filtered_decay"].args
    assert (segmenter["synthetic_ratio"], segmenter["synthetic_ratio_end"]) == (0.5, 0.0)
    assert segmenter["photometric_augmentation"] and segmenter["synthetic_keep_fraction"] == 0.5
    assert segmenter["synthetic_filter_model"] == tmp_path / "seed_0" / "segmenters" / "photometric"
    check_stage_flags(stages)  # train_segmentation.py's parser takes every flag of the row
    assert "synthetic_photometric_filtered_decay" in bench_headline.UNCERTAINTY_AWARE


def test_the_workflow_report_shows_the_labeled_classes_mean(tmp_path):
    from diffusers_uncertainty.report import metrics_table

    def write(variant, split, ious, pixels):
        folder = tmp_path / variant / split
        folder.mkdir(parents=True)
        per_class = [{"class": c, "IoU": i, "Dice": i, "pixels": p} for c, i, p in zip(CLASSES, ious, pixels)]
        present = [i for i in ious if i is not None]
        (folder / "metrics.json").write_text(json.dumps({"mIoU": sum(present) / len(present), "mDice": 0.5,
                                                         "pixel_accuracy": 0.5, "per_class": per_class}))

    for variant, car in (("predicts_car", 0.0), ("never_car", None)):  # car has no labeled pixel in target/val
        write(variant, "target_val", [0.6, 0.3, car], [10, 5, 0])
        write(variant, "source_val", [0.6, 0.3, 0.1], [10, 5, 3])
    table, _ = metrics_table(tmp_path, ["predicts_car", "never_car"])
    assert "| predicts_car | 30.0 | 45.0 |" in table and "| never_car | 45.0 | 45.0 |" in table


def test_rows_and_refinement_settings_are_checked_before_any_work(tmp_path, capsys):
    args = bench_headline.parse_args(["--work_dir", str(tmp_path), "--rows", "source_only", "fda", "--refine_rounds", "1"])
    assert list(bench_headline.rows(args)) == ["source_only", "fda"]
    assert not bench_headline.needs_diffusion(args) and not bench_headline.runs_semantic_only(args)
    args = bench_headline.parse_args(["--work_dir", str(tmp_path), "--rows", "photometric", "semantic_only",
                                      "--refine_rounds", "1"])
    assert list(bench_headline.rows(args)) == ["photometric"] and bench_headline.needs_diffusion(args)
    args = bench_headline.parse_args(["--work_dir", str(tmp_path), "--rows", "synthetic_photometric_filtered_ratio25",
                                      "photometric", "--refine_rounds", "1"])
    assert list(bench_headline.rows(args)) == ["photometric", "synthetic_photometric_filtered_ratio25"]
    assert bench_headline.needs_diffusion(bench_headline.parse_args(["--work_dir", str(tmp_path)]))
    for flags, message in (
        (["--rows", "source_only", "iccld", "--refine_rounds", "1"], "--rows must name rows of this run .*got iccld"),
        (["--rows", "source_only"], "--refine_rounds 2 retrains the synthetic rows .* add it or pass --refine_rounds 1"),
        (["--rows", "synthetic_photometric_filtered", "--refine_rounds", "1"],
         "--rows names synthetic_photometric_filtered, which keeps .* the photometric segmenter .* add photometric"),
        (["--rows", "synthetic", "--refine_rounds", "1", "--synthetic_counts", "1"],
         "--synthetic_counts retrains the synthetic_photometric row"),
    ):
        with pytest.raises(SystemExit):
            bench_headline.parse_args(["--work_dir", str(tmp_path), *flags])
        assert re.search(message, capsys.readouterr().err)

    # A finished round made with the other --match_uncertainty setting stops the run, naming what to delete.
    scores = tmp_path / "seed_1" / "rounds" / "round_2" / "uncertainty" / "target_train" / "scores.json"
    scores.parent.mkdir(parents=True)
    scores.write_text(json.dumps({"match_reference_dir": None}))
    bench_headline.check_rounds(tmp_path, [0, 1], match_uncertainty=False)
    with pytest.raises(ValueError, match=rf"made without --match_uncertainty, but this run is with it; delete "
                                         rf"{tmp_path / 'seed_1' / 'rounds'}"):
        bench_headline.check_rounds(tmp_path, [0, 1], match_uncertainty=True)


def test_later_seeds_link_the_first_seeds_fda_copies_with_its_control(tmp_path):
    first, later = tmp_path / "seed_0", tmp_path / "seed_1"
    for stage in (*bench_headline.SHARED_STAGES, "fda_copies", "uncertainty/fda_copies"):
        (first / stage).mkdir(parents=True)
        (first / stage / MARKER).write_text("{}")
    bench_headline.link_shared(first, later)
    for stage in (*bench_headline.SHARED_STAGES, "fda_copies", "uncertainty/fda_copies"):
        assert (later / stage).is_symlink() and (later / stage).resolve() == (first / stage).resolve()
    # Without `control.fda_copies` in the first seed nothing more is linked.
    (first / "fda_copies" / MARKER).unlink()
    other = tmp_path / "seed_2"
    bench_headline.link_shared(first, other)
    assert not (other / "fda_copies").exists() and not (other / "uncertainty" / "fda_copies").exists()


def _record_runs_finishing_seed_0(monkeypatch) -> list:
    """Replace bench_headline's workflow runner: it records (config, only), and seed 0's own run finishes the stages
    that the runs generated apart link."""
    calls = []

    def fake_run_workflow(config, only=None):
        calls.append((config, only))
        out = Path(config["output_dir"])
        if out.name == "seed_0":
            for stage in ("base", "control", "segmenters/source_only", "segmenters/photometric",
                          "uncertainty/source_train", "uncertainty/target_train"):
                (out / stage).mkdir(parents=True, exist_ok=True)
                (out / stage / MARKER).write_text("{}")
        return out

    monkeypatch.setattr(bench_headline, "run_workflow", fake_run_workflow)
    return calls


def test_the_source_image_row_is_a_run_of_its_own_on_the_first_runs_control_and_maps(tmp_path, monkeypatch, capsys):
    args = bench_headline.parse_args(["--work_dir", str(tmp_path), "--seeds", "0", "--rows", "source_only",
                                      "photometric", "source_images_photometric", "--refine_rounds", "1",
                                      "--source_image_strength", "0.4"])
    assert bench_headline.needs_diffusion(args)
    # No row of the seed's own run reads its generated data: it trains the base, control and maps, generates nothing.
    assert bench_headline.main_run_stages(args) == ["data", "base", "segmenter", "uncertainty", "evaluate",
                                                    "fda_copies", "control"]
    calls = _record_runs_finishing_seed_0(monkeypatch)
    bench_headline.run(args)
    (main_config, main_only), (side_config, side_only) = calls
    assert main_only == bench_headline.main_run_stages(args) and list(main_config["variants"]) == ["source_only", "photometric"]
    side = tmp_path / "source_images_seed_0"
    assert side_config["output_dir"] == str(side)
    assert side_config["generate"]["args"]["source_image_strength"] == 0.4
    assert side_config["variants"] == {"source_only": {}, "photometric": {"photometric_augmentation": True},
                                       "source_images_photometric": {"synthetic": True, "synthetic_ratio": 0.5,
                                                                     "photometric_augmentation": True}}
    assert "generate" in side_only and "evaluate:source_images_photometric" in side_only
    for stage in ("base", "control", "segmenters/source_only", "segmenters/photometric", "uncertainty/target_train"):
        assert (side / stage).is_symlink() and (side / stage).resolve() == (tmp_path / "seed_0" / stage).resolve()
    stages = {stage.name: stage for stage in plan(side_config)}
    assert stages["generate"].args["source_image_strength"] == 0.4
    assert stages["generate"].args["controlnet_model_name_or_path"] == side / "control"
    assert stages["synthetic_evaluation"].args["target_segmenter"] == side / "segmenters" / "photometric"

    # With a row that reads the seed's own generated data, its run is whole again.
    args = bench_headline.parse_args(["--work_dir", str(tmp_path), "--rows", "synthetic", "source_images_photometric",
                                      "--refine_rounds", "1"])
    assert bench_headline.main_run_stages(args) is None
    for bad in ("1", "0"):
        with pytest.raises(SystemExit):
            bench_headline.parse_args(["--work_dir", str(tmp_path), "--source_image_strength", bad])
        assert "--source_image_strength must lie in (0, 1)" in capsys.readouterr().err


def test_the_uncertainty_guided_row_runs_on_request_on_the_first_runs_control_maps_and_filter(tmp_path, monkeypatch, capsys):
    row = bench_headline.UNCERTAINTY_GUIDED
    default = bench_headline.parse_args(["--work_dir", str(tmp_path)])
    assert row not in bench_headline.generated_apart(default)  # not in the default table
    args = bench_headline.parse_args(["--work_dir", str(tmp_path), "--seeds", "0", "--rows", "source_only",
                                      "photometric", row, "--refine_rounds", "1", "--uncertainty_guidance_scale", "3"])
    assert list(bench_headline.generated_apart(args)) == [row]
    assert bench_headline.main_run_stages(args)[-2:] == ["fda_copies", "control"]
    calls = _record_runs_finishing_seed_0(monkeypatch)
    bench_headline.run(args)
    (_, _), (side_config, side_only) = calls
    side = tmp_path / "uncertainty_guided_seed_0"
    assert side_config["output_dir"] == str(side) and f"evaluate:{row}" in side_only
    assert side_config["variants"][row] == bench_headline.ROWS["synthetic_photometric_filtered_ratio25"]
    stages = {stage.name: stage for stage in plan(side_config)}
    assert stages["generate"].args["uncertainty_guidance_scale"] == 3.0
    assert stages["generate"].args["controlnet_model_name_or_path"] == side / "control"
    # The filter reads the seed's photometric segmenter, linked into the side run.
    assert stages[f"segmenter:{row}"].args["synthetic_filter_model"] == side / "segmenters" / "photometric"
    assert (side / "segmenters" / "photometric").resolve() == (tmp_path / "seed_0" / "segmenters" / "photometric").resolve()
    # Its evaluation is collected as an uncertainty-aware row.
    for split, value in (("target_val", 0.3), ("source_val", 0.5)):
        folder = side / "evaluation" / row / split
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"mIoU": value, "pixel_accuracy": 0.6, "per_class": []}))
    assert bench_headline.collect(args)[row][0]["target"]["mIoU"] == 0.3 and row in bench_headline.UNCERTAINTY_AWARE

    with pytest.raises(SystemExit):
        bench_headline.parse_args(["--work_dir", str(tmp_path), "--rows", "source_only", row, "--refine_rounds", "1"])
    assert f"--rows names {row}, which keeps the synthetic samples the photometric segmenter" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_headline.parse_args(["--work_dir", str(tmp_path), "--uncertainty_guidance_scale", "-1"])
    assert "--uncertainty_guidance_scale must be a finite number >= 0, got -1.0" in capsys.readouterr().err
