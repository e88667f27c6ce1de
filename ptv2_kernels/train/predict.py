"""``ptv2 predict --run DIR --input F --output F.jsonl``: one prediction per input row.

The input is CSV, TSV or JSONL with ``text`` (and ``text_pair`` when the task takes pairs; a
``label`` column is ignored; a prefix bank's run also needs a ``task`` column naming each row's task).
Each output line is ``{"label": ..., "scores": {class: probability}}`` for classification and
``{"label": value, "scores": {"value": value}}`` for regression (a bank's lines also name the task).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import torch

from ..tasks import MultiTask, Task, get_task, read_inputs
from ..tasks.classification import SentenceTask
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
    """``(task, max_length)`` recorded in ``task.json``; only sentence classification and regression
    (and banks of them) predict from plain text rows."""
    spec = json.loads((saved / TASK_FILE).read_text())
    task = get_task(spec["task"], **spec["options"])
    if task.model_kind != "sequence_classification" or not isinstance(task, (SentenceTask, MultiTask)):
        raise ConfigError("run", f"must hold a sentence classification or regression model, got {task.describe()}")
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


def prediction(task: Task, row: torch.Tensor, example: Optional[dict] = None) -> dict:
    """One output line from a row of logits (a bank's row: its task's slice)."""
    if isinstance(task, MultiTask):
        own, seg = task.tasks[example["task"]], task.segments()[example["task"]]
        return {"task": own.name, **prediction(own, row[seg.start:seg.stop])}
    if task.regression:
        value = float(row.reshape(-1)[0])
        return {"label": value, "scores": {"value": value}}
    probs = torch.softmax(row.float(), -1).tolist()
    return {"label": task.labels[int(row.argmax())], "scores": {str(c): p for c, p in zip(task.labels, probs)}}


@torch.no_grad()
def predictions(task: Task, model, tokenizer, max_length: int, examples: List[dict], batch_size: int) -> List[dict]:
    """:func:`prediction` for every example, in order."""
    feats = task.encode(examples, tokenizer, max_length, "predict")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(feats), batch_size):
        rows = range(start, min(start + batch_size, len(feats)))
        logits = model(**_to(feats.batch(rows, pad_id), device)).logits
        out.extend(prediction(task, logits[j], examples[i]) for j, i in enumerate(rows))
    return out


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
    examples = read_inputs(input_file, [t.name for t in task.tasks] if isinstance(task, MultiTask) else None)
    model, tokenizer = load_model(saved, task)
    model.to(device or "cpu")
    lines = [json.dumps(p) for p in predictions(task, model, tokenizer, max_length, examples, batch_size)]
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, out)
    return len(lines)
