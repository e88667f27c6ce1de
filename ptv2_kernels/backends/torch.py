"""Pure-PyTorch backend: the kernels' algorithm written with tensor ops, for any device.

It follows the kernels step for step (prefix scores and token scores kept apart, merged by
log-sum-exp; backward from the saved output and LSE), so it doubles as their readable specification.
The prefix is never copied per row: the rows that share a prefix entry are laid out head-major as one
long ``(Hkv, rows * G * N, D)`` problem against the ``(Hkv, P, D)`` prefix, so every prefix product,
including the gradient's sum over the batch, is a single batched matmul. Only per-row prefix dropout
makes each row's prefix different; then rows are visited one at a time with a ``(Hkv, P, D)`` prefix.
It does materialize the ``(B, Hq, N, P + N)`` probabilities, which the GPU kernels never do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import dropout as _dropout
from .base import Backend, Params, lse_dtype


def _head_major(x: torch.Tensor) -> torch.Tensor:
    """(b, Hkv, M, X) -> (Hkv, b * M, X): rows sharing a prefix become one sequence per kv head."""
    b, h, m, d = x.shape
    return x.permute(1, 0, 2, 3).reshape(h, b * m, d)


def _batch_major(x: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of :func:`_head_major`."""
    h, bm, d = x.shape
    return x.reshape(h, b, bm // b, d).permute(1, 0, 2, 3)


@dataclass
class _Group:
    rows: object  # slice or int64 index tensor into the batch
    count: int
    entry: int  # bank entry (task)
    row: Optional[int]  # the batch row when the group is one row with its own prefix dropout


def _groups(batch: int, prefix_index: Optional[torch.Tensor], per_row: bool) -> list:
    """Sets of batch rows that read the same effective prefix."""
    if per_row:
        entries = [0] * batch if prefix_index is None else prefix_index.tolist()
        return [_Group(slice(b, b + 1), 1, t, b) for b, t in enumerate(entries)]
    if prefix_index is None:
        return [_Group(slice(None), batch, 0, None)]
    groups = []
    for t in torch.unique(prefix_index).tolist():
        rows = (prefix_index == t).nonzero().flatten()
        groups.append(_Group(rows, rows.numel(), t, None))
    return groups


class _Problem:
    """One call's tensors in the compute dtype, grouped-query layout ``(B, Hkv, G * N, ...)``."""

    def __init__(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params):
        self.params = params
        self.B, self.Hq, self.N, self.D = q.shape
        self.T, self.Hkv, self.P, _ = prefix_k.shape
        self.G = self.Hq // self.Hkv
        ct = lse_dtype(q.dtype)
        self.ct = ct
        self.q = q.to(ct).reshape(self.B, self.Hkv, self.G * self.N, self.D)
        self.k, self.v = k.to(ct), v.to(ct)
        self.prefix_k, self.prefix_v = prefix_k.to(ct), prefix_v.to(ct)
        self.groups = _groups(self.B, prefix_index, params.prefix_dropout_p > 0)
        self.key_padding_mask = key_padding_mask

    def prefix(self, group: _Group, which: str) -> torch.Tensor:
        """The ``(Hkv, P, D)`` prefix keys or values that ``group`` reads, with its dropout applied."""
        base = (self.prefix_k if which == "k" else self.prefix_v)[group.entry]
        keep = self.prefix_keep(group, which)
        return base if keep is None else base * keep

    def prefix_matmul(self, x: torch.Tensor, which: str, transpose: bool) -> torch.Tensor:
        """Per group, ``x[rows] @ prefix`` (or ``@ prefix^T``): (B, Hkv, G*N, ·) -> (B, Hkv, G*N, ·)."""
        out_dim = self.P if transpose else self.D
        out = x.new_empty(self.B, self.Hkv, self.G * self.N, out_dim)
        for g in self.groups:
            pre = self.prefix(g, which)
            pre = pre.transpose(1, 2) if transpose else pre
            out[g.rows] = _batch_major(torch.bmm(_head_major(x[g.rows]), pre), g.count)
        return out

    def prefix_grad(self, a: torch.Tensor, b: torch.Tensor, which: str) -> torch.Tensor:
        """``sum over rows of a[rows]^T @ b[rows]`` per bank entry: (T, Hkv, P, D), dropout-masked."""
        grad = a.new_zeros(self.T, self.Hkv, self.P, self.D)
        for g in self.groups:
            part = torch.bmm(_head_major(a[g.rows]).transpose(1, 2), _head_major(b[g.rows]))
            keep = self.prefix_keep(g, which)
            grad[g.entry] += part if keep is None else part * keep
        return grad

    def prefix_keep(self, group: _Group, which: str) -> Optional[torch.Tensor]:
        """Row ``group.row``'s prefix-dropout multipliers (Hkv, P, D) (keep / (1 - p)), or None."""
        p = self.params.prefix_dropout_p
        if group.row is None or p == 0:
            return None
        stream = _dropout.STREAM_PREFIX_K if which == "k" else _dropout.STREAM_PREFIX_V
        row = torch.tensor([group.row], device=self.q.device)
        keep = _dropout.prefix_keep(self.params.seed, stream, p, self.B, self.Hkv, self.P, self.D,
                                    self.q.device, rows=row)[0]
        return keep.to(self.ct) / (1.0 - p)

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
        """Scaled prefix scores (B, Hkv, G*N, P) and token scores (B, Hkv, G*N, N), -inf where hidden."""
        scale = self.params.softmax_scale
        s_prefix = self.prefix_matmul(self.q, "k", transpose=True) * scale
        s_tokens = torch.matmul(self.q, self.k.transpose(-1, -2)) * scale
        vis = self.visible_tokens()
        if vis is not None:
            s_tokens = s_tokens.masked_fill(~vis, float("-inf"))
        return s_prefix, s_tokens

    def probabilities(self, lse: torch.Tensor):
        """Softmax probabilities of both key groups from the merged LSE (zeros where it is -inf)."""
        s_prefix, s_tokens = self.scores()
        lse = lse.reshape(self.B, self.Hkv, self.G * self.N, 1).to(self.ct)
        lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        return torch.exp(s_prefix - lse), torch.exp(s_tokens - lse)

    def attention_keep(self):
        """Attention-dropout multipliers for both key groups, or (None, None) without dropout."""
        p = self.params.dropout_p
        if p == 0:
            return None, None
        keep = _dropout.attention_keep(self.params.seed, p, self.B, self.Hq, self.N, self.P + self.N,
                                       self.q.device)
        keep = keep.reshape(self.B, self.Hkv, self.G * self.N, self.P + self.N).to(self.ct) / (1 - p)
        return keep[..., : self.P], keep[..., self.P:]


def _row_max(s_prefix: torch.Tensor, s_tokens: torch.Tensor) -> torch.Tensor:
    """Max over both key groups per row, 0 where a row sees nothing (so exp() never sees inf - inf)."""
    m = s_tokens.amax(-1, keepdim=True) if s_tokens.shape[-1] else None
    if s_prefix.shape[-1]:
        mp = s_prefix.amax(-1, keepdim=True)
        m = mp if m is None else torch.maximum(m, mp)
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


class TorchBackend(Backend):
    name = "torch"
    devices = ("any device PyTorch computes on",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    head_dims = "any"

    def device_reason(self, device: torch.device):
        # Any device PyTorch computes on; meta tensors carry no data.
        return "cannot compute on meta tensors" if device.type == "meta" else None

    def forward(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params):
        pb = _Problem(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params)
        s_prefix, s_tokens = pb.scores()
        m = _row_max(s_prefix, s_tokens)
        p_prefix, p_tokens = torch.exp(s_prefix - m), torch.exp(s_tokens - m)
        total = p_prefix.sum(-1, keepdim=True) + p_tokens.sum(-1, keepdim=True)
        lse = m + torch.log(total)
        inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
        p_prefix, p_tokens = p_prefix * inv, p_tokens * inv
        keep_prefix, keep_tokens = pb.attention_keep()
        if keep_prefix is not None:
            p_prefix, p_tokens = p_prefix * keep_prefix, p_tokens * keep_tokens
        o = pb.prefix_matmul(p_prefix, "v", transpose=False) + torch.matmul(p_tokens, pb.v)
        out = torch.empty_like(q)
        out.copy_(o.reshape(pb.B, pb.Hq, pb.N, pb.D))
        return out, lse.reshape(pb.B, pb.Hq, pb.N).to(lse_dtype(q.dtype))

    def backward(self, grad_out, grad_lse, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index,
                 out, lse, params: Params, needs):
        pb = _Problem(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params)
        shape = (pb.B, pb.Hkv, pb.G * pb.N)
        do = grad_out.to(pb.ct).reshape(*shape, pb.D)
        delta = (do * out.to(pb.ct).reshape(*shape, pb.D)).sum(-1, keepdim=True)
        if grad_lse is not None:
            delta = delta - grad_lse.to(pb.ct).reshape(*shape, 1)
        p_prefix, p_tokens = pb.probabilities(lse)
        keep_prefix, keep_tokens = pb.attention_keep()
        dp_prefix = pb.prefix_matmul(do, "v", transpose=True)
        dp_tokens = torch.matmul(do, pb.v.transpose(-1, -2))
        if keep_prefix is not None:
            dp_prefix, dp_tokens = dp_prefix * keep_prefix, dp_tokens * keep_tokens
            a_prefix, a_tokens = p_prefix * keep_prefix, p_tokens * keep_tokens
        else:
            a_prefix, a_tokens = p_prefix, p_tokens
        scale = params.softmax_scale
        ds_prefix = p_prefix * (dp_prefix - delta) * scale
        ds_tokens = p_tokens * (dp_tokens - delta) * scale
        need_q, need_k, need_v, need_pk, need_pv = needs
        dq = dk = dv = dpk = dpv = None
        if need_q:
            dq = pb.prefix_matmul(ds_prefix, "k", transpose=False) + torch.matmul(ds_tokens, pb.k)
            dq = dq.reshape(pb.B, pb.Hq, pb.N, pb.D).to(q.dtype)
        if need_k:
            dk = torch.matmul(ds_tokens.transpose(-1, -2), pb.q).to(k.dtype)
        if need_v:
            dv = torch.matmul(a_tokens.transpose(-1, -2), do).to(v.dtype)
        if need_pk:
            dpk = pb.prefix_grad(ds_prefix, pb.q, "k").to(prefix_k.dtype)
        if need_pv:
            dpv = pb.prefix_grad(a_prefix, do, "v").to(prefix_v.dtype)
        return dq, dk, dv, dpk, dpv


BACKEND = TorchBackend()
