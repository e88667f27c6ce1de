"""GPU correctness matrix of the CUDA backend against the float64 reference.

Every case runs the forward and all five gradients (plus LSE and grad_lse) in float16 and bfloat16
and compares with ``ptv2_kernels.reference.prefix_attention_reference`` evaluated in float64 on the
same (rounded) inputs. The tolerance is derived from what plain PyTorch gets wrong in the same dtype
(the reference run in fp16/bf16), with a floor. Run on a GPU machine with:

    pytest tests/gpu/test_cuda_gpu.py -v -s
"""

from __future__ import annotations

import math

import pytest
import torch

from ptv2_kernels import dropout as dr
from ptv2_kernels.backends import cuda as cuda_backend
from ptv2_kernels.backends.base import Params

pytestmark = pytest.mark.gpu

BACKEND = cuda_backend.BACKEND


if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine (torch.cuda.is_available() is False)", allow_module_level=True)
_WHY = BACKEND.availability() or BACKEND.device_reason(torch.device("cuda"))
if _WHY:  # on a GPU machine an unbuilt or unloadable _C is a broken install: fail, never skip
    pytest.fail(f"the CUDA backend {_WHY}", pytrace=False)

from ptv2_kernels.reference import prefix_attention_reference  # noqa: E402

DEV = torch.device("cuda")
FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _case_id(c):
    return "-".join(f"{k}{v}" for k, v in c.items())


BASE = dict(B=2, Hq=4, Hkv=2, N=97, P=7, D=64)
CASES = [
    dict(),
    dict(N=1, P=1),
    dict(N=7, P=0),
    dict(N=129, P=20, D=32),
    dict(N=64, P=64, D=128),
    dict(N=97, P=33, D=128, Hq=2, Hkv=2),
    dict(D=40),
    dict(D=96, P=5),
    dict(D=8, N=17),
    dict(causal=True),
    dict(causal=True, N=129, P=0, D=32),
    dict(mask=True),
    dict(mask=True, causal=True, D=128),
    dict(bank=3),
    dict(bank=2, prefix_dropout_p=0.2),
    dict(Hq=6, Hkv=1),
    dict(Hq=8, Hkv=2, causal=True, mask=True),
    dict(dropout_p=0.1),
    dict(dropout_p=0.3, causal=True, mask=True),
    dict(prefix_dropout_p=0.1),
    dict(prefix_dropout_p=0.25, D=128, P=40),
    dict(dropout_p=0.1, prefix_dropout_p=0.1, bank=3, causal=True, mask=True, Hq=6, Hkv=2, N=129, P=20),
    dict(layout="packed"),
    dict(layout="unaligned", D=40),
    dict(layout="unaligned", D=64, mask=True, bank=2),
    dict(B=5, N=33, P=129, D=64),
    dict(empty_rows=True, P=0, mask=True),
    dict(empty_rows=True, P=0, mask=True, causal=True, dropout_p=0.2),
]


def _make(case, dtype, seed=0):
    c = {**BASE, **case}
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, Hq, Hkv, N, P, D = c["B"], c["Hq"], c["Hkv"], c["N"], c["P"], c["D"]
    T = c.get("bank") or 1

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(DEV).to(dtype)

    layout = c.get("layout")
    if layout == "packed":  # q, k, v as views of one (B, N, Hq + 2 Hkv, D) projection
        qkv = rnd(B, N, Hq + 2 * Hkv, D)
        q = qkv[:, :, :Hq].transpose(1, 2)
        k = qkv[:, :, Hq:Hq + Hkv].transpose(1, 2)
        v = qkv[:, :, Hq + Hkv:].transpose(1, 2)
    elif layout == "unaligned":  # base pointers off 16-byte alignment: the scalar load path
        def off(*shape):
            base = rnd(math.prod(shape) + 1)
            return base[1:].view(*shape)
        q, k, v = off(B, Hq, N, D), off(B, Hkv, N, D), off(B, Hkv, N, D)
    else:
        q, k, v = rnd(B, Hq, N, D), rnd(B, Hkv, N, D), rnd(B, Hkv, N, D)
    pk, pv = rnd(T, Hkv, P, D), rnd(T, Hkv, P, D)
    if layout == "unaligned":
        pk = rnd(T * Hkv * P * D + 1)[1:].view(T, Hkv, P, D)
    mask = None
    if c.get("mask"):
        mask = torch.rand(B, N, generator=g) > 0.3
        mask[0, :] = True
        if B > 1:
            mask[1, N // 2:] = False  # right padding
    if c.get("empty_rows"):
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[0, :] = False  # row 0 sees nothing (P = 0)
    if mask is not None:
        mask = mask.to(DEV)
    index = None
    if c.get("bank"):
        index = torch.randint(0, T, (B,), generator=g).to(DEV)
    params = Params(causal=bool(c.get("causal")), softmax_scale=D ** -0.5, dropout_p=c.get("dropout_p", 0.0),
                    prefix_dropout_p=c.get("prefix_dropout_p", 0.0), seed=12345 + seed)
    return c, q, k, v, pk, pv, mask, index, params


def _reference(q, k, v, pk, pv, mask, index, params, dtype):
    """Reference output, its LSE (float64 formulation below) and grads, with inputs cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v, pk, pv)]
    qq, kk, vv, ppk, ppv = leaves
    shared = index is None and ppk.shape[0] == 1
    out = prefix_attention_reference(
        qq, kk, vv, ppk[0] if shared else ppk, ppv[0] if shared else ppv, mask, causal=params.causal,
        softmax_scale=params.softmax_scale, dropout_p=params.dropout_p, prefix_dropout_p=params.prefix_dropout_p,
        prefix_index=index, seed=params.seed)
    return leaves, out


def _lse64(q, k, pk, mask, index, params):
    """Natural-log LSE of the scaled scores over [prefix; tokens], materialized, differentiable."""
    B, Hq, N, D = q.shape
    Hkv, P = k.shape[1], pk.shape[2]
    G = Hq // Hkv
    rows = index if index is not None else torch.zeros(B, dtype=torch.int64, device=q.device)
    pkb = pk[rows]  # (B, Hkv, P, D)
    if params.prefix_dropout_p > 0:
        keep = dr.prefix_keep(params.seed, dr.STREAM_PREFIX_K, params.prefix_dropout_p, B, Hkv, P, D, q.device)
        pkb = pkb * keep / (1 - params.prefix_dropout_p)
    kk = torch.cat([pkb, k], dim=2).repeat_interleave(G, dim=1)
    s = (q @ kk.transpose(-1, -2)) * params.softmax_scale
    vis = torch.ones(B, 1, N, P + N, dtype=torch.bool, device=q.device)
    if mask is not None:
        vis[..., P:] &= mask[:, None, None, :]
    if params.causal:
        vis[..., P:] &= torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    return torch.logsumexp(s.masked_fill(~vis, -math.inf), dim=-1)


def _err(name, got, ref, tol_ref, dtype):
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if got.numel() == 0:
        print(f"  {name:9s} (empty)")
        return
    diff = (got - ref).abs()
    base = (tol_ref.double() - ref).abs().max().item() if tol_ref is not None else 0.0
    tol = max(4 * base, FLOOR[dtype] * max(1.0, ref.abs().max().item()))
    mx = diff.max().item() if diff.numel() else 0.0
    mean = diff.mean().item() if diff.numel() else 0.0
    ref_txt = f"torch-{str(dtype)[6:]} max {base:.3e}" if tol_ref is not None else "floor"
    print(f"  {name:9s} max {mx:.3e} mean {mean:.3e} ({ref_txt}, tol {tol:.3e})")
    assert mx <= tol, f"{name}: max error {mx:.3e} > tol {tol:.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) or "base" for c in CASES])
def test_forward_backward_matches_reference(case, dtype):
    c, q, k, v, pk, pv, mask, index, params = _make(case, dtype)
    print(f"\n{c} {dtype}")
    out, lse = BACKEND.forward(q, k, v, pk, pv, mask, index, params)
    torch.cuda.synchronize()
    go = torch.randn_like(out)
    torch.randn_like(lse)

    (q64, k64, v64, pk64, pv64), ref64 = _reference(q, k, v, pk, pv, mask, index, params, torch.float64)
    lse64 = _lse64(q64, k64, pk64, mask, index, params)
    (ql, kl, vl, pkl, pvl), ref_lp = _reference(q, k, v, pk, pv, mask, index, params, dtype)

    _err("out", out, ref64, ref_lp, dtype)
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf rows differ"
    _err("lse", lse[finite], lse64[finite], None, torch.float16)
    assert (out[~finite] == 0).all(), "rows that see nothing must give zeros"

    # gradients of sum(out * go) against float64, error scale from the same reference in dtype
    ref_grads = torch.autograd.grad((ref64 * go.double()).sum(), (q64, k64, v64, pk64, pv64), allow_unused=True)
    lp_grads = torch.autograd.grad((ref_lp * go).sum(), (ql, kl, vl, pkl, pvl), allow_unused=True)
    grads = BACKEND.backward(go, None, q, k, v, pk, pv, mask, index, out, lse, params, (True,) * 5)
    torch.cuda.synchronize()
    _check_grads(grads, ref_grads, lp_grads, (q, k, v, pk, pv), dtype)


def _check_grads(grads, ref_grads, lp_grads, inputs, dtype):
    for name, got, ref, lp, inp in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads, lp_grads,
                                       inputs):
        ref = torch.zeros_like(inp, dtype=torch.float64) if ref is None else ref
        assert got is not None and got.shape == inp.shape and got.dtype == inp.dtype, name
        _err(name, got, ref, lp, dtype)


GLSE_CASES = [dict(), dict(causal=True, mask=True, bank=2, dropout_p=0.1, prefix_dropout_p=0.1, Hq=4, Hkv=1),
              dict(empty_rows=True, P=0, mask=True), dict(D=128, P=40, N=65)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", GLSE_CASES, ids=[_case_id(c) or "base" for c in GLSE_CASES])
def test_grad_lse(case, dtype):
    # Back-propagating through the returned LSE: delta = rowsum(dO * O) - grad_lse.
    c, q, k, v, pk, pv, mask, index, params = _make(case, dtype, seed=3)
    print(f"\n{c} {dtype} (with grad_lse)")
    out, lse = BACKEND.forward(q, k, v, pk, pv, mask, index, params)
    go, glse = torch.randn_like(out), torch.randn_like(lse)
    (q64, k64, v64, pk64, pv64), ref64 = _reference(q, k, v, pk, pv, mask, index, params, torch.float64)
    lse64 = _lse64(q64, k64, pk64, mask, index, params)
    finite = torch.isfinite(lse64)
    glse = torch.where(finite, glse, torch.zeros_like(glse))
    loss = (ref64 * go.double()).sum() + (lse64.masked_fill(~finite, 0) * glse.double()).sum()
    ref_grads = torch.autograd.grad(loss, (q64, k64, v64, pk64, pv64), allow_unused=True)
    grads = BACKEND.backward(go, glse, q, k, v, pk, pv, mask, index, out, lse, params, (True,) * 5)
    torch.cuda.synchronize()
    _check_grads(grads, ref_grads, (None,) * 5, (q, k, v, pk, pv), dtype)


@pytest.mark.parametrize("needs", [(False, False, False, True, True), (False, False, False, True, False),
                                   (True, False, False, False, False), (False, True, False, False, False),
                                   (False, False, True, False, True)])
def test_needs_subsets(needs):
    dtype = torch.float16
    _, q, k, v, pk, pv, mask, index, params = _make(dict(mask=True, causal=True, bank=2), dtype, seed=1)
    out, lse = BACKEND.forward(q, k, v, pk, pv, mask, index, params)
    go = torch.randn_like(out)
    full = BACKEND.backward(go, None, q, k, v, pk, pv, mask, index, out, lse, params, (True,) * 5)
    part = BACKEND.backward(go, None, q, k, v, pk, pv, mask, index, out, lse, params, needs)
    for n, f, p in zip(needs, full, part):
        if not n:
            assert p is None
        else:
            torch.testing.assert_close(p.float(), f.float(), atol=2e-3, rtol=1e-3)


def test_dropout_masks_match_forward_and_backward():
    # Same seed -> same output; another seed -> different output (the mask is a function of the seed).
    _, q, k, v, pk, pv, mask, index, params = _make(dict(dropout_p=0.3, prefix_dropout_p=0.3), torch.float16)
    a, _ = BACKEND.forward(q, k, v, pk, pv, mask, index, params)
    b, _ = BACKEND.forward(q, k, v, pk, pv, mask, index, params)
    assert torch.equal(a, b)
    other = params._replace(seed=params.seed + 1)
    c, _ = BACKEND.forward(q, k, v, pk, pv, mask, index, other)
    assert not torch.equal(a, c)


def test_large_batch_prefix_grad_memory_is_bounded():
    # The prefix-gradient reduction allocates (T, Hkv, P, D) fp32 buffers only, whatever B is.
    dtype = torch.bfloat16
    B, H, N, P, D = 64, 4, 33, 16, 64
    q = torch.randn(B, H, N, D, device=DEV, dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    pk, pv = torch.randn(1, H, P, D, device=DEV, dtype=dtype), torch.randn(1, H, P, D, device=DEV, dtype=dtype)
    params = Params(False, D ** -0.5, 0.0, 0.0, 0)
    out, lse = BACKEND.forward(q, k, v, pk, pv, None, None, params)
    go = torch.randn_like(out)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _, _, _, dpk, dpv = BACKEND.backward(go, None, q, k, v, pk, pv, None, None, out, lse, params,
                                         (False, False, False, True, True))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # delta (B*H*N fp32) + two fp32 buffers + the two outputs; no B*P*D term
    bound = B * H * N * 4 + 2 * H * P * D * 4 + 2 * H * P * D * 2 + 64 * 1024  # allocator rounding
    assert extra <= bound, (extra, bound)
    (_, _, _, pk64, pv64), ref64 = _reference(q, k, v, pk, pv, None, None, params, torch.float64)
    ref = torch.autograd.grad((ref64 * go.double()).sum(), (pk64, pv64))
    _err("dprefix_k", dpk, ref[0], None, dtype)
    _err("dprefix_v", dpv, ref[1], None, dtype)
