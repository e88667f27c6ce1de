"""Every layer's keys and values of a model run on some tokens: the real activations P-Tuning v2 can
start a prefix from (``PrefixEncoder.init_from_tokens_``)."""

from __future__ import annotations

import torch

from .arch import model_dims
from .patch import patch_attention, remove_prefix_attention

__all__ = ["capture_key_values"]


class _NoPrefix:
    """A zero-length prefix with the encoder interface the patch reads: the model runs as it came."""

    is_bank = False
    prefix_len = 0
    prefix_dropout_p = 0.0

    def __init__(self, model):
        dims = model_dims(model)
        self.num_layers, self.num_kv_heads, self.head_dim = dims["num_layers"], dims["num_kv_heads"], dims["head_dim"]
        p = next(model.parameters())
        self.empty = torch.zeros(self.num_kv_heads, 0, self.head_dim, dtype=p.dtype, device=p.device)

    def __call__(self):
        return [(self.empty, self.empty)] * self.num_layers


@torch.no_grad()
def capture_key_values(model, input_ids, **forward_kwargs):
    """Every layer's keys and values ``(B, Hkv, N, D)`` for ``input_ids`` (eval mode, no prefix)."""
    state = patch_attention(model, _NoPrefix(model), attention="reference")
    state.capture = {}
    was = model.training
    try:
        model.eval()
        model(input_ids=input_ids, **forward_kwargs)
    finally:
        model.train(was)
        remove_prefix_attention(model)
    layers = [state.capture[i] for i in range(len(state.capture))]
    return [k for k, _ in layers], [v for _, v in layers]
