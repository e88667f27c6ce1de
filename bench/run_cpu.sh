#!/usr/bin/env bash
# The CPU benchmarks in one command: the op grid, the MiniLM training step, the report.
#
#   bench/run_cpu.sh                          # every stage: op, train, report
#   bench/run_cpu.sh op report                # stages can be run separately; they share one results folder
#   PTV2_BENCH_CPUS=1 bench/run_cpu.sh        # pinned to core 1 (taskset -c), one thread
#
# Results: bench/results/cpu/<cpu-name>/<YYYYMMDD>-<short sha>-t<threads>/ (or PTV2_RUN_DIR): one
# pytest-benchmark JSON per suite (the CPU model, thread count and affinity, versions and git SHA in its
# machine_info), each stage's log, and report.md (the CPU tables and issue 11's targets, ready to paste
# into README.md). Commit the folder.
#
# Knobs: PTV2_BENCH_THREADS (torch threads, default 1; OMP_NUM_THREADS follows it), PTV2_BENCH_CPUS
# (a taskset core list; default: no pinning), PTV2_BENCH_BUDGET_S (timed seconds per benchmark, default
# 1.0; at least 7 rounds whatever it says), PTV2_BENCH_GRID=minilm|bert-base|host (one op grid),
# PTV2_BENCH_PROVIDERS (comma-separated op providers, e.g. "ptv2-flash,peft-route,sdpa-preconcat"; default
# all), PYTEST_ARGS (extra pytest arguments, e.g. "-k N64-P16"), PTV2_RUN_DIR, $PYTHON (default python3).
# PTV2_BENCH_SMOKE=1 checks this script on tiny shapes in a few seconds, writing to /tmp, never into
# bench/results.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PTV2_BENCH_DEVICE=cpu
export PTV2_BENCH_THREADS=${PTV2_BENCH_THREADS:-1}
export OMP_NUM_THREADS=$PTV2_BENCH_THREADS
export PYTHONUNBUFFERED=1
PIN=()
if [ -n "${PTV2_BENCH_CPUS:-}" ]; then PIN=(taskset -c "$PTV2_BENCH_CPUS"); fi

STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then STAGES=(op train report); fi
for s in "${STAGES[@]}"; do
    case $s in op|train|report) ;; *) echo "run_cpu.sh: stage must be op, train or report, got '$s'" >&2; exit 2;; esac
done

CPU_SLUG=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); import benchlib; print(benchlib.safe_name(benchlib.cpu_name()))") || exit 2
SHA=$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then SHA="$SHA-dirty"; fi
if [ "${PTV2_BENCH_SMOKE:-0}" = "1" ]; then
    RUN_DIR=${PTV2_RUN_DIR:-${TMPDIR:-/tmp}/ptv2-cpu-smoke}  # smoke results measure nothing: never committed
else
    RUN_DIR=${PTV2_RUN_DIR:-bench/results/cpu/$CPU_SLUG/$(date -u +%Y%m%d)-$SHA-t$PTV2_BENCH_THREADS}
fi
mkdir -p "$RUN_DIR" || exit 2
echo "run_cpu.sh: $CPU_SLUG, $PTV2_BENCH_THREADS thread(s), cores ${PTV2_BENCH_CPUS:-unpinned}, results in $RUN_DIR"

suite() {  # suite NAME FILE: one pytest-benchmark suite into $RUN_DIR/NAME.json, its log beside it
    local name=$1 file=$2
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
    "${PIN[@]}" "$PY" -m pytest "$file" -q -rs -p no:cacheprovider --benchmark-json="$RUN_DIR/$name.json" \
        ${PYTEST_ARGS:-} 2>&1 | tee "$RUN_DIR/$name.log"
}

status=0
for s in "${STAGES[@]}"; do
    start=$(date +%s)
    case $s in
        op) suite prefix_attention${PTV2_BENCH_GRID:+_$PTV2_BENCH_GRID} bench/bench_prefix_attention.py ;;
        train) suite train_step bench/bench_train_step.py ;;
        report) "$PY" bench/report.py "$RUN_DIR" --no-plots 2>&1 | tee "$RUN_DIR/report.log" ;;
    esac
    rc=${PIPESTATUS[0]}
    echo "run_cpu.sh: stage $s exited $rc after $(( $(date +%s) - start )) s"
    [ "$rc" -eq 0 ] || status=$rc
done
exit $status
