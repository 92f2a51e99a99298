#!/usr/bin/env bash
# One GPU session's measurements, prepared so that a short lease runs them in one call.
#
# GPU time comes in leases of minutes on a machine that starts bare and reaches no network, so everything it needs
# travels with the checkout: the Python 3.12 wheels it lacks (`.whl/`) and the CamVid day -> dusk folder
# (`.devdata/`). Both folders are git-ignored through .git/info/exclude. Trained models do not travel back: at the
# GPU scale the base and control are ~100 MB, over what a call may carry, so a lease that needs them trains them
# (the `workflow` part) before the parts that reuse them (`headline`).
#
# On the development machine (package registries reachable, no GPU needed):
#   bash benchmarks/gpu_session.sh pack DATA_DIR
#     DATA_DIR: the CamVid day -> dusk folder (source/{train,val}, target/{train,val}, classes.json; source/test is
#     left out to stay under the 64 MiB a call may carry).
# On the GPU machine, carrying `.whl` and `.devdata`:
#   bash benchmarks/gpu_session.sh device SECONDS [PART ...]
#     Runs the parts in order while SECONDS last (a part starts only if its estimate fits in what is left, and is
#     stopped at the deadline), and writes to $OUT: session.md (what ran, how long, exit codes), report.md (the
#     workflow's report) and results.tar.gz (every part's log and results, the report's figures). Work stays in
#     /tmp/gpu_session_runs: a call made while the machine is still warm resumes a part from its finished stages.
#     Parts (default: workflow generation stages):
#       workflow    examples/configs/camvid_daydusk.yaml --scale gpu end to end, its report (issue 11's <= 8 min run;
#                   issue 15's synthetic-data table; issue 16's FDA row at one seed)
#       generation  bench_dual_control.py --compile and bench_generation.py at SD 1.5 sizes (issue 14)
#       stages      bench_stages.py: each stage's throughput, streaming vs on-device vs compiled (issue 11)
#       headline    bench_headline.py --scale gpu, seeds 0 1 2, reusing the workflow part's base and control (issue 12)
# Test it on a CPU at the smoke scale (minutes on 2 cores):
#   GPU_SESSION_DEVICE=cpu GPU_SESSION_SCALE=smoke OUT=/tmp/gpu_out bash benchmarks/gpu_session.sh device 900 workflow
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
usage="usage: bash benchmarks/gpu_session.sh pack DATA_DIR | device SECONDS [PART ...]"
part=${1:?$usage}
shift

exclude() {  # git-ignore a top-level folder of this checkout only (not committed: users have no .devdata)
    grep -qxF "/$1/" .git/info/exclude 2>/dev/null || echo "/$1/" >> .git/info/exclude
}

if [[ $part == pack ]]; then
    data=${1:?$usage}
    for split in source/train source/val target/train target/val; do
        [[ -d $data/$split/images ]] || { echo "DATA_DIR must hold $split/images/, but $data/$split/images is missing" >&2; exit 2; }
    done
    [[ -f $data/classes.json ]] || { echo "DATA_DIR must hold classes.json, but $data/classes.json is missing" >&2; exit 2; }
    exclude .whl
    exclude .devdata
    # Built under temporary names and renamed when complete: a failed pack leaves the previous folders as they were.
    rm -rf .whl.partial .devdata.partial
    trap 'rm -rf .whl.partial .devdata.partial' EXIT
    mkdir -p .whl.partial .devdata.partial/camvid_daydusk
    # The versions this checkout was tested with, for the device's CPython 3.12 (pure-Python wheels but multiprocess).
    versions=$(python - <<'EOF'
import importlib.metadata as m
print(" ".join(f"{name}=={m.version(name)}" for name in
      ("diffusers", "segmentation-models-pytorch", "datasets", "dill", "multiprocess", "importlib-metadata")))
EOF
)
    # shellcheck disable=SC2086
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl.partial $versions
    for split in source/train source/val target/train target/val; do
        mkdir -p ".devdata.partial/camvid_daydusk/$split"
        cp -r "$data/$split/." ".devdata.partial/camvid_daydusk/$split/"
    done
    cp "$data/classes.json" .devdata.partial/camvid_daydusk/
    total=$(du -sm .whl.partial .devdata.partial | awk '{s += $1} END {print s}')
    (( total < 60 )) || { echo "Carried folders would be ${total} MiB: over what a call may carry with the checkout" >&2; exit 2; }
    rm -rf .whl .devdata
    mv .whl.partial .whl
    mv .devdata.partial .devdata
    echo "Packed $versions"
    du -sh .whl .devdata
    echo "Carry [\".whl\", \".devdata\"] and run: bash benchmarks/gpu_session.sh device 540"
    exit 0
fi

[[ $part == device ]] || { echo "$usage" >&2; exit 2; }
seconds=${1:?$usage}
shift
parts=("$@")
(( ${#parts[@]} )) || parts=(workflow generation stages)
for name in "${parts[@]}"; do
    [[ $name =~ ^(workflow|generation|stages|headline)$ ]] \
        || { echo "PART must be one of workflow generation stages headline, got $name" >&2; exit 2; }
done
out=${OUT:?OUT must name the folder whose files come back}
device=${GPU_SESSION_DEVICE:-cuda}
scale=${GPU_SESSION_SCALE:-gpu}
data=$repo/.devdata/camvid_daydusk
[[ -d $data/source/train/images ]] || { echo "$data is missing: run the pack part first and carry .devdata" >&2; exit 2; }
deadline=$(( $(date +%s) + seconds ))

export PYTHONPATH=$repo
if ! python3 -c "import diffusers, datasets, segmentation_models_pytorch" 2> /dev/null; then  # the device's case
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=$repo:/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import diffusers, datasets, segmentation_models_pytorch, diffusers_uncertainty" \
    || { echo "The carried wheels do not import with this machine's packages (above)" >&2; exit 2; }
runs=/tmp/gpu_session_runs
results=$runs/results   # becomes $OUT/results.tar.gz: a call brings back at most 8 files
rm -rf "$results"
mkdir -p "$runs" "$results" "$out"

summary=$out/session.md
{
    echo "# GPU session $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    echo
    echo "| part | wall s | exit |"
    echo "|---|---|---|"
} > "$summary"

# run_part NAME ESTIMATE_S COMMAND...: skipped if its estimate does not fit (then `ran` is 0); stopped at the deadline.
run_part() {
    local name=$1 estimate=$2 left start code
    shift 2
    left=$(( deadline - $(date +%s) ))
    ran=0
    if (( left < estimate )); then
        echo "| $name | skipped: ${left} s left, needs ~${estimate} s | |" >> "$summary"
        return 0
    fi
    ran=1
    start=$(date +%s)
    set +e
    timeout --signal=INT --kill-after=20 "$left" "$@" > "$runs/$name.log" 2>&1
    code=$?
    set -e
    echo "| $name | $(( $(date +%s) - start )) | $code |" >> "$summary"
    cp "$runs/$name.log" "$results/$name.log"
}

config=examples/configs/camvid_daydusk.yaml
for name in "${parts[@]}"; do
    case $name in
    workflow)
        run_part workflow 300 python3 -m diffusers_uncertainty run --config "$config" --scale "$scale" \
            --data_root "$data" --output_dir "$runs/workflow"
        if (( ran )) && [[ -f $runs/workflow/report/report.md ]]; then
            cp "$runs/workflow/report/report.md" "$out/report.md"
            cp -r "$runs/workflow/report" "$results/report"
        fi
        ;;
    generation)
        if [[ $device == cuda ]]; then
            run_part dual_control 120 python3 benchmarks/bench_dual_control.py --device cuda --dtype float16 \
                --resolution 512 --steps 20 --whole_calls 3 --compile
            run_part generation 120 python3 benchmarks/bench_generation.py --architecture sd15 --device cuda \
                --dtype float16 --resolutions 128 512 --batch_sizes 8 32 64 --steps 4 --rounds 2 --shards_per_batch_size 1
        else
            run_part dual_control 60 python3 benchmarks/bench_dual_control.py --device cpu --resolution 64 --steps 2 --rounds 1
        fi
        ;;
    stages)
        run_part stages 180 python3 benchmarks/bench_stages.py --device "$device" --data_root "$data" \
            --work_dir "$runs/stages" --paths stream device compiled
        (( ! ran )) || [[ ! -f $runs/stages/results.md ]] || cp "$runs/stages/results.md" "$results/stages.md"
        ;;
    headline)
        # The workflow part's base and control serve every seed: bench_headline skips finished stages.
        mkdir -p "$runs/headline/seed_0"
        for stage in base control; do
            if [[ -d $runs/workflow/$stage && ! -e $runs/headline/seed_0/$stage ]]; then
                cp -r "$runs/workflow/$stage" "$runs/headline/seed_0/$stage"
            fi
        done
        run_part headline 240 python3 benchmarks/bench_headline.py --config "$config" --scale "$scale" \
            --data_root "$data" --work_dir "$runs/headline" --seeds 0 1 2
        (( ! ran )) || [[ ! -f $runs/headline/results.md ]] || cp "$runs/headline/results.md" "$results/headline.md"
        ;;
    esac
done

tar -czf "$out/results.tar.gz" -C "$runs" results
cat "$summary"
