"""``ptv2 train`` on a generation job end to end, every method on a decoder and an encoder-decoder: the
toy of python/generation_toy.py (E2E-shaped table-to-text, 444 training rows, 60 dev), tiny random
LLaMA and BART backbones (the hub is out of reach here), 5 epochs, greedy decoding, BLEU (sacrebleu) and
ROUGE-L (rouge-score), 3 seeds.

    python bench/generation_study.py run [--only SETTING ...] [--threads 1]
    python bench/generation_study.py report       # OUT/report.md

The backbones are random, so this measures the machinery (a frozen random decoder lets a prefix learn
the template, not copy the values), not the quality of Prefix-Tuning on a pretrained model.
OUT is bench/results/cpu/generation.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import studylib

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "cpu" / "generation"
SEEDS = (0, 1, 2)
MODELS = ("llama", "bart")
METHODS = {  # name: (what, flags)
    "prefix": ("Prefix-Tuning, P = 8", "--method prefix --prefix-len 8 --lr 5e-2"),
    "prefix-mlp": ("Prefix-Tuning with Li and Liang's MLP (width 512), P = 8",
                   "--method prefix --prefix-len 8 --projection --lr 5e-3"),
    "lora": ("LoRA r = 8 (PEFT's default targets)", "--method lora --lora-r 8 --lr 5e-3"),
    "finetune": ("fine-tuning every weight", "--method finetune --lr 1e-3"),
}
JOB = "--task custom --max-length 48 --max-new-tokens 16 --batch-size 16 --epochs 5"


def _toy(folder: Path) -> None:
    spec = importlib.util.spec_from_file_location("generation_toy", HERE.parent / "python" / "generation_toy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main([str(folder)])


def settings():
    for model in MODELS:
        for method, (_, flags) in METHODS.items():
            yield f"{model}-{method}", flags


def run(only, threads: int = 1) -> None:
    with tempfile.TemporaryDirectory(prefix="ptv2-generation-") as tmp:
        toy = Path(tmp)
        _toy(toy)
        for seed in SEEDS:
            for name, flags in settings():
                if only and name not in only:
                    continue
                model = name.split("-")[0]
                data = f"--train-file {toy / 'train.jsonl'} --dev-file {toy / 'dev.jsonl'} --model {toy / model}"
                studylib.run_one(OUT, name, f"{JOB} {data} {flags}".split(), seed, threads)


def report() -> str:
    lines = ["| backbone | method | trainable params | BLEU | ROUGE-L | CPU time per run (median) |",
             "|---|---|---|---|---|---|"]
    for name, _ in settings():
        runs = studylib.load_runs(OUT, name, SEEDS)
        model, method = name.split("-", 1)
        if not runs:
            lines.append(f"| {model} | {method} | | not run | | |")
            continue
        lines.append(f"| {model} | {METHODS[method][0]} | {runs[0]['trainable_params']:,} "
                     f"| {studylib.mean_sd(studylib.final_scores(runs, 'bleu'))} "
                     f"| {studylib.mean_sd(studylib.final_scores(runs, 'rougeL'))} | {studylib.cpu_time(runs):.0f} s |")
    return "\n".join(["Final dev scores (x 100), mean ± sd over seeds " + ", ".join(map(str, SEEDS)) + ".", "",
                      *lines, "", f"Job: `{JOB}`, 1 thread per run."]) + "\n"


if __name__ == "__main__":
    studylib.main(__doc__, OUT, run, report, [n for n, _ in settings()],
                  threads=dict(type=int, default=1, help="CPU threads per run"))
