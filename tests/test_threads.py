"""The training CLI's default thread count: the idle cores, never a pool that waits on a busy core."""

import os

import pytest
import torch

from ptv2_kernels.train import threads


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("busy,expected", [(0, 4), (1, 3), (3, 1), (9, 1)])
def test_idle_cores_are_the_allowed_cores_minus_the_busy_ones(monkeypatch, busy, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "busy_cores", lambda: busy)
    assert threads.idle_cores() == expected


def test_busy_cores_counts_the_processes_running_now_not_the_lagging_average(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    fake = tmp_path / "loadavg"
    fake.write_text("3.50 2.00 1.00 2/140 4242\n")  # a minute of load, one other process running now
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(fake if path == "/proc/loadavg" else path, *a, **k))
    assert threads.busy_cores() == 1


def test_explicit_count_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.configure_threads(1) == (1, "--threads")
    assert torch.get_num_threads() == 1


def test_omp_num_threads_is_respected(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert threads.configure_threads(None) == (1, "OMP_NUM_THREADS")


def test_default_uses_the_idle_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "idle_cores", lambda: 1)
    assert threads.configure_threads(None) == (1, "idle cores")
    assert torch.get_num_threads() == 1
