"""Pure-PyTorch backend: the kernels' algorithm written with tensor ops, for any device.

It follows the kernels step for step (the scores of both key groups normalized by one log-sum-exp;
backward from the saved output and LSE), so it doubles as their readable specification. The prefix is
never copied per row: the rows that share a prefix entry are laid out head-major as one long
``(Hkv, rows * G * N, D)`` problem against the ``(Hkv, P, D)`` prefix, so every prefix product,
including the gradient's sum over the batch, is a single batched matmul. Per-row prefix dropout makes
each row's prefix different; then the effective prefixes ``(B, Hkv, P, D)`` are formed once (the mask
alone is that size) and the products run batched over the rows.

It materializes the ``(B, Hkv, G * N, P + N)`` scores in one buffer (prefix columns first), which the
GPU kernels never do. :class:`Materialized` is parametrized by where dropout masks come from: the
counter hash every kernel backend shares (this backend), or the platform RNG (the flash backend's
materialized path, see ``flash.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import dropout as _dropout
from .base import Backend, Params, lse_dtype


def _head_major(x: torch.Tensor) -> torch.Tensor:
    """(b, Hkv, M, X) -> (Hkv, b * M, X): rows sharing a prefix become one sequence per kv head."""
    b, h, m, d = x.shape
    return x.transpose(0, 1).reshape(h, b * m, d)


def _batch_major(x: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of :func:`_head_major`."""
    h, bm, d = x.shape
    return x.reshape(h, b, bm // b, d).transpose(0, 1)


class HashMasks:
    """Dropout masks from the counter hash (:mod:`ptv2_kernels.dropout`): equal across backends."""

    attention = staticmethod(_dropout.attention_keep)
    prefix = staticmethod(_dropout.prefix_keep)


class PlatformMasks:
    """Dropout masks from the device's own RNG, seeded by the op's seed: one pass, not bit-equal to
    the hash masks."""

    attention = staticmethod(_dropout.platform_attention_keep)
    prefix = staticmethod(_dropout.platform_prefix_keep)


class Materialized:
    """One call's tensors in the compute dtype, in the grouped-query layout ``(B, Hkv, G * N, ...)``."""

    def __init__(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params,
                 masks=HashMasks):
        self.params, self.masks = params, masks
        self.B, self.Hq, self.N, self.D = q.shape
        self.T, self.Hkv, self.P, _ = prefix_k.shape
        self.G = self.Hq // self.Hkv
        self.ct = lse_dtype(q.dtype)
        q, k, v, prefix_k, prefix_v = (x if x.dtype == self.ct else x.to(self.ct)
                                       for x in (q, k, v, prefix_k, prefix_v))
        self.q = q.reshape(self.B, self.Hkv, self.G * self.N, self.D)
        self.k, self.v, self.prefix_k, self.prefix_v = k, v, prefix_k, prefix_v
        self.prefix_index = prefix_index
        if key_padding_mask is not None and key_padding_mask.device.type == "cpu" and bool(key_padding_mask.all()):
            key_padding_mask = None  # nothing padded (a free check on the CPU): no masking passes
        self.key_padding_mask = key_padding_mask
        self._rows = self._keep = None
        self._dense = {}

    # ---- the prefix each row reads ---------------------------------------------------------------

    def groups(self):
        """(rows, entry) for each bank entry in use; rows None means the whole batch."""
        if self.prefix_index is None:
            return [(None, 0)]
        entries = torch.unique(self.prefix_index)
        if entries.numel() == 1:
            return [(None, int(entries))]
        return [((self.prefix_index == t).nonzero().flatten(), int(t)) for t in entries]

    def per_row(self) -> bool:
        return self.params.prefix_dropout_p > 0

    def row_prefixes(self):
        """With prefix dropout: every row's effective prefix keys and values ``(B, Hkv, P, D)``, their
        scaled keep multipliers and each row's bank entry."""
        if self._rows is None:
            p = self.params.prefix_dropout_p
            index = self.prefix_index if self.prefix_index is not None else torch.zeros(
                self.B, dtype=torch.int64, device=self.q.device)
            keeps = [self.masks.prefix(self.params.seed, stream, p, self.B, self.Hkv, self.P, self.D,
                                       self.q.device).to(self.ct).mul_(1.0 / (1.0 - p))
                     for stream in (_dropout.STREAM_PREFIX_K, _dropout.STREAM_PREFIX_V)]
            self._rows = (self.prefix_k[index] * keeps[0], self.prefix_v[index] * keeps[1], keeps, index)
        return self._rows

    def prefix_matmul(self, x: torch.Tensor, which: str, transpose: bool) -> torch.Tensor:
        """``x @ prefix`` (or ``@ prefix^T``) with each row's prefix: (B, Hkv, G*N, ·) -> (B, Hkv, G*N, ·)."""
        if self.per_row():
            pre = self.row_prefixes()[0 if which == "k" else 1]
            return torch.matmul(self.dense(x), pre.transpose(-1, -2) if transpose else pre)
        base = self.prefix_k if which == "k" else self.prefix_v
        out = None
        for rows, entry in self.groups():
            pre = base[entry].transpose(1, 2) if transpose else base[entry]
            part = x if rows is None else x[rows]
            part = _batch_major(torch.bmm(_head_major(part), pre), part.shape[0])
            if rows is None:
                return part
            if out is None:
                out = x.new_empty(*x.shape[:3], pre.shape[-1])
            out[rows] = part
        return out

    def prefix_grad(self, a: torch.Tensor, b: torch.Tensor, which: str) -> torch.Tensor:
        """``sum over rows of a^T @ b`` per bank entry: (T, Hkv, P, D), through each row's dropout."""
        if self.per_row():
            _, _, keeps, index = self.row_prefixes()
            rows = torch.matmul(a.transpose(-1, -2), self.dense(b)).mul_(keeps[0 if which == "k" else 1])
            return a.new_zeros(self.T, self.Hkv, self.P, self.D).index_add_(0, index, rows)
        grad = a.new_zeros(self.T, self.Hkv, self.P, self.D)
        for rows, entry in self.groups():
            pa, pb = (a, b) if rows is None else (a[rows], b[rows])
            grad[entry] += torch.bmm(_head_major(pa).transpose(1, 2), _head_major(pb))
        return grad

    # ---- scores and probabilities ----------------------------------------------------------------

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` contiguous for the token GEMMs (which fold (B, Hkv) into one batch dim), copied at most
        once per call however many products read it; the prefix products read the original layout."""
        if id(x) not in self._dense:
            self._dense[id(x)] = (x, x.contiguous())  # x kept alive so its id stays unique
        return self._dense[id(x)][1]

    def visible_tokens(self) -> Optional[torch.Tensor]:
        """Bool (B or 1, 1, G*N or 1, N): which token keys each query row sees; None when all."""
        vis = None
        if self.key_padding_mask is not None:
            vis = self.key_padding_mask[:, None, None, :]
        if self.params.causal:
            i = torch.arange(self.N, device=self.q.device)
            causal = (i[None, :] <= i[:, None]).repeat(self.G, 1)[None, None]
            vis = causal if vis is None else vis & causal
        return vis

    def scores(self):
        """Scaled prefix scores (B, Hkv, G*N, P) and token scores (B, Hkv, G*N, N), -inf where hidden.
        Two buffers, not one over [prefix; tokens]: the token GEMMs then read contiguous operands."""
        scale = self.params.softmax_scale
        s_prefix = self.prefix_matmul(self.q, "k", transpose=True).mul_(scale)
        s_tokens = torch.matmul(self.dense(self.q), self.dense(self.k).transpose(-1, -2)).mul_(scale)
        vis = self.visible_tokens()
        if vis is not None:
            s_tokens.masked_fill_(~vis, float("-inf"))
        return s_prefix, s_tokens

    def probabilities(self, lse: torch.Tensor):
        """Softmax probabilities of both key groups from the merged LSE (zeros where it is -inf)."""
        lse = lse.reshape(self.B, self.Hkv, self.G * self.N, 1).to(self.ct)
        lse = lse.masked_fill(torch.isinf(lse), 0.0)
        return tuple(s.sub_(lse).exp_() for s in self.scores())

    def attention_keep(self):
        """Bool keep masks of the prefix (B, Hkv, G*N, P) and token (B, Hkv, G*N, N) probabilities,
        or (None, None) without dropout. The 1 / (1 - p) of the kept ones is applied to the products."""
        p = self.params.dropout_p
        if p == 0:
            return None, None
        if self._keep is None:
            keep = self.masks.attention(self.params.seed, p, self.B, self.Hq, self.N, self.P + self.N,
                                        self.q.device)
            self._keep = keep.reshape(self.B, self.Hkv, self.G * self.N, self.P + self.N)
        return self._keep[..., : self.P], self._keep[..., self.P:]

    @staticmethod
    def _kept(probs: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        return probs if keep is None else probs * keep

    # ---- the two passes --------------------------------------------------------------------------

    def forward(self, out_like: torch.Tensor):
        """(out in ``out_like``'s dtype and layout, lse, the probabilities of both key groups)."""
        s_prefix, s_tokens = self.scores()
        m = s_tokens.amax(-1, keepdim=True) if self.N else None
        if self.P:
            mp = s_prefix.amax(-1, keepdim=True)
            m = mp if m is None else torch.maximum(m, mp)
        m = m.masked_fill_(torch.isinf(m), 0.0)  # a row that sees nothing: exp() never sees inf - inf
        p_prefix, p_tokens = s_prefix.sub_(m).exp_(), s_tokens.sub_(m).exp_()
        total = p_prefix.sum(-1, keepdim=True) + p_tokens.sum(-1, keepdim=True)
        lse = m + torch.log(total)
        inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
        p_prefix.mul_(inv)
        p_tokens.mul_(inv)
        keep_prefix, keep_tokens = self.attention_keep()
        o = torch.matmul(self._kept(p_tokens, keep_tokens), self.dense(self.v))
        if self.P:
            o += self.prefix_matmul(self._kept(p_prefix, keep_prefix), "v", transpose=False)
        o = o.reshape(self.B, self.Hq, self.N, self.D)
        out = torch.empty_like(out_like)
        if out.dtype == o.dtype:  # the dropout scale rides on the copy into q's layout
            torch.mul(o, 1.0 / (1.0 - self.params.dropout_p), out=out)
        else:
            out.copy_(o.mul_(1.0 / (1.0 - self.params.dropout_p)))
        lse = lse.reshape(self.B, self.Hq, self.N).to(lse_dtype(out_like.dtype))
        # the dropout mask, one bool per probability, is cheaper kept than drawn again
        kept = (p_prefix, p_tokens) + (() if self._keep is None else (self._keep,))
        return out, lse, kept

    def output_gradient(self, grad_out, out, grad_lse=None):
        """dO in the grouped-query layout (B, Hkv, G*N, D) and delta = rowsum(dO * O) - dLSE."""
        shape = (self.B, self.Hkv, self.G * self.N)
        do = grad_out.to(self.ct).reshape(*shape, self.D)
        delta = (do * out.to(self.ct).reshape(*shape, self.D)).sum(-1, keepdim=True)
        if grad_lse is not None:
            delta = delta - grad_lse.to(self.ct).reshape(*shape, 1)
        return do, delta

    def backward(self, grad_out, grad_lse, out, lse, needs, probs=None):
        """The five gradients (None where not needed) from the forward's output and LSE; ``probs`` are
        the forward's probabilities when they were kept, else they are recomputed."""
        do, delta = self.output_gradient(grad_out, out, grad_lse)
        if probs is not None:  # the forward's probabilities (and dropout mask, when there was one)
            p_prefix, p_tokens, *keep = probs
            self._keep = keep[0] if keep else None
        else:
            p_prefix, p_tokens = self.probabilities(lse)
        keep_prefix, keep_tokens = self.attention_keep()
        scale = 1.0 / (1.0 - self.params.dropout_p)  # of the kept probabilities
        need_q, need_k, need_v, need_pk, need_pv = needs
        dq = dk = dv = dpk = dpv = None
        if need_v:
            dv = torch.matmul(self._kept(p_tokens, keep_tokens).transpose(-1, -2), self.dense(do)).mul_(scale)
        if need_pv:
            dpv = self.prefix_grad(self._kept(p_prefix, keep_prefix), do, "v").mul_(scale)
        # dS = P * (dropout(dP) - delta) * softmax_scale, with dropout(dP) = dP * keep / (1 - p)
        ds_tokens = self._ds(torch.matmul(self.dense(do), self.dense(self.v).transpose(-1, -2)), keep_tokens,
                             delta, p_tokens, scale)
        ds_prefix = self._ds(self.prefix_matmul(do, "v", transpose=True), keep_prefix, delta, p_prefix, scale)
        if need_q:
            dq = torch.matmul(ds_tokens, self.dense(self.k))
            if self.P:
                dq += self.prefix_matmul(ds_prefix, "k", transpose=False)
            dq = dq.reshape(self.B, self.Hq, self.N, self.D)
        if need_k:
            dk = torch.matmul(ds_tokens.transpose(-1, -2), self.dense(self.q))
        if need_pk:
            dpk = self.prefix_grad(ds_prefix, self.q, "k")
        return dq, dk, dv, dpk, dpv

    def _ds(self, dp, keep, delta, probs, scale):
        if keep is not None:
            dp.mul_(keep)
        return dp.sub_(delta / scale).mul_(probs).mul_(self.params.softmax_scale * scale)


class TorchBackend(Backend):
    name = "torch"
    devices = ("any device PyTorch computes on",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    head_dims = "any"

    def device_reason(self, device: torch.device):
        # Any device PyTorch computes on; meta tensors carry no data.
        return "cannot compute on meta tensors" if device.type == "meta" else None

    def forward(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params):
        call = Materialized(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params)
        return call.forward(q)[:2]  # backward recomputes the probabilities from the LSE

    def backward(self, grad_out, grad_lse, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index,
                 out, lse, params: Params, needs, saved=None):
        call = Materialized(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params)
        grads = call.backward(grad_out, grad_lse, out, lse, needs, probs=saved)
        return tuple(None if g is None else g.to(x.dtype)
                     for g, x in zip(grads, (q, k, v, prefix_k, prefix_v)))


BACKEND = TorchBackend()
