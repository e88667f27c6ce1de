"""The model ``ptv2 train --task a,b,c`` trains: one backbone, one prefix bank (an entry per task,
chosen per row by ``prefix_index``), and each task's classes in its own slice of one output layer
(see :class:`~ptv2_kernels.tasks.MultiTask`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..tasks import MultiTask


class PrefixBankClassifier(nn.Module):
    """Wraps a ``PrefixModelForSequenceClassification`` built with ``num_tasks=T`` and
    ``num_labels`` = all tasks' classes: each row's logits outside its task's slice are -inf, so the
    softmax, the loss and the argmax see only that task's classes."""

    def __init__(self, core: nn.Module, task: MultiTask):
        super().__init__()
        self.core = core
        allowed = torch.zeros(len(task.tasks), task.num_labels, dtype=torch.bool)
        for t, seg in enumerate(task.segments()):
            allowed[t, seg.start:seg.stop] = True
        self.register_buffer("allowed", allowed, persistent=False)

    def forward(self, prefix_index, labels=None, **inputs):
        out = self.core(prefix_index=prefix_index, **inputs)
        logits = out.logits.masked_fill(~self.allowed[prefix_index], float("-inf"))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return type(out)(loss=loss, logits=logits)

    def save_pretrained(self, save_directory: str) -> None:
        self.core.save_pretrained(save_directory)
