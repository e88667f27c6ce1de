"""Shared machinery for the benchmark suites: device and grid selection, timing, memory, metadata.

Environment knobs (all optional):

- ``PTV2_BENCH_DEVICE``: ``cuda`` (default when a GPU is visible) or ``cpu`` (the CPU grid: MiniLM and
  bert-base shapes, float32; a measurement).
- ``PTV2_BENCH_SMOKE=1``: on CPU, tiny shapes and a few rounds instead of the CPU grid: a smoke run that
  checks the suites work, not a measurement. ``bench/run_gpu.sh``'s dry run (``PTV2_RUN_GPU_DRY=1``)
  implies it: that run checks the script, not the CPU.
- ``PTV2_BENCH_THREADS``: torch's intra-op threads on CPU (default 1: one thread is what a shared or
  loaded machine can measure reproducibly; pin the process to as many cores, e.g. ``taskset``).
- ``PTV2_BENCH_QUICK=1``: the reduced grid used for a first pass on a GPU (bf16 only, fewer shapes).
- ``PTV2_BENCH_TORCH=1``: also time the pure-PyTorch backend on a GPU (skipped there by default).
- ``PTV2_BENCH_BUDGET_S``: target seconds of timed rounds per benchmark (default 0.25 quick, 0.6 full
  GPU, 1.0 CPU grid, 0.02 smoke).

Timing: on a GPU every benchmark's clock is a CUDA event recorded on the current stream and waited
for, so a round is ``event; fn x iterations; event`` measured on the GPU timeline (no host sync
latency inside the round); on CPU it is ``time.perf_counter``. Each round's per-call time is one
sample; median, p20 and p80 are taken over rounds (at least 7 on the CPU grid).
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
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


def smoke() -> bool:
    """A CPU smoke run (tiny shapes, a few rounds) rather than the CPU grid."""
    return not on_gpu() and (flag("PTV2_BENCH_SMOKE") or flag("PTV2_RUN_GPU_DRY"))


def threads() -> int:
    """Intra-op threads for a CPU run, from PTV2_BENCH_THREADS (default 1)."""
    text = os.environ.get("PTV2_BENCH_THREADS", "1").strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"PTV2_BENCH_THREADS must be a positive integer, got {text!r}")
    return int(text)


def gpu_skip_reason() -> Optional[str]:
    """Why a GPU-only benchmark cannot run here (None when it can)."""
    if not HAS_GPU:
        return NO_GPU_REASON
    if not on_gpu():
        return "PTV2_BENCH_DEVICE=cpu (CPU run)"
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


def cpu_name() -> str:
    """The CPU model as the kernel reports it ('AMD EPYC 7763 64-Core Processor')."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict:
    """What every result records: the GPU or CPU, threads, versions and the git SHA."""
    info = {
        "device": device().type,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": torch.get_num_threads(),
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
        "smoke": smoke(),
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
    """Seconds per call of ``fn`` (already warmed up), from a few calls (on CPU, one call when it
    takes over 0.1 s: the grid's slowest calls take seconds and one is estimate enough)."""
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
    for done in range(1, calls + 1):
        fn()
        if time.perf_counter() - t0 > 0.1:
            break
    return (time.perf_counter() - t0) / done


def plan(seconds_per_call: float, budget_s: Optional[float] = None, min_round_s: float = 1e-3,
         max_rounds: int = 30, min_rounds: int = 5) -> tuple:
    """(rounds, iterations): a round lasts at least ``min_round_s`` (launch overhead amortized, event
    resolution negligible), and all rounds together about ``budget_s``."""
    if budget_s is None:
        default = "0.02" if smoke() else "1.0" if not on_gpu() else ("0.25" if quick() else "0.6")
        budget_s = float(os.environ.get("PTV2_BENCH_BUDGET_S", default))
    if smoke():  # a handful of rounds proves the path, it measures nothing
        max_rounds, min_rounds = min(max_rounds, 3), min(min_rounds, 2)
    elif not on_gpu():  # CPU timings spread more than GPU ones: a median needs more rounds
        min_rounds = max(min_rounds, 7)
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
    return _summarize(benchmark, per_call, rounds, iterations, timer)


def _summarize(benchmark, fallback_s: float, rounds: int, iterations: int, timer: str) -> dict:
    """{median_us, p20_us, p80_us, rounds, iterations, timer} from the benchmark's samples (written to
    extra_info too)."""
    data = None
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        data = list(getattr(getattr(stats, "stats", None), "data", []) or [])
    if not data:  # --benchmark-disable: fall back to the estimate
        data = [fallback_s]
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


class ReplayClock:
    """A pytest-benchmark timer that replays durations measured elsewhere: pytest-benchmark reads the
    clock before and after each round, and round i lasts ``durations[i]``."""

    def __init__(self, durations):
        self._stamps, t = [], 0.0
        for d in durations:
            self._stamps += [t, t + d]
            t += d
        self._stamps.reverse()

    def __call__(self) -> float:
        return self._stamps.pop()

    def __repr__(self):
        return "ReplayClock"


def record_samples(benchmark, seconds: list, timer: str) -> dict:
    """Record per-call ``seconds`` measured in another process (``timer`` says how) as the benchmark's
    rounds, so its JSON carries the same statistics as a benchmark timed here."""
    benchmark._timer = ReplayClock(seconds)
    benchmark.pedantic(lambda: None, rounds=len(seconds), iterations=1, warmup_rounds=0)
    return _summarize(benchmark, percentile(seconds, 50), len(seconds), 1, timer)


# --------------------------------------------------------------------------------------------------
# memory


def free_memory():
    gc.collect()
    if HAS_GPU:
        torch.cuda.empty_cache()


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors torch ops allocate while the mode is active, counted when an op
    returns them and released when their storage dies: the CPU counterpart of the GPU's
    ``max_memory_allocated`` above the start (the CPU allocator keeps no peak statistic). Every aten op
    is seen, autograd's backward included; scratch buffers internal to one aten kernel are not (the
    CPU flash kernel's per-thread blocks: kilobytes)."""

    def __init__(self):
        super().__init__()
        self.live: dict = {}  # storage address -> (weak reference, bytes)
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._release_dead()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:  # views and in-place results share a counted storage
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out

    def _release_dead(self):
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]


def peak_memory_delta(fn: Callable) -> Optional[int]:
    """Bytes allocated at peak while ``fn`` runs, above what was allocated before it: the CUDA
    allocator's peak on a GPU, :class:`LiveTensorBytes` on CPU."""
    if not on_gpu():
        with LiveTensorBytes() as mode:
            out = fn()
            del out  # what fn returns is counted at its peak, not kept alive past it
        return int(mode.peak)
    if not HAS_GPU:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS of this process (VmHWM) to the current RSS; False where it cannot
    (not Linux, or /proc/self/clear_refs not writable), and then :func:`peak_rss_bytes` is the
    process's lifetime peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS of this process since the last :func:`reset_peak_rss` (its lifetime peak without one)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:  # not Linux: getrusage's maxrss (KiB on Linux, bytes on macOS)
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "CUDA_ERROR_OUT_OF_MEMORY" in text
