"""What keeps a training loop from leaving the accelerator idle, shared by every training script: the fast-math
switches, the fused AdamW choice, and the steady-state throughput meter (steps/s and samples/s after warm-up,
measured with two device synchronisations in all, none per step).
"""

import collections
import os
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..atomic import write_json_atomic


THROUGHPUT_FILE = "throughput.json"
# Where a training script keeps its data (`--dataset_placement`): decoded once on the device, streamed by a
# DataLoader, or chosen from the data's size (each side's `choose_dataset_placement` says how).
DATASET_PLACEMENTS = ("auto", "device", "stream")


def check_dataset_placement(value: str, argument: str = "--dataset_placement") -> str:
    r"""
    Return `value` if it is one of `auto`, `device`, `stream`; raise a `ValueError` naming `argument` otherwise.

    Args:
        value (`str`):
            The placement.
        argument (`str`, defaults to `"--dataset_placement"`):
            Name used in the error message.
    """
    if value not in DATASET_PLACEMENTS:
        raise ValueError(f"`{argument}` must be one of {', '.join(DATASET_PLACEMENTS)}, but got {value!r}.")
    return value


# `torch.compile` modes of the training scripts' `--torch_compile_mode` (`default`: inductor's fused kernels;
# `reduce-overhead` and `max-autotune` also replay each compiled graph as a CUDA graph, one launch instead of hundreds:
# what a small model whose steps are bound by kernel launches needs; they act on CUDA tensors only).
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_torch_compile_mode(mode: str, torch_compile: bool, argument: str = "--torch_compile_mode") -> str:
    r"""
    Return `mode` if it is one of `TORCH_COMPILE_MODES` and, when it is not `default`, compilation is on; raise a
    `ValueError` naming `argument` otherwise.

    Args:
        mode (`str`):
            The requested mode.
        torch_compile (`bool`):
            Whether `--torch_compile` is set.
        argument (`str`, defaults to `"--torch_compile_mode"`):
            Name used in the error messages.
    """
    if mode not in TORCH_COMPILE_MODES:
        raise ValueError(f"`{argument}` must be one of {', '.join(TORCH_COMPILE_MODES)}, but got {mode!r}.")
    if mode != "default" and not torch_compile:
        raise ValueError(f"`{argument} {mode}` needs `--torch_compile`.")
    return mode


def compile_in_place(module: torch.nn.Module, mode: str = "default") -> None:
    r"""
    `module.compile(mode=...)`: compiled in place, so its state dict keys, save hooks and `unwrap_model` stay as they
    are.

    Args:
        module (`torch.nn.Module`):
            The model to compile.
        mode (`str`, defaults to `"default"`):
            One of `TORCH_COMPILE_MODES`.
    """
    module.compile(mode=None if mode == "default" else mode)


def mark_step_begin(mode: str) -> None:
    r"""
    Tell the CUDA-graph runtime that a new training step begins (its previous step's graph outputs may then be
    overwritten); nothing in the modes without CUDA graphs. Call it before each step's first compiled call.

    Args:
        mode (`str`):
            The `--torch_compile_mode` of the run (`default` unless compiling: `check_torch_compile_mode`).
    """
    if mode in ("reduce-overhead", "max-autotune"):
        torch.compiler.cudagraph_mark_step_begin()


def enable_tf32() -> None:
    """TF32 matmuls and convolutions on Ampere and newer GPUs (no effect on the CPU): fp32 parts of a mixed-precision
    step run on tensor cores at a precision far below the noise of stochastic training."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def adamw_fused_kwargs(parameters) -> dict:
    r"""
    `{"fused": True}` when every parameter lives on a CUDA device (one kernel for the whole update instead of several
    per tensor), else `{}`.

    Args:
        parameters (iterable of `torch.nn.Parameter`):
            The parameters the optimizer will update (already on their device).
    """
    parameters = list(parameters)
    if parameters and all(p.device.type == "cuda" for p in parameters):
        return {"fused": True}
    return {}


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA only; the CPU runs eagerly)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ThroughputMeter:
    r"""
    Steady-state throughput of a loop: the first `warmup_steps` steps (allocator growth, cuDNN autotuning,
    compilation) are excluded; the device is synchronised once when measurement starts and once in [`result`], so
    the loop itself never waits on the host.

    Args:
        device (`torch.device` or `str`):
            The device the loop runs on.
        samples_per_step (`int`):
            Samples one step consumes over all processes (batch size x processes x accumulation).
        warmup_steps (`int`, defaults to 10):
            Steps excluded from the measurement.
    """

    def __init__(self, device: torch.device | str, samples_per_step: int, warmup_steps: int = 10):
        if samples_per_step < 1:
            raise ValueError(f"`samples_per_step` must be a positive integer, but got {samples_per_step!r}.")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, but got {warmup_steps!r}.")
        self.device = torch.device(device)
        self.samples_per_step = samples_per_step
        self.warmup_steps = warmup_steps
        self.steps = 0
        self._start = None
        if warmup_steps == 0:
            self._start_measuring()

    def _start_measuring(self) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def step(self) -> None:
        """Count one finished step (call it after the optimizer step)."""
        self.steps += 1
        if self.steps == self.warmup_steps:
            self._start_measuring()

    def result(self) -> dict | None:
        """The measurement so far, or `None` when no step after the warm-up has run yet."""
        measured = self.steps - self.warmup_steps
        if self._start is None or measured < 1:
            return None
        synchronize(self.device)
        seconds = time.perf_counter() - self._start
        return {
            "steps_per_second": measured / seconds,
            "samples_per_second": measured * self.samples_per_step / seconds,
            "measured_steps": measured,
            "warmup_steps": self.warmup_steps,
            "seconds": seconds,
            "samples_per_step": self.samples_per_step,
            "device": str(self.device),
        }

    def write(self, output_dir: str | os.PathLike, **extra) -> str:
        r"""
        Write the measurement to `<output_dir>/throughput.json` (with `extra` keys, e.g. the stage name) and return
        the line a script prints. With too few steps to measure, the file says so (`steps_per_second: null`).

        Args:
            output_dir (`str` or `os.PathLike`):
                The run's output folder.
        """
        result = self.result()
        record = dict(extra, **(result or {"steps_per_second": None, "samples_per_second": None,
                                           "measured_steps": 0, "warmup_steps": self.warmup_steps}))
        write_json_atomic(os.path.join(output_dir, THROUGHPUT_FILE), record)
        if result is None:
            return f"Steady-state throughput: not measured ({self.steps} steps, {self.warmup_steps} of warm-up)."
        return (
            f"Steady-state throughput: {result['steps_per_second']:.2f} it/s, "
            f"{result['samples_per_second']:.1f} samples/s ({result['measured_steps']} steps after "
            f"{self.warmup_steps} warm-up steps, {result['device']})."
        )


# ATen operators whose result on the host depends on tensor values: on an accelerator each one waits for the device
# (`.item()`, `bool(t)`, `int(t)` go through `_local_scalar_dense`; the others size their output from the data).
HOST_READ_OPERATORS = frozenset({
    "aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.nonzero", "aten.nonzero_static",
    "aten.masked_select", "aten.unique", "aten._unique", "aten._unique2", "aten.unique_consecutive",
    "aten.unique_dim", "aten.repeat_interleave", "aten.bincount",
})


class HostReadCounter(TorchDispatchMode):
    r"""
    Counts the operators that read tensor values on the host while it is active: on a GPU each is a device sync,
    on the CPU it is free, so this is how a CPU test finds the syncs a training step would have on an accelerator
    (`torch.cuda.set_sync_debug_mode` exists only on CUDA). Counts every operator too (`operators`), a proxy for the
    kernel launches of a step. `aten.repeat_interleave` is counted although it does not read values when given
    `output_size`.

        with HostReadCounter() as counter:
            loss = compute_loss(batch, ...)
        assert counter.host_reads == 0, counter.host_read_operators
    """

    def __init__(self):
        super().__init__()
        self.operators = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def host_read_operators(self) -> dict:
        """`{operator: count}` of the host-reading operators seen."""
        return {name: count for name, count in self.operators.items() if name in HOST_READ_OPERATORS}

    @property
    def host_reads(self) -> int:
        """How many host-reading operators ran."""
        return sum(self.host_read_operators.values())
