"""The materializing formulation of prefix attention: what PEFT and the authors' code compute.

Every row gets its own copy of the prefix (expand), the prefix is concatenated in front of each
layer's keys and values, the mask is widened with ones, and a plain softmax runs over ``P + N`` keys.
It is slow and memory-hungry by design; tests and benchmarks use it as ground truth (in float64) and
as the baseline the kernels are measured against. Dropout masks come from :mod:`ptv2_kernels.dropout`
with the same seed, so it reproduces the kernels exactly with dropout on.
"""

from __future__ import annotations

import torch

from . import dropout as _dropout


def prefix_attention_reference(q, k, v, prefix_k, prefix_v, key_padding_mask=None, *, causal=False,
                               softmax_scale=None, dropout_p=0.0, prefix_dropout_p=0.0,
                               prefix_index=None, seed=None, generator=None, return_lse=False):
    """Same arguments and result as :func:`ptv2_kernels.prefix_attention`, computed by materializing.

    ``seed`` (an int) fixes the dropout masks directly; otherwise one is drawn from ``generator``
    exactly as the op draws it, so the op and the reference given equal generators agree.
    """
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    if (dropout_p > 0 or prefix_dropout_p > 0) and seed is None:
        seed = int(_dropout.draw_seed(generator))

    if prefix_k.dim() == 4:
        pk, pv = prefix_k[prefix_index], prefix_v[prefix_index]  # (B, Hkv, P, D): one copy per row
    else:
        pk = prefix_k.unsqueeze(0).expand(B, -1, -1, -1)
        pv = prefix_v.unsqueeze(0).expand(B, -1, -1, -1)
    P = pk.shape[2]
    if prefix_dropout_p > 0:
        keep_scale = 1.0 / (1.0 - prefix_dropout_p)
        for stream, name in ((_dropout.STREAM_PREFIX_K, "k"), (_dropout.STREAM_PREFIX_V, "v")):
            keep = _dropout.prefix_keep(seed, stream, prefix_dropout_p, B, Hkv, P, D, q.device)
            if name == "k":
                pk = pk * keep.to(pk.dtype) * keep_scale
            else:
                pv = pv * keep.to(pv.dtype) * keep_scale

    keys = torch.cat([pk, k], dim=2)
    values = torch.cat([pv, v], dim=2)
    group = Hq // Hkv
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)

    visible = torch.ones(B, 1, N, P + N, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        visible = visible & torch.cat(
            [torch.ones(B, P, dtype=torch.bool, device=q.device), key_padding_mask], dim=1
        )[:, None, None, :]
    if causal:
        tokens = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
        visible = visible & torch.cat(
            [torch.ones(N, P, dtype=torch.bool, device=q.device), tokens], dim=1)
    visible = visible.expand(B, Hq, N, P + N)
    empty = ~visible.any(dim=-1, keepdim=True)

    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    # A row with nothing visible: softmax of zeros, then zeroed, so neither value nor gradient is NaN.
    scores = scores.masked_fill(~visible & ~empty, float("-inf")).masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(empty.squeeze(-1), float("-inf"))
    if dropout_p > 0:
        keep = _dropout.attention_keep(seed, dropout_p, B, Hq, N, P + N, q.device)
        probs = probs * keep.to(probs.dtype) / (1.0 - dropout_p)
    out = torch.matmul(probs, values)
    if return_lse:
        return out, lse
    return out
