"""Host side of the Triton backend: argument preparation, autotuned kernel handles and launches."""

from __future__ import annotations

import functools

import torch
import triton

from ... import dropout as _drop
from . import backward as _bwd
from . import configs as _cfg
from . import forward as _fwd
from ._hash import signed32

LOG2E = 1.4426950408889634

DPREFIX_CHUNKS = None  # tests force the number of dprefix chunks here (None: fill the device)

_FLAGS = ["CAUSAL", "HAS_MASK", "HAS_BANK", "DROPOUT", "PREFIX_DROPOUT"]


@functools.lru_cache(maxsize=None)
def kernels():
    """(kernel, fixed blocks) per kind: autotuned on GPUs, one small config under the interpreter."""
    raw = {"fwd": _fwd._fwd_kernel, "dkdv": _bwd._bwd_dkdv_kernel, "dq": _bwd._bwd_dq_kernel,
           "dprefix": _bwd._bwd_dprefix_kernel}
    if _cfg.interpreting():
        out = {kind: (fn, dict(_cfg.INTERPRET_BLOCKS[kind])) for kind, fn in raw.items()}
        out["dprefix_det"] = (raw["dprefix"], dict(_cfg.INTERPRET_BLOCKS["dprefix"]))
        return out
    # the shape (and the feature flags) a config is chosen for; tensor dtypes are added by triton.
    # SIZE_BUCKET stands for the sequence length (rows for dprefix) rounded up to a power of two, so
    # training with dynamic padding tunes once per bucket, not once per distinct batch length.
    keys = {
        "fwd": ["SIZE_BUCKET", "P", "GROUP", "BLOCK_D"] + _FLAGS,
        "dkdv": ["SIZE_BUCKET", "P", "GROUP", "BLOCK_D", "CAUSAL", "HAS_MASK", "DROPOUT"],
        "dq": ["SIZE_BUCKET", "P", "GROUP", "BLOCK_D"] + _FLAGS,
        "dprefix": ["SIZE_BUCKET", "P", "GROUP", "BLOCK_D", "HAS_BANK", "DROPOUT", "PREFIX_DROPOUT"],
    }
    out = {}
    for kind, fn in raw.items():
        tuned = triton.autotune(
            configs=_cfg.CONFIGS[kind], key=keys[kind],
            prune_configs_by={"early_config_prune": _cfg.make_prune(kind)},
            # the prefix kernel accumulates with atomics: every trial starts from zeros
            reset_to_zero=["DPK", "DPV"] if kind == "dprefix" else None,
        )(fn)
        out[kind] = (tuned, {})
    # the deterministic prefix gradient is never timed: its blocks come per call from
    # configs.untimed_dprefix_config (empty here)
    out["dprefix_det"] = (raw["dprefix"], {})
    return out


def size_bucket(n: int) -> int:
    """The autotuning key of a size: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(max(1, int(n))))


def _last_contig(x):
    return x if x is None or x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


class _Common:
    """Derived sizes, strides and dropout words shared by forward and backward."""

    def __init__(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params):
        self.q, self.k, self.v = _last_contig(q), _last_contig(k), _last_contig(v)
        self.B, self.Hq, self.N, self.D = q.shape
        self.Hkv = k.shape[1]
        self.T, _, self.P, _ = prefix_k.shape
        self.G = self.Hq // self.Hkv
        # a P = 0 bank has no storage worth pointing at: point at q, the loops never run
        self.pk = _last_contig(prefix_k) if self.P > 0 else self.q
        self.pv = _last_contig(prefix_v) if self.P > 0 else self.q
        self.pk_strides = self.pk.stride()[:3] if self.P > 0 else (0, 0, 0)
        self.pv_strides = self.pv.stride()[:3] if self.P > 0 else (0, 0, 0)
        self.has_mask = key_padding_mask is not None
        if self.has_mask:
            m = key_padding_mask
            m = m if m.dtype == torch.uint8 else m.view(torch.uint8) if m.dtype == torch.bool else (m != 0).view(torch.uint8)
            self.mask, self.s_mb = (m if m.stride(-1) == 1 else m.contiguous()), None
            self.s_mb = self.mask.stride(0)
        else:
            self.mask, self.s_mb = self.q, 0
        self.has_bank = prefix_index is not None
        self.pidx = prefix_index.to(torch.int64).contiguous() if self.has_bank else self.q
        self.params = params
        self.causal = bool(params.causal)
        self.scale = float(params.softmax_scale)
        self.qk_scale = self.scale * LOG2E  # scores go straight to the log2 domain of exp2
        self.dropout = params.dropout_p > 0
        self.prefix_dropout = params.prefix_dropout_p > 0 and self.P > 0
        seed = int(params.seed) if (self.dropout or self.prefix_dropout) else 0
        self.drop_key = signed32(_drop.stream_key(seed, _drop.STREAM_ATTENTION))
        self.drop_thr = _drop.drop_threshold(params.dropout_p) if self.dropout else 0
        self.drop_scale = 1.0 / (1.0 - params.dropout_p) if params.dropout_p < 1 else 0.0
        self.pk_key = signed32(_drop.stream_key(seed, _drop.STREAM_PREFIX_K))
        self.pv_key = signed32(_drop.stream_key(seed, _drop.STREAM_PREFIX_V))
        self.pdrop_thr = _drop.drop_threshold(params.prefix_dropout_p) if self.prefix_dropout else 0
        self.pdrop_scale = 1.0 / (1.0 - params.prefix_dropout_p) if params.prefix_dropout_p < 1 else 0.0
        self.block_d = _cfg.block_d(self.D)
        self.n_bucket = size_bucket(self.N)
        self.prec = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays exact: no TF32 rounding
        self.flags = dict(CAUSAL=self.causal, HAS_MASK=self.has_mask, HAS_BANK=self.has_bank,
                          DROPOUT=self.dropout, PREFIX_DROPOUT=self.prefix_dropout)


def forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params):
    c = _Common(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params)
    out = torch.empty_like(q)
    lse = torch.empty((c.B, c.Hq, c.N), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    o = out if out.stride(-1) == 1 else torch.empty_like(q, memory_format=torch.contiguous_format)
    fn, blocks = kernels()["fwd"]
    grid = lambda META: (triton.cdiv(c.N, META["BLOCK_M"]), c.Hq, c.B)
    fn[grid](
        c.q, c.k, c.v, c.pk, c.pv, c.pidx, c.mask, o, lse,
        *c.q.stride()[:3], *c.k.stride()[:3], *c.v.stride()[:3],
        *c.pk_strides, *c.pv_strides, c.s_mb, *o.stride()[:3],
        c.Hq, c.Hkv, c.N, c.P, c.D, c.G, c.qk_scale,
        c.drop_key, c.drop_thr, c.drop_scale, c.pk_key, c.pv_key, c.pdrop_thr, c.pdrop_scale, c.n_bucket,
        PREC=c.prec, BLOCK_D=c.block_d, **c.flags, **blocks,
    )
    if o is not out:
        out.copy_(o)
    return out, lse


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: a couple of chunks exercise the cross-chunk reduction


def dprefix_grid(c, block_p, block_m, device):
    """(prefix blocks, kv heads, chunks) of the dprefix kernel. About 3 waves of programs keep every SM
    busy, so the chunk count is bounded by the device, never by the batch size."""
    n_pb = triton.cdiv(c.P, block_p)
    units = c.B * c.G * triton.cdiv(c.N, block_m)
    waves = 3 if device.type == "cuda" else 2
    chunks = max(1, min(units, triton.cdiv(waves * _num_sms(device), n_pb * c.Hkv)))
    return n_pb, c.Hkv, int(DPREFIX_CHUNKS) if DPREFIX_CHUNKS else chunks


def backward(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index,
             out, lse, params, needs):
    c = _Common(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params)
    need_q, need_k, need_v, need_pk, need_pv = (bool(x) for x in needs)
    dq = torch.empty_like(q) if need_q else None
    dk = torch.empty_like(k) if (need_k or need_v) else None
    dv = torch.empty_like(v) if (need_k or need_v) else None
    dpk = dpv = None
    if not any(needs):
        return None, None, None, None, None
    if c.B * c.Hq * c.N == 0 or c.D == 0:
        z = lambda x, n: torch.zeros_like(x) if n else None
        return z(q, need_q), z(k, need_k), z(v, need_v), z(prefix_k, need_pk), z(prefix_v, need_pv)
    do = _last_contig(grad_out)
    o = _last_contig(out)
    delta = torch.empty((c.B, c.Hq, c.N), device=q.device, dtype=torch.float32)
    lse2 = torch.empty_like(delta)
    glse = grad_lse.contiguous() if grad_lse is not None else delta
    bm = 16 if _cfg.interpreting() else _cfg.PREPROCESS_BLOCK_M
    _bwd._bwd_preprocess[(triton.cdiv(c.N, bm), c.Hq, c.B)](
        o, do, glse, lse.contiguous(), delta, lse2, *o.stride()[:3], *do.stride()[:3], c.Hq, c.N, c.D,
        HAS_GLSE=grad_lse is not None, BLOCK_M=bm, BLOCK_D=c.block_d)
    ks = kernels()
    drop_args = (c.drop_key, c.drop_thr, c.drop_scale)
    pdrop_args = (c.pk_key, c.pv_key, c.pdrop_thr, c.pdrop_scale)

    if dk is not None:
        fn, blocks = ks["dkdv"]
        dk_ = dk if dk.stride(-1) == 1 else torch.empty_like(k, memory_format=torch.contiguous_format)
        dv_ = dv if dv.stride(-1) == 1 else torch.empty_like(v, memory_format=torch.contiguous_format)
        grid = lambda META: (triton.cdiv(c.N, META["BLOCK_N"]), c.Hkv, c.B)
        fn[grid](
            c.q, c.k, c.v, do, lse2, delta, c.mask, dk_, dv_,
            *c.q.stride()[:3], *c.k.stride()[:3], *c.v.stride()[:3], *do.stride()[:3], c.s_mb,
            *dk_.stride()[:3], *dv_.stride()[:3],
            c.Hq, c.Hkv, c.N, c.P, c.D, c.G, c.qk_scale, c.scale, *drop_args, c.n_bucket,
            CAUSAL=c.causal, HAS_MASK=c.has_mask, DROPOUT=c.dropout, PREC=c.prec, BLOCK_D=c.block_d,
            **blocks)
        if dk_ is not dk:
            dk.copy_(dk_)
            dv.copy_(dv_)

    if dq is not None:
        fn, blocks = ks["dq"]
        dq_ = dq if dq.stride(-1) == 1 else torch.empty_like(q, memory_format=torch.contiguous_format)
        grid = lambda META: (triton.cdiv(c.N, META["BLOCK_M"]), c.Hq, c.B)
        fn[grid](
            c.q, c.k, c.v, c.pk, c.pv, c.pidx, c.mask, do, lse2, delta, dq_,
            *c.q.stride()[:3], *c.k.stride()[:3], *c.v.stride()[:3],
            *c.pk_strides, *c.pv_strides, c.s_mb, *do.stride()[:3], *dq_.stride()[:3],
            c.Hq, c.Hkv, c.N, c.P, c.D, c.G, c.qk_scale, c.scale, *drop_args, *pdrop_args, c.n_bucket,
            PREC=c.prec, BLOCK_D=c.block_d, **c.flags, **blocks)
        if dq_ is not dq:
            dq.copy_(dq_)

    if need_pk or need_pv:
        if c.P == 0:
            dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
        else:
            deterministic = torch.are_deterministic_algorithms_enabled()
            shape = (c.T, c.Hkv, c.P, c.D)  # fp32 accumulators: bounded independently of the batch size
            if deterministic:
                fn, blocks = ks["dprefix_det"]
                if not blocks:
                    cfg = _cfg.untimed_dprefix_config(c.P, c.block_d, q.element_size())
                    blocks = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                grid = dprefix_grid(c, blocks["BLOCK_P"], blocks["BLOCK_M"], q.device)
                # one slice per chunk, summed below in a fixed order; zeroed, since a chunk writes only
                # the entries its rows use. chunks x prefix blocks x Hkv is about 3 waves of SMs, so a
                # buffer holds about 3 x SMs x T x BLOCK_P x D floats (H100, T = 1, P = D = 128: 26 MB)
                # whatever the batch size
                shape = (grid[2],) + shape
            else:
                fn, blocks = ks["dprefix"]
                grid = lambda META: dprefix_grid(c, META["BLOCK_P"], META["BLOCK_M"], q.device)
            acc_k = torch.zeros(shape, device=q.device, dtype=torch.float32)
            acc_v = torch.zeros_like(acc_k)
            fn[grid](
                c.q, c.pk, c.pv, c.pidx, do, lse2, delta, acc_k, acc_v,
                *c.q.stride()[:3], *c.pk_strides, *c.pv_strides, *do.stride()[:3],
                c.B, c.Hq, c.Hkv, c.N, c.P, c.D, c.T, c.G, c.qk_scale, c.scale, *drop_args, *pdrop_args,
                size_bucket(c.B * c.N), HAS_BANK=c.has_bank, DROPOUT=c.dropout,
                PREFIX_DROPOUT=c.prefix_dropout, DETERMINISTIC=deterministic, PREC=c.prec, BLOCK_D=c.block_d,
                **blocks)
            if deterministic:
                acc_k, acc_v = acc_k.sum(0), acc_v.sum(0)  # a fixed-order reduction, unlike atomics
            dpk = acc_k.to(prefix_k.dtype) if need_pk else None
            dpv = acc_v.to(prefix_v.dtype) if need_pv else None
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
            dpk if need_pk else None, dpv if need_pv else None)
