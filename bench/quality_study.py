"""Which defaults learn best: MiniLM prefix tuning on SST-2 (and RTE) over the choices that matter.

Every run is one ``ptv2 train`` in its own process with the same data, budget and thread count; the
PEFT-equivalent control is ``--attention reference --position-offset shifted --prefix-dropout 0``
(PEFT's computation: the prefix concatenated into K/V, positions shifted by P, no prefix dropout),
trained by the same loop, schedule and data as every other setting, so only the named choice differs.

    python bench/quality_study.py run [--only NAME ...] [--threads 1]   # runs what is missing, in order
    python bench/quality_study.py report                                # OUT/report.md from the runs

Each finished run's ``metrics.json`` is copied to ``OUT/runs/<setting>-s<seed>.json`` (OUT:
``bench/results/cpu/quality``); a setting whose file exists is not run again, so an interrupted study
resumes where it stopped. Runs go in ``ORDER``: the control and the defaults first.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import studylib

OUT = Path(__file__).resolve().parent / "results" / "cpu" / "quality"

# the job of issue 15: MiniLM-L6, SST-2's first 4,000 training examples, the full dev set
# --pooling auto (the pooler, PEFT's head) as every run before mean pooling became the default; the
# settings that change it say so
SST2 = ("--task sst2 --prefix-len 16 --lr 1e-2 --batch-size 32 --epochs 3 --max-length 64 "
        "--max-train-samples 4000 --pooling auto").split()
RTE = "--task rte --prefix-len 16 --lr 1e-2 --batch-size 32 --epochs 3 --max-length 128 --pooling auto".split()
PEFT = "--attention reference --position-offset shifted --prefix-dropout 0".split()

# (setting, what it changes, flags, seeds)
SETTINGS = [
    ("sst2-peft", "PEFT-equivalent control", SST2 + PEFT, (0, 1, 2)),
    ("sst2-defaults", "the earlier defaults: prefix dropout 0.1, zero positions",
     SST2 + ["--prefix-dropout", "0.1"], (0, 1, 2)),
    ("sst2-pdrop0", "no prefix dropout, zero positions", SST2 + ["--prefix-dropout", "0"], (0, 1, 2)),
    ("sst2-shifted", "shifted positions", SST2 + ["--position-offset", "shifted"], (0,)),
    ("sst2-finetune", "full fine-tuning, lr 5e-5", SST2 + ["--method", "finetune", "--lr", "5e-5"], (0,)),
    ("sst2-mean", "mean pooling instead of the pooler, no prefix dropout (the defaults now)",
     SST2 + ["--pooling", "mean"], (0, 1, 2)),
    ("sst2-mean-lr2e-2", "mean pooling, lr 2e-2 (the recipe sst2-minilm)", SST2 + ["--pooling", "mean", "--lr", "2e-2"],
     (0, 1, 2)),
    ("sst2-mean-4ep", "mean pooling, lr 2e-2, 4 epochs", SST2 + ["--pooling", "mean", "--lr", "2e-2", "--epochs", "4"],
     (0,)),
    ("sst2-mean-p64", "mean pooling, lr 2e-2, P = 64", SST2 + ["--pooling", "mean", "--lr", "2e-2", "--prefix-len", "64"],
     (0,)),
    ("sst2-projection", "projection (reparameterization)", SST2 + ["--projection"], (0,)),
    ("sst2-p64", "P = 64", SST2 + ["--prefix-len", "64"], (0,)),
    ("sst2-p8", "P = 8", SST2 + ["--prefix-len", "8"], (0,)),
    ("sst2-lr2e-2", "lr 2e-2", SST2 + ["--lr", "2e-2"], (0,)),
    ("sst2-lr5e-3", "lr 5e-3", SST2 + ["--lr", "5e-3"], (0,)),
    ("sst2-warmup", "warmup 10%", SST2 + ["--warmup-ratio", "0.1"], (0,)),
    ("rte-peft", "RTE: PEFT-equivalent control", RTE + PEFT, (0,)),
    ("rte-pdrop0", "RTE: no prefix dropout, zero positions", RTE + ["--prefix-dropout", "0"], (0,)),
    ("rte-defaults", "RTE: prefix dropout 0.1, zero positions", RTE + ["--prefix-dropout", "0.1"], (0,)),
    ("rte-mean", "RTE: mean pooling, no prefix dropout (the defaults now)", RTE + ["--pooling", "mean"], (0,)),
]
# The running order: the control and the defaults with every seed, then one seed of each single
# change, then the remaining seeds (the whole grid takes longer than one sitting on 2 cores).
ORDER = ([(s, seed) for s in ("sst2-peft", "sst2-defaults") for seed in (0, 1, 2)]
         + [(s, 0) for s in ("sst2-pdrop0", "sst2-shifted", "sst2-finetune", "sst2-projection")]
         + [("sst2-pdrop0", 1), ("sst2-pdrop0", 2), ("rte-peft", 0), ("rte-pdrop0", 0), ("rte-defaults", 0)]
         + [(s, 0) for s in ("sst2-p64", "sst2-p8", "sst2-lr2e-2", "sst2-lr5e-3", "sst2-warmup")])
ORDER += [(s, seed) for s, _, _, seeds in SETTINGS for seed in seeds if (s, seed) not in ORDER]  # added later


def run_file(setting: str, seed: int) -> Path:
    return studylib.run_file(OUT, setting, seed)


def run(only, threads: int) -> None:
    flags = {setting: f for setting, _, f, _ in SETTINGS}
    for setting, seed in ORDER:
        if (not only or setting in only) and not run_file(setting, seed).exists():
            studylib.run_one(OUT, setting, flags[setting], seed, threads)


def _row(setting: str, what: str, seeds) -> list:
    runs = studylib.load_runs(OUT, setting, seeds)
    if not runs:
        return [setting, what, "not run", "", "", "", ""]
    metric = runs[0]["main_metric"]
    best = [100 * r["best_metrics"][metric] for r in runs]
    by_epoch = " / ".join(f"{statistics.mean(100 * r['epochs'][e]['dev'][metric] for r in runs):.1f}"
                          for e in range(len(runs[0]["epochs"])))
    return [setting, what, f"{len(runs)}", studylib.mean_sd(studylib.final_scores(runs)),
            f"{statistics.mean(best):.2f}", by_epoch, f"{studylib.cpu_time(runs):.0f} s"]


def report() -> str:
    head = ["setting", "changes", "seeds", "final dev acc (mean ± sd)", "best epoch (mean)",
            "dev acc by epoch (mean)", "time (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_row(s, w, seeds)) + " |" for s, w, _, seeds in SETTINGS]
    any_run = next((json.loads(p.read_text()) for p in sorted((OUT / "runs").glob("*.json"))), None)
    facts = "" if any_run is None else (
        f"\n\n{any_run['study']['threads']} thread(s) per run, {any_run['device_name'] or 'cpu'}, "
        f"torch {any_run['versions']['torch']}, transformers {any_run['versions'].get('transformers')}. "
        "Time: the run's CPU time where recorded (it ignores pauses while benchmarks had the machine), else "
        "its wall time; one thread, so the two agree on an idle machine.")
    return "\n".join(lines) + facts + "\n"


def main(argv=None) -> None:
    studylib.main(__doc__, OUT, run, report, [s for s, *_ in SETTINGS], argv, threads=dict(type=int, default=1))


if __name__ == "__main__":
    main()
