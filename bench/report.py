"""Benchmark result files -> markdown tables, target checks and PNG plots.

    python bench/report.py bench/results/<gpu>/<run>/            # every *.json under the folder(s)
    python bench/report.py a.json b.json --out DIR --readme bench/README.md

Writes ``report.md`` and the plots into ``--out`` (default: the folder of the first input), prints the
targets with met/missed and the gap, and with ``--readme`` replaces the results section of that file
(between the ``<!-- results:begin -->`` and ``<!-- results:end -->`` markers) with the report, image
links made relative to the README.

Inputs are pytest-benchmark JSON files written by ``pytest bench/ --benchmark-json=...``; every number
comes from a benchmark's ``extra_info`` (median/p20/p80 microseconds, TFLOP/s, peak memory, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path
from statistics import median as _median

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
PTV2 = ("ptv2-triton", "ptv2-cuda", "ptv2-flash", "ptv2-torch")
OP_PROVIDERS = ("ptv2-triton", "ptv2-cuda", "ptv2-flash", "ptv2-torch", "peft-route", "sdpa-preconcat", "eager")
METHODS = ("ptv2", "peft", "reference", "finetune", "ptv2-top-half")  # train_methods.METHODS (no torch here)
CPU_PTV2 = "ptv2-flash"  # the CPU default backend: what a user gets, so what the CPU ratios compare
CPU_METHODS = ("ptv2", "peft-route", "finetune")
CPU_OP_GRIDS = ("minilm", "bert-base")
MODES_ORDER = ("fwd+bwd", "fwd", "bwd")

# (key, description, comparison, threshold); CPU ratios are ptv2's time (or RSS) over the baseline's
CPU_TARGETS = (
    ("cpu_op_vs_preconcat", "CPU op fwd+bwd <= 1.05x sdpa-preconcat's time (every CPU grid point)", "<=", 1.05),
    ("cpu_op_vs_peft", "CPU op fwd+bwd <= 1.0x peft-route's time (every CPU grid point)", "<=", 1.0),
    ("cpu_host", "CPU tiny-shape call (B=1 H=1 N=8 D=8 P=2, fwd+bwd) <= 2x SDPA's (sdpa-preconcat)", "<=", 2.0),
    ("cpu_step_time", "CPU MiniLM training step <= 1.0x the PEFT route's time (every length)", "<=", 1.0),
    ("cpu_step_rss", "CPU MiniLM training step peak RSS below the PEFT route's (every length)", "<", 1.0),
)
TARGETS = (
    ("op_vs_peft", "op fwd+bwd >= 2x faster than peft-route (P-Tuning v2 grid, every shape)", ">=", 2.0),
    ("op_vs_preconcat", "op fwd+bwd no slower than sdpa-preconcat (P-Tuning v2 grid, every shape)", ">=", 1.0),
    ("decoder_tflops", "decoder grid forward >= 350 TFLOP/s at N >= 4k, D = 128 (set for H100)", ">=", 350.0),
    ("step_memory", "bert-large step B=32 N=512 P=128: peak memory <= 0.6x PEFT's", "<=", 0.6),
    ("max_batch", "bert-large N=512 P=128: largest batch >= 1.5x PEFT's", ">=", 1.5),
    ("step_vs_peft", "train-step throughput >= 1.5x PEFT at N=512 (every model)", ">=", 1.5),
    ("step_vs_finetune", "train-step throughput >= 2x full fine-tuning at N=512 (every model)", ">=", 2.0),
)


# --------------------------------------------------------------------------------------------------
# loading


def find_files(paths):
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("*.json")))
        elif p.exists():
            files.append(p)
        else:
            raise SystemExit(f"report.py: no such file or folder: {p}")
    return files


def load(paths):
    """Flat records: each benchmark's extra_info plus gpu, name, file."""
    rows = []
    for f in find_files(paths):
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"report.py: skipping {f}: {e}", file=sys.stderr)
            continue
        if not isinstance(data, dict) or "benchmarks" not in data:
            continue
        machine = (data.get("machine_info") or {}).get("ptv2") or {}
        for b in data["benchmarks"]:
            ei = dict(b.get("extra_info") or {})
            if "subject" not in ei:
                continue
            if ei.get("median_us") is None:
                med = (b.get("stats") or {}).get("median")
                ei["median_us"] = med * 1e6 if med is not None else None
            ei.setdefault("gpu", machine.get("gpu"))
            ei["gpu"] = ei.get("gpu") or ("cpu" if (ei.get("device") or machine.get("device")) == "cpu" else "unknown")
            ei["name"] = b.get("name")
            ei["file"] = str(f)
            ei["machine"] = machine
            rows.append(ei)
    return rows


# --------------------------------------------------------------------------------------------------
# formatting


def fmt(x, digits=1):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def mib(b):
    return None if b is None else b / 2**20


def gib(b):
    return None if b is None else b / 2**30


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# the op


def _shape_key(r):
    return (r["N"], r["P"], r.get("padding", 0.0), r["B"], r["Hq"], r["Hkv"], r["D"], bool(r.get("causal")))


def op_groups(rows):
    """{(gpu, grid, dtype, mode): {shape: {provider: row}}}"""
    groups = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r.get("subject") != "prefix_attention" or r.get("median_us") is None:
            continue
        groups[(r["gpu"], r["grid"], r["dtype"], r["mode"])][_shape_key(r)][r["provider"]] = r
    return groups


def best_ptv2(provs):
    cands = [provs[p] for p in PTV2 if p in provs and provs[p].get("median_us")]
    if not cands:
        return None
    return min(cands, key=lambda r: r["median_us"])


def op_comparisons(groups):
    """Per (gpu, grid, dtype, mode, shape): best ptv2 row and speedups over the baselines."""
    out = []
    for (gpu, grid, dtype, mode), shapes in groups.items():
        for shape, provs in shapes.items():
            best = best_ptv2(provs)
            if best is None:
                continue
            rec = dict(gpu=gpu, grid=grid, dtype=dtype, mode=mode, shape=shape, best=best)
            for base in ("peft-route", "sdpa-preconcat", "eager"):
                rec[f"x_{base}"] = ratio(provs.get(base, {}).get("median_us"), best["median_us"])
            out.append(rec)
    return out


def op_section(groups):
    parts = []
    order = lambda k: (k[0], k[1] != "ptv2", k[1], k[2], MODES_ORDER.index(k[3]) if k[3] in MODES_ORDER else 9)  # noqa: E731
    for (gpu, grid, dtype, mode) in sorted(groups, key=order):
        shapes = groups[(gpu, grid, dtype, mode)]
        present = [p for p in OP_PROVIDERS if any(p in v for v in shapes.values())]
        header = ["N", "P", "pad", "B", "H"] + [f"{p} us" for p in present] + [
            "ptv2 p20-p80 us", "ptv2 TFLOP/s", "x vs peft-route", "x vs sdpa-preconcat", "peak MiB ptv2 / peft-route / preconcat"]
        rows = []
        for shape in sorted(shapes):
            provs = shapes[shape]
            N, P, pad, B, Hq, Hkv, D, causal = shape
            best = best_ptv2(provs)
            med = [provs[p]["median_us"] if p in provs else None for p in present]
            peaks = "/".join(fmt(mib(provs.get(p, {}).get("peak_mem_bytes")), 0)
                             for p in (best["provider"] if best else None, "peft-route", "sdpa-preconcat"))
            spread = (f"{fmt(best.get('p20_us'))}-{fmt(best.get('p80_us'))}"
                      if best and best.get("p20_us") is not None else "-")
            rows.append([N, P, f"{int(round(pad * 100))}%", B, f"{Hq}/{Hkv}"] + med + [
                spread, best.get("tflops") if best else None,
                ratio(provs.get("peft-route", {}).get("median_us"), best["median_us"]) if best else None,
                ratio(provs.get("sdpa-preconcat", {}).get("median_us"), best["median_us"]) if best else None,
                peaks])
        any_row = next(iter(next(iter(shapes.values())).values()))
        causal = " causal" if any_row.get("causal") else ""
        title = (f"#### prefix_attention {mode}, {grid} grid, {dtype}{causal}, D={any_row['D']} ({gpu})")
        parts.append(title + "\n\nMedian microseconds; speedups are the baseline's median over the faster ptv2 "
                     "backend's (its p20-p80 and TFLOP/s shown); peak memory above the inputs. peft-route passes "
                     "no mask where nothing is padded and attention is bidirectional, as transformers does "
                     "for SDPA (each result's `note` says which).\n\n"
                     + table(header, rows))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------------
# training


def train_groups(rows, subject="train_step"):
    """{(gpu, model, B): {method: row}} (max_batch: B is None)."""
    groups = defaultdict(dict)
    for r in rows:
        if r.get("subject") != subject:
            continue
        key = (r["gpu"], r["model"], r["B"] if subject == "train_step" else None)
        groups[key][r["method"]] = r
    return groups


def train_section(rows):
    parts = []
    steps = train_groups(rows)
    if steps:
        header = ["model", "B", "method", "samples/s", "peak GiB", "x samples/s vs peft",
                  "x vs finetune", "peak vs peft", "trainable params"]
        body = []
        for (gpu, model, B) in sorted(steps, key=lambda k: (k[0], k[1], k[2])):
            ms = steps[(gpu, model, B)]
            for m in METHODS:
                if m not in ms:
                    continue
                r = ms[m]
                body.append([model, B, m, r.get("samples_per_s"), gib(r.get("peak_mem_bytes")),
                             ratio(r.get("samples_per_s"), ms.get("peft", {}).get("samples_per_s")),
                             ratio(r.get("samples_per_s"), ms.get("finetune", {}).get("samples_per_s")),
                             ratio(r.get("peak_mem_bytes"), ms.get("peft", {}).get("peak_mem_bytes")),
                             fmt(r.get("trainable_params"))])
        gpus = sorted({k[0] for k in steps})
        all_rows = [r for ms in steps.values() for r in ms.values()]
        ns = "/".join(sorted({str(r.get("N")) for r in all_rows}))
        ps = "/".join(sorted({str(r.get("P")) for r in all_rows}))
        amp = "/".join(sorted({str(r.get("autocast") or "fp32") for r in all_rows}))
        parts.append(f"#### Training step, N={ns} P={ps}, {amp} ({', '.join(gpus)})\n\n"
                     "Peak memory is `max_memory_allocated` during a step (weights and optimizer state "
                     "included).\n\n" + table(header, body))
    maxb = train_groups(rows, "max_batch")
    if maxb:
        header = ["model", "method", "largest batch", "x vs peft", "samples/s there", "peak GiB", "note"]
        body = []
        for (gpu, model, _) in sorted(maxb):
            ms = maxb[(gpu, model, None)]
            for m in METHODS:
                if m in ms:
                    r = ms[m]
                    body.append([model, m, r.get("max_batch"), ratio(r.get("max_batch"), ms.get("peft", {}).get("max_batch")),
                                 r.get("samples_per_s"), gib(r.get("peak_mem_bytes")), r.get("capped") or ""])
        parts.append("#### Largest batch that fits, N=512 P=128\n\n" + table(header, body))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------------
# targets


def evaluate_targets(rows):
    """[(key, description, status, value, gap, detail)] with status 'met', 'missed' or 'no data'.
    Targets are GPU targets: CPU smoke results never count."""
    cpu_only = bool(rows) and all(r.get("gpu") == "cpu" for r in rows)
    rows = [r for r in rows if r.get("gpu") != "cpu"]
    comps = op_comparisons(op_groups(rows))
    values = {}

    def worst(recs, key):
        vals = [(r[key], r) for r in recs if r.get(key) is not None]
        return min(vals, key=lambda t: t[0]) if vals else (None, None)

    ptv2_fb = [c for c in comps if c["grid"] == "ptv2" and c["mode"] == "fwd+bwd"]
    for key, base in (("op_vs_peft", "x_peft-route"), ("op_vs_preconcat", "x_sdpa-preconcat")):
        v, r = worst(ptv2_fb, base)
        values[key] = (v, None if r is None else f"worst at N={r['shape'][0]} P={r['shape'][1]} "
                       f"pad={int(r['shape'][2] * 100)}% {r['dtype']} ({r['best']['provider']}, {r['gpu']}); "
                       f"median over shapes {_median([c[base] for c in ptv2_fb if c.get(base)]):.2f}x")
    dec = [c for c in comps if c["grid"] == "decoder" and c["mode"] == "fwd" and c["shape"][0] >= 4096
           and c["shape"][6] == 128]
    tf = [(c["best"].get("tflops"), c) for c in dec if c["best"].get("tflops") is not None]
    if tf:
        v, c = min(tf, key=lambda t: t[0])
        values["decoder_tflops"] = (v, f"worst at N={c['shape'][0]} P={c['shape'][1]} {c['dtype']} "
                                       f"({c['best']['provider']}, {c['gpu']})")
    steps = train_groups(rows)
    bl = [ms for (g, m, B), ms in steps.items() if m == "bert-large" and B == 32]
    mem = [ratio(ms.get("ptv2", {}).get("peak_mem_bytes"), ms.get("peft", {}).get("peak_mem_bytes")) for ms in bl]
    mem = [x for x in mem if x is not None]
    if mem:
        values["step_memory"] = (max(mem), "ptv2 peak / PEFT peak")
    mb = [ms for (g, m, _), ms in train_groups(rows, "max_batch").items() if m == "bert-large"]
    mbr = [ratio(ms.get("ptv2", {}).get("max_batch"), ms.get("peft", {}).get("max_batch")) for ms in mb]
    mbr = [x for x in mbr if x is not None]
    if mbr:
        ms = mb[0]
        values["max_batch"] = (min(mbr), f"ptv2 {ms.get('ptv2', {}).get('max_batch')} vs PEFT "
                                         f"{ms.get('peft', {}).get('max_batch')}")
    for key, base in (("step_vs_peft", "peft"), ("step_vs_finetune", "finetune")):
        rs = []
        for (g, model, B), ms in steps.items():
            if ms.get("ptv2", {}).get("N") == 512:
                x = ratio(ms.get("ptv2", {}).get("samples_per_s"), ms.get(base, {}).get("samples_per_s"))
                if x is not None:
                    rs.append((x, f"{model} B={B}"))
        if rs:
            v, where = min(rs)
            values[key] = (v, f"worst: {where}")
    why = "CPU smoke results only (targets are for a GPU)" if cpu_only else "not measured in these files"
    return _judge(TARGETS, values, why)


def _judge(targets, values, why_no_data):
    """[(key, description, status, value, gap, detail)] for ``targets`` from {key: (value, detail)}."""
    out = []
    for key, desc, cmp, thr in targets:
        v, detail = values.get(key, (None, None))
        if v is None:
            out.append((key, desc, "no data", None, None, why_no_data))
            continue
        ok = {">=": v >= thr, "<=": v <= thr, "<": v < thr}[cmp]
        gap = (thr - v) if cmp == ">=" else (v - thr)
        out.append((key, desc, "met" if ok else "missed", v, None if ok else gap, detail))
    return out


def targets_section(results):
    body = [[desc, status.upper() if status != "no data" else status, fmt(v, 2),
             fmt(gap, 2) if gap is not None else "", detail or ""] for _, desc, status, v, gap, detail in results]
    return "#### Targets\n\n" + table(["target", "status", "value", "gap", "detail"], body)


# --------------------------------------------------------------------------------------------------
# the CPU: ptv2 (its default backend, flash) against the PEFT route and SDPA, as time ratios


def is_cpu(r) -> bool:
    return r.get("gpu") == "cpu"


def _smoke(r) -> bool:
    return bool(r.get("smoke") or (r.get("machine") or {}).get("smoke"))


def fmt_us(us):
    if us is None:
        return "-"
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    return f"{us / 1000:.1f} ms" if us >= 1000 else f"{us:.0f} us"


def fmt_bytes_list(values):
    """'21.3 / 21.8 / 13.6 MiB': one unit for the list, KiB when all are below a MiB."""
    known = [v for v in values if v is not None]
    unit, scale = ("MiB", 2**20) if known and max(known) >= 2**20 else ("KiB", 2**10)
    return " / ".join("-" if v is None else f"{v / scale:.1f}" for v in values) + f" {unit}"


def fmt_x(x):
    return "-" if x is None else f"{x:.2f}x"


def _grid_order(grid):
    return CPU_OP_GRIDS.index(grid) if grid in CPU_OP_GRIDS else len(CPU_OP_GRIDS)


def cpu_op_groups(rows):
    """{mode: {(grid, B, Hq, D, N, P, padding): {provider: row}}} of the CPU op results."""
    groups = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r.get("subject") == "prefix_attention" and r.get("median_us") is not None:
            key = (r["grid"], r["B"], r["Hq"], r["D"], r["N"], r["P"], r.get("padding", 0.0))
            groups[r["mode"]][key][r["provider"]] = r
    return groups


def _time_ratio(provs, base):
    """ptv2's median time over ``base``'s at one grid point (below 1: ptv2 is faster)."""
    return ratio(provs.get(CPU_PTV2, {}).get("median_us"), provs.get(base, {}).get("median_us"))


def cpu_op_section(rows):
    parts = []
    groups = cpu_op_groups(rows)
    for mode in sorted(groups, key=lambda m: MODES_ORDER.index(m) if m in MODES_ORDER else 9):
        points = groups[mode]
        present = [p for p in OP_PROVIDERS if any(p in v for v in points.values())]
        header = ["grid", "B", "H", "D", "N", "P", "pad"] + present + [
            "ptv2 / peft-route", "ptv2 / sdpa-preconcat", "ptv2 p20-p80", "peak memory ptv2 / peft-route / preconcat"]
        body = []
        for key in sorted(points, key=lambda k: (_grid_order(k[0]),) + k):
            grid, B, Hq, D, N, P, pad = key
            provs = points[key]
            ours = provs.get(CPU_PTV2, {})
            spread = (f"{fmt_us(ours['p20_us'])}-{fmt_us(ours['p80_us'])}" if ours.get("p20_us") is not None else "-")
            peaks = fmt_bytes_list([provs.get(p, {}).get("peak_mem_bytes")
                                    for p in (CPU_PTV2, "peft-route", "sdpa-preconcat")])
            body.append([grid, B, Hq, D, N, P, f"{int(round(pad * 100))}%"]
                        + [fmt_us(provs.get(p, {}).get("median_us")) for p in present]
                        + [fmt_x(_time_ratio(provs, "peft-route")), fmt_x(_time_ratio(provs, "sdpa-preconcat")),
                           spread, peaks])
        parts.append(f"#### prefix_attention {mode}, CPU, float32\n\n" + table(header, body))
    return "\n\n".join(parts)


def cpu_train_groups(rows):
    """{(model, B, N, P): {method: row}} of the CPU training-step results."""
    groups = defaultdict(dict)
    for r in rows:
        if r.get("subject") == "train_step":
            groups[(r["model"], r["B"], r["N"], r["P"])][r["method"]] = r
    return groups


def cpu_train_section(rows):
    groups = cpu_train_groups(rows)
    if not groups:
        return ""
    header = ["model", "B", "N", "P", "method", "step", "p20-p80", "samples/s", "time / peft-route",
              "peak RSS MiB", "RSS growth MiB", "peak RSS / peft-route", "trainable params"]
    body = []
    for key in sorted(groups):
        model, B, N, P = key
        ms = groups[key]
        base = ms.get("peft-route", {})
        for m in [m for m in CPU_METHODS if m in ms] + sorted(set(ms) - set(CPU_METHODS)):
            r = ms[m]
            body.append([model, B, N, P, m, fmt_us(r.get("median_us")),
                         f"{fmt_us(r.get('p20_us'))}-{fmt_us(r.get('p80_us'))}", r.get("samples_per_s"),
                         fmt_x(ratio(r.get("median_us"), base.get("median_us"))), mib(r.get("peak_rss_bytes")),
                         mib(r.get("peak_rss_growth_bytes")),
                         fmt_x(ratio(r.get("peak_rss_bytes"), base.get("peak_rss_bytes"))),
                         f"{r['trainable_params']:,}" if r.get("trainable_params") is not None else "-"])
    return ("#### Training step, CPU, float32, train mode (recipe dropout)\n\n"
            "Median step (forward, backward, AdamW) over rounds; each method ran in a fresh process. Peak RSS: "
            "the process's peak resident memory while the steps ran (VmHWM reset just before the first step; "
            "weights, gradients, optimizer state and activations); RSS growth: that peak above the RSS "
            "before the first step.\n\n" + table(header, body))


def evaluate_cpu_targets(rows):
    """Issue 11's CPU targets from non-smoke CPU results, as [(key, description, status, value, gap,
    detail)]; each value is the worst ratio over the grid (ptv2's time or RSS over the baseline's)."""
    rows = [r for r in rows if is_cpu(r) and not _smoke(r)]
    values = {}

    def worst(pairs):
        pairs = [(v, where) for v, where in pairs if v is not None]
        if not pairs:
            return None, None
        v, where = max(pairs, key=lambda t: t[0])
        return v, f"worst at {where}; median {_median([x for x, _ in pairs]):.2f}x over {len(pairs)}"

    fb = cpu_op_groups(rows).get("fwd+bwd", {})
    grid_points = {k: v for k, v in fb.items() if k[0] in CPU_OP_GRIDS}
    for key, base in (("cpu_op_vs_preconcat", "sdpa-preconcat"), ("cpu_op_vs_peft", "peft-route")):
        values[key] = worst((_time_ratio(provs, base), f"{k[0]} D={k[3]} N={k[4]} P={k[5]} pad={int(k[6] * 100)}%")
                            for k, provs in grid_points.items())
    values["cpu_host"] = worst((_time_ratio(provs, "sdpa-preconcat"), "the host shape")
                               for k, provs in fb.items() if k[0] == "host")
    steps = cpu_train_groups(rows)
    for key, field in (("cpu_step_time", "median_us"), ("cpu_step_rss", "peak_rss_bytes")):
        values[key] = worst((ratio(ms.get("ptv2", {}).get(field), ms.get("peft-route", {}).get(field)),
                             f"{k[0]} B={k[1]} N={k[2]}") for k, ms in steps.items())
    why = "CPU smoke results only (they measure nothing)" if not rows else "not measured in these files"
    return _judge(CPU_TARGETS, {k: v for k, v in values.items() if v[0] is not None}, why)


def cpu_section(rows, results):
    cpus = sorted({f"{(r.get('machine') or {}).get('cpu') or r.get('cpu') or 'unknown CPU'}, "
                   f"{(r.get('machine') or {}).get('threads') or r.get('threads') or '?'} thread(s)" for r in rows})
    parts = [f"#### CPU ({'; '.join(cpus)})",
             "Ratios are ptv2's median time (or peak RSS) over the baseline's: below 1.00x ptv2 is faster "
             f"(smaller). ptv2 is `{CPU_PTV2}`, the CPU default backend; peak memory of the op is the peak "
             "of live tensor bytes allocated by torch ops during one call, above what existed before it "
             "(the CPU counterpart of `max_memory_allocated`)." + (" **Smoke-run results: they measure "
                                                                   "nothing.**" if any(map(_smoke, rows)) else ""),
             "#### CPU targets (issue 11)\n\n" + table(
                 ["target", "status", "value", "gap", "detail"],
                 [[desc, status.upper() if status != "no data" else status, fmt_x(v),
                   fmt(gap, 2) if gap is not None else "", detail or ""] for _, desc, status, v, gap, detail in results])]
    for section in (cpu_op_section(rows), cpu_train_section(rows)):
        if section:
            parts.append(section)
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------------
# plots


def plots(rows, out_dir: Path):
    """PNG plots; returns [(title, path)]."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # plots are optional, tables are not
        print(f"report.py: no plots ({type(e).__name__}: {e})", file=sys.stderr)
        return []
    made = []
    comps = op_comparisons(op_groups(rows))
    series = defaultdict(lambda: defaultdict(list))
    for c in comps:
        if c["mode"] != "fwd+bwd":
            continue
        N, P, pad = c["shape"][:3]
        key = (c["gpu"], c["grid"], c["dtype"])
        series[key][(P, pad)].append((N, c.get("x_peft-route"), c.get("x_sdpa-preconcat")))
    for (gpu, grid, dtype), lines in sorted(series.items()):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
        for (P, pad), pts in sorted(lines.items()):
            pts.sort()
            label = f"P={P}" + (f", pad {int(pad * 100)}%" if pad else "")
            style = "--" if pad else "-"
            for ax, idx in ((axes[0], 1), (axes[1], 2)):
                xs = [p[0] for p in pts if p[idx] is not None]
                ys = [p[idx] for p in pts if p[idx] is not None]
                if xs:
                    ax.plot(xs, ys, style, marker="o", label=label)
        for ax, name, target in ((axes[0], "peft-route", 2.0), (axes[1], "sdpa-preconcat", 1.0)):
            ax.axhline(target, color="gray", lw=0.8, ls=":")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(f"speedup over {name} (x)")
            ax.set_title(f"vs {name}")
            ax.legend(fontsize=8)
        fig.suptitle(f"prefix_attention fwd+bwd, {grid} grid, {dtype} ({gpu})")
        fig.tight_layout()
        path = out_dir / f"speedup_{grid}_{dtype}_{_slug(gpu)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append((f"Speedup against N: {grid} grid, {dtype}, {gpu}", path))
    steps = train_groups(rows)
    maxb = train_groups(rows, "max_batch")
    by_model = defaultdict(lambda: defaultdict(list))
    for (gpu, model, B), ms in steps.items():
        for m, r in ms.items():
            if r.get("peak_mem_bytes") is not None:
                by_model[(gpu, model)][m].append((B, gib(r["peak_mem_bytes"])))
    for (gpu, model), ms in sorted(by_model.items()):
        if max(len(v) for v in ms.values()) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in METHODS:
            if m in ms:
                pts = sorted(ms[m])
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
                mb = maxb.get((gpu, model, None), {}).get(m)
                if mb and mb.get("peak_mem_bytes"):
                    ax.plot([mb["max_batch"]], [gib(mb["peak_mem_bytes"])], marker="*", ms=12,
                            color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("peak memory (GiB)")
        cap = next((r.get("machine", {}).get("gpu_memory_gib") for v in steps.values() for r in v.values()
                    if r.get("gpu") == gpu and r.get("machine", {}).get("gpu_memory_gib")), None)
        if cap:
            ax.axhline(cap, color="gray", lw=0.8, ls=":", label=f"GPU memory {cap:.0f} GiB")
        ax.set_title(f"{model} training step, N=512 P=128\n{gpu}; star: largest batch that fits", fontsize=9)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"memory_{_slug(model)}_{_slug(gpu)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append((f"Peak memory against batch: {model}, {gpu}", path))
    return made


def _slug(s):
    out = "".join(c.lower() if c.isalnum() else "-" for c in str(s))
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")


# --------------------------------------------------------------------------------------------------


def environment_line(rows):
    envs = OrderedDict()
    for r in rows:
        m = r.get("machine") or {}
        device = m.get("gpu") or r.get("gpu")
        if is_cpu(r):
            device = f"CPU {m.get('cpu') or r.get('cpu') or 'unknown'}, {m.get('threads') or r.get('threads')} thread(s)"
        key = (device, m.get("torch"), m.get("triton"), m.get("cuda"), m.get("git_sha"))
        envs[key] = m
    lines = []
    for (device, torch_v, triton_v, cuda_v, sha), m in envs.items():
        lines.append(f"- {device}: torch {torch_v}, CUDA {cuda_v}, triton {triton_v}, transformers "
                     f"{m.get('transformers')}, peft {m.get('peft')}, git {sha}"
                     + (" (quick grid)" if m.get("quick") else "") + (" (smoke run)" if m.get("smoke") else ""))
    return "\n".join(lines)


def render(rows, images, link_base: Path):
    """The report's markdown and its targets: GPU sections from GPU results, the CPU section from CPU
    results (a file holds one or the other)."""
    gpu_rows = [r for r in rows if not is_cpu(r)]
    cpu_rows = [r for r in rows if is_cpu(r)]
    parts = ["### Results", "", environment_line(rows)]
    results = []
    if gpu_rows:
        results = evaluate_targets(gpu_rows)
        parts += ["", targets_section(results)]
        for title, path in images:
            rel = os.path.relpath(path, link_base)
            parts += ["", f"![{title}]({rel})"]
        for section in (op_section(op_groups(gpu_rows)), train_section(gpu_rows)):
            if section:
                parts += ["", section]
    if cpu_rows:
        cpu_results = evaluate_cpu_targets(cpu_rows)
        results = results + cpu_results
        parts += ["", cpu_section(cpu_rows, cpu_results)]
    return "\n".join(parts) + "\n", results


def update_readme(readme: Path, text: str):
    old = readme.read_text() if readme.exists() else ""
    block = f"{BEGIN}\n{text}{END}"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        new = head + block + tail
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(new)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="pytest-benchmark JSON files or folders holding them")
    ap.add_argument("--out", help="folder for report.md and the plots (default: the first input's folder)")
    ap.add_argument("--readme", help="a markdown file whose results section is replaced by the report")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    rows = load(args.inputs)
    if not rows:
        print("report.py: no benchmark results found in " + ", ".join(args.inputs), file=sys.stderr)
        return 1
    first = Path(args.inputs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    images = [] if args.no_plots else plots([r for r in rows if not is_cpu(r)], out)
    text, results = render(rows, images, out)
    (out / "report.md").write_text(text)
    if args.readme:
        readme = Path(args.readme)
        text_readme, _ = render(rows, images, readme.resolve().parent)
        update_readme(readme, text_readme)
    print(f"{len(rows)} results from {len(find_files(args.inputs))} file(s); report in {out / 'report.md'}")
    for _, desc, status, v, gap, detail in results:
        extra = "" if v is None else f" value {v:.2f}" + ("" if gap is None else f", gap {gap:.2f}")
        print(f"  [{status.upper() if status != 'no data' else 'no data'}] {desc}:{extra}"
              + (f" ({detail})" if detail else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
