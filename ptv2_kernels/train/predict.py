"""``ptv2 predict --run DIR --input F --output F.jsonl``: one prediction per input row.

The input is CSV, TSV or JSONL with ``text`` (and ``text_pair`` when the task takes pairs; a
``label`` column is ignored; a prefix bank's run also needs a ``task`` column naming each row's task).
Each output line is the task's :meth:`~ptv2_kernels.tasks.Task.predictions` for the row:

- classification: ``{"label": ..., "scores": {class: probability}}``;
- regression: ``{"label": value, "scores": {"value": value}}``;
- token classification (``text`` is the sentence): ``{"words": [...], "label": [tag per word],
  "scores": [{tag: probability} per word]}``;
- question answering (``text`` the question, ``text_pair`` the context): ``{"label": answer text,
  "scores": {"answer": span logit score, "null": no-answer score}}``;
- generation (the input's ``source`` column, as in training): ``{"generation": text}``, generated with
  the run's beams and length;
- a bank's lines also name the task.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import torch

from ..tasks import MultiTask, Task, get_task
from .config import ConfigError, check_device, model_location
from .multitask import PrefixBankClassifier
from .trainer import TASK_FILE, _to

MODEL_CONFIG = "ptv2_config.json"


def model_dir(run) -> Path:
    """The saved model of a run folder (its ``best/``) or a saved model folder itself."""
    run = Path(run)
    for cand in (run / "best", run):
        if (cand / MODEL_CONFIG).is_file() and (cand / TASK_FILE).is_file():
            return cand
    raise ConfigError("run", f"must be a run folder written by ptv2 train (with best/{MODEL_CONFIG} and "
                             f"best/{TASK_FILE}) or such a best/ folder, got {str(run)!r}")


def load_task(saved: Path) -> tuple:
    """``(task, max_length)`` recorded in ``task.json``; every kind but multiple choice predicts from
    text rows (generation from sources)."""
    spec = json.loads((saved / TASK_FILE).read_text())
    task = get_task(spec["task"], **spec["options"])
    if task.model_kind == "multiple_choice":
        raise ConfigError("run", f"must hold a classification, regression, token classification, question "
                                 f"answering or generation model, got {task.describe()}")
    return task, spec["max_length"]


def load_model(saved: Path, task: Task) -> tuple:
    """``(model, tokenizer)`` of a saved run, on the backbone its config names (a bank wrapped as in
    training), in eval mode."""
    from transformers import AutoTokenizer
    from ..hf import load_pretrained
    backbone = model_location(json.loads((saved / MODEL_CONFIG).read_text())["backbone"])
    model = load_pretrained(str(saved), backbone=backbone)
    if isinstance(task, MultiTask):
        model = PrefixBankClassifier(model, task)
    return model.eval(), AutoTokenizer.from_pretrained(backbone)


@torch.no_grad()
def predictions(task: Task, model, tokenizer, max_length: int, examples: List[dict], batch_size: int) -> List[dict]:
    """The task's prediction for every example (made by :meth:`Task.input_example`), in order."""
    feats = task.encode(examples, tokenizer, max_length, "predict")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(feats), batch_size):
        batch = _to(feats.batch(range(start, min(start + batch_size, len(feats))), pad_id), device)
        outputs.extend(task.infer(model, batch))
    return task.predictions(examples, feats, outputs)


def predict(run, input_file, output_file, batch_size: int = 32, device: Optional[str] = None) -> int:
    """Write one prediction per row of ``input_file`` to ``output_file`` (JSON lines, written
    atomically); returns the number of rows."""
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    check_device(device)
    if not Path(input_file).is_file():
        raise ConfigError("input", f"must be an existing CSV, TSV or JSONL file, got {str(input_file)!r}")
    out = Path(output_file)
    if out.is_dir() or not out.parent.is_dir():
        raise ConfigError("output", f"must be a file path in an existing folder, got {str(output_file)!r}")
    saved = model_dir(run)
    task, max_length = load_task(saved)
    examples = task.read_inputs(input_file)
    model, tokenizer = load_model(saved, task)
    model.to(device or "cpu")
    lines = [json.dumps(p) for p in predictions(task, model, tokenizer, max_length, examples, batch_size)]
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, out)
    return len(lines)
