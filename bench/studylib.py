"""What the studies share (bench/quality_study.py, bench/paper_study.py): one ``ptv2 train`` per run in
its own process, its ``metrics.json`` kept as ``OUT/runs/<setting>-s<seed>.json`` with the run's wall
and CPU time, and the summary row of a setting over its seeds."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional


def run_file(out: Path, setting: str, seed: int) -> Path:
    return out / "runs" / f"{setting}-s{seed}.json"


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _claim(path: Path) -> bool:
    """Take ``path`` (a run's claim file) for this process; False while another live process holds it.

    Several study processes may share one OUT (two cores, two runs); a killed process's claim is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(path.read_text() or 0), 0)
                return False
            except (ProcessLookupError, ValueError, FileNotFoundError):
                path.unlink(missing_ok=True)
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def run_one(out: Path, setting: str, flags: list, seed: int, threads: int, train=None) -> Optional[dict]:
    """Train ``flags`` with ``seed`` on ``threads`` threads; keep its metrics (atomically) and return them.
    ``train(flags, seed, threads)`` (default: ``ptv2 train``) returns ``(metrics, wall_s, cpu_s)``.

    Returns None, running nothing, when the run is done already or another study process is running it."""
    claim = run_file(out, setting, seed).with_suffix(".claim")
    if run_file(out, setting, seed).exists() or not _claim(claim):
        return None
    try:
        metrics, wall, cpu = (train or _train)(flags, seed, threads)
        return _keep(out, setting, flags, seed, threads, metrics, wall, cpu)
    finally:
        claim.unlink(missing_ok=True)


def timed(cmd: list, **kwargs) -> tuple:
    """``(wall_s, cpu_s)`` of running ``cmd`` to completion (its CPU time and its children's)."""
    start, cpu_start = time.perf_counter(), _children_cpu_s()
    subprocess.run(cmd, check=True, **kwargs)
    return time.perf_counter() - start, _children_cpu_s() - cpu_start


def _train(flags: list, seed: int, threads: int) -> tuple:
    with tempfile.TemporaryDirectory(prefix="ptv2-study-") as tmp:
        cmd = [sys.executable, "-m", "ptv2_kernels.train", "train", *flags, "--seed", str(seed),
               "--threads", str(threads), "--no-progress", "--output-dir", str(Path(tmp) / "run")]
        wall, cpu = timed(cmd)
        return json.loads((Path(tmp) / "run" / "metrics.json").read_text()), wall, cpu


def _keep(out: Path, setting: str, flags: list, seed: int, threads: int, metrics: dict, wall: float,
          cpu: float) -> dict:
    metrics["study"] = {"setting": setting, "seed": seed, "flags": flags, "wall_s": wall, "cpu_s": cpu,
                        "threads": threads}
    path = run_file(out, setting, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp_path, path)
    print(f"{setting} seed {seed}: {metrics['best_metrics']} in {wall:.0f} s", flush=True)
    return metrics


def load_runs(out: Path, setting: str, seeds) -> List[dict]:
    return [json.loads(run_file(out, setting, s).read_text()) for s in seeds if run_file(out, setting, s).exists()]


def final_scores(runs: List[dict], metric: Optional[str] = None) -> List[float]:
    """Each run's last evaluation of its main metric (or ``metric``), in percent."""
    return [100 * r["epochs"][-1]["dev"][metric or r["main_metric"]] for r in runs]


def mean_sd(values: List[float]) -> str:
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"


def cpu_time(runs: List[dict]) -> float:
    """Median CPU time (a run paused while benchmarks had the machine keeps its true cost), else wall."""
    return statistics.median(r["study"].get("cpu_s", r["study"]["wall_s"]) for r in runs)


def main(doc: str, out: Path, run, report, choices, argv=None, **run_args) -> None:
    """A study's command line: ``run [--only NAME ...] [--threads N] [options]`` runs what is missing, then
    ``report``'s text is written to ``out/report.md`` and printed; ``run_args`` adds run options
    (``name=dict(**add_argument kwargs)``) handed to ``run`` by name."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--only", nargs="*", choices=choices)
    for name, kw in run_args.items():
        r.add_argument("--" + name.replace("_", "-"), **kw)
    sub.add_parser("report")
    args = ap.parse_args(argv)
    if args.command == "run":
        run(args.only, **{name: getattr(args, name) for name in run_args})
    text = report()
    if (out / "runs").exists():
        (out / "report.md").write_text(text)
    print(text)
