"""One method's CPU training step, measured in a process of its own (bench_train_step.py starts it).

    python bench/train_step_process.py --method ptv2 --seq-len 64 [--batch 32 --prefix-len 16]

prints one JSON object: the duration of every timed step (seconds), the RSS before the first step,
the peak RSS while the steps ran and how that peak was read. Peak RSS is a property of a process and
the kernel's counter never goes down, so every method gets a fresh process; on Linux the peak
(``VmHWM``) is also reset to the current RSS just before the first step, so loading the model does not
count, while the weights, gradients, optimizer state and activations of the steps do.

The model and the batch: :func:`train_methods.minilm_method` (the packaged MiniLM in train mode, its
recipe dropout), random token ids without padding, AdamW over what trains. Threads from
PTV2_BENCH_THREADS (default 1); rounds from benchlib's CPU plan (>= 7, PTV2_BENCH_BUDGET_S).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import benchlib  # noqa: E402
import train_methods as M  # noqa: E402


def step_fn(method: M.Method, batch: dict, opt: torch.optim.Optimizer):
    def step():
        method.loss(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(method_name: str, batch_size: int, seq_len: int, prefix_len: int, warmup: int) -> dict:
    torch.set_num_threads(benchlib.threads())
    method = M.minilm_method(method_name, prefix_len)
    model = method.model
    config = model.backbone.config if hasattr(model, "backbone") else model.get_base_model().config
    batch = M.make_batch(config, batch_size, seq_len, "cpu")
    opt = torch.optim.AdamW(method.params, lr=1e-4)
    step = step_fn(method, batch, opt)
    gc.collect()
    rss_before = benchlib.rss_bytes()
    reset = benchlib.reset_peak_rss()
    for _ in range(warmup):  # the first step allocates the optimizer state
        step()
    t0 = time.perf_counter()
    step()
    rounds, _ = benchlib.plan(time.perf_counter() - t0, max_rounds=15)
    seconds = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    peak = benchlib.peak_rss_bytes()
    return {
        "step_s": seconds, "rss_before_bytes": rss_before, "peak_rss_bytes": peak,
        "peak_rss_growth_bytes": peak - rss_before,
        "rss_method": ("VmHWM, reset to the current RSS before the first step (fresh process)" if reset
                       else "the process's lifetime peak RSS (fresh process; VmHWM could not be reset)"),
        "threads": torch.get_num_threads(), "note": method.note,
        "trainable_params": sum(p.numel() for p in method.params),
        "total_params": sum(p.numel() for p in method.model.parameters()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, choices=M.CPU_METHODS)
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.method, args.batch, args.seq_len, args.prefix_len, args.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
