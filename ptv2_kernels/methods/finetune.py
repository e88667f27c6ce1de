"""Full fine-tuning, the baseline: the same task models with every backbone weight trained."""

from __future__ import annotations

from .base import Method


class FinetuneMethod(Method):
    name = "finetune"
    summary = "full fine-tuning: every backbone weight trains (the baseline)"
    default_lr = 5e-5
    trains_backbone = True

    def attach(self, model, dims):
        model.backbone.requires_grad_(True)

    def trainable_state_dict(self, model):
        return model.state_dict()
