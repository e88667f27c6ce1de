"""Pay only for the layers that hold prompts: the SST-2 job of the CPU section (MiniLM, SST-2's first
4,000 training sentences, the full dev set, P = 16, lr 1e-2, 3 epochs) with a prefix on every layer
against the top half (layers 4-6) and the top third (5-6) with the frozen trunk and its cache, each a
whole ``ptv2 train`` process; and CoNLL-2003 NER (first 2,000 training sentences) the same way.

    python bench/trunk_job.py run [--only SETTING ...] [--threads 1 2] [--peft-python PY]   # what is missing
    python bench/trunk_job.py report                                    # OUT/report.md

Runs are kept as ``OUT/runs/<setting>-t<threads>-s<seed>.json`` (OUT: ``bench/results/cpu/trunk``) with
their wall time, CPU time and peak RSS; the report gives each setting's ratios to the every-layer runs
of the same task, thread count and seeds, and dev scores over seeds. ``--peft-python`` (the transformers
4.57 venv of bench/peft_job.py) adds PEFT 0.21.2 doing the SST-2 job, timed the same way, and each
SST-2 setting's wall-time ratio to it.
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
from pathlib import Path

import studylib

OUT = Path(__file__).resolve().parent / "results" / "cpu" / "trunk"
SST2 = "--task sst2 --prefix-len 16 --lr 1e-2 --batch-size 32 --epochs 3 --max-length 64 --max-train-samples 4000"
CONLL = "--task conll2003 --prefix-len 16 --lr 1e-2 --batch-size 16 --epochs 3 --max-length 128 --max-train-samples 2000"
# (setting, what it is, flags, seeds)
SETTINGS = [
    ("sst2-all", "SST-2, a prefix on every layer", SST2, (0, 1, 2)),
    ("sst2-top-half", "SST-2, layers 4-6, frozen trunk cached", SST2 + " --prefix-layers 4-6", (0, 1, 2)),
    ("sst2-top-third", "SST-2, layers 5-6, frozen trunk cached", SST2 + " --prefix-layers 5-6", (0,)),
    ("sst2-top-half-disk", "SST-2, layers 4-6, frozen trunk cached in a file (read per batch)",
     SST2 + " --prefix-layers 4-6 --trunk-cache disk", (0,)),
    ("sst2-top-half-live", "SST-2, layers 4-6, frozen trunk without cache", SST2 + " --prefix-layers 4-6 --trunk-cache off",
     (0,)),
    ("sst2-top-half-train", "SST-2, layers 4-6, trunk in train mode (dropout on, as the authors run it), no cache",
     SST2 + " --prefix-layers 4-6 --trunk train", (0, 1, 2)),
    ("conll-all", "CoNLL-2003, a prefix on every layer", CONLL, (0, 1, 2)),
    ("conll-top-half", "CoNLL-2003, layers 4-6, frozen trunk cached", CONLL + " --prefix-layers 4-6", (0, 1, 2)),
]
BASELINE = {"sst2": "sst2-all", "conll": "conll-all"}
PEFT = ("sst2-peft", "SST-2, PEFT 0.21.2's prefix tuning on every layer (bench/peft_job.py)", (0,))


def _name(setting, threads):
    return f"{setting}-t{threads}"


def _peft_job(python: str):
    """``train`` for :func:`studylib.run_one`: bench/peft_job.py under ``/usr/bin/time`` (its peak RSS)."""
    def train(flags, seed, threads):
        with tempfile.TemporaryDirectory(prefix="ptv2-study-") as tmp:
            log, rss = Path(tmp) / "log", Path(tmp) / "rss"
            cmd = ["/usr/bin/time", "-f", "%M", "-o", str(rss), python, str(Path(__file__).parent / "peft_job.py"),
                   "--seed", str(seed)]
            with open(log, "w") as f:
                wall, cpu = studylib.timed(cmd, stdout=f, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
            text, peak_kib = log.read_text(), int(rss.read_text().split()[-1])
        by_epoch = [float(a) for a in re.search(r"dev accuracy by epoch ([\d.\s/]+),", text).group(1).split("/")]
        metrics = {"main_metric": "accuracy", "epochs": [{"dev": {"accuracy": a}} for a in by_epoch],
                   "best_metrics": {"accuracy": max(by_epoch)}, "peak_memory_bytes": peak_kib * 1024, "log": text}
        return metrics, wall, cpu
    return train


def run(only, threads=(1,), peft_python=None) -> None:
    for n in threads:
        for seed in (0, 1, 2):  # every setting's first seed before any second one
            for setting, _, flags, seeds in SETTINGS:
                timing_only = n != 1 and seed != 0
                if seed not in seeds or timing_only or (only and setting not in only):
                    continue
                if not studylib.run_file(OUT, _name(setting, n), seed).exists():
                    studylib.run_one(OUT, _name(setting, n), flags.split(), seed, n)
        if peft_python and not (only and PEFT[0] not in only):
            for seed in PEFT[2]:
                studylib.run_one(OUT, _name(PEFT[0], n), [], seed, n, train=_peft_job(peft_python))


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else ""


def _medians(runs) -> tuple:
    """``(wall, CPU, peak RSS)`` medians of ``runs`` (Nones when there are none)."""
    if not runs:
        return None, None, None
    return (statistics.median(r["study"]["wall_s"] for r in runs), studylib.cpu_time(runs),
            statistics.median(r["peak_memory_bytes"] for r in runs))


def report() -> str:
    head = ["setting", "threads", "seeds", "dev score (mean ± sd)", "wall (median)", "CPU (median)",
            "peak RSS", "wall / every layer", "CPU / every layer", "RSS / every layer", "wall / PEFT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for threads in (1, 2):
        peft_wall = _medians(studylib.load_runs(OUT, _name(PEFT[0], threads), PEFT[2]))[0]
        for setting, what, _, seeds in SETTINGS + [(PEFT[0], PEFT[1], None, PEFT[2])]:
            runs = studylib.load_runs(OUT, _name(setting, threads), seeds)
            if not runs:
                continue
            # the ratios pair each run with the every-layer run of its own seed
            same = [r["study"]["seed"] for r in runs]
            wall, cpu, rss = _medians(runs)
            bw, bc, br = _medians(studylib.load_runs(OUT, _name(BASELINE[setting.split("-")[0]], threads), same))
            lines.append("| " + " | ".join([what, str(threads), str(len(runs)), studylib.mean_sd(studylib.final_scores(runs)),
                                             f"{wall:.0f} s", f"{cpu:.0f} s", f"{rss / 2**20:.0f} MB",
                                             _ratio(wall, bw), _ratio(cpu, bc), _ratio(rss, br),
                                             _ratio(wall, peft_wall) if setting.startswith("sst2") else ""]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    studylib.main(__doc__, OUT, run, report, [s for s, *_ in SETTINGS] + [PEFT[0]], argv,
                  threads=dict(type=int, nargs="*", default=[1]),
                  peft_python=dict(default=None, help="python of bench/peft_job.py's transformers 4.57 venv"))


if __name__ == "__main__":
    main()
