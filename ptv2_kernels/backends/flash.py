"""Flash backend: the CPU's flash-attention kernel over each row's ``[prefix; tokens]``.

The platform's fused attention (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward)
reads each row's keys and values from one tensor, so it cannot read a prefix shared by the batch in
place. Two ways around that were built and measured on the CPU (bench/results/cpu/): the flash kernel
over the tokens plus the prefix part as GEMMs merged by log-sum-exp (the "cascade": three extra passes
over q, dO and O; a median of 1.07x PEFT's expand-and-concatenate route over the grid, 1.45x worst),
and the prefix copied into a ``(B, Hkv, P + N, D)`` K/V for one flash call (one pass over K/V; a median
of 0.99x, 1.10x worst; 0.95x and 1.06x with the workspace and layouts below). This backend does the
second. The joined K/V lives for one call, in a
per-thread workspace reused by every call (no page faults for fresh memory, which made PEFT's ``cat``
cost 1.2-4x our copies): backward builds it again rather than keep it, so the op keeps only its inputs,
output and LSE, where PEFT's route keeps the concatenated K/V of every layer. The forward reads it in
the tokens' layout, the backward head-major, where the kernel mostly runs faster. The prefix gradient is the
prefix columns of dK/dV reduced over the rows that read each bank entry.

A right-padded batch with enough padding runs one call per row over the prefix and that row's real
tokens (the batched call computes every padded key and masks it). Causal attention passes an explicit
``(N, P + N)`` mask: the kernel's own causal flag aligns top-left, which would hide the tokens from the
prefix-shifted diagonal.

The flash kernel has no dropout and takes no LSE cotangent. With attention dropout (training mode) or a
gradient through the returned LSE, the backend runs the torch backend's materialized algorithm
(``Materialized``: ``(B, Hkv, G * N, P + N)`` scores, kept for backward in eager mode) with dropout
masks from the platform RNG seeded by the op's seed: one pass instead of the counter hash's dozens, as
random, but not equal to the masks the torch, Triton and CUDA backends share. Prefix dropout, in either
path, draws the same platform masks, so both paths agree on each row's effective prefix.
"""

from __future__ import annotations

import functools
import threading
from typing import List, Optional

import torch

from .. import dropout as _dropout
from .base import Backend, Params, lse_dtype
from .torch import Materialized, PlatformMasks

# the direct binding: at tiny shapes a third of the host cost of the same call through torch.ops
_flash = torch._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

# At most this many bytes of joined K/V, eager calls without dropout are composed of differentiable ATen
# ops (autograd then keeps the joined K/V, prefix copies included): at such sizes a Python
# autograd.Function's overhead, about 150 us a call, costs more than the copies' memory is worth.
_COMPOSED_BYTES = 64 * 1024

# One flash call per row over its real tokens when the batch's real tokens are at most this fraction of
# B * N and rows have at least _PER_ROW_FROM_N positions. At B = 32 with 30% padding, per-row calls ran
# 0.90-0.96x the batched masked call at N = 128 and 1.02-1.10x at N = 64 (3 of 4 points, P 16/64,
# D 32/64, 1 thread): short rows save too little masked work to pay for 32 calls. The fraction is a
# judgment, not a measured crossover.
_PER_ROW_BELOW = 0.9
_PER_ROW_FROM_N = 128


class _Workspace(threading.local):
    """Memory for the joined keys and values of one flash call at a time, kept per thread and reused.

    The CPU allocator hands large blocks back to the system when freed, so a fresh joined K/V pays a page
    fault for every page it writes: a ``cat`` of the joined K/V took 1.2-4x as long as the same copies into
    memory already mapped. A call's joined K/V never outlives the call (the kernels' outputs are new
    tensors), so one buffer per slot serves every call and layer of a thread; it grows to the largest
    call and is not kept above ``_WORKSPACE_BYTES``.
    """

    def __init__(self):
        self.buffers = {}

    def take(self, slot: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A flat tensor of ``numel`` elements of ``like``'s dtype and device, its contents undefined."""
        if numel * like.element_size() > _WORKSPACE_BYTES:
            return like.new_empty(numel)
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            self.buffers[slot] = None  # the old buffer goes before the new one is allocated
            with torch.inference_mode(False):  # usable inside and outside inference mode alike
                buf = self.buffers[slot] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel]


# Above this many bytes per slot (keys, values) a call's joined K/V is allocated for the call alone: the
# page faults are then small next to the attention, and a thread does not hold that much memory for good.
_WORKSPACE_BYTES = 256 * 1024 * 1024
_WORKSPACE = _Workspace()


class _Joined:
    """One call on the flash path: each row's ``[prefix; tokens]`` K/V and the masks the kernel needs."""

    def __init__(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params):
        self.q, self.k, self.v, self.prefix_k, self.prefix_v = q, k, v, prefix_k, prefix_v
        self.params, self.prefix_index = params, prefix_index
        self.B, self.Hq, self.N, self.D = q.shape
        self.T, self.Hkv, self.P, _ = prefix_k.shape
        if key_padding_mask is not None and bool(key_padding_mask.all()):
            key_padding_mask = None  # nothing padded (a free check on the CPU): the unmasked kernel
        self.key_padding_mask = key_padding_mask
        self._keeps = None

    # ---- what each row reads ---------------------------------------------------------------------

    @functools.cached_property
    def lengths(self) -> Optional[List[int]]:
        """Each row's number of real tokens when the padding is right padding that leaves out enough
        keys to pay for one call per row; None otherwise."""
        mask = self.key_padding_mask
        if mask is None or self.B == 1 or self.N < _PER_ROW_FROM_N:
            return None
        lengths = mask.sum(-1)
        if lengths.sum() > _PER_ROW_BELOW * self.B * self.N:
            return None
        if not torch.equal(mask, torch.arange(self.N, device=mask.device) < lengths[:, None]):
            return None
        return lengths.tolist()

    def keeps(self):
        """With prefix dropout, each row's scaled keep multipliers for the prefix keys and values
        ``(B, Hkv, P, D)`` (the platform masks ``Materialized`` draws too); else None."""
        p = self.params.prefix_dropout_p
        if p == 0:
            return None
        if self._keeps is None:
            self._keeps = [PlatformMasks.prefix(self.params.seed, stream, p, self.B, self.Hkv, self.P, self.D,
                                                self.q.device).to(self.q.dtype).mul_(1.0 / (1.0 - p))
                           for stream in (_dropout.STREAM_PREFIX_K, _dropout.STREAM_PREFIX_V)]
        return self._keeps

    def row_prefix(self, which: str, rows=slice(None)) -> torch.Tensor:
        """The prefix keys or values ``rows`` read: ``(1, Hkv, P, D)`` when every row reads the same,
        else one per row (a bank entry, through the row's dropout)."""
        base = self.prefix_k if which == "k" else self.prefix_v
        keeps = self.keeps()
        if self.prefix_index is None and keeps is None:
            return base
        pre = base[self.prefix_index[rows]] if self.prefix_index is not None else base
        return pre if keeps is None else pre * keeps[0 if which == "k" else 1][rows]

    def joined(self, which: str, rows=slice(None), n: Optional[int] = None, head_major: bool = False):
        """``[prefix; tokens[:n]]`` keys or values of ``rows``, ``(b, Hkv, P + n, D)``, in this thread's
        workspace: head-major memory, or else the tokens' layout. The flash backward ran 4-30% faster on
        head-major memory at each of 9 minilm and bert-base shapes (1 thread); the forward was faster on
        transformers' ``(B, N, H, D)`` token layout at most of them (up to 17%; 14% slower at one)."""
        tokens = self.k if which == "k" else self.v
        if n is not None:  # one row's real tokens
            tokens = tokens[rows, :, :n]
        b, keys = tokens.shape[0], self.P + tokens.shape[2]
        flat = _WORKSPACE.take(which, b * keys * self.Hkv * self.D, tokens)
        if tokens.stride(1) < tokens.stride(2) and not head_major:
            out = flat.view(b, keys, self.Hkv, self.D).transpose(1, 2)
        else:
            out = flat.view(b, self.Hkv, keys, self.D)
        with torch.no_grad():  # the workspace outlives the call: it must never join a graph
            out[:, :, : self.P].copy_(self.row_prefix(which, rows))
            out[:, :, self.P:].copy_(tokens)
        return out

    def joined_differentiable(self, which: str) -> torch.Tensor:
        """:meth:`joined` for the whole batch as ops autograd records (fewest nodes: one ``cat``)."""
        tokens, pre = self.k if which == "k" else self.v, self.row_prefix(which)
        return torch.cat((pre if pre.shape[0] == self.B else pre.expand(self.B, -1, -1, -1), tokens), 2)

    def reduce_prefix(self, rows_grad: torch.Tensor, which: str) -> torch.Tensor:
        """(T, Hkv, P, D): the prefix columns' gradient ``(B, Hkv, P, D)`` through each row's dropout,
        summed over the rows of each bank entry."""
        keeps = self.keeps()
        if keeps is not None:
            rows_grad = rows_grad * keeps[0 if which == "k" else 1]
        if self.prefix_index is None:
            return rows_grad.sum(0, keepdim=True)
        grad = rows_grad.new_zeros(self.T, self.Hkv, self.P, self.D)
        return grad.index_add_(0, self.prefix_index, rows_grad)

    # ---- masks -----------------------------------------------------------------------------------

    def additive_mask(self, keys: Optional[int] = None) -> Optional[torch.Tensor]:
        """The kernel's additive mask over ``[prefix; tokens[:keys]]`` in q's dtype, None when
        everything is visible: -inf on padding (batched calls only) and above the causal diagonal."""
        n_keys = self.N if keys is None else keys
        mask = None
        if self.params.causal:
            i = torch.arange(self.N, device=self.q.device)
            hidden = i[None, :n_keys] > i[:, None]
            mask = torch.zeros(1, 1, self.N, self.P + n_keys, dtype=self.q.dtype, device=self.q.device)
            mask[..., self.P:].masked_fill_(hidden, float("-inf"))
        if keys is None and self.key_padding_mask is not None:
            pad = torch.zeros(self.B, 1, 1, self.P + self.N, dtype=self.q.dtype, device=self.q.device)
            pad[..., self.P:].masked_fill_(~self.key_padding_mask[:, None, None, :], float("-inf"))
            mask = pad if mask is None else mask + pad
        return mask

    def sees_nothing(self) -> Optional[torch.Tensor]:
        """Bool (B, 1, N or 1): query rows with no visible key (only without a prefix; the kernel gives
        them zeros and lse 0, the op's contract -inf)."""
        mask = self.key_padding_mask
        if self.P or mask is None:
            return None
        if self.params.causal:
            return (mask.cumsum(-1) == 0)[:, None, :]
        return ~mask.any(-1)[:, None, None]

    # ---- the two passes --------------------------------------------------------------------------

    def forward(self):
        """(out, lse) with lse -inf where a row sees nothing."""
        scale, ct = self.params.softmax_scale, lse_dtype(self.q.dtype)
        if self.lengths is None:
            out, lse = _flash(self.q, self.joined("k"), self.joined("v"), attn_mask=self.additive_mask(),
                              scale=scale)
            lse = lse.to(ct)
            empty = self.sees_nothing()
            return out, (lse if empty is None else lse.masked_fill(empty, float("-inf")))
        out = torch.empty_like(self.q)
        lse = self.q.new_full((self.B, self.Hq, self.N), float("-inf"), dtype=ct)
        for b, n in enumerate(self.lengths):
            if n + self.P == 0:
                out[b].zero_()
                continue
            row = slice(b, b + 1)
            out[row], lse[row] = _flash(self.q[row], self.joined("k", row, n), self.joined("v", row, n),
                                        attn_mask=self.additive_mask(n), scale=scale)
        return out, lse

    def backward(self, grad_out, out, lse):
        """dq, dk, dv and the rows' prefix gradients (B, Hkv, P, D) for keys and values."""
        scale = self.params.softmax_scale
        if self.lengths is None:
            # rows that see nothing (only without a prefix) have lse -inf: +inf makes their
            # probabilities 0, not NaN
            safe = lse if self.P else lse.masked_fill(torch.isinf(lse), float("inf"))
            dq, dk, dv = _flash_backward(grad_out, self.q, self.joined("k", head_major=True),
                                         self.joined("v", head_major=True), out, safe, 0.0, False,
                                         attn_mask=self.additive_mask(), scale=scale)
            return dq, dk[:, :, self.P:], dv[:, :, self.P:], dk[:, :, : self.P], dv[:, :, : self.P]
        dq, dk, dv = torch.empty_like(self.q), torch.zeros_like(self.k), torch.zeros_like(self.v)
        dpk = self.k.new_zeros(self.B, self.Hkv, self.P, self.D)
        dpv = torch.zeros_like(dpk)
        for b, n in enumerate(self.lengths):
            if n + self.P == 0:
                dq[b].zero_()
                continue
            row = slice(b, b + 1)
            dq[row], dkj, dvj = _flash_backward(
                grad_out[row], self.q[row], self.joined("k", row, n, head_major=True),
                self.joined("v", row, n, head_major=True), out[row], lse[row], 0.0, False,
                attn_mask=self.additive_mask(n), scale=scale)
            dk[row, :, :n], dv[row, :, :n] = dkj[:, :, self.P:], dvj[:, :, self.P:]
            dpk[row], dpv[row] = dkj[:, :, : self.P], dvj[:, :, : self.P]
        return dq, dk, dv, dpk, dpv


def _prefix_only_backward(call: Materialized, grad_out, out, lse, need_pk, need_pv):
    """The prefix gradients alone, as GEMMs from the probabilities (no flash backward): the first
    layer's q, k, v come from frozen embeddings and need none."""
    do, delta = call.output_gradient(grad_out, out)
    scale = call.params.softmax_scale
    probs = call.prefix_matmul(call.q, "k", transpose=True).mul_(scale).sub_(lse.reshape(delta.shape)).exp_()
    dpv = call.prefix_grad(probs, do, "v") if need_pv else None
    ds = call.prefix_matmul(do, "v", transpose=True).sub_(delta).mul_(probs)
    dpk = call.prefix_grad(ds, call.q, "k").mul_(scale) if need_pk else None
    return None, None, None, dpk, dpv


class FlashBackend(Backend):
    name = "flash"
    devices = ("cpu",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    head_dims = "any"
    paths = ("aten._scaled_dot_product_flash_attention_for_cpu over each row's [prefix; tokens] (one call per "
             "row over its real tokens when right-padded); with attention dropout or an LSE gradient (the "
             "flash kernel has neither) the materialized path with platform-RNG dropout masks")
    # CPU reductions give the same bits on every run, so the prefix gradient is deterministic.
    features = frozenset({"causal", "key_padding_mask", "bank", "gqa", "dropout", "prefix_dropout",
                          "deterministic_prefix_grad"})

    def forward(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params):
        return self.forward_saving(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params)[:2]

    def composed(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params):
        if params.dropout_p > 0 or params.prefix_dropout_p > 0:
            return None
        B, Hkv, N, D = k.shape
        if 2 * B * Hkv * (prefix_k.shape[2] + N) * D * k.element_size() > _COMPOSED_BYTES:
            return None
        call = _Joined(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params)
        return _flash(q, call.joined_differentiable("k"), call.joined_differentiable("v"),
                      attn_mask=call.additive_mask(), scale=params.softmax_scale)[0]

    def forward_saving(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params):
        if params.dropout_p > 0:
            call = Materialized(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params,
                                masks=PlatformMasks)
            return call.forward(q)
        out, lse = _Joined(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params).forward()
        if out.dtype != q.dtype or out.stride() != q.stride():
            out = torch.empty_like(q).copy_(out)
        return out, lse.to(lse_dtype(q.dtype)).contiguous(), None  # the fake op promises a contiguous LSE

    def backward(self, grad_out, grad_lse, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index,
                 out, lse, params: Params, needs, saved=None):
        need_q, need_k, need_v, need_pk, need_pv = needs
        args = (q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params)
        materialized = params.dropout_p > 0  # how the forward ran, so what ``saved`` holds
        if materialized or grad_lse is not None:  # the flash backward takes no LSE cotangent
            call = Materialized(*args, masks=PlatformMasks)
            grads = call.backward(grad_out, grad_lse, out, lse, needs, probs=saved if materialized else None)
        elif not (need_q or need_k or need_v) and prefix_k.shape[2]:
            grads = _prefix_only_backward(Materialized(*args, masks=PlatformMasks), grad_out, out, lse,
                                          need_pk, need_pv)
        else:
            call = _Joined(*args)
            dq, dk, dv, dpk, dpv = call.backward(grad_out, out, lse)
            grads = (dq, dk, dv, call.reduce_prefix(dpk, "k") if need_pk else None,
                     call.reduce_prefix(dpv, "v") if need_pv else None)
        return tuple(g.to(x.dtype) if need else None
                     for g, x, need in zip(grads, (q, k, v, prefix_k, prefix_v), needs))


BACKEND = FlashBackend()
