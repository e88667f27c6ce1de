"""Hugging Face integration: attention registration and patching, task models, PEFT interop.

- :func:`apply_prefix_attention` / :func:`remove_prefix_attention`: run a transformers model's
  attention over a :class:`~ptv2_kernels.PrefixEncoder`'s prefix with the fused op (and undo it);
  :func:`load_prefix_attention`: patch a model loaded from a patched model's ``save_pretrained``.
- ``PrefixModelFor{SequenceClassification,TokenClassification,QuestionAnswering,MultipleChoice}``:
  P-Tuning v2 task models on a frozen backbone; ``PrefixModelForGeneration``: Prefix-Tuning on a
  decoder or an encoder-decoder with its LM head.
- :func:`from_peft`: speed up an existing PEFT prefix-tuning model in place;
  :func:`load_authors_checkpoint`: import a THUDM/P-tuning-v2 checkpoint.

Needs transformers >= ``MIN_TRANSFORMERS_VERSION``; supports ``SUPPORTED_MODEL_TYPES`` (one record per
architecture in ``arch.py``). Modules: ``arch`` (per-architecture facts), ``attention`` (the attention
function transformers calls), ``patch`` (patch / remove), ``capture`` (a model's own keys and values),
``models`` (task models), ``peft`` (PEFT interop), ``testing`` (tiny models for tests).
"""

from .._lazy import lazy_exports

# each name is imported from its module at first use: ``ptv2_kernels.hf.location`` (what the ``ptv2``
# command line needs to check its flags) loads without torch or transformers
_HOME = {
    **dict.fromkeys(("ARCHS", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError"), ".arch"),
    **dict.fromkeys(("ATTN_IMPLEMENTATION", "MIN_TRANSFORMERS_VERSION", "register_prefix_attention"), ".attention"),
    **dict.fromkeys(("PrefixModelForMultipleChoice", "PrefixModelForQuestionAnswering",
                     "PrefixModelForSequenceClassification", "PrefixModelForTokenClassification",
                     "PrefixModelForGeneration", "load_prefix_attention", "load_pretrained"), ".models"),
    **dict.fromkeys(("apply_prefix_attention", "is_patched", "remove_prefix_attention", "set_prefix_encoder"),
                    ".patch"),
    **dict.fromkeys(("from_peft", "load_authors_checkpoint", "undo_from_peft"), ".peft"),
}

__all__ = [
    "ARCHS", "ATTN_IMPLEMENTATION", "MIN_TRANSFORMERS_VERSION", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError",
    "apply_prefix_attention", "remove_prefix_attention", "is_patched", "register_prefix_attention",
    "set_prefix_encoder", "PrefixModelForSequenceClassification", "PrefixModelForTokenClassification",
    "PrefixModelForQuestionAnswering", "PrefixModelForMultipleChoice", "PrefixModelForGeneration", "load_pretrained",
    "load_prefix_attention",
    "from_peft", "undo_from_peft", "load_authors_checkpoint",
]


__getattr__, __dir__ = lazy_exports(__name__, _HOME)
