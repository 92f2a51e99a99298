#!/usr/bin/env python
"""Training throughput and peak memory of the dual-control ControlNet, side by side with the stock recipe.

Three set-ups are trained for a few steps on a Stable Diffusion 1.5-architecture UNet with random weights built from
its config (nothing is downloaded):

* `single`  - one diffusers `ControlNetModel` (the stock `train_controlnet.py` recipe), conditioned on the label map;
* `two_branch_joint` - `UncertaintyControlNetModel` with separate semantic and uncertainty ControlNets, both trained;
* `shared_trunk_joint` - `UncertaintyControlNetModel(shared_trunk=True)`, trunk and both embeddings trained.

A step is what the training script does after the frozen encoders: noise the latents, run the controlnet and the frozen
UNet, MSE loss, backward, AdamW step. The VAE and text encoder are left out (identical for all set-ups; latents and
text embeddings are random tensors of the right shapes). All samples of a joint batch are labeled, so both branches
run on the whole batch (the most expensive joint case for separate branches).

Each (set-up, gradient checkpointing) pair runs in a fresh process, one after the other in one invocation, so its peak
memory is its own: `torch.cuda.max_memory_allocated` on CUDA, the process's peak resident memory on CPU.

Every step is timed twice: wall-clock time and the process's CPU time (`time.process_time`, all threads). On a shared
CPU machine wall time mostly measures the other jobs, so ratios use CPU time there (`--timer auto`: CPU time on CPU,
wall time on CUDA); samples per CPU-second equal samples/s on an otherwise idle machine with the same threads busy.

On a CPU shared with other jobs use `--threads 1` (and `OMP_NUM_THREADS=1`): with several threads, a thread that
waits for a descheduled sibling spins and burns CPU time, which makes even CPU time depend on the other jobs.

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py --device cpu --resolution 256 --batch_size 1 --steps 2 --threads 1
    python benchmarks/bench_training.py --device cuda --dtype float16 --resolution 512 --batch_size 4 --steps 10
"""

import argparse
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F


SETUPS = ("single", "two_branch_joint", "shared_trunk_joint")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sd15_unet():
    """A UNet with Stable Diffusion 1.5's architecture (stable-diffusion-v1-5 unet/config.json), random weights."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def build(setup: str, unet, num_classes: int):
    """The trainable controlnet of `setup` and a function mapping (noisy, t, text, one_hot, uncertainty) to residuals."""
    from diffusers import ControlNetModel

    from diffusers_uncertainty import UncertaintyControlNetModel

    if setup == "single":
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=num_classes)

        def run(noisy, timesteps, text, one_hot, uncertainty):
            return controlnet(noisy, timesteps, encoder_hidden_states=text, controlnet_cond=one_hot, return_dict=False)

    else:
        controlnet = UncertaintyControlNetModel.from_unet(
            unet, semantic_channels=num_classes, uncertainty_channels=1, shared_trunk=setup == "shared_trunk_joint"
        )
        mask = None

        def run(noisy, timesteps, text, one_hot, uncertainty):
            nonlocal mask
            if mask is None:
                mask = torch.ones(noisy.shape[0], dtype=torch.bool, device=noisy.device)
            return controlnet(
                noisy,
                timesteps,
                encoder_hidden_states=text,
                controlnet_cond=[one_hot, uncertainty],
                conditioning_scale=[1.0, 1.0],
                return_dict=False,
                semantic_mask=mask,
            )

    return controlnet, run


def measure(setup: str, gradient_checkpointing: bool, args, queue) -> None:
    """Run in a child process: build, warm up, time `args.steps` training steps, report via `queue`."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    unet = sd15_unet()
    controlnet, run = build(setup, unet, args.num_classes)
    unet.requires_grad_(False)
    unet.to(device, dtype=dtype)
    controlnet.to(device)  # trainable weights stay float32, as in diffusers' scripts
    controlnet.train()
    if gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    parameters = [p for p in controlnet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

    batch, size = args.batch_size, args.resolution
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, size // 8, size // 8, generator=generator).to(device)
    text = torch.randn(batch, 77, 768, generator=generator).to(device, dtype)
    labels = torch.randint(0, args.num_classes, (batch, size, size), generator=generator)
    one_hot = F.one_hot(labels, args.num_classes).permute(0, 3, 1, 2).float().to(device)
    uncertainty = torch.rand(batch, 1, size, size, generator=generator).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            down, mid = run(noisy, timesteps, text, one_hot, uncertainty)
            pred = unet(
                noisy.to(dtype),
                timesteps,
                encoder_hidden_states=text,
                down_block_additional_residuals=[sample.to(dtype) for sample in down],
                mid_block_additional_residual=mid.to(dtype),
                return_dict=False,
            )[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        memory_kind = "CUDA max allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        memory_kind = "peak RSS"
    queue.put(
        dict(
            setup=setup,
            gradient_checkpointing=gradient_checkpointing,
            times=times,
            cpu_times=cpu_times,
            trainable=sum(p.numel() for p in parameters),
            peak_gib=peak,
            memory_kind=memory_kind,
        )
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda.")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Frozen UNet / autocast dtype.")
    parser.add_argument("--resolution", type=int, default=256, help="Image resolution, divisible by 8.")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per set-up (the median is reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    parser.add_argument("--rounds", type=int, default=1, help="Repeat all set-ups this many times, alternating.")
    parser.add_argument("--num_classes", type=int, default=11)
    parser.add_argument(
        "--gradient_checkpointing", choices=["off", "on", "both"], default="both", help="Which variants to run."
    )
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each run.")
    parser.add_argument(
        "--timer",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="Time used for samples/s and ratios: wall clock or process CPU time (auto: CPU time on CPU).",
    )
    args = parser.parse_args(argv)
    if args.resolution <= 0 or args.resolution % 8 != 0:
        raise ValueError(f"`--resolution` must be a positive multiple of 8, but got {args.resolution}.")
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 0:
        raise ValueError(
            f"`--steps` and `--batch_size` must be >= 1 and `--warmup` >= 0, but got {args.steps}, "
            f"{args.batch_size}, {args.warmup}."
        )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"`--device {args.device}` was asked for, but CUDA is not available.")
    if args.device == "cpu" and args.dtype == "float16":
        raise ValueError("`--dtype float16` is not supported on CPU; use float32 or bfloat16.")
    return args


def main(argv=None):
    args = parse_args(argv)
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    timer = args.timer if args.timer != "auto" else ("wall" if args.device.startswith("cuda") else "cpu")
    context = multiprocessing.get_context("spawn")
    load_start = os.getloadavg()
    # Rounds alternate the set-ups over time, so that a change in machine load hits all of them alike; the median is
    # taken over the timed steps of all rounds.
    results = {}
    for round_index in range(args.rounds):
        for gradient_checkpointing in variants:
            for setup in args.setups:
                queue = context.Queue()
                process = context.Process(target=measure, args=(setup, gradient_checkpointing, args, queue))
                process.start()
                result = queue.get()
                process.join()
                if process.exitcode != 0:
                    raise RuntimeError(
                        f"benchmark run {setup} (gradient checkpointing {gradient_checkpointing}) failed"
                    )
                print(
                    f"round {round_index} {setup:20s} ckpt={gradient_checkpointing!s:5s} wall "
                    f"{', '.join(f'{t:.2f}' for t in result['times'])} s, CPU "
                    f"{', '.join(f'{t:.2f}' for t in result['cpu_times'])} s, load {os.getloadavg()[0]:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
                key = (setup, gradient_checkpointing)
                if key not in results:
                    results[key] = result
                else:
                    results[key]["times"] += result["times"]
                    results[key]["cpu_times"] += result["cpu_times"]
                    results[key]["peak_gib"] = max(results[key]["peak_gib"], result["peak_gib"])
    results = list(results.values())
    for result in results:
        result["median_s"] = statistics.median(result["times"])
        result["median_cpu_s"] = statistics.median(result["cpu_times"])
        result["samples_per_s"] = args.batch_size / (result["median_s"] if timer == "wall" else result["median_cpu_s"])

    print(
        f"\ndevice {args.device} ({platform.processor() or platform.machine()}, torch {torch.__version__}), dtype "
        f"{args.dtype}, resolution {args.resolution}, batch {args.batch_size}, {args.rounds} round(s) of {args.steps} timed "
        f"steps after {args.warmup} warm-up, memory = {results[0]['memory_kind']}, load average at start/end "
        f"{load_start[0]:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n"
    )
    unit = "samples/s" if timer == "wall" else "samples per CPU-s"
    print(
        f"| set-up | grad. ckpt | trainable params (M) | median wall s/step | median CPU s/step | {unit} | vs single |"
        " peak memory (GiB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    by_key = {(r["setup"], r["gradient_checkpointing"]): r for r in results}
    for result in results:
        single = by_key.get(("single", result["gradient_checkpointing"]))
        ratio = f"{result['samples_per_s'] / single['samples_per_s']:.2f}x" if single else "-"
        print(
            f"| {result['setup']} | {'on' if result['gradient_checkpointing'] else 'off'} | "
            f"{result['trainable'] / 1e6:.0f} | {result['median_s']:.2f} | {result['median_cpu_s']:.2f} | "
            f"{result['samples_per_s']:.3f} | {ratio} | "
            f"{result['peak_gib']:.1f} |"
        )
    print()
    for gradient_checkpointing in variants:
        shared = by_key.get(("shared_trunk_joint", gradient_checkpointing))
        two = by_key.get(("two_branch_joint", gradient_checkpointing))
        if shared and two:
            ratio = shared["samples_per_s"] / two["samples_per_s"]
            verdict = "meets" if ratio >= 1.3 else "misses"
            print(
                f"shared trunk joint / two branches joint (gradient checkpointing "
                f"{'on' if gradient_checkpointing else 'off'}): {ratio:.2f}x {unit} ({verdict} the 1.3x target); "
                f"peak memory {shared['peak_gib']:.1f} vs {two['peak_gib']:.1f} GiB"
            )


if __name__ == "__main__":
    main()
