"""The P-Tuning v2 paper's comparison at CPU scale: deep prompts against input-only prompts against
fine-tuning and LoRA, across task kinds, on the packaged MiniLM (6 layers, 22M parameters).

    python bench/paper_study.py run [--stage sweep|select|grid] [--only METHOD ...] [--threads 1]
    python bench/paper_study.py report          # OUT/report.md and OUT/paper_study.png from the runs

Three stages, each resumable (a finished run's ``metrics.json`` is kept as ``OUT/runs/<name>-s<seed>.json``
and never run again; OUT is ``bench/results/cpu/paper``):

1. ``sweep``: the prompt length and learning rate of each method, as the paper chooses them by a small
   search: one seed on an SST-2 slice (1,000 training sentences, 2 epochs, the full dev set); the grid
   uses each method's best setting (final dev accuracy; a tie goes to the shorter prompt). Fine-tuning
   keeps the usual 5e-5; P-Tuning v2 starts from the quality study's recipe (bench/results/cpu/quality:
   lr 2e-2, P 16).
2. ``select``: which SuperGLUE task MiniLM learns: P-Tuning v2 with its recipe on CB, COPA, WiC and RTE
   (one seed, full training sets); the grid takes the one furthest above its majority class.
3. ``grid``: every method on SST-2 (first 4,000 training sentences, full dev), CoNLL-2003 NER (first
   2,000 training sentences, full dev, entity F1 by seqeval) and the selected SuperGLUE task, 3 seeds.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import studylib

OUT = Path(__file__).resolve().parent / "results" / "cpu" / "paper"
SEEDS = (0, 1, 2)

# the methods of the comparison: (name, what it is, its fixed flags)
METHODS = [
    ("finetune", "full fine-tuning", ["--method", "finetune"]),
    ("lora", "LoRA r = 8 on query and value (PEFT)", ["--method", "lora", "--lora-r", "8"]),
    ("prompt", "prompt tuning (input only)", ["--method", "prompt"]),
    ("ptuning", "P-Tuning v1 (input only, LSTM prompt encoder)", ["--method", "ptuning"]),
    ("ptv2", "P-Tuning v2, every layer", ["--method", "prefix"]),
    ("ptv2-top", "P-Tuning v2, top half (layers 4-6)", ["--method", "prefix", "--prefix-layers", "4-6"]),
    ("ptv2-mlp", "P-Tuning v2, MLP reparameterization", ["--method", "prefix", "--projection"]),
]
# the sweep of each method: (lr, P) pairs; P None for methods without one
SWEEP = {
    "finetune": [(5e-5, None)],
    "lora": [(5e-4, None), (2e-3, None), (5e-3, None)],
    "prompt": [(3e-2, 16), (1e-2, 16), (1e-1, 16), (3e-2, 64)],
    "ptuning": [(1e-3, 16), (1e-4, 16), (3e-3, 16)],
    "ptv2": [(2e-2, 16), (5e-2, 16)],
    "ptv2-top": [(2e-2, 16), (5e-2, 16)],
    "ptv2-mlp": [(1e-4, 16), (1e-3, 16), (3e-4, 16)],
}
SWEEP_TASK = "--task sst2 --max-train-samples 1000 --epochs 2 --batch-size 32 --max-length 64".split()
TASKS = {
    "sst2": "--task sst2 --max-train-samples 4000 --epochs 3 --batch-size 32 --max-length 64".split(),
    "conll2003": "--task conll2003 --max-train-samples 2000 --epochs 3 --batch-size 16 --max-length 128".split(),
}
SUPERGLUE = {  # candidates of the select stage
    "cb": "--task cb --epochs 3 --batch-size 16 --max-length 128".split(),
    "copa": "--task copa --epochs 3 --batch-size 16 --max-length 64".split(),
    "wic": "--task wic --epochs 3 --batch-size 32 --max-length 64".split(),
    "rte": "--task rte --epochs 3 --batch-size 32 --max-length 128".split(),
}
SELECT_METHOD = "ptv2"


def _flags(method: str, lr: float, P) -> list:
    fixed = dict((m, f) for m, _, f in METHODS)[method]
    return fixed + ["--lr", f"{lr:g}"] + ([] if P is None else ["--prefix-len", str(P)])


def _sweep_name(method, lr, P) -> str:
    return f"sweep-{method}-lr{lr:g}" + ("" if P is None else f"-p{P}")


def chosen(method: str):
    """The best swept ``(lr, P)`` of ``method`` (final dev accuracy), or None before its sweep ran."""
    done = [(studylib.final_scores(runs)[0], lr, P) for lr, P in SWEEP[method]
            for runs in [studylib.load_runs(OUT, _sweep_name(method, lr, P), (0,))] if runs]
    if len(done) < len(SWEEP[method]):
        return None
    best = max(done, key=lambda d: (d[0], -(d[2] or 0)))  # a tie goes to the shorter prompt
    return best[1:]


def selected_task():
    """The SuperGLUE task with the largest margin of P-Tuning v2 over the most frequent label, or None."""
    margins = {}
    for task in SUPERGLUE:
        runs = studylib.load_runs(OUT, f"select-{task}", (0,))
        if not runs:
            return None
        r = runs[0]
        margins[task] = r["epochs"][-1]["dev"]["accuracy"] - r["baseline_metrics"]["accuracy"]
    return max(margins, key=margins.get)


def run(only, stage=None, threads: int = 1) -> None:
    methods = [m for m, _, _ in METHODS if not only or m in only]
    if stage in (None, "sweep"):
        for m in methods:
            for lr, P in SWEEP[m]:
                if not studylib.run_file(OUT, _sweep_name(m, lr, P), 0).exists():
                    studylib.run_one(OUT, _sweep_name(m, lr, P), SWEEP_TASK + _flags(m, lr, P), 0, threads)
    if stage in (None, "select"):
        lr, P = SWEEP[SELECT_METHOD][0]
        for task, flags in SUPERGLUE.items():
            if not studylib.run_file(OUT, f"select-{task}", 0).exists():
                studylib.run_one(OUT, f"select-{task}", flags + _flags(SELECT_METHOD, lr, P), 0, threads)
    if stage in (None, "grid"):
        tasks = dict(TASKS)
        if selected_task() is not None:
            tasks[selected_task()] = SUPERGLUE[selected_task()]
        for seed in SEEDS:  # every cell's first seed before any second one
            for task, flags in tasks.items():
                for m in methods:
                    setting = chosen(m)
                    name = f"{task}-{m}"
                    if setting is not None and not studylib.run_file(OUT, name, seed).exists():
                        studylib.run_one(OUT, name, flags + _flags(m, *setting), seed, threads)


# ------------------------------------------------------------------------------------------ report
def _sweep_table() -> list:
    lines = ["| method | lr | P | SST-2 slice dev acc | chosen |", "|---|---|---|---|---|"]
    for m, _, _ in METHODS:
        best = chosen(m)
        for lr, P in SWEEP[m]:
            runs = studylib.load_runs(OUT, _sweep_name(m, lr, P), (0,))
            score = f"{studylib.final_scores(runs)[0]:.2f}" if runs else "not run"
            lines.append(f"| {m} | {lr:g} | {P or ''} | {score} | {'yes' if best == (lr, P) else ''} |")
    return lines


def _grid_cells(tasks):
    for m, what, _ in METHODS:
        row = []
        for task in tasks:
            runs = studylib.load_runs(OUT, f"{task}-{m}", SEEDS)
            row.append(runs)
        yield m, what, row


def _grid_table(tasks) -> list:
    head = ["method", "what", "trainable params"] + [f"{t} (n)" for t in tasks] + ["CPU time per run (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, what, row in _grid_cells(tasks):
        every = [r for runs in row for r in runs]
        params = f"{statistics.median(r['trainable_params'] for r in every):,.0f}" if every else ""
        cells = [f"{studylib.mean_sd(studylib.final_scores(runs))} ({len(runs)})" if runs else "not run" for runs in row]
        cpu = " / ".join(f"{studylib.cpu_time(runs):.0f} s" if runs else "-" for runs in row)
        lines.append("| " + " | ".join([m, what, params] + cells + [cpu]) + " |")
    return lines


def _plot(tasks, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    cells = list(_grid_cells(tasks))
    for j, task in enumerate(tasks):
        ax = axes[0, j]
        for i, (m, _, row) in enumerate(cells):
            scores = studylib.final_scores(row[j]) if row[j] else []
            if scores:
                ax.bar(i, statistics.mean(scores), yerr=statistics.stdev(scores) if len(scores) > 1 else 0,
                       color="C0" if m.startswith("ptv2") else "C7", capsize=3)
                ax.plot([i] * len(scores), scores, "k.", ms=3)
        ax.set_xticks(range(len(cells)), [m for m, _, _ in cells], rotation=45, ha="right")
        metric = "entity F1 (%)" if task == "conll2003" else "accuracy (%)"
        ax.set_title(f"{task} dev, MiniLM-L6"), ax.set_ylabel(metric)
        lows = [min(studylib.final_scores(row[j])) for _, _, row in cells if row[j]]
        if lows:
            ax.set_ylim(max(0, min(lows) - 10), 100)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report() -> str:
    tasks = list(TASKS) + ([selected_task()] if selected_task() else [])
    select = []
    for task in SUPERGLUE:
        runs = studylib.load_runs(OUT, f"select-{task}", (0,))
        if runs:
            r = runs[0]
            select.append(f"{task} {100 * r['epochs'][-1]['dev']['accuracy']:.1f} "
                          f"(majority {100 * r['baseline_metrics']['accuracy']:.1f})")
    lines = ["## Sweep (one seed, SST-2 slice)", "", *_sweep_table(), "",
             "## SuperGLUE task selection (P-Tuning v2, one seed; final dev accuracy)", "",
             ", ".join(select) or "not run", f"selected: {selected_task() or 'not yet'}", "",
             "## Grid (final dev score, mean ± sd over seeds; n = seeds run)", "", *_grid_table(tasks)]
    any_run = next((json.loads(p.read_text()) for p in sorted((OUT / "runs").glob("*.json"))), None)
    if any_run is not None:
        lines += ["", f"{any_run['study']['threads']} thread(s) per run, {any_run['device_name'] or 'cpu'}, torch "
                      f"{any_run['versions']['torch']}, transformers {any_run['versions'].get('transformers')}. "
                      "CPU time is the run's own (pauses and other processes do not inflate it)."]
        _plot(tasks, OUT / "paper_study.png")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    studylib.main(__doc__, OUT, run, report, [m for m, _, _ in METHODS], argv, stage=dict(choices=("sweep", "select", "grid")), threads=dict(type=int, default=1))


if __name__ == "__main__":
    main()
