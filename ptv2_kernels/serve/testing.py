"""Saved runs without training, for the server's tests and its load benchmark: a task model with a
freshly initialized prefix and head written the way ``ptv2 train`` writes its ``best/`` model (a
generation run's too, on a decoder or an encoder-decoder), and a tiny random BERT backbone that reads
the packaged MiniLM's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch


def write_tiny_backbone(folder, seed: int = 0, **overrides) -> str:
    """A 2-layer BERT (hidden 32) with random weights and MiniLM's vocabulary and tokenizer, saved as
    safetensors in ``folder``; returns its path (what runs record as their backbone)."""
    from transformers import AutoTokenizer
    from ..hf.testing import minilm_path, tiny_model

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = tiny_model("bert", seed=seed, vocab_size=tokenizer.vocab_size, max_position_embeddings=512, **overrides)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def write_run(folder, backbone, task: str, *, task_options: Optional[dict] = None, max_length: int = 64,
              prefix_len: int = 4, seed: int = 0, **model_options) -> Path:
    """A run folder holding ``best/`` (model and ``task.json``) for ``task`` (a name for
    :func:`~ptv2_kernels.tasks.get_task`; ``a,b`` a bank) on ``backbone`` (a path, or a loaded model that
    many runs reuse: it is left unpatched), initialized from ``seed``."""
    from .. import hf
    from ..tasks import MultiTask, get_task
    from ..train.trainer import MODEL_CLASSES, TASK_FILE

    spec = get_task(task, **(task_options or {}))
    klass = getattr(hf, MODEL_CLASSES[spec.model_kind])
    torch.manual_seed(seed)
    bank = dict(num_tasks=len(spec.tasks)) if isinstance(spec, MultiTask) else {}
    model = klass.from_pretrained(backbone, num_labels=spec.num_labels, prefix_len=prefix_len, **bank, **model_options)
    spec.fit_backbone(model.backbone.config)
    best = Path(folder) / "best"
    model.save_pretrained(str(best))
    model.unpatch()
    (best / TASK_FILE).write_text(json.dumps({"task": spec.name, "options": spec.options(), "max_length": max_length}))
    return Path(folder)
