"""Pay only for the layers that hold prompts: the SST-2 job of the CPU section (MiniLM, SST-2's first
4,000 training sentences, the full dev set, P = 16, lr 1e-2, 3 epochs) with a prefix on every layer
against the top half (layers 4-6) and the top third (5-6) with the frozen trunk and its cache, each a
whole ``ptv2 train`` process; and CoNLL-2003 NER (first 2,000 training sentences) the same way.

    python bench/trunk_job.py run [--only SETTING ...] [--threads 1 2]   # what is missing, in order
    python bench/trunk_job.py report                                    # OUT/report.md

Runs are kept as ``OUT/runs/<setting>-t<threads>-s<seed>.json`` (OUT: ``bench/results/cpu/trunk``) with
their wall time, CPU time and peak RSS; the report gives each setting's ratios to the every-layer runs
of the same task, thread count and seeds, and dev scores over seeds.
"""

from __future__ import annotations

import statistics
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
    ("sst2-top-half-live", "SST-2, layers 4-6, frozen trunk without cache", SST2 + " --prefix-layers 4-6 --trunk-cache off",
     (0,)),
    ("sst2-top-half-train", "SST-2, layers 4-6, trunk in train mode with autograd (no freezing)",
     SST2 + " --prefix-layers 4-6 --trunk train", (0,)),
    ("conll-all", "CoNLL-2003, a prefix on every layer", CONLL, (0, 1, 2)),
    ("conll-top-half", "CoNLL-2003, layers 4-6, frozen trunk cached", CONLL + " --prefix-layers 4-6", (0, 1, 2)),
]
BASELINE = {"sst2": "sst2-all", "conll": "conll-all"}


def _name(setting, threads):
    return f"{setting}-t{threads}"


def run(only, threads=(1,)) -> None:
    for n in threads:
        for seed in (0, 1, 2):  # every setting's first seed before any second one
            for setting, _, flags, seeds in SETTINGS:
                timing_only = n != 1 and seed != 0
                if seed not in seeds or timing_only or (only and setting not in only):
                    continue
                if not studylib.run_file(OUT, _name(setting, n), seed).exists():
                    studylib.run_one(OUT, _name(setting, n), flags.split(), seed, n)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else ""


def report() -> str:
    head = ["setting", "threads", "seeds", "dev score (mean ± sd)", "wall (median)", "CPU (median)",
            "peak RSS", "wall / every layer", "CPU / every layer", "RSS / every layer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for threads in (1, 2):
        for setting, what, _, seeds in SETTINGS:
            runs = studylib.load_runs(OUT, _name(setting, threads), seeds)
            if not runs:
                continue
            # the ratios pair each run with the every-layer run of its own seed
            same = [r["study"]["seed"] for r in runs]
            base = studylib.load_runs(OUT, _name(BASELINE[setting.split("-")[0]], threads), same)
            wall = statistics.median(r["study"]["wall_s"] for r in runs)
            cpu = studylib.cpu_time(runs)
            rss = statistics.median(r["peak_memory_bytes"] for r in runs)
            bw = statistics.median(r["study"]["wall_s"] for r in base) if base else None
            bc = studylib.cpu_time(base) if base else None
            br = statistics.median(r["peak_memory_bytes"] for r in base) if base else None
            lines.append("| " + " | ".join([what, str(threads), str(len(runs)), studylib.mean_sd(studylib.final_scores(runs)),
                                             f"{wall:.0f} s", f"{cpu:.0f} s", f"{rss / 2**20:.0f} MB",
                                             _ratio(wall, bw), _ratio(cpu, bc), _ratio(rss, br)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    studylib.main(__doc__, OUT, run, report, [s for s, *_ in SETTINGS], argv, threads=dict(type=int, nargs="*", default=[1]))


if __name__ == "__main__":
    main()
