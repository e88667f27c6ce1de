"""Cascade backend: the token part through the platform's fused attention, the prefix part ours.

Softmax over ``[prefix; tokens]`` is two softmaxes merged by log-sum-exp. The token part (queries
against their own row's keys) is exactly what the platform's fused attention already does well, and it
returns its LSE: on the CPU ``aten._scaled_dot_product_flash_attention_for_cpu``. Only the prefix part
(every row against one small shared prefix) is ours, as batched GEMMs over the kv heads with the rows
that share a prefix entry laid out as one long ``(Hkv, rows * G * N, D)`` sequence (a view, not a copy,
for the ``(B, N, H, D)`` memory transformers hands over). The merge re-weights the fused kernel's
output in place, and the prefix probabilities, normalized against the merged LSE, add the prefix values
into it inside one ``baddbmm``.

Backward: the fused kernel's backward called with the *merged* output and LSE returns the token part's
exact dQ, dK, dV (its ``exp(S - lse)`` is then the merged softmax restricted to the tokens, and its
``rowsum(dO * O)`` the merged delta); the prefix part adds its dQ in place and reduces the prefix
gradient over the batch inside one GEMM per kv head.

The CPU fused kernel has no dropout and takes no LSE cotangent. With attention dropout (training mode)
or a gradient through the returned LSE this backend runs the torch backend's materialized algorithm
(``(B, Hkv, G * N, P + N)`` scores in one buffer, like SDPA's own math path, kept for backward in eager
mode) with dropout masks from the platform RNG seeded by the op's seed: one pass instead of the counter
hash's dozens, as random, but not equal to the masks the torch, Triton and CUDA backends share.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import Backend, Params, lse_dtype
from .torch import Materialized, PlatformMasks

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

# One fused-kernel call per row over its real tokens when the batch's real tokens are at most this
# fraction of B * N (per-row calls measured faster at B = 32 with 25-30% padding; the threshold itself
# is a judgment, not a measured crossover).
_PER_ROW_BELOW = 0.9


def _infinite_to(x: torch.Tensor, value: float) -> torch.Tensor:
    return x.masked_fill(torch.isinf(x), value)


class _Fused(Materialized):
    """One call on the fused path: the token-visibility forms the fused kernel needs, and the prefix
    products accumulated into the fused kernel's outputs."""

    def additive_mask(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The fused kernel's (B, 1, 1, N) mask in the query's ``dtype``: 0 for real tokens, -inf for
        padding."""
        if self.key_padding_mask is None:
            return None
        m = torch.zeros(self.B, 1, 1, self.N, dtype=dtype, device=self.k.device)
        return m.masked_fill_(~self.key_padding_mask[:, None, None, :], float("-inf"))

    def sees_no_token(self) -> Optional[torch.Tensor]:
        """Bool (B, 1, N or 1): query rows with no visible token (the fused kernel gives them lse 0)."""
        mask = self.key_padding_mask
        if mask is None:
            return None
        if self.params.causal:
            return (mask.cumsum(-1) == 0)[:, None, :]
        return ~mask.any(-1)[:, None, None]

    def token_lengths(self) -> Optional[list]:
        """Each row's number of real tokens when the padding is right padding that leaves out enough
        keys to pay for one fused-kernel call per row over just those keys (the batched call computes
        every padded key and masks it); None otherwise."""
        mask = self.key_padding_mask
        if mask is None or self.B == 1:
            return None
        lengths = mask.sum(-1)
        if lengths.sum() > _PER_ROW_BELOW * self.B * self.N:
            return None
        if not torch.equal(mask, torch.arange(self.N, device=mask.device) < lengths[:, None]):
            return None
        return lengths.tolist()

    def token_forward(self, q, k, v):
        """The fused kernel over the tokens: (output, LSE in the LSE dtype, -inf where nothing is seen)."""
        causal, scale = self.params.causal, self.params.softmax_scale
        lengths = self.token_lengths()
        if lengths is None:
            out, lse = _flash(q, k, v, is_causal=causal, attn_mask=self.additive_mask(q.dtype), scale=scale)
            lse = lse.to(self.ct)
            empty = self.sees_no_token()
            return out, (lse if empty is None else lse.masked_fill(empty, float("-inf")))
        out = torch.empty_like(q)
        lse = q.new_full((self.B, self.Hq, self.N), float("-inf"), dtype=self.ct)
        for b, n in enumerate(lengths):
            if n == 0:
                out[b].zero_()
                continue
            # causal stays right for a key prefix: the kernel aligns its mask top-left (j <= i)
            out[b:b + 1], lse[b:b + 1] = _flash(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                                is_causal=causal, scale=scale)
        return out, lse

    def token_backward(self, grad_out, q, k, v, out, lse):
        """The fused kernel's backward over the tokens with the merged output and LSE."""
        causal, scale = self.params.causal, self.params.softmax_scale
        lengths = self.token_lengths()
        if lengths is None:
            # rows that see nothing (only without a prefix) have lse -inf: +inf makes their
            # probabilities 0, not NaN
            safe = lse if self.P else _infinite_to(lse, float("inf"))
            return _flash_backward(grad_out, q, k, v, out, safe, 0.0, causal,
                                   attn_mask=self.additive_mask(q.dtype), scale=scale)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for b, n in enumerate(lengths):
            if n == 0:
                dq[b].zero_()
                continue
            row = slice(b, b + 1)
            dq[row], dk[row, :, :n], dv[row, :, :n] = _flash_backward(
                grad_out[row], q[row], k[row, :, :n], v[row, :, :n], out[row], lse[row], 0.0, causal,
                scale=scale)
        return dq, dk, dv

    def prefix_scores(self) -> torch.Tensor:
        """Scaled prefix scores (B, Hkv, G*N, P)."""
        return self.prefix_matmul(self.q, "k", transpose=True).mul_(self.params.softmax_scale)

    def add_prefix_product(self, target: torch.Tensor, x: torch.Tensor, which: str, alpha: float = 1.0):
        """``target (B, Hq, N, D) += alpha * x @ prefix``: inside the GEMM when one prefix serves every
        row and the head-major layout of ``target`` is a view of it, else one extra pass."""
        if not self.per_row() and self.prefix_index is None:
            try:
                view = target.view(self.B, self.Hkv, self.G * self.N, self.D).transpose(0, 1).view(
                    self.Hkv, -1, self.D)
            except RuntimeError:
                view = None
            if view is not None:
                pre = (self.prefix_k if which == "k" else self.prefix_v)[0]
                view.baddbmm_(x.transpose(0, 1).reshape(self.Hkv, -1, self.P), pre, alpha=alpha)
                return
        target.add_(self.prefix_matmul(x, which, transpose=False).reshape(target.shape), alpha=alpha)

    def fused_forward(self, q, k, v):
        """(output, merged LSE, the prefix probabilities or None without a prefix)."""
        scores = self.prefix_scores() if self.P else None
        out, lse = self.token_forward(q, k, v)
        if scores is None:
            return out, lse, None
        lse_tokens = lse
        lse = torch.logaddexp(lse_tokens, torch.logsumexp(scores, -1).reshape(lse.shape))
        out = out.to(self.ct).mul_(torch.exp(lse_tokens - lse).unsqueeze(-1))
        probs = scores.sub_(lse.reshape(*scores.shape[:3], 1)).exp_()
        self.add_prefix_product(out, probs, "v")
        return out, lse, probs

    def fused_backward(self, grad_out, q, k, v, out, lse, needs, probs=None):
        need_q, need_k, need_v, need_pk, need_pv = needs
        dq = dk = dv = None
        if need_q or need_k or need_v:
            dq, dk, dv = self.token_backward(grad_out, q, k, v, out, lse)
            dq = dq.to(self.ct)
        dpk = dpv = None
        if self.P:
            dpk, dpv = self.prefix_backward(grad_out, out, lse, dq if need_q else None, need_pk, need_pv, probs)
        elif need_pk or need_pv:
            dpk, dpv = torch.zeros_like(self.prefix_k), torch.zeros_like(self.prefix_v)
        return dq, dk, dv, dpk, dpv

    def prefix_backward(self, grad_out, out, lse, dq, need_pk, need_pv, probs=None):
        """Adds the prefix part's dQ into ``dq``; returns the batch-reduced prefix gradients.
        ``probs``: the forward's prefix probabilities, recomputed when not kept."""
        do, delta = self.output_gradient(grad_out, out)
        if probs is None:  # with a prefix, lse is finite
            probs = self.prefix_scores().sub_(lse.reshape(*delta.shape)).exp_()
        dpv = self.prefix_grad(probs, do, "v") if need_pv else None
        # dS / softmax_scale; the scale is applied to the two (smaller) products
        ds = self.prefix_matmul(do, "v", transpose=True).sub_(delta).mul_(probs)
        scale = self.params.softmax_scale
        dpk = self.prefix_grad(ds, self.q, "k").mul_(scale) if need_pk else None
        if dq is not None:
            self.add_prefix_product(dq, ds, "k", alpha=scale)
        return dpk, dpv


class CascadeBackend(Backend):
    name = "cascade"
    devices = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    head_dims = "any"
    paths = ("tokens through aten._scaled_dot_product_flash_attention_for_cpu (per row over the real tokens "
             "when right-padded), prefix as GEMMs, merged by LSE; with attention dropout or an LSE gradient "
             "(the flash kernel has neither) the materialized path with platform-RNG dropout masks")
    # CPU GEMM reductions give the same bits on every run, so the prefix gradient is deterministic.
    features = frozenset({"causal", "key_padding_mask", "bank", "gqa", "dropout", "prefix_dropout",
                          "deterministic_prefix_grad"})

    def forward(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params):
        return self.forward_saving(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params)[:2]

    def forward_saving(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params):
        if params.dropout_p > 0:
            call = Materialized(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params,
                                masks=PlatformMasks)
            return call.forward(q)
        call = _Fused(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params, masks=PlatformMasks)
        out, lse, probs = call.fused_forward(q, k, v)
        if out.dtype != q.dtype or out.stride() != q.stride():
            out = torch.empty_like(q).copy_(out)
        # the prefix probabilities (B, Hkv, G*N, P) are kept: backward need not recompute them
        return out, lse.to(lse_dtype(q.dtype)).contiguous(), None if probs is None else (probs,)

    def backward(self, grad_out, grad_lse, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index,
                 out, lse, params: Params, needs, saved=None):
        materialized = params.dropout_p > 0  # how the forward ran, so what ``saved`` holds
        if materialized or grad_lse is not None:  # the fused backward takes no LSE cotangent
            call = Materialized(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params,
                                masks=PlatformMasks)
            grads = call.backward(grad_out, grad_lse, out, lse, needs, probs=saved if materialized else None)
        else:
            call = _Fused(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params,
                          masks=PlatformMasks)
            grads = call.fused_backward(grad_out, q, k, v, out, lse, needs, saved[0] if saved else None)
        return tuple(g.to(x.dtype) if need else None
                     for g, x, need in zip(grads, (q, k, v, prefix_k, prefix_v), needs))


BACKEND = CascadeBackend()
