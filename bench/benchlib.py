"""Shared machinery for the benchmark suites: device and grid selection, timing, memory, metadata.

Environment knobs (all optional):

- ``PTV2_BENCH_DEVICE``: ``cuda`` (default when a GPU is visible) or ``cpu`` (tiny shapes through the
  torch backend: a smoke run that checks the suites work, not a measurement).
- ``PTV2_BENCH_QUICK=1``: the reduced grid used for a first pass on a GPU (bf16 only, fewer shapes).
- ``PTV2_BENCH_TORCH=1``: also time the pure-PyTorch backend on a GPU (skipped there by default).
- ``PTV2_BENCH_BUDGET_S``: target seconds of timed rounds per benchmark (default 0.25 quick, 0.6 full).

Timing: on a GPU every benchmark's clock is a CUDA event recorded on the current stream and waited
for, so a round is ``event; fn x iterations; event`` measured on the GPU timeline (no host sync
latency inside the round); on CPU it is ``time.perf_counter``. Each round's per-call time is one
sample; median, p20 and p80 are taken over rounds.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

HAS_GPU = torch.cuda.is_available()
NO_GPU_REASON = "no CUDA GPU on this machine (torch.cuda.is_available() is False)"


def device() -> torch.device:
    want = os.environ.get("PTV2_BENCH_DEVICE", "").strip().lower()
    if not want:
        want = "cuda" if HAS_GPU else "cpu"
    if want not in ("cuda", "cpu"):
        raise ValueError(f"PTV2_BENCH_DEVICE must be 'cuda' or 'cpu', got {want!r}")
    return torch.device(want)


def on_gpu() -> bool:
    return device().type == "cuda"


def flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def quick() -> bool:
    return flag("PTV2_BENCH_QUICK")


def gpu_skip_reason() -> Optional[str]:
    """Why a GPU-only benchmark cannot run here (None when it can)."""
    if not HAS_GPU:
        return NO_GPU_REASON
    if not on_gpu():
        return "PTV2_BENCH_DEVICE=cpu (CPU smoke run)"
    return None


# --------------------------------------------------------------------------------------------------
# metadata


def git_sha() -> str:
    if os.environ.get("PTV2_GIT_SHA"):  # a copy of the tree without .git (a remote runner)
        return os.environ["PTV2_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except Exception:  # not a git checkout, or git missing
        return "unknown"


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "installed")
    except Exception as e:  # report, never fail the run over metadata
        return f"unavailable ({type(e).__name__})"


def gpu_name() -> str:
    if not HAS_GPU:
        return "cpu"
    return torch.cuda.get_device_name(0)


def environment() -> dict:
    """What every result records: the GPU, versions and the git SHA."""
    info = {
        "device": device().type,
        "gpu": gpu_name() if HAS_GPU else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if HAS_GPU else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if HAS_GPU else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if HAS_GPU else None,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "quick": quick(),
    }
    return info


_ENV_CACHE: dict = {}


def environment_cached() -> dict:
    if not _ENV_CACHE:
        _ENV_CACHE.update(environment())
    return dict(_ENV_CACHE)


def safe_name(text: str) -> str:
    """A folder name for a GPU name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "unknown"


# --------------------------------------------------------------------------------------------------
# timing


class CudaEventClock:
    """A pytest-benchmark timer reading the GPU timeline: records an event, waits for it, returns
    seconds since the first event. Two readings bracket exactly the GPU work launched between them."""

    def __init__(self):
        self._ref = None

    def __call__(self) -> float:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        ev.synchronize()
        if self._ref is None:
            self._ref = ev
            return 0.0
        return self._ref.elapsed_time(ev) / 1e3

    def __repr__(self):  # pytest-benchmark prints the timer's name
        return "CudaEventClock"


def sync():
    if on_gpu() and HAS_GPU:
        torch.cuda.synchronize()


def estimate_seconds(fn: Callable, calls: int = 3) -> float:
    """Seconds per call of ``fn`` (already warmed up), from a few calls."""
    sync()
    if on_gpu():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def plan(seconds_per_call: float, budget_s: Optional[float] = None, min_round_s: float = 1e-3,
         max_rounds: int = 30, min_rounds: int = 5) -> tuple:
    """(rounds, iterations): a round lasts at least ``min_round_s`` (launch overhead amortized, event
    resolution negligible), and all rounds together about ``budget_s``."""
    if budget_s is None:
        default = "0.02" if not on_gpu() else ("0.25" if quick() else "0.6")
        budget_s = float(os.environ.get("PTV2_BENCH_BUDGET_S", default))
    if not on_gpu():  # CPU smoke run: a handful of rounds proves the path, it measures nothing
        max_rounds, min_rounds = min(max_rounds, 3), min(min_rounds, 2)
    t = max(seconds_per_call, 1e-7)
    iterations = max(1, min(200, math.ceil(min_round_s / t)))
    rounds = int(budget_s / (t * iterations))
    return max(min_rounds, min(max_rounds, rounds)), iterations


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_benchmark(benchmark, fn: Callable, *, warmup: int = 3, budget_s: Optional[float] = None,
                  max_rounds: int = 30, min_rounds: int = 5) -> dict:
    """Warm ``fn`` up, time it through ``benchmark.pedantic`` with the right clock, and return
    {median_us, p20_us, p80_us, rounds, iterations, timer} (also written to extra_info)."""
    for _ in range(warmup):
        fn()
    sync()
    per_call = estimate_seconds(fn)
    rounds, iterations = plan(per_call, budget_s, max_rounds=max_rounds, min_rounds=min_rounds)
    if on_gpu():
        benchmark._timer = CudaEventClock()  # pytest-benchmark reads this attribute for every round
        timer = "cuda-events"
    else:
        benchmark._timer = time.perf_counter
        timer = "perf_counter"
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=0)
    data = None
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        data = list(getattr(getattr(stats, "stats", None), "data", []) or [])
    if not data:  # --benchmark-disable: fall back to the estimate
        data = [per_call]
    result = {
        "median_us": percentile(data, 50) * 1e6,
        "p20_us": percentile(data, 20) * 1e6,
        "p80_us": percentile(data, 80) * 1e6,
        "rounds": rounds,
        "iterations": iterations,
        "timer": timer,
    }
    benchmark.extra_info.update(result)
    return result


# --------------------------------------------------------------------------------------------------
# memory


def free_memory():
    gc.collect()
    if HAS_GPU:
        torch.cuda.empty_cache()


def peak_memory_delta(fn: Callable) -> Optional[int]:
    """Bytes allocated at peak while ``fn`` runs, above what was allocated before it (GPU only)."""
    if not (on_gpu() and HAS_GPU):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "CUDA_ERROR_OUT_OF_MEMORY" in text
