"""The attention function transformers calls on a patched model, and its registration.

- ``prefix_attention_forward`` is registered with ``transformers.AttentionInterface`` under the name
  ``ATTN_IMPLEMENTATION`` ("ptv2_prefix"); the supported models call their attention through that
  interface with ``(module, q, k, v, attention_mask, scaling=, dropout=, **kwargs)``, except DeBERTa,
  whose attention modules get ``disentangled_attention_forward`` as their forward while patched. The
  module carries ``_ptv2_state`` (the patch's shared state, ``patch.py``) and ``_ptv2_layer``.
  Encoder-decoders call it for encoder self-attention, decoder self-attention and cross-attention
  alike; each module reads its own layer's prefix.
- ``prefix_attention_mask`` is registered under the same name with ``AttentionMaskInterface``, so
  ``create_bidirectional_mask`` / ``create_causal_mask`` hand the attention function the 2-D
  ``(B, N)`` bool key padding mask (True = real token) instead of a 4-D bias. Without this
  registration transformers would skip mask creation for an unknown implementation and the padding
  would be silently dropped. Causality comes from the attention module (``module.is_causal``, or an
  ``is_causal`` kwarg), and what the op cannot express (sliding windows shorter than the sequence,
  packed sequences, custom overlays, 4-D masks, logit soft-capping, attention sinks) raises instead
  of being ignored.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops

__all__ = ["ATTN_IMPLEMENTATION", "MIN_TRANSFORMERS_VERSION", "MODULE_FORWARDS", "register_prefix_attention",
           "prefix_attention_forward", "prefix_attention_mask", "disentangled_attention_forward"]

ATTN_IMPLEMENTATION = "ptv2_prefix"
#: Oldest transformers this module is written and tested against (attention and mask interfaces,
#: ``cache`` keyword, BERT-family through the attention interface).
MIN_TRANSFORMERS_VERSION = "5.24.0"

#: Keywords transformers' models pass to the attention function that change what attention computes
#: and the op does not: logit soft-capping (Gemma 2), attention sinks (gpt-oss), ALiBi and position
#: biases, sliding windows (only a window covering every key is plain attention), packed sequences
#: (flash-attention's cumulative lengths), cross-attention inputs, and returning the attention weights.
#: Any other keyword (``position_ids``, ``use_cache``, Trainer's ``num_items_in_batch``, ...) carries
#: nothing attention needs here.
_UNSUPPORTED_KWARGS = frozenset({
    "softcap", "s_aux", "sinks", "alibi", "position_bias", "attention_bias", "sliding_window",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "encoder_hidden_states",
    "output_attentions"})

# ------------------------------------------------------------------------------------------------
# registration

_REGISTERED = False


def register_prefix_attention() -> str:
    """Register the attention and mask functions with transformers (idempotent); returns the name."""
    global _REGISTERED
    if not _REGISTERED:
        import transformers
        from packaging.version import Version
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        if Version(transformers.__version__.split("+")[0]) < Version(MIN_TRANSFORMERS_VERSION):
            raise RuntimeError(f"ptv2_kernels.hf needs transformers >= {MIN_TRANSFORMERS_VERSION}, "
                               f"found {transformers.__version__}")
        AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prefix_attention_mask)
        _REGISTERED = True
    return ATTN_IMPLEMENTATION


def prefix_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                          attention_mask=None, local_size=None, **kwargs):
    """Mask interface: returns the ``(B, kv_length)`` bool padding mask (or None) for the op."""
    from transformers import masking_utils as mu

    plain = (mu.causal_mask_function, mu.bidirectional_mask_function)
    if mask_function is not None and mask_function not in plain:
        # A sliding window is the plain causal mask while the whole sequence fits in it.
        if local_size is None or kv_length > local_size:
            raise NotImplementedError(
                "ptv2 prefix attention supports plain causal or bidirectional masks with padding; got a "
                "custom mask pattern (packed sequences, a sliding window shorter than the sequence, or a "
                "mask overlay)")
    if attention_mask is None:
        return None
    mask = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    return mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)


def _key_padding_mask(mask, B, N, P):
    """The op's ``(B, N)`` bool mask over the N keys (tokens, cached ones included)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"ptv2 prefix attention needs a 2-D (batch, seq) padding mask; got {shape}. Pass the usual "
            "attention_mask of 0/1 per token (4-D or custom masks are not supported).")
    if mask.shape[-1] == N + P and P > 0:  # a PEFT-style mask widened with ones for the prefix
        mask = mask[:, P:]
    if mask.shape[-1] != N:
        raise ValueError(f"padding mask has {mask.shape[-1]} columns for {N} tokens (prefix {P})")
    if mask.dtype != torch.bool:
        mask = mask.to(torch.bool)
    if mask.shape[0] != B:
        mask = mask.expand(B, N)
    return mask


def _patch_state(module):
    state = getattr(module, "_ptv2_state", None)
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} runs with attn_implementation={ATTN_IMPLEMENTATION!r} but was not "
            "patched by ptv2_kernels.apply_prefix_attention")
    return state


def _layer_inputs(state, module, query, key, value):
    """``(q, k, v, prefix_k, prefix_v)`` of the module's layer in the dtype the op runs in. Under autocast
    everything runs in the autocast dtype (the same cast the op makes); without it a low-precision
    backbone reads the (fp32-trained) prefix in its own dtype, as PEFT does."""
    if state.capture is not None:  # capture_key_values
        state.capture[module._ptv2_layer] = (key.detach().clone(), value.detach().clone())
    pk, pv = state.layer_prefix(module._ptv2_layer)
    q, k, v, pk, pv = ops.autocast_inputs([query, key, value, pk, pv])
    if pk.dtype != q.dtype:
        pk, pv = pk.to(q.dtype), pv.to(q.dtype)
    return q, k, v, pk, pv


def _prefix_op(state, q, k, v, pk, pv, mask, **kwargs):
    """The op, or the materializing reference formulation when the patch asked for it."""
    if state.attention == "reference":
        from ..reference import prefix_attention_reference

        return prefix_attention_reference(q, k, v, pk, pv, mask, **kwargs)
    return ops.prefix_attention(q, k, v, pk, pv, mask, backend=state.backend, **kwargs)


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """The transformers attention function: returns ``(out (B, N, Hq, D), None)``.

    Self-attention runs in the op. Keys of another length than the queries are cached decoding (causal:
    the queries are the last N of the Nk positions) or cross-attention (not causal: the decoder's
    queries over the encoder's keys, padding masked, the cross-attention prefix always visible); both
    run through ``_cached_attention`` when nothing trains, else as a materialized token part merged with
    the op's prefix part, which is also how a token bias (``Arch.token_bias``, T5's relative positions)
    is added: to the token scores only."""
    state = _patch_state(module)
    B, Hq, N, D = query.shape
    Nk = key.shape[2]
    bias = kwargs.pop(state.arch.token_bias, None) if state.arch.token_bias else None
    causal = kwargs.get("is_causal", None)
    if causal is None:
        causal = bool(getattr(module, "is_causal", False))
    if causal and Nk < N:
        raise ValueError(f"ptv2 prefix attention got {Nk} keys for {N} causal queries (expected at least as many)")
    _refuse_unsupported(module, kwargs, Nk)
    q, k, v, pk, pv = _layer_inputs(state, module, query, key, value)
    mask = _key_padding_mask(attention_mask, B, Nk, pk.shape[-2])
    # a layer without a prefix draws no prefix dropout (nor a seed for it)
    common = dict(causal=causal, softmax_scale=scaling, dropout_p=float(dropout),
                  prefix_dropout_p=state.prefix_dropout_p() if pk.shape[-2] else 0.0,
                  prefix_index=state.prefix_index_for(B, pk))
    trains = common["dropout_p"] > 0 or common["prefix_dropout_p"] > 0 or pk.requires_grad
    if bias is not None or (Nk != N and trains):
        out = _with_prefix(state, q, pk, pv, *_token_part(q, k, v, mask, bias=bias, **common), **common)
    elif Nk != N:
        out = _cached_attention(q, k, v, pk, pv, mask, **common)
    else:
        out = _prefix_op(state, q, k, v, pk, pv, mask, **common)
    return out.transpose(1, 2), None


def disentangled_attention_forward(module: nn.Module, hidden_states, attention_mask, output_attentions=False,
                                   query_states=None, relative_pos=None, rel_embeddings=None):
    """DeBERTa-v2/v3's ``DisentangledSelfAttention.forward`` on a patched model, defined as the authors'
    P-tuning v2 DeBERTa defines it: one softmax over ``[prefix; tokens]`` with DeBERTa's common scale
    ``1 / sqrt(D * (1 + #c2p + #p2c))``; the tokens' relative-position terms (c2p, p2c) as transformers
    computes them; the prefix keys get no relative-position term (the authors add zeros in their
    columns), and prefix positions are always visible. Returns ``(context (B, N, H * D), None)``.

    DeBERTa materializes its token scores (the relative terms are a per-pair bias), so the token part
    runs here as in transformers, while the prefix part runs in the op (read in place, prefix dropout in
    the kernels, its gradient reduced over the batch); the two are merged by their log-sum-exps."""
    for name, value in (("output_attentions", output_attentions), ("query_states", query_states)):
        if value is not None and value is not False:  # the enhanced mask decoder's path, attention maps
            raise NotImplementedError(f"ptv2 prefix attention does not support the attention keyword {name!r} "
                                      f"({type(module).__name__})")
    state = _patch_state(module)
    H = module.num_attention_heads
    B, N = hidden_states.shape[:2]
    q, k, v = (module.transpose_for_scores(proj(hidden_states), H)  # (B * H, N, D)
               for proj in (module.query_proj, module.key_proj, module.value_proj))
    D = q.shape[-1]
    scale_factor = 1 + sum(kind in module.pos_att_type for kind in ("c2p", "p2c"))
    scaling = (D * scale_factor) ** -0.5
    scores = torch.bmm(q, k.transpose(-1, -2)) * scaling
    if module.relative_attention:
        scores = scores + module.disentangled_attention_bias(q, k, relative_pos, module.pos_dropout(rel_embeddings),
                                                             scale_factor)
    # masked as transformers masks it: a row that sees no token (padding) still gets finite scores
    scores = scores.view(B, H, N, N).masked_fill(~attention_mask.bool(), torch.finfo(scores.dtype).min)
    token_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    token_out = module.dropout(scores.softmax(-1)) @ v.view(B, H, N, D)
    q, k, v, pk, pv = _layer_inputs(state, module, q.view(B, H, N, D), k.view(B, H, N, D), v.view(B, H, N, D))
    out = _with_prefix(state, q, pk, pv, token_out, token_lse, softmax_scale=scaling,
                       dropout_p=module.dropout.p if module.training else 0.0,
                       prefix_dropout_p=state.prefix_dropout_p(), prefix_index=state.prefix_index_for(B, pk))
    return out.transpose(1, 2).reshape(B, N, H * D), None


def _token_part(q, k, v, mask, *, bias, causal, softmax_scale, dropout_p, **_):
    """The token part of attention over ``[prefix; tokens]``, materialized as transformers' eager
    attention computes it: ``(out, lse)``, normalized over the visible tokens, and its log-sum-exp
    ``(B, Hq, N, 1)``. ``bias`` is added to the token scores; masked scores are the dtype's minimum
    rather than -inf, so a row that sees no token stays finite (its weight vanishes beside a prefix)."""
    B, Hq, N, D = q.shape
    group = Hq // k.shape[1]
    if group > 1:  # grouped-query attention: each kv head serves `group` query heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    visible = _token_visibility(mask, B, N, k.shape[2], causal, q.device)
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return probs @ v, torch.logsumexp(scores, dim=-1, keepdim=True)


def _with_prefix(state, q, pk, pv, token_out, token_lse, *, softmax_scale, dropout_p, prefix_dropout_p,
                 prefix_index, **_):
    """Attention over ``[prefix; tokens]`` from its token part (``token_out`` normalized over the tokens,
    ``token_lse`` its log-sum-exp ``(B, Hq, N, 1)``) and the prefix part, which runs in the op (read in
    place, prefix dropout in the kernels, its gradient reduced over the batch): the two softmaxes are
    one after merging by their log-sum-exps. A layer without a prefix returns the token part."""
    if pk.shape[-2] == 0:
        return token_out
    B, _, N, _ = q.shape
    # The op's token keys, all masked, so it reads the prefix alone: any (B, Hkv, N, D) tensor serves,
    # and a detached view of q costs nothing (no copy, no gradient).
    no_keys = q.detach()[:, :pk.shape[-3]]
    no_token = torch.zeros(B, N, dtype=torch.bool, device=q.device)
    prefix_out, prefix_lse = _prefix_op(state, q, no_keys, no_keys, pk, pv, no_token, softmax_scale=softmax_scale,
                                        dropout_p=dropout_p, prefix_dropout_p=prefix_dropout_p,
                                        prefix_index=prefix_index, return_lse=True)
    prefix_lse = prefix_lse.unsqueeze(-1).to(token_lse.dtype)
    lse = torch.logaddexp(prefix_lse, token_lse)
    return prefix_out.to(token_out.dtype) * torch.exp(prefix_lse - lse) + token_out * torch.exp(token_lse - lse)


#: Attention modules that do not call transformers' attention interface get their forward replaced by
#: one of these (``Arch.module_forward`` names it).
MODULE_FORWARDS = {"disentangled": disentangled_attention_forward}


def _refuse_unsupported(module, kwargs, n_keys):
    """Raise naming a keyword of ``_UNSUPPORTED_KWARGS`` that is set (not None or False)."""
    for name, value in kwargs.items():
        if name not in _UNSUPPORTED_KWARGS or value is None or value is False:
            continue
        if name == "sliding_window" and value >= n_keys:  # the window covers every key: plain attention
            continue
        shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        detail = f" shorter than the {n_keys} keys" if name == "sliding_window" else ""
        raise NotImplementedError(f"ptv2 prefix attention does not support the attention keyword {name!r} "
                                  f"({type(module).__name__} passed {shown}{detail})")


def _token_visibility(mask, B, N, Nk, causal, device):
    """Which of the Nk token keys each of the N queries sees, ``(B or 1, 1, N, Nk)`` bool: the padding
    mask, and with ``causal`` the keys up to the query's own position ``Nk - N + i`` (the queries are
    the last N positions, as in cached decoding)."""
    visible = torch.ones(1, 1, N, Nk, dtype=torch.bool, device=device)
    if mask is not None:
        visible = visible & mask[:, None, None, :]
    if causal:
        rows = torch.arange(Nk - N, Nk, device=device)[:, None]
        visible = visible & (torch.arange(Nk, device=device)[None, :] <= rows)
    return visible


def _cached_attention(q, k, v, pk, pv, mask, *, causal, softmax_scale, dropout_p, prefix_dropout_p,
                      prefix_index):
    """Attention of N new queries over ``[prefix; Nk cached and new tokens]`` (generation with a KV
    cache; the prefix stays out of the cache and is read from the encoder at every step), or, not
    causal, of a decoder's N queries over ``[cross-attention prefix; Nk encoder tokens]``.

    Decoding steps are small and bound by reading the cache, so this path simply joins the prefix to
    the keys (one ``(B, Hkv, P, D)`` copy per step) and calls SDPA; query i sits at key position
    ``Nk - N + i`` for the causal mask."""
    if dropout_p > 0 or prefix_dropout_p > 0:
        raise NotImplementedError("cached decoding with attention or prefix dropout: call model.eval() "
                                  "before generating")
    B, Hkv, Nk, _ = k.shape
    N = q.shape[2]
    if pk.dim() == 4:  # a bank: each row's entry
        pk, pv = pk[prefix_index], pv[prefix_index]
    else:
        pk, pv = pk.unsqueeze(0).expand(B, -1, -1, -1), pv.unsqueeze(0).expand(B, -1, -1, -1)
    P = pk.shape[2]
    tokens = _token_visibility(mask, B, N, Nk, causal, q.device)
    visible = torch.cat([torch.ones(B, 1, N, P, dtype=torch.bool, device=q.device), tokens.expand(B, 1, N, Nk)], -1)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=visible, scale=softmax_scale,
        enable_gqa=q.shape[1] != Hkv)
    # a row that sees nothing (no prefix, every key masked) gives zeros, as the op does
    return torch.where(visible.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))


