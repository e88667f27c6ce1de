"""Hugging Face integration: attention registration and patching, task models, PEFT interop.

- :func:`apply_prefix_attention` / :func:`remove_prefix_attention`: run a transformers model's
  attention over a :class:`~ptv2_kernels.PrefixEncoder`'s prefix with the fused op (and undo it).
- ``PrefixModelFor{SequenceClassification,TokenClassification,QuestionAnswering,MultipleChoice}``:
  P-Tuning v2 task models on a frozen backbone.
- :func:`from_peft`: speed up an existing PEFT prefix-tuning model in place;
  :func:`load_authors_checkpoint`: import a THUDM/P-tuning-v2 checkpoint.

Needs transformers >= ``MIN_TRANSFORMERS_VERSION``; supports ``SUPPORTED_MODEL_TYPES``.
"""

from .models import (PrefixModelForMultipleChoice, PrefixModelForQuestionAnswering,
                     PrefixModelForSequenceClassification, PrefixModelForTokenClassification, load_pretrained)
from .patch import (ATTN_IMPLEMENTATION, MIN_TRANSFORMERS_VERSION, SUPPORTED_MODEL_TYPES, UnsupportedModelError,
                    apply_prefix_attention, is_patched, load_prefix_attention, register_prefix_attention,
                    remove_prefix_attention, set_prefix_encoder)
from .peft import from_peft, load_authors_checkpoint, undo_from_peft

__all__ = [
    "ATTN_IMPLEMENTATION", "MIN_TRANSFORMERS_VERSION", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError",
    "apply_prefix_attention", "remove_prefix_attention", "is_patched", "register_prefix_attention",
    "set_prefix_encoder", "PrefixModelForSequenceClassification", "PrefixModelForTokenClassification",
    "PrefixModelForQuestionAnswering", "PrefixModelForMultipleChoice", "load_pretrained", "load_prefix_attention",
    "from_peft", "undo_from_peft", "load_authors_checkpoint",
]
