"""Per-denoising-step latency and peak memory of the dual control against diffusers' stock ControlNet pipelines.

Stable Diffusion 1.5-architecture components with random weights are built from configs (no download). Five
configurations run side by side, interleaved round by round so that machine noise hits all of them alike:

  stock-1cn        StableDiffusionControlNetPipeline, one ControlNetModel
  stock-2cn        StableDiffusionControlNetPipeline, MultiControlNetModel of two ControlNets (the reference)
  dual             StableDiffusionDualControlPipeline, two branches (the same two ControlNets)
  dual-shared      StableDiffusionDualControlPipeline, shared trunk
  dual-unc-half    dual, with the uncertainty branch switched off for the second half of the steps

Latency is the median over all timed steps of the wall time between two `callback_on_step_end` calls (text
encoding and VAE decoding excluded). Memory is measured in a fresh process per configuration that builds only what
that configuration needs and runs it once: peak CUDA allocated memory, or on the CPU the peak resident set size
(weights and activations).

    python benchmarks/bench_dual_control.py --device cpu --resolution 256 --steps 4 --rounds 3
"""

import argparse
import platform
import resource
import subprocess
import statistics
import sys
import tempfile
import threading
import time

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    MultiControlNetModel,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from diffusers_uncertainty import StableDiffusionDualControlPipeline, UncertaintyControlNetModel, write_tiny_tokenizer


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--resolution", type=int, default=256, help="image size (latents are 1/8 of it)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per call (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=3, help="calls per configuration, interleaved")
    parser.add_argument("--num_classes", type=int, default=12, help="semantic channels")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"])
    parser.add_argument("--memory_of", default=None, help=argparse.SUPPRESS)  # internal: one config's peak RSS
    return parser.parse_args()


def build_sd15_components(device, dtype):
    """SD 1.5 sizes (UNet 320/640/1280/1280, CLIP ViT-L/14 text encoder, 4-level VAE), random weights."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_tiny_tokenizer(folder, model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=len(tokenizer) - 2,
            eos_token_id=len(tokenizer) - 1,
            pad_token_id=len(tokenizer) - 1,
        )
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    for name in ("vae", "text_encoder", "unet"):
        common[name] = common[name].to(device=device, dtype=dtype)
    return common


def random_controlnet(unet, channels, seed):
    """A ControlNet from the UNet with non-zero output convolutions (untrained ones add exact zeros)."""
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=channels)
    for name, parameter in controlnet.named_parameters():
        if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
            torch.nn.init.normal_(parameter, std=0.01)
    return controlnet


def _resident_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_memory_of_call(call, device):
    """Peak memory while `call` runs: CUDA peak allocated, or the CPU resident set size sampled every 5 ms
    (model construction, whose transient copies exceed inference, is not counted)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        call()
        return torch.cuda.max_memory_allocated()
    peak, done = [_resident_bytes()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _resident_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    call()
    done.set()
    sampler.join()
    return max(peak[0], _resident_bytes())


def peak_memory_in_subprocess(name, argv):
    """Peak resident memory (MiB) of a fresh process that builds only configuration `name` and runs it once.

    On the CPU the allocator keeps freed memory, so in-process differences say little; a process of its own per
    configuration gives comparable peaks (weights plus activations).
    """


    command = [sys.executable, __file__, *argv, "--memory_of", name]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def build_calls(args, names):
    """Build the pipelines needed for the configurations `names`: `{name: (pipeline, call_kwargs)}`."""
    dtype = getattr(torch, args.dtype)
    components = build_sd15_components(args.device, dtype)
    unet = components["unet"]
    stock_kwargs = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    needs = set(names)
    semantic = uncertainty = None
    if needs & {"stock-1cn", "stock-2cn", "dual", "dual-unc-half"}:
        semantic = random_controlnet(unet, args.num_classes, seed=1).to(args.device, dtype)
    if needs & {"stock-2cn", "dual", "dual-unc-half"}:
        uncertainty = random_controlnet(unet, 1, seed=2).to(args.device, dtype)

    size = args.resolution
    labels = torch.randint(0, args.num_classes, (1, size, size), generator=torch.Generator().manual_seed(0))
    one_hot = torch.nn.functional.one_hot(labels, args.num_classes).permute(0, 3, 1, 2).float()
    uncertainty_map = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(1))
    common = dict(prompt="a street at dusk", num_inference_steps=args.steps, height=size, width=size, output_type="latent")

    calls = {}
    if "stock-1cn" in needs:
        pipeline = StableDiffusionControlNetPipeline(**components, controlnet=semantic, **stock_kwargs)
        calls["stock-1cn"] = (pipeline, dict(image=one_hot, **common))
    if "stock-2cn" in needs:
        pipeline = StableDiffusionControlNetPipeline(
            **components, controlnet=MultiControlNetModel([semantic, uncertainty]), **stock_kwargs
        )
        calls["stock-2cn"] = (
            pipeline,
            dict(image=[one_hot, uncertainty_map], controlnet_conditioning_scale=[1.0, 1.0], **common),
        )
    if needs & {"dual", "dual-unc-half"}:
        pipeline = StableDiffusionDualControlPipeline(
            **components, controlnet=UncertaintyControlNetModel.from_controlnets(semantic, uncertainty)
        )
        calls["dual"] = (pipeline, dict(semantic_map=labels, uncertainty_map=uncertainty_map, **common))
        calls["dual-unc-half"] = (
            pipeline,
            dict(semantic_map=labels, uncertainty_map=uncertainty_map, control_guidance_end=(1.0, 0.5), **common),
        )
    if "dual-shared" in needs:
        torch.manual_seed(3)
        shared = UncertaintyControlNetModel.from_unet(unet, semantic_channels=args.num_classes, shared_trunk=True)
        for name, parameter in shared.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                torch.nn.init.normal_(parameter, std=0.01)
        pipeline = StableDiffusionDualControlPipeline(**components, controlnet=shared.to(args.device, dtype))
        calls["dual-shared"] = (pipeline, dict(semantic_map=labels, uncertainty_map=uncertainty_map, **common))
    for name in list(calls):
        if name not in needs:
            del calls[name]
    return calls


def main():
    args = parse_args()
    names = ["stock-1cn", "stock-2cn", "dual", "dual-shared", "dual-unc-half"]
    if args.memory_of is not None:
        pipeline, kwargs = build_calls(args, [args.memory_of])[args.memory_of]
        pipeline.set_progress_bar_config(disable=True)
        print(peak_memory_of_call(lambda: pipeline(**kwargs), args.device) / 2**20)
        return

    calls = build_calls(args, names)
    for pipeline, _ in calls.values():
        pipeline.set_progress_bar_config(disable=True)
        if args.attention == "xformers":
            pipeline.enable_xformers_memory_efficient_attention()

    step_times = {name: [] for name in names}
    for round_index in range(args.rounds + 1):  # round 0 warms up and is not recorded
        for name in names:
            stamps = []

            def callback(pipeline, step, timestep, callback_kwargs):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())
                return callback_kwargs

            pipeline, kwargs = calls[name]
            pipeline(**kwargs, callback_on_step_end=callback)
            if round_index > 0:
                step_times[name] += [b - a for a, b in zip(stamps, stamps[1:])]
    del calls

    peaks = {name: peak_memory_in_subprocess(name, sys.argv[1:]) for name in names}
    reference = statistics.median(step_times["stock-2cn"])
    print(
        f"# {platform.machine()}, torch {torch.__version__}, device={args.device}, dtype={args.dtype}, "
        f"resolution={args.resolution}, steps={args.steps}, rounds={args.rounds}, attention={args.attention}, "
        f"classes={args.num_classes}, CFG on (batch 2 through UNet and controls)"
    )
    memory_kind = "peak CUDA allocated" if args.device.startswith("cuda") else "peak RSS during the call"
    print(f"| configuration | median s/step | x stock-2cn | {memory_kind} (MiB) |")
    print("|---|---|---|---|")
    for name in names:
        median = statistics.median(step_times[name])
        print(f"| {name} | {median:.3f} | {median / reference:.3f} | {peaks[name]:.0f} |")


if __name__ == "__main__":
    main()
