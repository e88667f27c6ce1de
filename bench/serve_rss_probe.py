"""Resident memory of ``ptv2 serve`` with 1 and 64 tasks: after start, and after 256 requests at
concurrency 64 (README: serving memory). One server process at a time, as bench/serve_load.py starts it.

    python bench/serve_rss_probe.py [--work /tmp/serve-work]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import serve_load  # noqa: E402


def memory_mib(pid: int) -> tuple:
    """``(VmRSS, VmHWM)`` of a process, MiB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return tuple(int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/serve-work", help="where the 64 runs are written (once)")
    args = ap.parse_args(argv)
    runs = serve_load.write_runs(Path(args.work), 64)
    texts = serve_load.sentences()
    options = argparse.Namespace(threads=1, max_batch_size=32, batch_timeout_ms=5)
    for tasks in (1, 64):
        proc, port = serve_load.start_server("ptv2", runs, tasks, options)
        try:
            start = memory_mib(proc.pid)
            serve_load.measure(port, texts, tasks, 64, 256, seed=0)
            print(f"{tasks:2d} task(s): after start RSS {start[0]} MiB (peak {start[1]}); after 256 requests at "
                  f"concurrency 64 peak {memory_mib(proc.pid)[1]} MiB", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
