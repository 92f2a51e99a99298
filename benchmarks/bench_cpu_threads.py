#!/usr/bin/env python
"""The workflow on a machine without a GPU: `accelerate launch`'s one thread per process against the physical cores
that the workflow now gives its CPU stages (`stage_runner.cpu_thread_arguments`), side by side in one invocation.

Runs a config end to end `--repeats` times per setting, alternating, each in a fresh output folder: `one` with
`launch.args` + `--num_cpu_threads_per_process 1` (what `accelerate launch` chose before), `cores` with the config's
own `launch.args` (the workflow adds the physical cores). Prints each stage's time per setting (medians over
repeats; stages under 1 s left out), the ratio, and the whole workflow's time.

    python benchmarks/bench_cpu_threads.py --work_dir /tmp/bench_cpu_threads                 # the embedded default
    python benchmarks/bench_cpu_threads.py --config camvid_daydusk --smoke --data_root data/camvid_daydusk \
        --work_dir /tmp/bench_cpu_threads_camvid
"""

import argparse
import platform
import re
import shutil
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from this checkout

from diffusers_uncertainty.stage_runner import _accelerator_available  # noqa: E402
from diffusers_uncertainty.workflow import launch_arguments, load_config, run_workflow, stage_launch_arguments  # noqa: E402


STAGE_LINE = re.compile(r"^\[\s*\d+/\d+\] (\S+)\s+done in (\d+) s$")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="A config file or shipped name; the embedded default if unset.")
    parser.add_argument("--smoke", action="store_true", help="The config's smoke scale.")
    parser.add_argument("--data_root", default=None, help="The config's data folder (`--data_root` of the CLI).")
    parser.add_argument("--work_dir", required=True, help="Each run's output folder goes under it.")
    parser.add_argument("--repeats", type=int, default=1, help="Runs per setting (medians are reported).")
    args = parser.parse_args(input_args)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if _accelerator_available():
        parser.error("a GPU (or other accelerator) is available: the stages would not run on the CPU")
    return args


def settings(args, output_dir: Path) -> dict:
    overrides = {"output_dir": str(output_dir)}
    if args.data_root:
        overrides["data"] = {"root": args.data_root}
    config = load_config(args.config, smoke=args.smoke, overrides=overrides)
    one = dict(config, launch=dict(config.get("launch") or {},
                                   args=launch_arguments(config) + ["--num_cpu_threads_per_process", "1"]))
    return {"one": one, "cores": config}


def main(args) -> None:
    work = Path(args.work_dir)
    times = {"one": [], "cores": []}
    for repeat in range(args.repeats):
        for name in times:
            output_dir = work / f"{name}_{repeat}"
            shutil.rmtree(output_dir, ignore_errors=True)
            config = settings(args, output_dir)[name]
            lines = []
            start = time.perf_counter()
            run_workflow(config, echo=lines.append)
            stages = {match[1]: int(match[2]) for match in map(STAGE_LINE.match, lines) if match}
            stages["(whole workflow)"] = round(time.perf_counter() - start)
            times[name].append(stages)
            print(f"{name} run {repeat}: launch.args {stage_launch_arguments(config)}, "
                  f"{stages['(whole workflow)']} s", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {args.repeats} run(s) per setting, medians")
    print("| stage | one thread (s) | physical cores (s) | ratio |\n|---|---|---|---|")
    for stage in times["one"][0]:
        one = statistics.median(run[stage] for run in times["one"])
        cores = statistics.median(run[stage] for run in times["cores"])
        if cores >= 1:  # the workflow prints whole seconds: a stage under 1 s has no ratio to speak of
            print(f"| {stage} | {one:.0f} | {cores:.0f} | {one / cores:.2f}x |")


if __name__ == "__main__":
    main(parse_args())
