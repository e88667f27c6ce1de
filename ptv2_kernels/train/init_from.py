"""``--init-from RUN[:TASK]``: start a run's prefix or prompt from one trained before, or from one task's
entry of a bank trained on several tasks (the P-Tuning v2 paper's multi-task initialization). Only the
method's encoder is copied; the head starts fresh (the tasks' label sets differ)."""

from __future__ import annotations

import json
from typing import Optional

import torch

from ..methods.base import encoder_entry, shape_mismatch
from .config import ConfigError


def init_from_run(model, run: str, task: Optional[str]) -> str:
    """Load the encoder of ``run`` (entry ``task`` of a bank) into ``model``'s; returns what was done, in
    one line. Raises :class:`ConfigError` naming ``--init-from`` when the run does not fit."""
    from safetensors.torch import load_file

    from .predict import MODEL_CONFIG, model_dir
    from .trainer import TASK_FILE

    try:
        saved = model_dir(run)
    except ConfigError as e:
        raise ConfigError("init_from", e.message.replace("must be", "must name", 1)) from None
    source = json.loads((saved / MODEL_CONFIG).read_text())
    attr = model.method.encoder_attr
    if attr is None or source.get("method") != model.method.name:
        raise ConfigError("init_from", f"must name a run of --method {model.method.name} with a prefix or prompt to "
                                       f"start from, got a {source.get('method')} run ({run})")
    names = json.loads((saved / TASK_FILE).read_text())["task"].split(",")
    entry = _entry(names, task, run, bank=source.get("num_tasks") is not None)
    rows = source["prefix_len"]
    state = {k[len(attr) + 1:]: v for k, v in load_file(str(saved / "model.safetensors")).items()
             if k.startswith(attr + ".")}
    state = encoder_entry(state, "embedding.weight", rows, entry)
    encoder = getattr(model, attr)
    differ = shape_mismatch(state, encoder.state_dict())
    if differ:
        have = {k: tuple(v.shape) for k, v in state.items() if k in differ}
        want = {k: tuple(v.shape) for k, v in encoder.state_dict().items() if k in differ}
        raise ConfigError("init_from", f"must hold a {attr} shaped as this run's, got {have} for {want} ({run})")
    with torch.no_grad():
        encoder.load_state_dict({k: v.to(encoder.state_dict()[k].dtype) for k, v in state.items()})
    which = f" (task {names[entry]} of its bank)" if entry is not None else ""
    return f"--init-from: {attr} from {saved}{which}; the head starts fresh"


def _entry(names, task, run, bank: bool) -> Optional[int]:
    if not bank:
        if task is not None and task != names[0]:
            raise ConfigError("init_from", f"names task {task!r}, but {run} trained {names[0]} alone")
        return None
    if task is None:
        raise ConfigError("init_from", f"must name one task of the bank {run} holds ({','.join(names)}) as RUN:TASK, "
                                       f"got {run}")
    if task not in names:
        raise ConfigError("init_from", f"must name a task of the bank ({','.join(names)}), got {task!r}")
    return names.index(task)
