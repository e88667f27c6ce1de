"""ptv2-kernels: fast P-Tuning v2 (deep prompt tuning) with attention that reads a shared prefix in place.

- :func:`prefix_attention`: the op (Triton, CUDA and PyTorch backends);
- :class:`PrefixEncoder`: P-Tuning v2's per-layer prefix (plain or MLP-reparameterized, banks);
- :class:`PromptEncoder`: input-only prompts (prompt tuning, P-Tuning v1's LSTM/MLP prompt encoder);
- :func:`apply_prefix_attention`, the ``PrefixModelFor*`` task models and :func:`from_peft`: the
  Hugging Face drop-in (transformers and peft are imported only when these are used).
"""

from ._lazy import lazy_exports

from ._version import __version__

# each name is imported from its module at first use: `import ptv2_kernels` loads neither torch nor transformers
_HOME = {
    "prefix_attention": ".ops", "prefix_attention_reference": ".reference", "PrefixEncoder": ".prefix",
    "PromptEncoder": ".prompt",
    **dict.fromkeys(("MIN_TRANSFORMERS_VERSION", "SUPPORTED_MODEL_TYPES", "PrefixModelForMultipleChoice",
                     "PrefixModelForGeneration", "PrefixModelForQuestionAnswering", "PrefixModelForSequenceClassification",
                     "PrefixModelForTokenClassification", "UnsupportedModelError", "apply_prefix_attention",
                     "from_peft", "load_authors_checkpoint", "load_prefix_attention", "load_pretrained",
                     "remove_prefix_attention", "undo_from_peft"), ".hf"),
}

__all__ = [
    "prefix_attention", "prefix_attention_reference", "PrefixEncoder", "PromptEncoder", "apply_prefix_attention",
    "remove_prefix_attention", "load_prefix_attention", "from_peft", "undo_from_peft", "load_authors_checkpoint", "load_pretrained",
    "PrefixModelForSequenceClassification", "PrefixModelForTokenClassification",
    "PrefixModelForQuestionAnswering", "PrefixModelForMultipleChoice", "PrefixModelForGeneration",
    "MIN_TRANSFORMERS_VERSION",
    "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "__version__",
]


__getattr__, __dir__ = lazy_exports(__name__, _HOME)
