"""The latent and prompt caches of `--dataset_placement device`: the cached path gives the streaming path's loss for
the same noise and crop, the prompt cache equals the text encoder's output, crops of latents and maps stay aligned,
and batches depend only on the seed and the batch number."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_uncertainty import build_tiny_components
from diffusers_uncertainty.training import (
    ControlNetTrainingDataset,
    PairedTransform,
    collate_fn,
    load_image,
    load_label,
    load_uncertainty,
)
from diffusers_uncertainty.training.latent_cache import (
    DeviceBatchSampler,
    LatentCache,
    PromptEmbeddingCache,
    check_dataset_placement,
    choose_dataset_placement,
    estimate_cache_bytes,
    resize_sample,
    sample_latents,
)
from diffusers_uncertainty.training.performance import HostReadCounter
from example_scripts import load_example


NUM_CLASSES, IGNORE_INDEX = 4, 255


@pytest.fixture(scope="module")
def script():
    return load_example("train_uncertainty_controlnet")


@pytest.fixture(scope="module")
def components():
    components = build_tiny_components(num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX)
    for name in ("vae", "text_encoder", "unet", "controlnet"):
        components[name].eval().requires_grad_(False)
    return components


def _records(size, count=4, seed=0, captions=None):
    """Labeled then unlabeled in-memory records (images, label maps with ignore pixels, uncertainty maps)."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(count):
        label = rng.integers(0, NUM_CLASSES, (size[1], size[0])).astype(np.uint8)
        label[:2] = IGNORE_INDEX
        records.append({
            "name": f"sample_{index}",
            "image": rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8),
            "label": label if index < count // 2 else None,
            "uncertainty": rng.random((size[1], size[0]), dtype=np.float32),
            "caption": None if captions is None else captions[index],
        })
    return records


class _FixedRng:
    """A `random.Random` stand-in for `PairedTransform`: a given crop offset and flip."""

    def __init__(self, top, left, flip):
        self.values, self.flip = [top, left], flip

    def randint(self, low, high):
        value = self.values.pop(0)
        assert low <= value <= high
        return value

    def random(self):
        return 0.0 if self.flip else 0.9


def _cache(components, records, resolution, prompt_cache, **kwargs):
    return LatentCache.from_records(
        components["vae"], records, resolution, prompt_cache, random_flip=True, labeled=[r["label"] is not None for r in records],
        use_labels=True, use_uncertainty=True, label_fill=IGNORE_INDEX, show_progress=False, **kwargs,
    )


@pytest.mark.parametrize("flip", [False, True])
def test_cached_loss_equals_the_streamed_loss_for_the_same_noise_and_a_whole_image_crop(script, components, flip):
    """Square images at the training resolution: the crop is the whole image, so the cached latent moments are the
    moments the streaming path computes, and the same RNG state gives the same latent, noise, timesteps and loss."""
    records = _records((16, 16))
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    prompt_cache = PromptEmbeddingCache(text_encoder, tokenizer, [""])
    cache = _cache(components, records, 16, prompt_cache)
    labeled = [r for r in records if r["label"] is not None]
    unlabeled = [r for r in records if r["label"] is None]
    dataset = ControlNetTrainingDataset(
        labeled, unlabeled, PairedTransform(16, random_flip=True), tokenizer, NUM_CLASSES, IGNORE_INDEX
    )
    indices = torch.tensor([0, 3, 1])
    items = []
    for index in indices.tolist():
        record = dataset.labeled_records[index] if index < 2 else dataset.unlabeled_records[index - 2]
        sample = dataset.transform(
            load_image(record["image"]), load_label(record["label"]) if record["label"] is not None else None,
            load_uncertainty(record["uncertainty"]), rng=_FixedRng(0, 0, flip),
        )
        items.append(sample)
    streamed = collate_fn([dataset[int(i)] for i in indices])  # for the tokenization and is_labeled
    streamed["pixel_values"] = torch.stack([item["pixel_values"] for item in items])
    streamed["conditioning_uncertainty"] = torch.stack([item["uncertainty"] for item in items])
    labels = torch.stack([item.get("labels", torch.full((16, 16), IGNORE_INDEX)) for item in items])
    in_range = labels < NUM_CLASSES
    streamed["conditioning_one_hot"] = (
        torch.nn.functional.one_hot(torch.where(in_range, labels, 0), NUM_CLASSES).permute(0, 3, 1, 2).float()
        * in_range[:, None].float()
    )

    zeros = torch.zeros(3, dtype=torch.long)
    cached = cache.crop(indices, zeros, zeros, torch.full((3,), flip), torch.zeros(3, dtype=torch.long))
    cached = cache.control_conditioning(cached, NUM_CLASSES)
    cached["encoder_hidden_states"] = prompt_cache(cached["prompt_ids"])
    assert torch.equal(cached["labels"], labels)
    assert torch.equal(cached["conditioning_one_hot"], streamed["conditioning_one_hot"])
    assert torch.equal(cached["conditioning_uncertainty"], streamed["conditioning_uncertainty"])
    assert torch.equal(cached["is_labeled"], streamed["is_labeled"])

    scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    models = [components[key] for key in ("vae", "text_encoder", "unet", "controlnet")]

    def loss(batch):
        torch.manual_seed(0)
        with torch.no_grad():
            return script.compute_loss(batch, *models, scheduler, "joint", snr_gamma=5.0)

    torch.manual_seed(0)
    latents = sample_latents(components["vae"], streamed, torch.float32)
    torch.manual_seed(0)
    assert torch.equal(sample_latents(components["vae"], cached, torch.float32), latents)
    # The latent path is exact: with the text encoder run on the same input ids, the losses are bit-for-bit equal.
    with_ids = {key: value for key, value in cached.items() if key != "encoder_hidden_states"}
    with_ids["input_ids"] = streamed["input_ids"]
    assert "pixel_values" not in with_ids and torch.equal(loss(with_ids), loss(streamed))
    # With the cached prompt embedding (the prompt encoded alone, not in a batch of 3) only the last bits may move.
    torch.testing.assert_close(loss(cached), loss(streamed), rtol=1e-6, atol=0)


def test_latent_crops_and_map_crops_stay_aligned_and_flip_as_a_pixel_crop_does(components):
    """A wide image (40x16 -> latent 20x8 with the tiny VAE's factor 2): the maps of latent window (t, l) are the
    `PairedTransform` maps at pixel offset (2t, 2l) of the trimmed image, flipped after the crop; the mirror image's
    latents are read at the mirrored offset."""
    records = _records((40, 16), count=2)
    prompt_cache = PromptEmbeddingCache(components["text_encoder"], components["tokenizer"], [""])
    cache = _cache(components, records, 16, prompt_cache)
    assert cache.latent_sizes.tolist() == [[8, 20], [8, 20]] and cache.trims == [(0, 0), (0, 0)]
    transform = PairedTransform(16, random_flip=True)
    record = records[0]
    for left, flip in ((0, False), (3, True), (12, False), (12, True)):
        batch = cache.crop(
            torch.tensor([0]), torch.tensor([0]), torch.tensor([left]), torch.tensor([flip]), torch.tensor([0])
        )
        expected = transform(
            load_image(record["image"]), load_label(record["label"]), load_uncertainty(record["uncertainty"]),
            rng=_FixedRng(0, 2 * left, flip),
        )
        assert torch.equal(batch["labels"][0], expected["labels"])
        assert torch.equal(batch["uncertainty"][0], expected["uncertainty"])
        # both images encoded together, as the cache encodes them (a batch of 1 may round differently)
        pixels = torch.stack([
            torch.from_numpy(resize_sample(load_image(r["image"]), resolution=16)["pixels"]).permute(2, 0, 1)
            for r in records
        ])
        with torch.no_grad():
            full = components["vae"].encode(torch.flip(pixels, dims=[-1]) if flip else pixels).latent_dist.parameters
        offset = 20 - left - 8 if flip else left
        assert torch.equal(batch["latent_parameters"][0], full[0, :, :, offset : offset + 8])


def test_prompt_cache_equals_the_text_encoder_output(components):
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    prompts = ["", "a street at dusk", "a scan", "a street at dusk"]
    cache = PromptEmbeddingCache(text_encoder, tokenizer, prompts)
    assert cache.prompts == ["", "a street at dusk", "a scan"]
    batch = ["a scan", "", "a street at dusk", "a scan"]
    input_ids = torch.cat([PromptEmbeddingCache.tokenize(tokenizer, prompt) for prompt in batch])
    with torch.no_grad():
        expected = text_encoder(input_ids, return_dict=False)[0]
    got = cache(torch.tensor([cache.index(prompt) for prompt in batch]))
    for row, prompt in enumerate(batch):  # bit-for-bit the prompt encoded alone
        with torch.no_grad():
            alone = text_encoder(PromptEmbeddingCache.tokenize(tokenizer, prompt), return_dict=False)[0]
        assert torch.equal(got[row], alone[0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # a batched call: up to BLAS rounding
    assert torch.equal(cache.input_ids[[cache.index(prompt) for prompt in batch]], input_ids)
    with pytest.raises(ValueError, match="The prompt 'unknown' is not cached"):
        cache.index("unknown")


def test_batches_depend_only_on_seed_epoch_and_batch_and_mix_labeled_samples(components):
    records = _records((24, 16), count=8, captions=[None, "a", ["b", "c"], None, "a", None, ["c"], None])
    prompt_cache = PromptEmbeddingCache(components["text_encoder"], components["tokenizer"], ["", "a", "b", "c"])
    cache = _cache(components, records, 16, prompt_cache, proportion_empty_prompts=0.25)
    weights = torch.tensor([0.9 / 4] * 4 + [0.1 / 4] * 4)
    sampler = DeviceBatchSampler(len(cache), 4, "cpu", seed=7, weights=weights)

    def draw(sampler, epoch, batch):
        return cache.batch(sampler.indices(epoch, batch), sampler.generator("batch", epoch, batch))

    first, again = draw(sampler, 1, 1), draw(DeviceBatchSampler(len(cache), 4, "cpu", seed=7, weights=weights), 1, 1)
    for key in first:
        assert torch.equal(first[key], again[key]), key
    other = draw(sampler, 1, 0)
    assert not torch.equal(first["latent_parameters"], other["latent_parameters"])
    # about 90 % labeled samples; captions from each sample's own choices (or the empty prompt)
    labeled = torch.cat([sampler.indices(epoch, 0) < 4 for epoch in range(200)]).float().mean().item()
    assert 0.85 < labeled < 0.95
    allowed = {0: {0}, 1: {1}, 2: {2, 3}, 3: {0}, 4: {1}, 5: {0}, 6: {3}, 7: {0}}
    for epoch in range(20):
        indices = sampler.indices(epoch, 1)
        prompt_ids = cache.batch(indices, sampler.generator("batch", epoch, 1))["prompt_ids"]
        for index, prompt in zip(indices.tolist(), prompt_ids.tolist()):
            assert prompt in allowed[index] | {0}
    # a plain sampler is a permutation per epoch, shared out over processes
    shards = [DeviceBatchSampler(8, 2, "cpu", seed=3, num_processes=2, process_index=p) for p in range(2)]
    assert len(shards[0]) == 2
    seen = torch.cat([shard.indices(0, batch) for batch in range(2) for shard in shards])
    assert sorted(seen.tolist()) == list(range(8))


def test_placement_choice_and_bad_values():
    assert check_dataset_placement("device") == "device"
    with pytest.raises(ValueError, match="`--dataset_placement` must be one of auto, device, stream, but got 'gpu'"):
        check_dataset_placement("gpu")
    small = estimate_cache_bytes(367, (240, 180), 128, 8, 4, True, True, True)
    # 171x128 -> latent 21x16: 8 moments x 2 flips in float32, int32 labels and float32 maps at 168x128
    assert small == 367 * (8 * 21 * 16 * 4 * 2 + 2 * 4 * 168 * 128)
    assert choose_dataset_placement("auto", small, "cpu") == "device"
    assert choose_dataset_placement("auto", 10**18, "cpu") == "stream"
    assert choose_dataset_placement("stream", small, "cpu") == "stream"


@pytest.mark.parametrize("shared_trunk", [False, True])
def test_a_cached_joint_control_step_reads_nothing_on_the_host(script, shared_trunk):
    """Drawing a cached batch, the joint-mode loss (labeled and unlabeled samples mixed), the backward pass and the
    gradient clipping run with no operator that reads tensor values on the host: on a GPU each would be a device sync
    every step (the optimizer step is left out: on the CPU AdamW reads its step counters, the fused CUDA one does not)."""
    components = build_tiny_components(num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX, shared_trunk=shared_trunk)
    for name in ("vae", "text_encoder", "unet"):
        components[name].eval().requires_grad_(False)
    controlnet = components["controlnet"].train()
    records = _records((24, 16), count=8)
    prompt_cache = PromptEmbeddingCache(components["text_encoder"], components["tokenizer"], [""])
    cache = _cache(components, records, 16, prompt_cache)
    sampler = DeviceBatchSampler(len(cache), 4, "cpu", seed=0, weights=torch.tensor([0.5 / 4] * 8))
    scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    models = [components["vae"], components["text_encoder"], components["unet"], controlnet]
    for batch_index in range(2):
        with HostReadCounter() as counter:
            batch = cache.batch(sampler.indices(0, batch_index), sampler.generator("batch", 0, batch_index))
            batch = cache.control_conditioning(batch, NUM_CLASSES)
            batch["encoder_hidden_states"] = prompt_cache(batch["prompt_ids"])
            loss = script.compute_loss(batch, *models, scheduler, "joint", snr_gamma=5.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        assert counter.host_reads == 0, counter.host_read_operators
        controlnet.zero_grad()


@pytest.mark.parametrize("shared_trunk", [False, True])
def test_compiled_joint_control_step_has_no_graph_break_and_no_recompile_as_the_labeled_mix_changes(script, shared_trunk):
    """`--torch_compile`: the control (whole graph) and the UNet compile once; batches with another mix of labeled
    and unlabeled samples (all labeled, none labeled) reuse the graphs, and the loss equals the eager one."""
    components = build_tiny_components(num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX, shared_trunk=shared_trunk)
    for name in ("vae", "text_encoder", "unet"):
        components[name].eval().requires_grad_(False)
    records = _records((16, 16), count=8)
    prompt_cache = PromptEmbeddingCache(components["text_encoder"], components["tokenizer"], [""])
    cache = _cache(components, records, 16, prompt_cache)
    scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    zeros = torch.zeros(4, dtype=torch.long)

    def loss(unet, controlnet, indices):
        batch = cache.crop(torch.tensor(indices), zeros, zeros, torch.zeros(4, dtype=torch.bool), zeros)
        batch = cache.control_conditioning(batch, NUM_CLASSES)
        batch["encoder_hidden_states"] = prompt_cache(batch["prompt_ids"])
        torch.manual_seed(0)
        value = script.compute_loss(batch, components["vae"], components["text_encoder"], unet, controlnet, scheduler,
                                    "joint")
        value.backward()
        return value.detach()

    mixes = ([0, 5, 1, 6], [4, 5, 6, 7], [0, 1, 2, 3], [7, 2, 4, 0])  # records 0-3 labeled, 4-7 unlabeled
    eager = [loss(components["unet"], components["controlnet"], indices) for indices in mixes]
    torch._dynamo.reset()
    unet = torch.compile(components["unet"], backend="eager")
    controlnet = torch.compile(components["controlnet"], fullgraph=True, backend="eager")
    compiled = [loss(unet, controlnet, mixes[0])]
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled += [loss(unet, controlnet, indices) for indices in mixes[1:]]
    for got, expected in zip(compiled, eager):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_a_cached_base_unet_step_reads_nothing_on_the_host(components):
    """The base model's UNet stage on the latent cache (`train_base_model.py`'s loop body: batch draw, latent sample,
    noise, timesteps, prompt embedding, loss, backward, clipping) has no host read."""
    from diffusers_uncertainty.base_model import build_noise_scheduler

    records = [dict(record, label=None, uncertainty=None) for record in _records((24, 16), count=6)]
    prompt_cache = PromptEmbeddingCache(components["text_encoder"], components["tokenizer"], [""])
    cache = LatentCache.from_records(components["vae"], records, 16, prompt_cache, random_flip=True,
                                     show_progress=False)
    sampler = DeviceBatchSampler(len(cache), 4, "cpu", seed=0)
    unet = build_tiny_components(num_classes=NUM_CLASSES)["unet"].train()
    scheduler = build_noise_scheduler()
    for batch_index in range(2):
        with HostReadCounter() as counter:
            batch = cache.batch(sampler.indices(0, batch_index), sampler.generator("batch", 0, batch_index))
            with torch.no_grad():
                latents = sample_latents(components["vae"], batch, torch.float32)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, prompt_cache(batch["prompt_ids"]), return_dict=False)[0]
            torch.nn.functional.mse_loss(prediction.float(), noise.float()).backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        assert counter.host_reads == 0, counter.host_read_operators
        unet.zero_grad()
