"""Shared test tools: random problems and error bounds against the float64 reference."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ptv2_kernels import prefix_attention, prefix_attention_reference

NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


@dataclass
class Case:
    B: int = 2
    Hq: int = 2
    Hkv: int = 2
    N: int = 7
    P: int = 5
    D: int = 16
    T: int = 0  # bank entries; 0 = shared prefix
    mask: bool = False
    right_padded: bool = False  # with mask: each row's real tokens first, then padding
    empty_rows: bool = False  # with mask and P = 0: some rows see nothing at all
    causal: bool = False
    dropout_p: float = 0.0
    prefix_dropout_p: float = 0.0
    transposed: bool = False  # q/k/v as (B, N, H, D) memory transposed to (B, H, N, D)
    needs: tuple = (True,) * 5
    grad_lse: bool = True  # also back-propagate a random cotangent of the returned LSE
    index: tuple = ()  # the bank entry of each row (random when empty)
    chunks: int = 0  # kernel backends: force this many prefix-gradient chunks (0: the backend's choice)

    def __str__(self):
        parts = [f"B{self.B}H{self.Hq}/{self.Hkv}N{self.N}P{self.P}D{self.D}"]
        for flag in ("mask", "right_padded", "empty_rows", "causal", "transposed"):
            if getattr(self, flag):
                parts.append(flag)
        if self.T:
            parts.append(f"bank{self.T}")
        if self.dropout_p:
            parts.append(f"drop{self.dropout_p}")
        if self.prefix_dropout_p:
            parts.append(f"pdrop{self.prefix_dropout_p}")
        if not all(self.needs):
            parts.append("needs" + "".join("1" if n else "0" for n in self.needs))
        if not self.grad_lse:
            parts.append("nolsegrad")
        if self.chunks:
            parts.append(f"chunks{self.chunks}")
        return "-".join(parts)


@contextlib.contextmanager
def deterministic_algorithms(warn_only=False):
    """``torch.use_deterministic_algorithms(True)`` inside the block; the previous setting after it."""
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0):
    """Random inputs (never zeros) for ``case``, in float64 masters plus copies in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, N, P, D = case.B, case.Hq, case.Hkv, case.N, case.P, case.D

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if case.transposed:
        q = rnd(B, N, Hq, D).transpose(1, 2)
        k = rnd(B, N, Hkv, D).transpose(1, 2)
        v = rnd(B, N, Hkv, D).transpose(1, 2)
    else:
        q, k, v = rnd(B, Hq, N, D), rnd(B, Hkv, N, D), rnd(B, Hkv, N, D)
    pshape = (case.T, Hkv, P, D) if case.T else (Hkv, P, D)
    pk, pv = rnd(*pshape), rnd(*pshape)
    mask = None
    if case.mask:
        mask = torch.rand(B, N, generator=g) > 0.35
        mask[0, 0] = True
        if case.right_padded:
            lengths = torch.randint(0, N, (B,), generator=g)
            lengths[0] = max(1, N // 2)
            mask = torch.arange(N)[None, :] < lengths[:, None]
        if case.empty_rows:
            mask[B - 1] = False
    index = None
    if case.T:
        index = (torch.tensor(case.index, dtype=torch.int64) if case.index
                 else torch.randint(0, case.T, (B,), generator=g))
    masters = [q, k, v, pk, pv]
    inputs = [x.to(device=device, dtype=dtype) for x in masters]
    for x, need in zip(inputs, case.needs):
        x.requires_grad_(need)
    for x, need in zip(masters, case.needs):
        x.requires_grad_(need)
    return masters, inputs, (None if mask is None else mask.to(device)), index


def run(fn, inputs, mask, index, case: Case, grad_seed=1, return_lse=True, **kw):
    """Forward, then backward of a random cotangent (and a random LSE cotangent); the LSE is None
    when ``return_lse`` is off."""
    gen = torch.Generator().manual_seed(1234)
    result = fn(*inputs, mask if mask is None else mask.to(inputs[0].device), causal=case.causal,
                dropout_p=case.dropout_p, prefix_dropout_p=case.prefix_dropout_p,
                prefix_index=None if index is None else index.to(inputs[0].device), generator=gen,
                return_lse=return_lse, **kw)
    out, lse = result if return_lse else (result, None)
    g = torch.Generator().manual_seed(grad_seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    wanted = [x for x in inputs if x.requires_grad]
    loss = (out * dout).sum()
    if case.grad_lse:  # otherwise the LSE gets no cotangent at all, as when return_lse is off
        dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
        dlse = torch.where(torch.isfinite(lse).cpu(), dlse, torch.zeros_like(dlse)).to(lse)
        loss = loss + (lse * dlse).sum()
    grads = torch.autograd.grad(loss, wanted, allow_unused=True)
    it = iter(grads)
    return out, lse, [next(it) if x.requires_grad else None for x in inputs]


def reference_results(masters, mask, index, case):
    return run(prefix_attention_reference, masters, mask, index, case)


def low_precision_reference(masters, mask, index, case, dtype):
    """What plain PyTorch gets in ``dtype`` (the reference formulation run in that dtype)."""
    low = [x.detach().to(dtype).requires_grad_(x.requires_grad) for x in masters]
    return run(prefix_attention_reference, low, mask, index, case)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def mean_err(a, b):
    return (a.double() - b.double()).abs().mean().item() if a.numel() else 0.0


def check_against_reference(case: Case, backend: str, dtype=torch.float32, device="cpu", slack=3.0,
                            return_lse=True):
    """Compare a backend with the float64 reference; the bound is ``slack`` x plain PyTorch's own error
    in the same dtype plus a floor at that dtype's resolution. Prints max and mean errors.
    ``return_lse=False`` (cases without an LSE gradient) calls the op as most callers do."""
    masters, inputs, mask, index = make_inputs(case, dtype, device)
    ref = reference_results(masters, mask, index, case)
    low = low_precision_reference(masters, mask, index, case, dtype)
    got = run(prefix_attention, inputs, mask, index, case, backend=backend, return_lse=return_lse)
    assert got[0].dtype == dtype and got[0].stride() == inputs[0].stride(), "output keeps q's dtype and layout"
    empty = ~torch.isfinite(ref[1])
    assert torch.equal(got[0].cpu()[empty], torch.zeros_like(got[0].cpu()[empty])), "rows seeing nothing: 0"
    floor = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    names = ("out", "lse") + tuple("d" + n for n in NAMES)
    refs = [ref[0], ref[1], *ref[2]]
    lows = [low[0], low[1], *low[2]]
    gots = [got[0], got[1], *got[2]]
    report = []
    for name, r, lo, gv in zip(names, refs, lows, gots):
        if r is None or (name == "lse" and not return_lse):
            assert gv is None, f"{name} was computed though not required"
            continue
        assert gv is not None, f"{name} missing"
        assert gv.shape == r.shape, f"{name} shape {tuple(gv.shape)} != {tuple(r.shape)}"
        if name == "lse":
            fin = torch.isfinite(r)
            assert torch.equal(fin.cpu(), torch.isfinite(gv).cpu()), "lse finiteness differs"
            r, lo, gv = r[fin.cpu()], lo[fin.to(lo.device)], gv[fin.to(gv.device)]
        else:
            assert gv.dtype == dtype, f"{name} has dtype {gv.dtype}, expected {dtype}"
        assert torch.isfinite(gv).all(), f"{name} has non-finite values"
        bound = slack * max_err(lo, r) + floor * max(1.0, r.abs().max().item() if r.numel() else 1.0)
        err = max_err(gv.cpu(), r)
        report.append(f"{name}: max {err:.2e} mean {mean_err(gv.cpu(), r):.2e} (bound {bound:.2e})")
        assert err <= bound, f"{case} {backend} {dtype}: {name} max error {err:.3e} > bound {bound:.3e}"
    print(f"{case} {backend} {dtype}: " + "; ".join(report))
    return got


# small labelled sentence sets for training runs of custom CSV data (tests/test_train.py, tests/test_fsdp.py)
POSITIVE = ["a wonderful film", "great acting", "I loved it", "truly moving", "a delight", "superb"]
NEGATIVE = ["a dull mess", "terrible plot", "I hated it", "boring and slow", "a disaster", "awful"]


def write_csv(path, rows, header=("text", "label")):
    """A CSV file of ``rows`` under ``header``; returns ``path``."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path
