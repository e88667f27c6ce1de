"""bench/run_gpu.sh (bench/gpu_run.py) on CPU: the tiers fit their GPU budgets, a stage that runs out
is stopped and named, results are packed into $OUT, and the cheap pieces of the dry run work.

The whole dry run (``PTV2_RUN_GPU_DRY=1 bench/run_gpu.sh``, a few minutes) is not run here; its pieces
are, each in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_run  # noqa: E402


@pytest.mark.parametrize("tier", sorted(gpu_run.TIERS))
def test_tier_budgets_add_up_to_one_command(tier):
    stages = gpu_run.TIERS[tier]
    assert all(name in gpu_run.STAGES for name in stages)
    total = sum(gpu_run.STAGES[name].budget_s for name in stages)
    print(f"\n{tier}:\n{gpu_run.budget_table(stages)}")
    assert total <= gpu_run.GPU_BUDGET_S <= 480, f"{tier} needs {total} s"


def test_budgets_print_without_a_gpu():
    done = subprocess.run(["bash", str(REPO / "bench" / "run_gpu.sh"), "--budgets", "tier2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "racecheck" in done.stdout and "total" in done.stdout


def test_unknown_stage_is_named():
    with pytest.raises(SystemExit, match="unknown stage or tier 'tier3'"):
        gpu_run._stages_of(["tier3"])
    assert gpu_run._stages_of([]) == ("tier1", gpu_run.TIERS["tier1"])


def test_stage_time_limit_knob(monkeypatch):
    stage = gpu_run.STAGES["tests-triton"]
    assert stage.limit_s() == stage.budget_s
    monkeypatch.setenv("PTV2_T_TESTS_TRITON", "7")
    assert stage.limit_s() == 7
    monkeypatch.setenv("PTV2_T_TESTS_TRITON", "soon")
    with pytest.raises(SystemExit, match="PTV2_T_TESTS_TRITON must be a whole number"):
        stage.limit_s()


def test_stages_report_ok_failure_and_running_out_then_pack(tmp_path):
    run = gpu_run.Run("tier1", dry=False, run_dir=tmp_path / "run", out=tmp_path / "out")
    run.run_dir.mkdir()
    py = sys.executable
    ok = gpu_run.Stage("fine", 30, "prints", lambda r: [py, "-c", "print('hello from a stage')"])
    bad = gpu_run.Stage("broken", 30, "fails", lambda r: [py, "-c", "raise SystemExit(3)"])
    slow = gpu_run.Stage("slow", 1, "sleeps", lambda r: [py, "-c", "import time; print('start', flush=True); "
                                                                    "time.sleep(60)"])
    lines = [gpu_run.run_stage(s, run) for s in (ok, bad, slow)]
    assert lines[0].split()[:2] == ["fine", "ok"]
    assert "FAILED (exit 3)" in lines[1]
    assert "RAN OUT of its 1 s" in lines[2]
    assert run.failed
    assert "hello from a stage" in (run.run_dir / "fine.log").read_text()
    assert "start" in (run.run_dir / "slow.log").read_text()
    summary = (run.out / "summary.txt").read_text()
    assert all(line in summary for line in lines)
    with tarfile.open(run.out / "ptv2-gpu-tier1.tar.gz") as tar:
        names = tar.getnames()
    assert {"run/summary.txt", "run/fine.log", "run/slow.log"} <= set(names)


def test_every_stage_command_in_dry_mode(tmp_path):
    run = gpu_run.Run("tier1", dry=True, run_dir=tmp_path, out=None)
    for name, stage in gpu_run.STAGES.items():
        argv = stage.argv(run)
        assert argv and all(isinstance(a, str) for a in argv), name
        if name in ("build", "bench") or name in ("memcheck", "racecheck", "synccheck", "initcheck"):
            assert "--dry-run" in argv, f"{name} would need a GPU in a dry run"


def test_build_stage_dry_run_decides_without_compiling():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_run.py"), "--build", "--dry-run"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("build: ptv2_kernels._C")


def test_facts_add_the_toolchain_to_the_benchmark_environment(monkeypatch):
    import benchlib

    monkeypatch.setattr(benchlib, "environment", lambda: {"gpu": None})  # importing every library is slow
    facts = gpu_run.facts()
    assert {"gpu", "driver", "nvcc", "compute_sanitizer", "cpu_count", "dry_run"} <= set(facts)
    assert facts["driver"] and facts["compute_sanitizer"]  # a version, or what is missing
    json.dumps(facts)


def test_sanitize_dry_run_builds_every_shape_on_cpu():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / "csrc" / "sanitize.py"), "--tools", "memcheck", "racecheck",
                           "--quick", "--dry-run"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--tool memcheck" in done.stdout and "--tool racecheck" in done.stdout
    assert done.stdout.count("\nok B=") == 3


def test_ratio_benchmark_pieces_on_cpu(monkeypatch):
    import tier1_ratio as T

    monkeypatch.setenv("PTV2_BENCH_DEVICE", "cpu")
    assert len(T.SHAPES) == 4
    shape = T.dry_shape(T.SHAPES[2])  # the GQA causal decoder, shrunk
    assert shape[2] % shape[3] == 0 and shape[7] is True
    rows = [T.measure(p, shape, "fwd") for p in ("sdpa-preconcat", "ptv2-cuda")]
    assert rows[0]["host_us"] > 0 and rows[0]["sdpa"] != "-", rows[0]
    assert "skipped" in rows[1] and "ptv2-cuda" in rows[1]["skipped"]
    table = T.ratio_table(rows)
    assert "sdpa-preconcat" in table and "skipped" in table


def test_sdpa_kernel_is_read_from_the_dispatched_op():
    import tier1_ratio as T

    q = torch.randn(1, 2, 8, 16)
    assert T.sdpa_kernels(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) != "-"
    assert T.sdpa_kernels(lambda: q + 1) == "-"
