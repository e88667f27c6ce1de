"""How many CPU threads a run computes with.

PyTorch's OpenMP pool makes every parallel region wait for its slowest thread, so one thread sharing
its core with another busy process stalls the whole pool at every operator. Measured on a 2-core
machine with the second core kept busy by other processes: a MiniLM training step that takes 1.9 s on
one thread did not finish 11 steps in 10 minutes on two. The default is therefore the cores this
process may run on minus the ones other processes keep busy right now, at least one; ``--threads``
or ``OMP_NUM_THREADS`` set it explicitly.
"""

from __future__ import annotations

import os
from typing import Optional

import torch


def busy_cores() -> int:
    """Other processes running right now: /proc/loadavg's runnable count less this process (the load
    averages lag by a minute: a job just finished would still count), else the 1-minute average."""
    try:
        with open("/proc/loadavg") as f:
            return max(0, int(f.read().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        return round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0


def idle_cores() -> int:
    """Cores this process may run on that are not already busy, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - busy_cores())


def configure_threads(requested: Optional[int] = None, processes: int = 1) -> tuple:
    """Set torch's intra-op thread count: ``requested``, else what OMP_NUM_THREADS set, else this
    process's share of :func:`idle_cores` among ``processes``. Returns (threads, where it came from)."""
    if requested:
        torch.set_num_threads(requested)
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    n = max(1, idle_cores() // processes)
    torch.set_num_threads(n)
    return n, "idle cores"
