#!/usr/bin/env bash
# The GPU check, one command per tier, each within one 10-minute command on a lent H100/H200:
#
#   bench/run_gpu.sh                      # tier 1: build, info, GPU tests, memcheck, ratio benchmark (<= 480 s)
#   bench/run_gpu.sh tier2                # tier 2: racecheck, synccheck, initcheck, the full op grid (<= 480 s)
#   bench/run_gpu.sh STAGE...             # stages by name; --budgets [TIER] prints each stage's budget
#   PTV2_RUN_GPU_DRY=1 bench/run_gpu.sh   # every stage's plumbing on CPU with tiny shapes
#
# Installs nothing: it uses the Python it finds ($PYTHON, default python3). A copy of the tree without
# .git should pass PTV2_GIT_SHA=<sha>. Stages, budgets, results and $OUT: see bench/gpu_run.py.
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_run.py "$@"
