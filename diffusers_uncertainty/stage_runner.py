"""Running one example script as a workflow stage: in the workflow's own process (the script's `parse_args` and
`main`, CUDA initialised once for the whole workflow) when `accelerate launch` would start a single local process, or
through `accelerate launch` in a fresh process otherwise (several processes, DeepSpeed, FSDP, TPU, chosen GPUs).

Both ways give the script the same environment: the in-process run takes the variables that `accelerate launch`
itself would set (mixed precision, CPU, dynamo, threads) from accelerate's own launcher code, sets them for the
duration of the stage and restores them afterwards, together with accelerate's process-wide state. Both write the
script's output to the same log file.
"""

import contextlib
import gc
import importlib.util
import io
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch


# Launch variables that cannot change after CUDA is initialised: a stage that sets them runs in its own process.
_PROCESS_WIDE_VARIABLES = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES")


def single_process_environment(launch_args: list[str], script: str | os.PathLike) -> dict | None:
    r"""
    The environment `accelerate launch <launch_args> <script>` would give its one process, or `None` when it would
    not start exactly one local process with the simple launcher (then the stage needs `accelerate launch`).

    Args:
        launch_args (`list[str]`):
            `accelerate launch` flags, e.g. `["--num_processes", "1", "--mixed_precision", "bf16"]`.
        script (`str` or `os.PathLike`):
            The script (only used to let accelerate parse the command line).
    """
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args([*launch_args, str(script)])
    # The same resolution of defaults (accelerate config file, environment) that `accelerate launch` does, without
    # its "values were not passed to `accelerate launch`" warning: no `accelerate launch` happens here.
    launch_logger = logging.getLogger("accelerate.commands.launch")
    level = launch_logger.level
    launch_logger.setLevel(logging.ERROR)
    try:
        args, defaults, _ = _validate_launch_command(args)
    finally:
        launch_logger.setLevel(level)
    distributed = (args.multi_gpu, args.tpu, args.use_deepspeed, args.use_fsdp, args.use_megatron_lm)
    sagemaker = defaults is not None and str(getattr(defaults, "compute_environment", "")).endswith("SAGEMAKER")
    if any(distributed) and not args.cpu or sagemaker:
        return None
    if (args.num_processes or 1) > 1 or (args.num_machines or 1) > 1 or args.module or args.no_python:
        return None
    _, environment = prepare_simple_launcher_cmd_env(args)
    if any(environment.get(name) != os.environ.get(name) for name in _PROCESS_WIDE_VARIABLES):
        return None
    return environment


def _cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 or AMX); `True` when this torch cannot tell."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return supported is None or bool(supported())


def _accelerator_available() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def cpu_thread_arguments(launch_args: list[str]) -> list[str]:
    r"""
    `["--num_cpu_threads_per_process", "N"]` when `accelerate launch <launch_args>` would run the stages on the CPU
    with one thread per process, otherwise `[]`.

    `accelerate launch` sets `OMP_NUM_THREADS=1` in every process unless it is given `--cpu`,
    `--num_cpu_threads_per_process` or an `OMP_NUM_THREADS` of the caller's, also on a machine without a GPU where
    the stages run on the CPU anyway: torch then computes on one core (a VAE training step of the base model at 64 px,
    batch 16, took 2.2 s instead of 1.2 s on a 2-core CPU). N is the physical cores divided by the processes per
    machine, what accelerate itself picks with `--cpu`; nothing is added when that is 1 or the user chose.

    Args:
        launch_args (`list[str]`):
            `accelerate launch` flags, e.g. `["--num_processes", "1"]`.
    """
    import psutil
    from accelerate.commands.launch import launch_command_parser

    if os.environ.get("OMP_NUM_THREADS") or _accelerator_available():
        return []
    args = launch_command_parser().parse_args([*launch_args, "stage.py"])
    if args.cpu or args.num_cpu_threads_per_process is not None:
        return []  # accelerate gives --cpu the physical cores itself; an explicit count is the user's
    processes_per_machine = max((args.num_processes or 1) // (args.num_machines or 1), 1)
    threads = (psutil.cpu_count(logical=False) or os.cpu_count() or 1) // processes_per_machine
    return ["--num_cpu_threads_per_process", str(threads)] if threads > 1 else []


def emulated_bf16_warning(environment: dict | None) -> str | None:
    r"""
    A warning when the stages would autocast to bf16 on a CPU that has no bf16 instructions, or `None`.

    Without AVX-512 or AMX, oneDNN runs bf16 convolutions through a slow fallback: on a 2-core AVX2-only EPYC a VAE
    training step took 55 s in bf16 against 2.7 s in fp32. Nothing is changed (the user asked for bf16); the
    warning says how to get fp32.

    Args:
        environment (`dict`, *optional*):
            From [`single_process_environment`]; `None` (a multi-process launch) gives no warning.
    """
    if environment is None or environment.get("ACCELERATE_MIXED_PRECISION") != "bf16":
        return None
    forced_cpu = environment.get("ACCELERATE_USE_CPU", "false").lower() in ("true", "1", "yes")
    if not forced_cpu and _accelerator_available():
        return None
    if _cpu_has_bf16_kernels():
        return None
    return (
        "Warning: `launch.args` asks for `--mixed_precision bf16`, but the stages run on a CPU without bf16 "
        "instructions (no AVX-512/AMX), where bf16 autocast is emulated and much slower than fp32 (measured 20x on "
        "an AVX2 CPU). Use `--mixed_precision no` in `launch.args` on this machine (quoted in YAML: "
        '`--mixed_precision, "no"`).'
    )


class _StageStream(io.TextIOBase):
    """A stream that writes to the current stage's log while one runs and to the original stream otherwise.

    Loggers and progress bars created during a stage keep a reference to `sys.stderr`; through this object they
    never write to a log file that a finished stage has closed."""

    def __init__(self, fallback):
        self.fallback = fallback
        self.target = None

    def write(self, text: str) -> int:
        (self.target or self.fallback).write(text)
        return len(text)

    def flush(self) -> None:
        (self.target or self.fallback).flush()

    def isatty(self) -> bool:
        return False


_STDOUT = None
_STDERR = None


def _stage_streams():
    global _STDOUT, _STDERR
    if _STDOUT is None:
        _STDOUT, _STDERR = _StageStream(sys.stdout), _StageStream(sys.stderr)
    return _STDOUT, _STDERR


def load_script(path: str | os.PathLike):
    r"""
    Import an example script as a fresh module (its `if __name__ == "__main__"` block does not run).

    Args:
        path (`str` or `os.PathLike`):
            The script file.
    """
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"diffusers_uncertainty_stage_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("build_parser", "parse_args", "main"):
        if not callable(getattr(module, name, None)):
            raise ValueError(
                f"The example script {str(path)!r} has no `{name}` function; stages need `build_parser`, `parse_args` "
                "and `main`."
            )
    return module


def _reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons so that the next stage can pick its own mixed precision."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@contextlib.contextmanager
def _library_handlers_to(stream):
    """Point the stream handlers that libraries (diffusers, transformers, ...) attached to the process's stdout or
    stderr at `stream` for the duration, so their messages land in the stage's log as in a launched process."""
    standard = {id(sys.__stdout__), id(sys.__stderr__), *(id(proxy.fallback) for proxy in _stage_streams())}
    moved = []
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler and id(handler.stream) in standard:
                moved.append((handler, handler.setStream(stream)))
    try:
        yield
    finally:
        for handler, previous in moved:
            handler.setStream(previous)


@contextlib.contextmanager
def _stage_environment(environment: dict):
    changed = {name: value for name, value in environment.items() if os.environ.get(name) != value}
    saved = {name: os.environ.get(name) for name in changed}
    threads = torch.get_num_threads()
    os.environ.update(changed)
    if environment.get("OMP_NUM_THREADS", "").isdigit():
        # A fresh process reads OMP_NUM_THREADS at start-up; this one has started, so set it directly.
        torch.set_num_threads(int(environment["OMP_NUM_THREADS"]))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.set_num_threads(threads)


def run_in_process(script: str | os.PathLike, flags: list[str], environment: dict, log_path: str | os.PathLike) -> None:
    r"""
    Run `script`'s `main(parse_args(flags))` in this process with `environment`, its output (prints, logging,
    progress bars, warnings) appended to `log_path`.

    Raises:
        `RuntimeError`: the script failed (an exception, or `SystemExit` with a non-zero code, e.g. an argument
        error); the message ends with the last lines of the log, as for a stage run by `accelerate launch`.
    """
    stdout, stderr = _stage_streams()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    failure = None
    with open(log_path, "a") as log:
        handler = logging.StreamHandler(stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s", "%m/%d/%Y %H:%M:%S"))
        stdout.target = stderr.target = log
        # Scripts configure logging with `basicConfig`, which does nothing once the root logger has a handler: give it
        # only the stage's handler and the level the scripts ask for.
        root.handlers, root.level = [handler], logging.INFO
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), _stage_environment(environment), \
                    _library_handlers_to(stderr):
                module = load_script(script)
                module.main(module.parse_args(flags))
        except SystemExit as error:
            if error.code not in (None, 0):
                failure = error
                traceback.print_exc(file=log)
        except Exception as error:  # noqa: BLE001 - reported with the log's tail below
            failure = error
            traceback.print_exc(file=log)
        finally:
            log.flush()
            stdout.target = stderr.target = None
            root.handlers, root.level = saved_handlers, saved_level
            _reset_accelerate_state()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if failure is not None:
        raise RuntimeError(f"{type(failure).__name__}: {failure}") from failure


def run_subprocess(command: list[str], log_path: str | os.PathLike) -> int:
    """Run `command` with its output appended to `log_path`; return its exit code."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment).returncode
