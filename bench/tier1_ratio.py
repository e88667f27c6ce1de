"""Tier-1 ratio benchmark: ptv2 against the materializing baselines at four shapes, in about a minute.

    python bench/tier1_ratio.py --out DIR [--dry-run]

Shapes (bf16): encoder B32 N128 P16 D64 and B32 N512 P128 D64 (16 heads, bidirectional, no padding),
decoder B4 N4096 P128 D128 and B16 N1024 P16 D128 (GQA 32/8, causal). Providers: ``ptv2-triton``,
``ptv2-cuda``, ``ptv2-flash`` (skips with the backend's reason where it cannot run) against
``sdpa-preconcat`` and ``peft-route`` (see bench_prefix_attention.py, whose inputs and providers are
used as they are). For each of fwd, bwd and fwd+bwd: GPU time per call (CUDA events around a loop of
calls), host time per call (the same loop on the host clock without waiting: what launching costs the
CPU), peak memory above the inputs, and which SDPA kernel each provider ran (the ``aten`` op under the
profiler: flash, efficient, cudnn or math). Writes ``tier1_ratio.json`` and ``tier1_ratio.md`` (the
ratios baseline/ptv2: above 1 means ptv2 is faster or smaller) into ``--out``.

``--dry-run`` runs the same plumbing on CPU with the shapes shrunk (Triton through the interpreter
when ``TRITON_INTERPRET=1``): nothing it prints is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import bench_prefix_attention as bpa  # noqa: E402

# name, B, Hq, Hkv, N, P, D, causal
SHAPES = [
    ("encoder-B32-N128-P16-D64", 32, 16, 16, 128, 16, 64, False),
    ("encoder-B32-N512-P128-D64", 32, 16, 16, 512, 128, 64, False),
    ("decoder-B4-N4096-P128-D128-gqa32x8-causal", 4, 32, 8, 4096, 128, 128, True),
    ("decoder-B16-N1024-P16-D128-gqa32x8-causal", 16, 32, 8, 1024, 16, 128, True),
]
PTV2 = ("ptv2-triton", "ptv2-cuda", "ptv2-flash")
BASELINES = ("sdpa-preconcat", "peft-route")
ROUNDS = 7  # median over rounds; a round is at least ~2 ms of GPU work
# aten op name fragment -> SDPA implementation; the first match of an op wins (the CPU flash op's name
# also holds "_flash_attention")
SDPA_OPS = (("flash_attention_for_cpu", "flash (cpu)"), ("_flash_attention", "flash"),
            ("_efficient_attention", "efficient"), ("_cudnn_attention", "cudnn"), ("_attention_math", "math"))


def dry_shape(shape):
    """The same structure (heads, GQA, causal, P < N) at a size the CPU runs in a moment."""
    name, B, Hq, Hkv, N, P, D, causal = shape
    return (name + "-dry", 2, Hq // 8, max(1, Hkv // 8), 32, max(4, P // 16), 16, causal)


def sdpa_kernels(fn) -> str:
    """Which SDPA implementation ``fn`` dispatched to, from the aten ops the profiler saw ('-': none)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}
    found = {next((label for frag, label in SDPA_OPS if frag in op), op) for op in ops}
    return ", ".join(sorted(found)) or "-"


def time_call(fn, iters: int, rounds: int) -> tuple:
    """(GPU us, host us) per call, medians over ``rounds`` rounds of ``iters`` calls."""
    gpu, host = [], []
    for _ in range(rounds):
        benchlib.sync()
        if benchlib.on_gpu():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        host.append((time.perf_counter() - t0) / iters * 1e6)
        if benchlib.on_gpu():
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end) * 1e3 / iters)
    return (benchlib.percentile(gpu, 50) if gpu else None), benchlib.percentile(host, 50)


def measure(provider, shape, mode):
    """One row: timings, memory and SDPA kernel of ``provider`` at ``shape`` in ``mode``, or a skip."""
    name, B, Hq, Hkv, N, P, D, causal = shape
    row = dict(shape=name, provider=provider, mode=mode, B=B, Hq=Hq, Hkv=Hkv, N=N, P=P, D=D, causal=causal)
    dtype = torch.bfloat16 if benchlib.on_gpu() else torch.float32
    why = bpa._provider_skip_reason(provider)
    if why:
        return dict(row, skipped=why)
    try:
        tensors = bpa.make_inputs(B, Hq, Hkv, N, P, D, 0.0, dtype, benchlib.device())
        fwd, leaves, note = bpa.build(provider, tensors, causal)
        fn = bpa.callable_for(mode, fwd, leaves)
        fn()  # compile / autotune
        benchlib.sync()
        if benchlib.on_gpu():
            iters = max(1, min(100, int(2e-3 / max(benchlib.estimate_seconds(fn), 1e-7))))
            row["gpu_us"], row["host_us"] = time_call(fn, iters, ROUNDS)
        else:  # a dry run: the path once more, timed for the table's sake only
            row["gpu_us"], row["host_us"] = time_call(fn, 1, 1)
        row["peak_mem_bytes"] = benchlib.peak_memory_delta(fn)
        row["sdpa"] = sdpa_kernels(fn)
        row["note"] = note
        row["tflops"] = (bpa.attention_flops(B, Hq, N, P, D, causal, mode) / (row["gpu_us"] * 1e-6) / 1e12
                         if row["gpu_us"] else None)
    except (Exception, pytest.skip.Exception) as e:  # a backend that cannot run, or out of memory: results
        if not (isinstance(e, pytest.skip.Exception) or benchlib.is_oom(e)):
            raise
        row["skipped"] = str(e).splitlines()[0][:300]
    finally:
        benchlib.free_memory()
    return row


def ratio_table(rows) -> str:
    """Markdown: per shape and mode, each provider's times and memory, and baseline/provider ratios."""
    by = {(r["shape"], r["provider"], r["mode"]): r for r in rows}
    clock = "gpu_us" if benchlib.on_gpu() else "host_us"
    head = ["shape", "mode", "provider", clock, "host_us", "peak MiB"] + [f"{b} / it" for b in BASELINES] \
        + ["SDPA kernel"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (3 + len(BASELINES)) + "---|"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for mode in bpa.MODES:
            base = {b: by.get((shape, b, mode), {}) for b in BASELINES}
            for prov in PTV2 + BASELINES:
                r = by.get((shape, prov, mode), {})
                if "skipped" in r:
                    cells = [f"skipped: {r['skipped'][:100]}"] + [""] * (len(head) - 4)
                else:
                    mem = r.get("peak_mem_bytes")
                    cells = [_num(r.get(clock)), _num(r.get("host_us")),
                             _num(mem / 2**20 if mem is not None else None)]
                    cells += [_ratio(base[b].get(clock), r.get(clock)) for b in BASELINES] + [r.get("sdpa", "-")]
                lines.append("| " + " | ".join([shape, mode, prov] + cells) + " |")
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _ratio(base, mine) -> str:
    return f"{base / mine:.2f}x" if base and mine else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for tier1_ratio.json and tier1_ratio.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU plumbing with tiny shapes (no measurement)")
    args = ap.parse_args(argv)
    if not args.dry_run and not benchlib.on_gpu():
        raise SystemExit("tier1_ratio.py: no GPU here (PTV2_BENCH_DEVICE or no CUDA); --dry-run checks it on CPU")
    if args.dry_run:
        os.environ["PTV2_BENCH_DEVICE"] = "cpu"
    shapes = [dry_shape(s) for s in SHAPES] if args.dry_run else SHAPES
    rows = []
    for shape in shapes:
        for provider in PTV2 + BASELINES:
            for mode in bpa.MODES:
                row = measure(provider, shape, mode)
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"environment": benchlib.environment(), "dry_run": args.dry_run,
           "triton_autotune": os.environ.get("PTV2_TRITON_AUTOTUNE", "full"), "rows": rows}
    (out / "tier1_ratio.json").write_text(json.dumps(doc, indent=1) + "\n")
    table = ratio_table(rows)
    (out / "tier1_ratio.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
