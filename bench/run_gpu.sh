#!/usr/bin/env bash
# One command for a GPU machine: GPU tests, backend info, sanitizers, benchmarks, report.
#
#   bench/run_gpu.sh                 # every stage, quick grid (about 15-20 minutes on an H100)
#   PTV2_BENCH_QUICK=0 bench/run_gpu.sh bench-op bench-train report     # the full grid
#   bench/run_gpu.sh info tests sanitize   # stages can be run separately (a runner with a per-command
#   bench/run_gpu.sh bench-op bench-train report   # time limit); they share one results folder
#
# Stages: build info tests sanitize bench-op bench-train memory report (default: all, in that order).
# Results: bench/results/<gpu-name>/<YYYYMMDD>-<short sha>-<quick|full>/ (or PTV2_RUN_DIR): one
# pytest-benchmark JSON per suite, the logs of every stage, report.md and the plots; bench/README.md's
# results section is rewritten from that folder. When $OUT is set (a remote runner that returns what
# is written under $OUT), the results folder and README are copied there after every stage.
#
# Installs nothing: it uses the Python environment it finds ($PYTHON, default python3). The "build"
# stage only builds this project's own CUDA extension in place (no dependencies, no build isolation,
# no network) when ptv2_kernels._C is missing; PTV2_SKIP_BUILD=1 skips it.
#
# Time limits per stage (seconds): PTV2_T_BUILD (540) PTV2_T_TESTS (420) PTV2_T_SANITIZE (300)
# PTV2_T_BENCH_OP (540) PTV2_T_BENCH_TRAIN (540). A stage that fails or times out is reported and the
# next one still runs; the exit status is non-zero when any stage failed. PTV2_RUN_GPU_DRY=1 runs every
# stage on CPU (tiny shapes) to check this script on a machine without a GPU.

set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PTV2_BENCH_QUICK=${PTV2_BENCH_QUICK:-1}
export PTV2_BENCH_DEVICE=cuda
export PYTHONUNBUFFERED=1

if [ "${PTV2_RUN_GPU_DRY:-0}" = "1" ]; then
    # Checking this script on a machine without a GPU: every stage runs, benchmarks on tiny CPU shapes.
    export PTV2_BENCH_DEVICE=cpu
    GPU=cpu-dry-run
    PTV2_RUN_DIR=${PTV2_RUN_DIR:-${TMPDIR:-/tmp}/ptv2-dry-run}  # never into bench/results
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu.sh: torch sees no CUDA GPU here ($PY); nothing to do (PTV2_RUN_GPU_DRY=1 checks the script on CPU)." >&2
    exit 2
else
    GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
fi
GPU_SLUG=$(echo "$GPU" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
if [ -n "${PTV2_GIT_SHA:-}" ]; then  # a copy of the tree without .git: pass the SHA in
    SHA=${PTV2_GIT_SHA:0:12}
else
    SHA=$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
    if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then SHA="$SHA-dirty"; fi
fi
export PTV2_GIT_SHA=${PTV2_GIT_SHA:-$SHA}
GRID_TAG=$([ "$PTV2_BENCH_QUICK" = "1" ] && echo quick || echo full)
RUN_DIR=${PTV2_RUN_DIR:-bench/results/$GPU_SLUG/$(date -u +%Y%m%d)-$SHA-$GRID_TAG}
mkdir -p "$RUN_DIR"
echo "run_gpu.sh: $GPU, results in $RUN_DIR (quick=$PTV2_BENCH_QUICK)"

STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then
    STAGES=(build info tests sanitize bench-op bench-train memory report)
fi

declare -a SUMMARY=()
FAILED=0

export_out() {
    # A remote runner returns only a few files from $OUT: one tarball (extract it in the repo root:
    # it holds $RUN_DIR and bench/README.md) plus the summary and the report to read at once.
    if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
        tar czf "$OUT/ptv2-results.tar.gz" "$RUN_DIR" bench/README.md 2>/dev/null
        [ -f "$RUN_DIR/summary.txt" ] && cp "$RUN_DIR/summary.txt" "$OUT/summary.txt"
        [ -f "$RUN_DIR/report.md" ] && cp "$RUN_DIR/report.md" "$OUT/report.md"
    fi
    return 0
}

# run_stage NAME TIMEOUT_S LOG -- command...
run_stage() {
    local name=$1 limit=$2 log=$3
    shift 4
    local t0=$(date +%s)
    echo "=== $name: $*"
    timeout --kill-after=20 "$limit" "$@" 2>&1 | tee "$RUN_DIR/$log"
    local rc=${PIPESTATUS[0]}
    local dt=$(( $(date +%s) - t0 ))
    local state="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then state="TIMED OUT after ${limit}s"; FAILED=1
    elif [ "$rc" -ne 0 ]; then state="FAILED (exit $rc)"; FAILED=1; fi
    SUMMARY+=("$name: $state in ${dt}s (log $RUN_DIR/$log)")
    export_out
    return 0
}

for stage in "${STAGES[@]}"; do
    case "$stage" in
    build)
        if [ "${PTV2_SKIP_BUILD:-0}" = "1" ]; then
            SUMMARY+=("build: skipped (PTV2_SKIP_BUILD=1)")
        elif "$PY" -c "import ptv2_kernels._C" 2>/dev/null; then
            SUMMARY+=("build: ptv2_kernels._C already importable")
        elif [ -f setup.py ]; then
            # In place, for this GPU's architecture only (fast); nothing is installed.
            ARCH=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}')" 2>/dev/null)
            run_stage build "${PTV2_T_BUILD:-540}" build.txt -- \
                env PTV2_CUDA_ARCHS="${PTV2_CUDA_ARCHS:-$ARCH}" "$PY" setup.py build_ext --inplace
        else
            SUMMARY+=("build: no setup.py; the cuda backend will report itself unavailable")
        fi
        ;;
    info)
        run_stage info 120 info.txt -- "$PY" -m ptv2_kernels.info
        ;;
    tests)
        run_stage tests "${PTV2_T_TESTS:-420}" gpu_tests.txt -- "$PY" -m pytest -m gpu tests/ -q -rs -p no:cacheprovider
        ;;
    sanitize)
        if [ -f csrc/sanitize.py ]; then
            # csrc/sanitize.py (the CUDA backend's) runs compute-sanitizer memcheck and racecheck itself.
            if [ -z "${PTV2_SANITIZE_ARGS:-}" ]; then
                PTV2_SANITIZE_ARGS="--tools memcheck racecheck"
                if [ "$PTV2_BENCH_QUICK" = "1" ]; then PTV2_SANITIZE_ARGS="$PTV2_SANITIZE_ARGS --quick"; fi
            fi
            run_stage sanitize "${PTV2_T_SANITIZE:-300}" sanitize.txt -- "$PY" csrc/sanitize.py $PTV2_SANITIZE_ARGS
        else
            SUMMARY+=("sanitize: skipped (csrc/sanitize.py does not exist)")
        fi
        ;;
    bench-op)
        run_stage bench-op "${PTV2_T_BENCH_OP:-540}" bench_prefix_attention.txt -- \
            "$PY" -m pytest bench/bench_prefix_attention.py -q -rs -p no:cacheprovider \
            --benchmark-json="$RUN_DIR/prefix_attention${PTV2_BENCH_GRID:+_$PTV2_BENCH_GRID}.json" \
            --benchmark-columns=median,iqr,rounds,iterations --benchmark-sort=name
        ;;
    bench-train)
        run_stage bench-train "${PTV2_T_BENCH_TRAIN:-540}" bench_train_step.txt -- \
            "$PY" -m pytest bench/bench_train_step.py -q -rs -p no:cacheprovider \
            --benchmark-json="$RUN_DIR/train_step.json" --benchmark-columns=median,iqr,rounds --benchmark-sort=name
        ;;
    memory)
        run_stage memory 300 memory_account.txt -- env PTV2_BENCH_DEVICE=cpu "$PY" bench/memory_account.py
        ;;
    report)
        if [ "${PTV2_RUN_GPU_DRY:-0}" = "1" ]; then  # CPU smoke numbers never go into the README
            run_stage report 300 report.txt -- "$PY" bench/report.py "$RUN_DIR"
        else
            run_stage report 300 report.txt -- "$PY" bench/report.py "$RUN_DIR" --readme bench/README.md
        fi
        ;;
    *)
        echo "run_gpu.sh: unknown stage '$stage' (build info tests sanitize bench-op bench-train memory report)" >&2
        FAILED=1
        ;;
    esac
done

echo
echo "=== summary ($GPU, $RUN_DIR)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
{ echo "# $(date -u +%FT%TZ) run_gpu.sh ${STAGES[*]} (quick=$PTV2_BENCH_QUICK)"; printf '%s\n' "${SUMMARY[@]}"; } >> "$RUN_DIR/summary.txt"
export_out
exit $FAILED
