#!/usr/bin/env bash
# benchmarks/gpu.sh [--dry-run] OUTDIR
#
# The GPU measurement in one call, for a lent machine (one H100/H200, torch with CUDA preinstalled, no diffusers,
# no network, 10 minutes a command): installs the wheels of .whl/ (benchmarks/gpu_wheels.sh fetches them here
# beforehand), builds sd15-random fp16 for the torch backend at 512², runs fd-bench DDIM-50 and DPM++-20 with
# CUDA graphs on and off (--compare diffusers where graphs are on), a DeepCache arm on diffusers' pipeline, then
# sdxl-random at 1024² DDIM-50 if time remains. Every part has its own time limit, clamped to what is left of
# the whole budget (FD_GPU_BUDGET seconds, default 540), so one slow part cannot eat the rest.
#
# OUTDIR gets three files, rewritten after every part (what is done survives a later part's failure or the
# machine's time limit): results.json (each part's status and seconds, and every fd-bench JSON), results.md
# (the same as tables) and gpu.log (everything the parts printed).
#
# Exit status 0 when every part that ran succeeded (parts skipped for the budget do not count), else 1.
#
# --dry-run: the same parts on the CPU with the tiny models, tiny sizes and few steps (tests/test_gpu_script.py
# runs it, so the script cannot rot); CUDA-graph parts are recorded as skipped there (they need a GPU).
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -ne 1 || "$1" == -* ]]; then
    echo "usage: benchmarks/gpu.sh [--dry-run] OUTDIR" >&2
    exit 2
fi
OUT=$1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUDGET=${FD_GPU_BUDGET:-540}   # seconds for everything, install included; the device tool kills at 600
SCALE=1                        # part limits are multiplied by this
RESERVE=15                     # kept back for the last report
PY=${PYTHON:-python3}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fd-gpu.XXXXXX")   # engines and per-part files: large, never in OUTDIR
LOG=$OUT/gpu.log
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

if [[ $DRY == 1 ]]; then
    MODE=dry-run; DEVICE=cpu; PRECISION=fp32; SD=tiny; SD_SIZE=64; XL=tiny-xl; XL_SIZE=64
    DDIM_STEPS=10; DPM_STEPS=8; RUNS=1; WARMUP=0; GRAPHS=(off)
    # no device clock on the CPU, and a shared CPU can be several times slower: generous limits, so a dry run
    # fails only when a part is broken
    BUDGET=${FD_GPU_BUDGET:-3600}; SCALE=4
else
    MODE=gpu; DEVICE=cuda; PRECISION=fp16; SD=sd15-random; SD_SIZE=512; XL=sdxl-random; XL_SIZE=1024
    DDIM_STEPS=50; DPM_STEPS=20; RUNS=3; WARMUP=1; GRAPHS=(on off)
fi
echo "fd gpu.sh: mode $MODE, budget ${BUDGET}s, out $OUT, work $WORK, $(date -u +%FT%TZ)"

# --- install: the wheels of .whl/ into a private folder, fd itself through a folder of links -------------------
if [[ -d $REPO/.whl ]] && ! $PY -c "import diffusers" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$REPO"/.whl/*.whl || echo "wheel install failed (the parts that need diffusers will fail)"
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
# fd installs as fd.builder/fd.runtime/... (pyproject's package-dir); the same layout as links, no pip install
mkdir -p "$WORK/src/fd"
cp "$REPO"/fd/*.py "$WORK/src/fd/"
for part in builder runtime benchmarks serve; do ln -s "$REPO/$part" "$WORK/src/fd/$part"; done
export PYTHONPATH=$WORK/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

# --- parts ------------------------------------------------------------------------------------------------------
PARTS=$WORK/parts.tsv   # name, status, seconds, limit, command
: > "$PARTS"
FAILED=0                # parts that failed or timed out (skipped ones are not failures)

report() {
    $PY -m fd.benchmarks.gpu_report --mode "$MODE" --parts "$PARTS" --work "$WORK" --out "$OUT" \
        || echo "gpu_report failed"
}

# part NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, the limit clamped to what the budget has left
part() {
    local name=$1 limit=$(($2 * SCALE)); shift 2
    local left=$((BUDGET - SECONDS - RESERVE))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        echo "== $name: skipped, ${left}s of the budget left"
        printf '%s\tskipped (budget)\t0\t%s\t%s\n' "$name" "$limit" "$*" >> "$PARTS"
        report
        return 1
    fi
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS status
    timeout -k 10 "$limit" "$@"
    local rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out" ;;
        *) status="failed (exit $rc)" ;;
    esac
    [[ $rc != 0 ]] && FAILED=$((FAILED + 1))
    echo "== $name: $status after $((SECONDS - start))s"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$limit" "$*" >> "$PARTS"
    report
    [[ $rc == 0 ]]
}

skip() {  # skip NAME REASON
    echo "== $1: skipped, $2"
    printf '%s\tskipped (%s)\t0\t0\t\n' "$1" "$2" >> "$PARTS"
}

BUILD=($PY -m fd.builder.cli --backend torch --precision "$PRECISION" --device "$DEVICE" --force)
BENCH=($PY -m fd.benchmarks.cli --runs "$RUNS" --warmup "$WARMUP")

part environment 60 $PY -m fd.benchmarks.gpu_report --environment "$WORK/environment.json"

# bench NAME LIMIT ENGINE SCHEDULER STEPS GRAPHS [more fd-bench options]: one fd-bench run, its JSON and Markdown
bench() {
    local name=$1 limit=$2 engine=$3 scheduler=$4 steps=$5 graphs=$6; shift 6
    local flags=()
    [[ $graphs == on ]] && flags+=(--cuda-graphs)
    part "$name" "$limit" "${BENCH[@]}" --engine-dir "$engine" --scheduler "$scheduler" --steps "$steps" \
        "${flags[@]}" "$@" --json "$WORK/$name.json" --markdown "$WORK/$name.md"
}

sd_engine=$WORK/engines/$SD
if part "build-$SD" 240 "${BUILD[@]}" --model "$SD" --height "$SD_SIZE" --width "$SD_SIZE" --out "$sd_engine"; then
    for graphs in "${GRAPHS[@]}"; do
        # diffusers once per scheduler, in the first (headline) run: it does not change with fd's CUDA graphs
        compare=(); [[ $graphs == "${GRAPHS[0]}" ]] && compare=(--compare diffusers)
        bench "$SD-ddim$DDIM_STEPS-graphs-$graphs" 150 "$sd_engine" ddim "$DDIM_STEPS" "$graphs" "${compare[@]}"
    done
    for graphs in "${GRAPHS[@]}"; do
        compare=(); [[ $graphs == "${GRAPHS[0]}" ]] && compare=(--compare diffusers)
        bench "$SD-dpmpp$DPM_STEPS-graphs-$graphs" 120 "$sd_engine" dpmpp-2m "$DPM_STEPS" "$graphs" "${compare[@]}"
    done
    if [[ $DRY == 1 ]]; then
        skip "$SD-ddim$DDIM_STEPS-graphs-on" "CUDA graphs need a GPU"
        skip "$SD-dpmpp$DPM_STEPS-graphs-on" "CUDA graphs need a GPU"
    fi
    name=$SD-deepcache3-ddim$DDIM_STEPS
    part "$name" 120 $PY -m fd.benchmarks.gpu_deepcache --engine-dir "$sd_engine" \
        --steps "$DDIM_STEPS" --interval 3 --runs "$RUNS" --warmup "$WARMUP" --json "$WORK/$name.json"
fi

xl_engine=$WORK/engines/$XL
if part "build-$XL" 240 "${BUILD[@]}" --model "$XL" --height "$XL_SIZE" --width "$XL_SIZE" --out "$xl_engine"; then
    bench "$XL-ddim$DDIM_STEPS-graphs-${GRAPHS[0]}" 200 "$xl_engine" ddim "$DDIM_STEPS" "${GRAPHS[0]}"
fi

rm -rf "$WORK/engines"
report
echo "fd gpu.sh: done in ${SECONDS}s, $FAILED part(s) failed or timed out; results in $OUT"
[[ $FAILED == 0 ]]
