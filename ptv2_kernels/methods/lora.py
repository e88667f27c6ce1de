"""LoRA, the baseline most users weigh prompts against, through PEFT's own ``LoraConfig`` and layers
(injected into the task model's backbone in place): trained low-rank updates of the attention
projections, the rest of the backbone frozen."""

from __future__ import annotations

from .base import Method


class LoraMethod(Method):
    name = "lora"
    summary = "LoRA (PEFT's LoraConfig): rank-r updates of the attention projections"
    # bench/paper_study.py's sweep (SST-2, 1,000 sentences, 2 epochs): 5e-3 82.0, 2e-3 80.0, 5e-4 68.9
    default_lr = 5e-3
    options = frozenset({"lora_r", "lora_alpha", "lora_dropout", "lora_targets"})
    trains_backbone = True  # its adapters live inside the backbone's layers

    def attach(self, model, dims):
        from peft import LoraConfig, inject_adapter_in_model

        o = model.options
        model.backbone.requires_grad_(False)
        cfg = LoraConfig(r=o.get("lora_r") or 8, lora_alpha=o.get("lora_alpha") or 16,
                         lora_dropout=o.get("lora_dropout") or 0.0, target_modules=o.get("lora_targets"))
        # PEFT fills target_modules from its table of model types when none are given
        inject_adapter_in_model(cfg, model.backbone)

    def trainable_state_dict(self, model):
        return {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.") or "lora_" in k}
