"""pytest configuration for the benchmark suites in bench/.

``pytest bench/ --benchmark-json=out.json`` collects every ``bench_*.py`` here (test functions are
named ``test_*``). Without a GPU, GPU providers skip with the reason printed (``-rs``) and the CPU grid runs
(``PTV2_BENCH_DEVICE=cpu`` forces it; ``PTV2_BENCH_SMOKE=1`` makes it a smoke run on tiny shapes). See
benchlib.py for the other environment knobs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402


def pytest_collect_file(file_path, parent):
    # Benchmark files are named after their subject (bench_<op>.py), not test_*.py.
    # A file named on the command line is collected by pytest itself; do not collect it twice.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    if benchlib.device().type == "cpu":
        # Explicit, and recorded in every result: the default (1) is immune to a loaded machine.
        import torch

        torch.set_num_threads(benchlib.threads())
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped with the reason when none is present)")
    # Show skip reasons by default: a skipped provider must say why.
    if "s" not in (config.option.reportchars or ""):
        config.option.reportchars = (config.option.reportchars or "") + "s"


def pytest_report_header(config):
    env = benchlib.environment_cached()
    gpu = env["gpu"] or benchlib.NO_GPU_REASON
    return [f"ptv2 bench: device={env['device']} gpu={gpu} quick={env['quick']} torch={env['torch']} "
            f"cuda={env['cuda']} triton={env['triton']} sha={env['git_sha']}",
            f"ptv2 bench: cpu={env['cpu']} threads={env['threads']} affinity={env['cpu_affinity']} "
            f"smoke={env['smoke']}"]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["ptv2"] = benchlib.environment_cached()


@pytest.fixture(scope="session")
def bench_env() -> dict:
    return benchlib.environment_cached()


@pytest.fixture
def record(benchmark, bench_env):
    """The benchmark fixture with the environment written into its extra_info."""
    for key in ("gpu", "cpu", "threads", "torch", "triton", "cuda", "git_sha", "device", "quick", "smoke"):
        benchmark.extra_info[key] = bench_env[key]
    return benchmark


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    if benchlib.HAS_GPU:
        benchlib.free_memory()
