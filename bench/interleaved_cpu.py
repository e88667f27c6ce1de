"""The CPU op grid timed interleaved: ptv2 and its baselines called in turn, round after round.

pytest-benchmark times one provider after another, so a shared machine's slow minute lands on
whichever provider ran then: on a virtual machine, two providers doing the same work were seen 25%
apart. Here every round calls each provider once, in an order rotated from round to round, and the
ratio of a point is the median over rounds of ptv2's time over the baseline's in the same round.

    PYTHONPATH=. python bench/interleaved_cpu.py OUT_DIR [--rounds 15] [--mode fwd+bwd]

Writes OUT_DIR/interleaved.json (every round's times, versions, SHA) and OUT_DIR/interleaved.md.
Same inputs, providers and callables as bench_prefix_attention.py; one thread (PTV2_BENCH_THREADS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_prefix_attention as B  # noqa: E402
import benchlib  # noqa: E402

PTV2, BASELINES = "ptv2-flash", ("peft-route", "sdpa-preconcat")


def time_point(case, mode: str, rounds: int) -> dict:
    grid, b, hq, hkv, n, p, d, causal, pad, dtype = case
    calls = {}
    for provider in (PTV2, *BASELINES):
        tensors = B.make_inputs(b, hq, hkv, n, p, d, pad, dtype, torch.device("cpu"))
        fwd, leaves, _ = B.build(provider, tensors, causal)
        calls[provider] = B.callable_for(mode, fwd, leaves)
        calls[provider]()  # warm-up
    order = list(calls)
    times = {name: [] for name in calls}
    for r in range(rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summarize(times: dict) -> dict:
    out = {name: statistics.median(t) for name, t in times.items()}
    for base in BASELINES:
        out[f"/{base}"] = statistics.median(a / b for a, b in zip(times[PTV2], times[base]))
    return out


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def table(points: list) -> str:
    head = ["grid", "D", "N", "P", "pad", PTV2, *BASELINES] + [f"ptv2 / {b} (paired median)" for b in BASELINES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for pt in points:
        s = pt["summary"]
        lines.append("| " + " | ".join([pt["grid"], str(pt["D"]), str(pt["N"]), str(pt["P"]), f"{pt['pad']:.0%}",
                                        *(_fmt(s[n]) for n in (PTV2, *BASELINES)),
                                        *(f"{s['/' + b]:.2f}x" for b in BASELINES)]) + " |")
    ratios = {b: [pt["summary"]["/" + b] for pt in points if pt["grid"] != "host"] for b in BASELINES}
    lines.append("")
    for b in BASELINES:
        r = ratios[b]
        lines.append(f"- ptv2 / {b} over the {len(r)} grid points: median {statistics.median(r):.2f}x, "
                     f"best {min(r):.2f}x, worst {max(r):.2f}x, at or below 1.00x at {sum(x <= 1.0 for x in r)}, "
                     f"at or below 1.05x at {sum(x <= 1.05 for x in r)}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--mode", choices=B.MODES, default="fwd+bwd")
    args = ap.parse_args(argv)
    torch.set_num_threads(benchlib.threads())
    points = []
    for case in B.CASES:
        grid, b, hq, hkv, n, p, d, causal, pad, dtype = case
        times = time_point(case, args.mode, args.rounds)
        points.append({"grid": grid, "B": b, "H": hq, "N": n, "P": p, "D": d, "pad": pad, "times_s": times,
                       "summary": summarize(times)})
        print(f"{B._case_id(case)}: " + ", ".join(f"{k} {v:.3g}" for k, v in points[-1]["summary"].items()),
              flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"mode": args.mode, "rounds": args.rounds, "threads": torch.get_num_threads(),
            "environment": benchlib.environment()}
    (args.out_dir / "interleaved.json").write_text(json.dumps({"meta": meta, "points": points}, indent=1))
    text = (f"### Op {args.mode}, CPU, interleaved ({args.rounds} rounds, {meta['threads']} thread(s))\n\n"
            + table(points))
    (args.out_dir / "interleaved.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
