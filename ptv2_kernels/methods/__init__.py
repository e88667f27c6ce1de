"""The prompt-tuning family and its baselines, one record each (see :class:`~.base.Method`):

- ``prefix``: P-Tuning v2 / Prefix-Tuning (deep prompts: keys and values at every layer);
- ``prompt``: prompt tuning (input-only soft prompts);
- ``ptuning``: P-Tuning v1 (input-only prompts through an LSTM or MLP prompt encoder);
- ``lora``: LoRA through PEFT;
- ``finetune``: full fine-tuning.
"""

from __future__ import annotations

from typing import Dict

from .base import Method
from .finetune import FinetuneMethod
from .lora import LoraMethod
from .prefix import PrefixMethod
from .prompt import PROMPT_INITS, PromptMethod
from .ptuning import REPARAMETERIZATIONS, PTuningMethod

__all__ = ["METHODS", "METHOD_OPTIONS", "PROMPT_INITS", "REPARAMETERIZATIONS", "Method", "get_method",
           "method_for_peft"]

METHODS: Dict[str, Method] = {m.name: m for m in (PrefixMethod(), PromptMethod(), PTuningMethod(), LoraMethod(),
                                                  FinetuneMethod())}
#: every option some method reads and another does not
METHOD_OPTIONS = frozenset().union(*(m.options for m in METHODS.values()))


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def method_for_peft(peft_type) -> Method:
    """The record of a PEFT ``PeftType`` (prefix tuning, prompt tuning, P-tuning, LoRA)."""
    name = getattr(peft_type, "value", str(peft_type))
    for m in METHODS.values():
        if m.peft_type == name:
            return m
    known = ", ".join(m.peft_type for m in METHODS.values() if m.peft_type)
    raise ValueError(f"PEFT adapters of type {known} convert, got {name}")
