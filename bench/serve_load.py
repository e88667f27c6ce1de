r"""Load benchmark of ``ptv2 serve``: requests per second and p50/p99 latency at concurrency 1, 8 and 64,
with 1, 8 and 64 tasks mixed uniformly at random, on the CPU with MiniLM; against the same server given
one task (the 1-task rows) and against PEFT serving the same number of tasks the only way it can (one
active adapter at a time, each batch's requests grouped per task: ``bench/peft_serve.py``, behind the
same HTTP server, batching and request checks).

    python bench/serve_load.py --peft-python /tmp/peftenv/bin/python      # a few minutes
    python bench/serve_load.py --report bench/results/cpu/serve/<run>      # redraw table and plot
    python bench/serve_load.py --device cuda [--peft-python ...]            # the GPU row (model threads: 1)

Runs: 64 SST-2 task models with freshly initialized prefixes (P = 16, max length 64, mean pooling as
``ptv2 train`` uses for MiniLM) and heads, written once into ``--work``; each server serves the first K
(``NAME=RUN``: t00, t01, ...). Requests: SST-2 dev sentences in file order, each sent to a task drawn
uniformly at random, ``--requests`` per concurrency level after a warm-up. The server's model runs on
``--threads`` threads; the load generator is one asyncio process (one keep-alive connection per concurrent
client) on the same machine, over loopback. Memory: the server process's peak resident set (VmHWM).
Results: ``serve_load.json``, ``serve_load.md`` and ``serve_load.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
SYSTEMS = ("ptv2", "peft")


def write_runs(work: Path, count: int) -> list:
    """``count`` single-task SST-2 runs on the packaged MiniLM (written once, reused)."""
    from ptv2_kernels.hf.testing import minilm_path
    from ptv2_kernels.serve.testing import write_run
    from transformers import AutoModel

    paths = [work / f"t{i:02d}" for i in range(count)]
    if all((p / "best" / "task.json").is_file() for p in paths):
        return paths
    backbone = AutoModel.from_pretrained(minilm_path())
    for i, p in enumerate(paths):
        write_run(p, backbone, "sst2", prefix_len=16, max_length=64, seed=i, pooling="mean")
    return paths


def sentences(limit: int = 2000) -> list:
    from ptv2_kernels.tasks import default_data_dirs, get_task

    try:
        return [e["text_a"] for e in get_task("sst2").load("dev", default_data_dirs(), explicit_dir=True)][:limit]
    except Exception:  # noqa: BLE001 - no local SST-2: sentences of like length, said in the results
        rng = random.Random(0)
        words = "the film is a moving and lovely story of loss but its plot never holds together at all".split()
        return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(limit)]


def start_server(system: str, runs: list, tasks: int, args) -> tuple:
    """``(process, port)`` of a server for the first ``tasks`` runs, once it listens."""
    common = ["--port", "0", "--threads", str(args.threads), "--max-batch-size", str(args.max_batch_size),
              "--batch-timeout-ms", str(args.batch_timeout_ms), "--device", args.device]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    if system == "ptv2":
        cmd = [sys.executable, "-m", "ptv2_kernels.train", "serve"] + \
              [f"t{i:02d}={runs[i]}" for i in range(tasks)] + common
    else:
        cmd = [args.peft_python, str(HERE / "peft_serve.py"), "--adapters", str(tasks)] + common
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    if "listening on http://" not in line:
        proc.kill()
        raise RuntimeError(f"{system} server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) / 1024


def load_average() -> float:
    return os.getloadavg()[0]


def measure(port: int, texts: list, tasks: int, concurrency: int, count: int, seed: int) -> dict:
    from ptv2_kernels.serve.client import post_all

    rng = random.Random(seed)
    start = rng.randrange(len(texts))
    bodies = [{"task": f"t{rng.randrange(tasks):02d}", "text": texts[(start + i) % len(texts)]} for i in range(count)]
    asyncio.run(post_all(HOST, port, bodies[:max(concurrency, 16)], concurrency))  # warm-up
    load_before = load_average()
    t0 = time.perf_counter()
    answers = asyncio.run(post_all(HOST, port, bodies, concurrency))
    wall = time.perf_counter() - t0
    failed = sum(status != 200 for status, _, _ in answers)
    lat = sorted(s for _, _, s in answers)
    return dict(tasks=tasks, concurrency=concurrency, requests=count, failed=failed, seconds=wall,
                rps=count / wall, p50_ms=1e3 * statistics.median(lat), p99_ms=1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                load_before=load_before, load_after=load_average())


def run(args) -> dict:
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = write_runs(work, max(args.tasks))
    texts = sentences()
    systems = ["ptv2"] + (["peft"] if args.peft_python else [])
    rows = []
    for system in systems:
        for tasks in args.tasks:
            proc, port = start_server(system, runs, tasks, args)
            try:
                for c in args.concurrency:
                    row = dict(system=system, **measure(port, texts, tasks, c, args.requests[c], seed=tasks * 1000 + c))
                    rows.append(row)
                    print(f"{system:5s} tasks {tasks:2d} concurrency {c:2d}: {row['rps']:7.1f} req/s, "
                          f"p50 {row['p50_ms']:7.1f} ms, p99 {row['p99_ms']:7.1f} ms, failed {row['failed']}, "
                          f"load {row['load_before']:.2f}", flush=True)
                peak = peak_rss_mib(proc.pid)
                for row in rows:
                    if row["system"] == system and row["tasks"] == tasks:
                        row["peak_rss_mib"] = peak
            finally:
                proc.terminate()
                proc.wait(60)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return dict(rows=rows, facts=dict(
        git_sha=sha, cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), threads=args.threads,
        device=_device_name(args.device),
        torch=torch.__version__, python=platform.python_version(), max_batch_size=args.max_batch_size,
        batch_timeout_ms=args.batch_timeout_ms, requests=args.requests, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        loadavg_start=args.loadavg_start, loadavg_end=load_average(), texts="SST-2 dev" if len(texts) > 100 else "synthetic"))


def _device_name(device: str) -> str:
    import benchlib

    return benchlib.gpu_name() if device.startswith("cuda") else "CPU"


def _row(result, system, tasks, c):
    return next((r for r in result["rows"] if (r["system"], r["tasks"], r["concurrency"]) == (system, tasks, c)), None)


def report(result: dict, out: Path) -> str:
    rows, f = result["rows"], result["facts"]
    tasks = sorted({r["tasks"] for r in rows})
    conc = sorted({r["concurrency"] for r in rows})
    lines = [f"# ptv2 serve load benchmark ({f['date']}, {f['git_sha']})", "",
             f"MiniLM on the {f.get('device', 'CPU')}, {f['threads']} model thread(s), batches of up to "
             f"{f['max_batch_size']} within {f['batch_timeout_ms']:g} ms, {f['texts']} sentences, torch {f['torch']}; "
             f"{f['cores']} cores: 1-minute load average {f['loadavg_start']:.2f} at the start, "
             f"{f['loadavg_end']:.2f} at the end (each row's is in serve_load.json).", "",
             "| system | tasks | concurrency | req/s | p50 ms | p99 ms | x one task | x PEFT | peak RSS MiB | failed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["system"] != "ptv2", r["tasks"], r["concurrency"])):
        one = _row(result, r["system"], min(tasks), r["concurrency"])
        peft = _row(result, "peft", r["tasks"], r["concurrency"])
        vs_peft = f"{r['rps'] / peft['rps']:.2f}x" if peft and r["system"] == "ptv2" else ""
        lines.append(f"| {r['system']} | {r['tasks']} | {r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['rps'] / one['rps']:.2f}x | {vs_peft} | {r.get('peak_rss_mib', 0):.0f} | "
                     f"{r['failed']} |")
    text = "\n".join(lines) + "\n"
    (out / "serve_load.md").write_text(text)
    _plot(result, tasks, conc, out / "serve_load.png")
    return text


def _plot(result, tasks, conc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for system, style in (("ptv2", "-o"), ("peft", "--s")):
        for t in tasks:
            pts = [_row(result, system, t, c) for c in conc]
            if not all(pts):
                continue
            axes[0].plot(conc, [p["rps"] for p in pts], style, label=f"{system}, {t} task(s)")
            axes[1].plot(conc, [p["p99_ms"] for p in pts], style, label=f"{system}, {t} task(s)")
    for ax, ylabel in zip(axes, ("requests/s", "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    f = result["facts"]
    fig.suptitle(f"ptv2 serve vs PEFT, MiniLM on {f.get('device', 'CPU')} ({f['threads']} thread), tasks mixed uniformly")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    import benchlib

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peft-python", default=None, help="python of the transformers 4.57 + peft venv (no PEFT rows without)")
    ap.add_argument("--work", default="/tmp/ptv2-serve-bench", help="where the 64 runs are written (reused)")
    ap.add_argument("--out", default=None, help="default bench/results/<cpu or GPU name>/serve/<date>-<sha>")
    ap.add_argument("--device", default="cpu", help="the servers' torch device (cpu, cuda)")
    ap.add_argument("--tasks", default="1,8,64")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--requests", default="1:100,8:300,64:640", help="requests per concurrency level")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-timeout-ms", type=float, default=5.0)
    ap.add_argument("--report", default=None, help="only redraw the table and plot of this results folder")
    args = ap.parse_args(argv)
    if args.report:
        out = Path(args.report)
        print(report(json.loads((out / "serve_load.json").read_text()), out))
        return 0
    args.tasks = [int(x) for x in args.tasks.split(",")]
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.requests = {int(k): int(v) for k, v in (kv.split(":") for kv in args.requests.split(","))}
    args.loadavg_start = load_average()
    result = run(args)
    machine = "cpu" if args.device == "cpu" else benchlib.safe_name(result["facts"]["device"])
    out = Path(args.out) if args.out else HERE / "results" / machine / "serve" / \
        f"{time.strftime('%Y%m%d')}-{result['facts']['git_sha']}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(result, indent=1))
    print(report(result, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
