"""Unit tests of the training pieces: which parameters train, the loss, data loading/checking and paired transforms."""

from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_uncertainty import build_tiny_components
from diffusers_uncertainty.training import (
    ControlNetTrainingDataset,
    DatasetRecords,
    PairedTransform,
    attach_uncertainty_maps,
    collate_fn,
    labeled_folder_records,
    load_label,
    load_uncertainty,
    unlabeled_folder_records,
    validate_records,
    write_model_card,
)
from example_scripts import load_example


@pytest.fixture(scope="module")
def script():
    return load_example("train_uncertainty_controlnet")


def _batch(batch_size=2, size=16, num_classes=4, is_labeled=(True, False), seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (batch_size, size, size), generator=generator)
    return {
        "pixel_values": torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1,
        "conditioning_one_hot": torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float(),
        "conditioning_uncertainty": torch.rand(batch_size, 1, size, size, generator=generator),
        "is_labeled": torch.tensor(is_labeled),
        "input_ids": torch.randint(0, 500, (batch_size, 16), generator=generator),
    }


def _snapshot(module):
    return {name: parameter.detach().clone() for name, parameter in module.named_parameters()}


def _changed_names(before, module):
    return {name for name, parameter in module.named_parameters() if not torch.equal(before[name], parameter)}


@pytest.mark.parametrize(
    "shared_trunk, train_branch, trained, untouched",
    [
        (False, "semantic", ["semantic_controlnet."], ["uncertainty_controlnet."]),
        (False, "uncertainty", ["uncertainty_controlnet."], ["semantic_controlnet."]),
        (False, "joint", ["semantic_controlnet.", "uncertainty_controlnet."], []),
        (True, "semantic", ["trunk.", "semantic_embedding."], ["uncertainty_embedding."]),
        (True, "uncertainty", ["trunk.", "uncertainty_embedding."], ["semantic_embedding."]),
        (True, "joint", ["trunk.", "semantic_embedding.", "uncertainty_embedding."], []),
    ],
)
def test_training_steps_change_only_the_trained_branch_and_never_the_base_model(
    script, shared_trunk, train_branch, trained, untouched
):
    components = build_tiny_components(num_classes=4, shared_trunk=shared_trunk)
    vae, text_encoder, unet, controlnet = (components[key] for key in ("vae", "text_encoder", "unet", "controlnet"))
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    parameters = script.set_trainable_branch(controlnet, train_branch)
    trainable = {name for name, parameter in controlnet.named_parameters() if parameter.requires_grad}
    assert {id(parameter) for parameter in parameters} == {
        id(parameter) for parameter in controlnet.parameters() if parameter.requires_grad
    }
    assert all(any(name.startswith(prefix) for prefix in trained) for name in trainable)

    frozen_before = {name: _snapshot(model) for name, model in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet))}
    controlnet_before = _snapshot(controlnet)
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    torch.manual_seed(0)
    for step in range(2):
        loss = script.compute_loss(
            _batch(seed=step), vae, text_encoder, unet, controlnet, noise_scheduler, train_branch
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for name, model in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
        assert not _changed_names(frozen_before[name], model), f"frozen {name} changed"
        assert all(parameter.grad is None for parameter in model.parameters())
    changed = _changed_names(controlnet_before, controlnet)
    for prefix in trained:
        assert any(name.startswith(prefix) for name in changed), f"nothing under {prefix} changed"
    for prefix in untouched:
        assert not any(name.startswith(prefix) for name in changed), f"{prefix} changed in {train_branch} mode"


def test_joint_mode_switches_the_semantic_branch_off_for_unlabeled_samples(script):
    batch = _batch(is_labeled=(True, False))
    cond, scales, mask = script.branch_conditioning(batch, "joint", torch.float32)
    assert scales == [1.0, 1.0] and mask.tolist() == [True, False] and cond[0] is batch["conditioning_one_hot"]
    assert script.branch_conditioning(batch, "semantic", torch.float32)[1:] == ([1.0, 0.0], None)
    cond, scales, mask = script.branch_conditioning(batch, "uncertainty", torch.float32)
    assert cond[0] is None and scales == [0.0, 1.0] and mask is None

    # A batch of unlabeled samples only gives the semantic branch a zero gradient (it runs, masked on the device).
    components = build_tiny_components(num_classes=4)
    controlnet = components["controlnet"]
    script.set_trainable_branch(controlnet, "joint")
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    loss = script.compute_loss(
        _batch(is_labeled=(False, False)), components["vae"], components["text_encoder"], components["unet"],
        controlnet, noise_scheduler, "joint",
    )
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in controlnet.semantic_controlnet.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in controlnet.uncertainty_controlnet.parameters())


def test_loss_targets_follow_the_prediction_type_and_snr_weighting(script):
    components = build_tiny_components(num_classes=4)
    models = [components[key] for key in ("vae", "text_encoder", "unet", "controlnet")]
    batch = _batch()

    def loss_for(prediction_type, snr_gamma=None):
        scheduler = DDPMScheduler.from_config(components["scheduler"].config, prediction_type=prediction_type)
        torch.manual_seed(0)
        with torch.no_grad():
            return script.compute_loss(batch, *models, scheduler, "joint", snr_gamma=snr_gamma).item()

    epsilon = loss_for("epsilon")
    # Min-SNR with a huge gamma weights every sample by snr / snr = 1 for epsilon: the plain MSE.
    assert loss_for("epsilon", snr_gamma=1e9) == pytest.approx(epsilon, rel=1e-5)
    assert loss_for("epsilon", snr_gamma=0.01) != pytest.approx(epsilon, rel=1e-3)
    assert loss_for("v_prediction") != pytest.approx(epsilon, rel=1e-3)


# -------------------------------------------------------------------------------------------------- data
def _write_pair(folder: Path, name: str, label: np.ndarray, image: np.ndarray | None = None):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    if image is None:
        image = np.zeros(label.shape + (3,), dtype=np.uint8)
    PIL.Image.fromarray(image).save(folder / "images" / name)
    PIL.Image.fromarray(label.astype(np.uint8)).save(folder / "labels" / name)


def test_folder_records_pair_images_labels_maps_and_captions(tmp_path):
    label = np.zeros((8, 8), dtype=np.uint8)
    _write_pair(tmp_path / "data", "a.png", label)
    _write_pair(tmp_path / "data", "b.png", label)
    (tmp_path / "data" / "captions").mkdir()
    (tmp_path / "data" / "captions" / "a.txt").write_text("a dusk street\n")
    (tmp_path / "maps").mkdir()
    np.save(tmp_path / "maps" / "a.npy", np.full((8, 8), 0.25, dtype=np.float32))
    records = attach_uncertainty_maps(labeled_folder_records(tmp_path / "data"), tmp_path / "maps")
    assert [Path(record["image"]).name for record in records] == ["a.png", "b.png"]
    assert records[0]["caption"] == "a dusk street" and records[1]["caption"] is None
    assert records[0]["uncertainty"].endswith("a.npy") and records[1]["uncertainty"] is None
    validate_records(records[:1], 4, None, need_labels=True, need_uncertainty=True, show_progress=False)
    with pytest.raises(ValueError, match=r"Missing uncertainty map for image .*b\.png.*maps/b\.\{npy,png\}"):
        validate_records(records, 4, None, need_labels=True, need_uncertainty=True, show_progress=False)

    (tmp_path / "data" / "images" / "c.png").write_bytes((tmp_path / "data" / "images" / "a.png").read_bytes())
    with pytest.raises(ValueError, match=r"--train_data_dir.*no label map.*c\.png"):
        labeled_folder_records(tmp_path / "data")
    assert len(unlabeled_folder_records(tmp_path / "data")) == 3


def test_validate_records_names_the_bad_file(tmp_path):
    label = np.zeros((8, 8), dtype=np.uint8)
    label[0, 0] = 9
    _write_pair(tmp_path, "bad.png", label)
    records = labeled_folder_records(tmp_path)
    with pytest.raises(ValueError, match=r"labels/bad\.png has values \[9\] outside the allowed \[0, 4\)"):
        validate_records(records, 4, None, need_labels=True, need_uncertainty=False, show_progress=False)
    validate_records(records, 4, 9, need_labels=True, need_uncertainty=False, show_progress=False)  # void pixels

    _write_pair(tmp_path / "sizes", "x.png", np.zeros((8, 8), np.uint8), image=np.zeros((8, 10, 3), np.uint8))
    with pytest.raises(ValueError, match=r"label map of .*x\.png has size 8x8 \(WxH\), but the image has size 10x8"):
        validate_records(labeled_folder_records(tmp_path / "sizes"), 4, None, True, False, show_progress=False)


def test_uncertainty_maps_load_from_8_bit_16_bit_png_and_npy(tmp_path):
    values = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    PIL.Image.fromarray((values * 255).round().astype(np.uint8)).save(tmp_path / "u8.png")
    PIL.Image.fromarray((values * 65535).round().astype(np.uint16)).save(tmp_path / "u16.png")
    np.save(tmp_path / "f.npy", values)
    np.testing.assert_allclose(load_uncertainty(str(tmp_path / "u8.png")), values, atol=1 / 255)
    np.testing.assert_allclose(load_uncertainty(str(tmp_path / "u16.png")), values, atol=1 / 65535)
    np.testing.assert_array_equal(load_uncertainty(str(tmp_path / "f.npy")), values)
    np.save(tmp_path / "bad.npy", values * 2)
    with pytest.raises(ValueError, match=r"uncertainty map of .*bad\.npy.*\[0, 1\]"):
        load_uncertainty(str(tmp_path / "bad.npy"), str(tmp_path / "bad.npy"))
    with pytest.raises(ValueError, match="does not exist"):
        load_uncertainty(str(tmp_path / "missing.npy"), "sample")


def test_paired_transform_crops_and_flips_image_label_and_map_identically():
    # Image red channel, label and uncertainty encode the same column index, so any misalignment shows.
    height, width = 32, 48
    columns = np.tile(np.arange(width), (height, 1))
    image = PIL.Image.fromarray(np.stack([columns * 5, columns * 0, columns * 0], axis=-1).astype(np.uint8))
    label = columns.astype(np.int64)
    uncertainty = (columns / 100).astype(np.float32)
    transform = PairedTransform(32, center_crop=False, random_flip=True)
    seen_flip, seen_offsets = False, set()
    import random

    rng = random.Random(0)
    for _ in range(20):
        output = transform(image, label, uncertainty, rng=rng)
        red = ((output["pixel_values"][0] + 1) * 127.5 / 5).round().long()
        assert torch.equal(red, output["labels"])
        assert torch.allclose(output["uncertainty"][0] * 100, output["labels"].float(), atol=1e-3)
        row = output["labels"][0]
        seen_flip |= bool(row[0] > row[-1])
        seen_offsets.add(int(row.min()))
    assert seen_flip and len(seen_offsets) > 1

    # Resizing: labels with nearest neighbour (only values that exist), the map stays in [0, 1].
    output = PairedTransform(16, center_crop=True)(image, label, uncertainty)
    assert set(output["labels"].unique().tolist()) <= set(range(width))
    assert output["pixel_values"].shape == (3, 16, 16) and output["uncertainty"].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="multiple of 8"):
        PairedTransform(20)


class _Tokenizer:
    model_max_length = 4

    def __call__(self, text, max_length, padding, truncation, return_tensors):
        class Output:
            input_ids = torch.tensor([[len(text), 0, 0, 0]])

        return Output()


def test_dataset_items_and_labeled_fraction_of_the_sampler(tmp_path):
    label = np.full((16, 16), 2, dtype=np.uint8)
    label[0] = 255
    _write_pair(tmp_path / "l", "a.png", label)
    (tmp_path / "u" / "images").mkdir(parents=True)
    for name in ("x.png", "y.png", "z.png"):
        PIL.Image.new("RGB", (16, 16)).save(tmp_path / "u" / "images" / name)
    labeled = labeled_folder_records(tmp_path / "l")
    unlabeled = unlabeled_folder_records(tmp_path / "u")
    for record in labeled + unlabeled:
        record["uncertainty"] = np.full((16, 16), 0.5, dtype=np.float32)
    dataset = ControlNetTrainingDataset(
        labeled, unlabeled, PairedTransform(16, center_crop=True), _Tokenizer(), num_classes=4, ignore_index=255,
        default_prompt="street",
    )
    first, last = dataset[0], dataset[3]
    assert first["is_labeled"] and not last["is_labeled"]
    assert first["conditioning_one_hot"][2, 5].sum() == 16 and first["conditioning_one_hot"][:, 0].sum() == 0
    assert last["conditioning_one_hot"].sum() == 0 and torch.all(last["labels"] == 255)
    assert torch.allclose(first["conditioning_uncertainty"], torch.full((1, 16, 16), 0.5))
    assert first["input_ids"][0] == len("street")
    batch = collate_fn([first, last])
    assert batch["conditioning_one_hot"].shape == (2, 4, 16, 16) and batch["is_labeled"].tolist() == [True, False]

    sampler = torch.utils.data.WeightedRandomSampler(
        dataset.sample_weights(0.75), 4000, generator=torch.Generator().manual_seed(0)
    )
    fraction = np.mean([index < dataset.num_labeled for index in sampler])
    assert abs(fraction - 0.75) < 0.03
    with pytest.raises(ValueError, match="labeled_fraction"):
        ControlNetTrainingDataset(labeled, [], dataset.transform, _Tokenizer(), 4).sample_weights(0.5)


def test_dataset_records_read_columns_and_reject_unknown_ones():
    label = PIL.Image.fromarray(np.ones((8, 8), dtype=np.uint8))
    table = datasets.Dataset.from_dict(
        {
            "image": [PIL.Image.new("RGB", (8, 8))],
            "mask": [label],
            "u": [np.full((8, 8), 0.5, dtype=np.float32).tolist()],
            "text": [["one", "two"]],
        }
    ).cast_column("image", datasets.Image()).cast_column("mask", datasets.Image())
    records = DatasetRecords(table, "image", "mask", "u", "text", description="--dataset_name toy")
    assert len(records) == 1 and records[0]["name"] == "--dataset_name toy[0]"
    validate_records(records, 2, None, need_labels=True, need_uncertainty=True, show_progress=False)
    assert load_label(records[0]["label"]).tolist() == np.ones((8, 8)).tolist()
    assert load_uncertainty(records[0]["uncertainty"]).shape == (8, 8)
    with pytest.raises(ValueError, match=r"`--label_column` value 'labels' not found .*image, mask, u, text"):
        DatasetRecords(table, "image", "labels")


def test_model_card_refuses_unfilled_placeholders_and_writes_atomically(tmp_path):
    template = tmp_path / "card.md"
    template.write_text("# ${repo_id}\nbase: ${base_model}\n")
    text = write_model_card(template, tmp_path / "out" / "README.md", repo_id="me/x", base_model="sd")
    assert text == "# me/x\nbase: sd\n" and (tmp_path / "out" / "README.md").read_text() == text
    with pytest.raises(ValueError, match="needs a value for 'base_model'"):
        write_model_card(template, tmp_path / "out2" / "README.md", repo_id="me/x")
    assert not (tmp_path / "out2" / "README.md").exists()
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "README.md"]


def test_parse_args_rejects_bad_combinations_before_any_work(script, tmp_path):
    base = ["--pretrained_model_name_or_path", "x", "--num_classes", "4"]
    cases = [
        (["--resolution", "20", "--train_data_dir", "d", "--train_branch", "semantic"], "`--resolution` must be"),
        (["--train_branch", "semantic"], "needs labeled data"),
        (["--train_branch", "joint", "--train_data_dir", "d", "--uncertainty_dir", "m"], "needs unlabeled data"),
        (["--train_branch", "uncertainty", "--train_data_dir", "d"], "`--uncertainty_dir` (their uncertainty maps)"),
        (["--train_branch", "semantic", "--train_data_dir", "d", "--ignore_index", "2"], "`--ignore_index` must not"),
        (["--train_branch", "semantic", "--train_data_dir", "d", "--validation_uncertainty_levels", "1.5"], "[0, 1]"),
        (["--train_branch", "semantic", "--train_data_dir", "d", "--torch_compile_mode", "max-autotune"],
         "`--torch_compile_mode max-autotune` needs `--torch_compile`."),
        (["--train_branch", "semantic", "--train_data_dir", "d", "--dataset_placement", "gpu"],
         "`--dataset_placement` must be one of auto, device, stream, but got 'gpu'."),
        (["--train_branch", "semantic", "--train_data_dir", "d", "--dataset_placement", "device",
          "--train_style_encoder"], "`--dataset_placement device` caches latents, but `--train_style_encoder` needs"),
        (["--train_branch", "semantic", "--train_data_dir", "d", "--logging_steps", "0"],
         "`--logging_steps` must be a positive integer, but got 0."),
    ]
    from diffusers.utils.import_utils import is_xformers_available

    if not (is_xformers_available() and torch.cuda.is_available()):
        cases.append(
            (["--train_branch", "semantic", "--train_data_dir", "d", "--enable_xformers_memory_efficient_attention"],
             "--enable_xformers_memory_efficient_attention` needs")
        )
    for extra, message in cases:
        with pytest.raises((ValueError, ImportError)) as error:
            script.parse_args(base + extra)
        assert message in str(error.value), (extra, str(error.value))
    # A validation label with a value outside the classes is refused up front, naming the file.
    label = tmp_path / "val.png"
    PIL.Image.fromarray(np.full((8, 8), 6, dtype=np.uint8)).save(label)
    with pytest.raises(ValueError, match=r"val\.png has values \[6\]"):
        script.parse_args(base + ["--train_branch", "semantic", "--train_data_dir", "d", "--validation_label", str(label)])


def test_load_controlnet_from_scratch_from_a_semantic_controlnet_and_from_a_saved_model(script, tmp_path):
    from accelerate import PartialState

    PartialState(cpu=True)  # the script logs through accelerate's logger, which needs the state
    components = build_tiny_components(num_classes=4, ignore_index=255)
    unet, vae = components["unet"], components["vae"]
    base = ["--pretrained_model_name_or_path", "x", "--num_classes", "4", "--ignore_index", "255",
            "--train_branch", "semantic", "--train_data_dir", "d"]

    # From scratch: the conditioning embedding downsamples by the tiny VAE's factor 2, so the residuals fit the UNet.
    controlnet = script.load_controlnet(script.parse_args(base + ["--shared_trunk"]), unet, vae)
    assert controlnet.config.shared_trunk and controlnet.config.ignore_index == 255
    assert tuple(controlnet.trunk.config.conditioning_embedding_out_channels) == (16, 32)
    down, mid = controlnet(
        torch.randn(1, 4, 8, 8), 10, torch.randn(1, 16, 32),
        controlnet_cond=[torch.zeros(1, 4, 16, 16), torch.zeros(1, 1, 16, 16)], conditioning_scale=[1.0, 1.0],
    )
    assert down[0].shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="must have 2 entries to match the VAE's downsampling factor 2"):
        script.load_controlnet(script.parse_args(base + ["--conditioning_embedding_out_channels", "16", "32", "96"]),
                               unet, vae)

    # Semantic branch from an existing diffusers ControlNetModel, uncertainty branch new from the UNet.
    semantic = components["controlnet"].semantic_controlnet
    semantic.save_pretrained(tmp_path / "semantic")
    args = script.parse_args(base + ["--semantic_controlnet_model_name_or_path", str(tmp_path / "semantic")])
    controlnet = script.load_controlnet(args, unet, vae)
    for (name, loaded), original in zip(controlnet.semantic_controlnet.state_dict().items(), semantic.state_dict().values()):
        assert torch.equal(loaded, original), name
    assert controlnet.uncertainty_controlnet.config.conditioning_channels == 1
    assert all(p.abs().max() == 0 for p in controlnet.uncertainty_controlnet.controlnet_down_blocks.parameters())
    # With --shared_trunk the same ControlNet becomes the trunk (its embedding the semantic one, weights unchanged);
    # the new uncertainty embedding adds nothing until trained.
    args = script.parse_args(base + ["--shared_trunk", "--semantic_controlnet_model_name_or_path", str(tmp_path / "semantic")])
    controlnet = script.load_controlnet(args, unet, vae)
    assert controlnet.config.shared_trunk and controlnet.config.semantic_channels == 4
    assert controlnet.config.ignore_index == 255
    original = semantic.state_dict()
    trunk = controlnet.trunk.state_dict()
    embedding = {f"controlnet_cond_embedding.{k}": v for k, v in controlnet.semantic_embedding.state_dict().items()}
    assert set(trunk) | set(embedding) == set(original)
    for name, loaded in {**trunk, **embedding}.items():
        assert torch.equal(loaded, original[name]), name
    sample, cond = torch.randn(1, 4, 8, 8), torch.nn.functional.one_hot(torch.randint(0, 4, (1, 16, 16)), 4)
    cond = cond.permute(0, 3, 1, 2).float()
    expected = semantic(sample, 10, torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0)), cond,
                        return_dict=False)
    got = controlnet(sample, 10, torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0)),
                     controlnet_cond=[cond, torch.rand(1, 1, 16, 16)], conditioning_scale=[1.0, 1.0])
    for a, b in zip([*expected[0], expected[1]], [*got[0], got[1]]):
        assert torch.allclose(a, b, atol=1e-6)
    wrong = script.parse_args([*base[:3], "5", *base[4:], "--semantic_controlnet_model_name_or_path", str(tmp_path / "semantic")])
    with pytest.raises(ValueError, match="`--num_classes` is 5, but the ControlNet .* has 4 conditioning channels"):
        script.load_controlnet(wrong, unet, vae)

    # A saved UncertaintyControlNetModel, with its config checked against the flags.
    components["controlnet"].save_pretrained(tmp_path / "dual")
    args = script.parse_args(base + ["--controlnet_model_name_or_path", str(tmp_path / "dual")])
    assert not script.load_controlnet(args, unet, vae).config.shared_trunk
    with pytest.raises(ValueError, match="`--shared_trunk` was given, but the controlnet .* has separate branches"):
        script.load_controlnet(script.parse_args(base + ["--shared_trunk", "--controlnet_model_name_or_path",
                                                         str(tmp_path / "dual")]), unet, vae)
