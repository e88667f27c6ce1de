"""``ptv2 predict --run DIR --input F --output F.jsonl``: one prediction per input row.

The input is CSV, TSV or JSONL with ``text`` (and ``text_pair`` when the task takes pairs; a
``label`` column is ignored). Each output line is ``{"label": ..., "scores": {class: probability}}``
for classification and ``{"label": value, "scores": {"value": value}}`` for regression.
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
    """``(task, max_length)`` recorded in ``saved/task.json``."""
    spec = json.loads((saved / TASK_FILE).read_text())
    task = get_task(spec["task"], **spec["options"])
    if not isinstance(task, SentenceTask) or isinstance(task, MultiTask):
        raise ConfigError("run", f"must hold a single sentence classification or regression task, got {task.describe()}")
    return task, spec["max_length"]


def load_model(saved: Path):
    """The task model and tokenizer of ``saved``, on the backbone its config names."""
    from transformers import AutoTokenizer
    from ..hf import load_pretrained
    backbone = model_location(json.loads((saved / MODEL_CONFIG).read_text())["backbone"])
    return load_pretrained(str(saved), backbone=backbone).eval(), AutoTokenizer.from_pretrained(backbone)


def prediction(task: Task, row: torch.Tensor) -> dict:
    if task.regression:
        value = float(row.reshape(-1)[0])
        return {"label": value, "scores": {"value": value}}
    probs = torch.softmax(row.float(), -1).tolist()
    return {"label": task.labels[int(row.argmax())], "scores": {str(c): p for c, p in zip(task.labels, probs)}}


@torch.no_grad()
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
    examples = read_inputs(input_file)
    model, tokenizer = load_model(saved)
    model.to(device or "cpu")
    feats = task.encode(examples, tokenizer, max_length, "predict")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lines: List[str] = []
    for start in range(0, len(feats), batch_size):
        batch = _to(feats.batch(range(start, min(start + batch_size, len(feats))), pad_id), model_device(model))
        lines.extend(json.dumps(prediction(task, row)) for row in model(**batch).logits)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, out)
    return len(lines)


def model_device(model) -> torch.device:
    return next(model.parameters()).device
