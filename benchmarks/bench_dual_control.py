"""Per-denoising-step latency, whole-call latency and peak memory of the dual control against diffusers' stock
ControlNet pipelines.

Stable Diffusion 1.5-architecture components with random weights are built from configs (no download), directly on
`--device`. Configurations run side by side, interleaved round by round so that machine noise hits all of them
alike:

  sd               StableDiffusionPipeline, no ControlNet (whole calls only)
  stock-1cn        StableDiffusionControlNetPipeline, one ControlNetModel
  stock-2cn        StableDiffusionControlNetPipeline, MultiControlNetModel of two ControlNets (the reference)
  dual             StableDiffusionDualControlPipeline, two branches (the same two ControlNets)
  dual-shared      StableDiffusionDualControlPipeline, shared trunk
  dual-unc-half    dual, with the uncertainty branch switched off for the second half of the steps

Per step: the wall time between two `callback_on_step_end` calls, each after a device synchronisation (so steps
do not blur into each other; text encoding and VAE decoding excluded). For dual-unc-half the steps inside and
outside the uncertainty branch's window are reported separately. Whole calls (`--whole_calls N`): median wall time
of N calls with `output_type="np"` (text encoding, denoising, VAE decoding, post-processing), and it/s = steps per
second of whole call. `--compile` compiles the UNet and the control(s) of every pipeline with `torch.compile`
(first rounds are warm-up and not timed). `--sync_debug` (CUDA) counts the host synchronisations per denoising step
with `torch.cuda.set_sync_debug_mode`. `--memory`: each configuration again in a fresh process that builds only what
it needs: peak CUDA allocated memory, or on the CPU the peak resident set size.

    python benchmarks/bench_dual_control.py --device cpu --resolution 128 --steps 4 --rounds 2
    python benchmarks/bench_dual_control.py --device cuda --dtype float16 --resolution 512 --steps 20 --whole_calls 3 --compile
"""

import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    MultiControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's package
from diffusers_uncertainty import StableDiffusionDualControlPipeline, UncertaintyControlNetModel, write_tiny_tokenizer


CONFIGURATIONS = ["sd", "stock-1cn", "stock-2cn", "dual", "dual-shared", "dual-unc-half"]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--resolution", type=int, default=256, help="image size (latents are 1/8 of it)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per call (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per configuration, interleaved")
    parser.add_argument("--warmup_rounds", type=int, default=1, help="untimed rounds first (compilation happens here)")
    parser.add_argument("--whole_calls", type=int, default=0, help="also time N whole calls per configuration")
    parser.add_argument("--configs", nargs="+", default=None, choices=CONFIGURATIONS, help="default: all")
    parser.add_argument("--num_classes", type=int, default=12, help="semantic channels")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and the control(s)")
    parser.add_argument("--compile_mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend (eager: a quick check)")
    parser.add_argument("--sync_debug", action="store_true", help="count host syncs per step (CUDA only)")
    parser.add_argument("--memory", action="store_true", help="peak memory, one fresh process per configuration")
    parser.add_argument("--memory_of", default=None, help=argparse.SUPPRESS)  # internal: one config's peak memory
    args = parser.parse_args(input_args)
    if args.configs is None:
        args.configs = list(CONFIGURATIONS)
    if args.steps < 2:
        raise ValueError(f"`--steps` must be at least 2 (the first step is not timed), but got {args.steps}.")
    if args.rounds < 1 or args.warmup_rounds < 0 or args.whole_calls < 0:
        raise ValueError(
            f"`--rounds` must be >= 1 and `--warmup_rounds`, `--whole_calls` >= 0, but got {args.rounds}, "
            f"{args.warmup_rounds}, {args.whole_calls}."
        )
    if args.sync_debug and not args.device.startswith("cuda"):
        raise ValueError(f"`--sync_debug` counts CUDA synchronisations and needs `--device cuda`, but got {args.device}.")
    return args


def build_sd15_components(device, dtype):
    """SD 1.5 sizes (UNet 320/640/1280/1280, CLIP ViT-L/14 text encoder, 4-level VAE), random weights, initialised
    on `device` (random initialisation of ~1.1 B parameters on the CPU would take longer than the benchmark)."""
    torch.manual_seed(0)
    with torch.device(device):
        return _build_sd15_components(device, dtype)


def _build_sd15_components(device, dtype):
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
    with torch.device(unet.device):
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
    """Build the pipelines needed for the configurations `names`: `{name: (pipeline, call_kwargs)}`; call_kwargs
    ask for latents (per-step timing), whole calls replace `output_type`."""
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
    if "sd" in needs:
        calls["sd"] = (StableDiffusionPipeline(**components, **stock_kwargs), dict(common))
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
        with torch.device(args.device):
            shared = UncertaintyControlNetModel.from_unet(unet, semantic_channels=args.num_classes, shared_trunk=True)
        for name, parameter in shared.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                torch.nn.init.normal_(parameter, std=0.01)
        pipeline = StableDiffusionDualControlPipeline(**components, controlnet=shared.to(args.device, dtype))
        calls["dual-shared"] = (pipeline, dict(semantic_map=labels, uncertainty_map=uncertainty_map, **common))
    for name in list(calls):
        if name not in needs:
            del calls[name]
    if args.compile:
        # One compiled UNet shared by all pipelines (they share the module); each control compiled once.
        compiled = {}

        def compile_once(module):
            if id(module) not in compiled:
                compiled[id(module)] = torch.compile(module, mode=args.compile_mode, backend=args.compile_backend)
            return compiled[id(module)]

        for pipeline in {id(pipeline): pipeline for pipeline, _ in calls.values()}.values():
            pipeline.unet = compile_once(pipeline.unet)
            if hasattr(pipeline, "controlnet"):
                pipeline.controlnet = compile_once(pipeline.controlnet)
    return calls


def off_window_steps(steps, end):
    """Steps at which a branch with `control_guidance_end=end` (start 0) is off, as the pipelines decide it."""
    return {i for i in range(steps) if (i + 1) / steps > end}


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(pipeline, kwargs, device, sync_debug=False):
    """Per-step wall times (steps 1..N-1) and, with `sync_debug`, the host syncs counted in each of them."""
    stamps, syncs = [], []
    recorder = warnings.catch_warnings(record=True) if sync_debug else None
    caught = recorder.__enter__() if sync_debug else None

    def callback(pipeline, step, timestep, callback_kwargs):
        if sync_debug:
            torch.cuda.set_sync_debug_mode(0)  # the benchmark's own synchronisation is not counted
            syncs.append(sum("synchroniz" in str(w.message) for w in caught))
            caught.clear()
        synchronize(device)
        stamps.append(time.perf_counter())
        if sync_debug:
            torch.cuda.set_sync_debug_mode(1)  # warn on every synchronising call from here to the next step's end
        return callback_kwargs

    try:
        if sync_debug:
            warnings.simplefilter("always")
        pipeline(**kwargs, callback_on_step_end=callback)
    finally:
        if sync_debug:
            torch.cuda.set_sync_debug_mode(0)
            recorder.__exit__(None, None, None)
    return [b - a for a, b in zip(stamps, stamps[1:])], syncs[1:]


def time_whole_call(pipeline, kwargs, device):
    synchronize(device)
    start = time.perf_counter()
    pipeline(**dict(kwargs, output_type="np"))
    synchronize(device)
    return time.perf_counter() - start


def main(args):
    if args.memory_of is not None:
        pipeline, kwargs = build_calls(args, [args.memory_of])[args.memory_of]
        pipeline.set_progress_bar_config(disable=True)
        print(peak_memory_of_call(lambda: pipeline(**kwargs), args.device) / 2**20)
        return

    names = [name for name in CONFIGURATIONS if name in args.configs]
    build_start = time.perf_counter()
    calls = build_calls(args, names)
    build_seconds = time.perf_counter() - build_start
    for pipeline, _ in calls.values():
        pipeline.set_progress_bar_config(disable=True)
        if args.attention == "xformers":
            pipeline.enable_xformers_memory_efficient_attention()

    step_names = [name for name in names if name != "sd"]
    half_off = off_window_steps(args.steps, 0.5)
    step_times = {name: [] for name in step_names}
    off_times, on_times, sync_counts = [], [], {name: [] for name in step_names}
    warmup_start, warmup_seconds = time.perf_counter(), 0.0
    for round_index in range(args.warmup_rounds + args.rounds if step_names else 0):
        if round_index == args.warmup_rounds:
            warmup_seconds = time.perf_counter() - warmup_start
        for name in step_names:
            pipeline, kwargs = calls[name]
            durations, _ = time_steps(pipeline, kwargs, args.device)
            if round_index < args.warmup_rounds:
                continue
            step_times[name] += durations
            if name == "dual-unc-half":
                for step, duration in enumerate(durations, start=1):
                    (off_times if step in half_off else on_times).append(duration)
    if args.sync_debug:
        for name in step_names:
            pipeline, kwargs = calls[name]
            sync_counts[name] = time_steps(pipeline, kwargs, args.device, sync_debug=True)[1]

    whole = {name: [] for name in names}
    for round_index in range(args.whole_calls + (1 if args.whole_calls else 0)):
        for name in names:  # the first round warms up the decoder path (and compiles nothing new)
            pipeline, kwargs = calls[name]
            duration = time_whole_call(pipeline, kwargs, args.device)
            if round_index > 0:
                whole[name].append(duration)
    del calls

    peaks = {name: peak_memory_in_subprocess(name, sys.argv[1:]) for name in step_names} if args.memory else {}
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: python {' '.join(sys.argv)}")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(
        f"machine: {device_name}, {os.cpu_count()} CPUs, torch {torch.__version__}, device={args.device}, "
        f"dtype={args.dtype}, resolution={args.resolution}, steps={args.steps}, rounds={args.rounds} "
        f"(+{args.warmup_rounds} warm-up), attention={args.attention}, classes={args.num_classes}, "
        f"compile={args.compile}{f' ({args.compile_backend}, mode {args.compile_mode})' if args.compile else ''}, CFG on (batch 2 through UNet "
        f"and controls); build {build_seconds:.1f} s, warm-up {warmup_seconds:.1f} s\n"
    )
    if step_names:
        reference = statistics.median(step_times["stock-2cn"]) if "stock-2cn" in step_times else None
        memory_kind = "peak CUDA allocated" if args.device.startswith("cuda") else "peak RSS during the call"
        header = "| configuration | median s/step | x stock-2cn |"
        header += f" {memory_kind} (MiB) |" if peaks else ""
        header += " host syncs per step |" if args.sync_debug else ""
        print(header)
        print("|---" * (header.count("|") - 1) + "|")
        rows = [(name, step_times[name]) for name in step_names]
        if "dual-unc-half" in step_times:
            rows += [("dual-unc-half, uncertainty on (window)", on_times), ("dual-unc-half, uncertainty off", off_times)]
        for name, times in rows:
            if not times:  # e.g. no timed step inside the window with very few steps
                print(f"| {name} | no timed step |")
                continue
            median = statistics.median(times)
            ratio = f"{median / reference:.3f}" if reference else "-"
            row = f"| {name} | {median:.4f} | {ratio} |"
            if peaks:
                row += f" {peaks[name]:.0f} |" if name in peaks else " |"
            if args.sync_debug:
                row += f" {sync_counts[name]} |" if name in sync_counts else " |"
            print(row)
    if args.whole_calls:
        print("\n| configuration | median s/call (whole) | it/s | x stock-1cn | x stock-2cn |")
        print("|---|---|---|---|---|")
        medians = {name: statistics.median(times) for name, times in whole.items()}
        for name in names:
            one = f"{medians[name] / medians['stock-1cn']:.3f}" if "stock-1cn" in medians else "-"
            two = f"{medians[name] / medians['stock-2cn']:.3f}" if "stock-2cn" in medians else "-"
            print(f"| {name} | {medians[name]:.3f} | {args.steps / medians[name]:.1f} | {one} | {two} |")


if __name__ == "__main__":
    main(parse_args())
