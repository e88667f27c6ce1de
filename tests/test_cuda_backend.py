"""CPU checks of the CUDA backend: the extension builds and imports, and the backend refuses clearly.

The kernels' correctness needs a GPU: tests/gpu/test_cuda_gpu.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import deterministic_algorithms
from ptv2_kernels import backends
from ptv2_kernels.backends import cuda as cuda_backend
from ptv2_kernels.backends.base import Params, Problem

BACKEND = cuda_backend.BACKEND


def _deliberately_unbuilt() -> str | None:
    if os.environ.get("PTV2_SKIP_CUDA_BUILD", "").strip().lower() in ("1", "true", "yes", "on"):
        return "PTV2_SKIP_CUDA_BUILD is set, so the extension was deliberately not built"
    if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "nvcc is not installed, so the extension could not be built"
    return None


def _cpu_problem(dtype=torch.float16, head_dim=64, features=()):
    return Problem(torch.device("cpu"), dtype, head_dim, frozenset(features))


def test_extension_imports_and_lists_archs():
    why = _deliberately_unbuilt()
    if why:
        pytest.skip(why)
    import ptv2_kernels._C as C  # a failure here means the build was broken or skipped by accident

    archs = C.compiled_archs()
    assert archs, "the extension reports no compiled architectures"
    assert all(isinstance(a, int) and a >= 80 for a in archs), archs
    assert C.ptx_arch() == max(archs)
    print(f"compiled archs: {archs}, PTX for compute_{C.ptx_arch()}, CUDA runtime {C.cuda_runtime_version()}")
    wanted = os.environ.get("PTV2_CUDA_ARCHS")
    if wanted and os.environ.get("PTV2_CHECK_ARCHS") == "1":  # CI sets this when it built with the knob
        assert sorted(archs) == sorted(int(a) for a in wanted.replace(",", ";").split(";") if a.strip())
    # the C++ and Python head-dim declarations agree
    for d in range(0, 300):
        assert bool(C.supported_head_dim(d)) == BACKEND.supports_head_dim(d), d
    info = cuda_backend.build_info()
    assert info["built"] and info["archs"] == list(archs) and info["error"] is None


def test_extension_errors_become_runtime_errors():
    why = _deliberately_unbuilt()
    if why:
        pytest.skip(why)
    import ptv2_kernels._C as C

    with pytest.raises(ValueError):  # bad arguments are refused before any CUDA call
        C.forward({"B": 1, "Hq": 3, "Hkv": 2, "N": 1, "P": 0, "D": 64, "T": 1}, 0, 0)
    with pytest.raises(RuntimeError, match="dtype code"):
        C.forward({"B": 1, "Hq": 1, "Hkv": 1, "N": 1, "P": 0, "D": 64, "T": 1}, 7, 0)
    with pytest.raises(RuntimeError, match="head dim"):
        C.forward({"B": 1, "Hq": 1, "Hkv": 1, "N": 1, "P": 0, "D": 12, "T": 1}, 0, 0)


def test_cpu_tensors_are_refused_clearly():
    assert BACKEND.device_reason(torch.device("cpu")) == "runs on cuda tensors, got cpu"
    why = BACKEND.reason(_cpu_problem())
    assert why
    if BACKEND.availability() is None:
        assert why == "runs on cuda tensors, got cpu"
    else:
        assert "not built" in why or "cannot load" in why
        assert "pip install" in why
    with pytest.raises(backends.NoBackendError, match="backend='cuda' cannot run these inputs"):
        backends.select(_cpu_problem(), "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_no_cuda_device_is_refused_clearly():
    why = BACKEND.device_reason(torch.device("cuda"))
    assert why and "CUDA device" in why


def test_declaration():
    assert BACKEND.name == "cuda"
    assert BACKEND.devices == ("cuda",)
    assert set(BACKEND.dtypes) == {torch.float16, torch.bfloat16}
    assert BACKEND.features == frozenset(backends.base.FEATURES) - {"deterministic_prefix_grad"}
    for d in (8, 32, 40, 64, 72, 96, 128):
        assert BACKEND.supports_head_dim(d), d
    for d in (0, 4, 12, 100, 136, 256):
        assert not BACKEND.supports_head_dim(d), d


def test_deterministic_prefix_gradient_goes_to_another_backend(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the backend declines a prefix gradient (it sums it
    with float atomics) and dispatch moves on; everything else it still runs."""
    monkeypatch.setattr(BACKEND, "availability", lambda: None)  # as on a GPU machine with the build
    monkeypatch.setattr(BACKEND, "device_reason", lambda device: None)
    monkeypatch.setitem(backends.PRIORITY, "cuda", ("cuda", "torch"))
    q = torch.empty(2, 4, 7, 64, dtype=torch.float16)
    describe = lambda prefix_grad: Problem.describe(q, None, None, False, 0.0, 0.0, 4, prefix_grad)  # noqa: E731
    assert "deterministic_prefix_grad" not in describe(True).features  # determinism is off
    with deterministic_algorithms():
        assert "deterministic_prefix_grad" not in describe(False).features  # no prefix gradient
        features = describe(True).features
    assert "deterministic_prefix_grad" in features
    det = Problem(torch.device("cuda"), torch.float16, 64, features)
    why = BACKEND.reason(det)
    assert why.startswith("does not support deterministic_prefix_grad (") and "atomics" in why, why
    assert backends.select(det).name == "torch"
    assert backends.select(Problem(torch.device("cuda"), torch.float16, 64, frozenset())).name == "cuda"
    with pytest.raises(backends.NoBackendError, match="backend='cuda' cannot run.*deterministic_prefix_grad"):
        backends.select(det, "cuda")


def test_backward_refuses_determinism_switched_on_after_forward(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_require", lambda: object())  # fails before touching the module
    x, lse = torch.zeros(1, 1, 1, 8, dtype=torch.float16), torch.zeros(1, 1, 1)
    args = (x, None, x, x, x, x, x, None, None, x, lse, Params(False, 1.0, 0.0, 0.0, 0))
    with deterministic_algorithms(), pytest.raises(RuntimeError, match="use_deterministic_algorithms"):
        BACKEND.backward(*args, (False, False, False, True, False))
    with deterministic_algorithms(warn_only=True), pytest.warns(UserWarning, match="float atomics"):
        cuda_backend._alert_atomic_prefix_grad()


def test_availability_and_build_info_agree():
    info = cuda_backend.build_info()
    assert set(info) >= {"built", "archs", "ptx_arch", "error"}
    assert info["built"] == (BACKEND.availability() is None)
    if not info["built"]:
        assert info["error"] == BACKEND.availability()
        assert "pip install" in info["error"]


def test_arch_compatibility_rule():
    runs = cuda_backend._arch_runs
    assert runs(80, [80], 0) and runs(86, [80], 0) and runs(89, [80, 86], 0)
    assert not runs(90, [80, 86, 89], 0)          # no sm_90 SASS, no PTX
    assert runs(90, [80, 86, 89, 90], 90)
    assert runs(100, [80, 90], 90)                 # newer GPU: the PTX JIT-compiles
    assert not runs(86, [90], 90)                  # PTX cannot go backwards
    assert runs(120, [120], 0) and not runs(100, [120], 120)


def test_package_imports_without_the_extension():
    # Hide ptv2_kernels._C and check the backend module still imports and explains itself.
    code = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "ptv2_kernels._C":
                    raise ModuleNotFoundError("No module named 'ptv2_kernels._C'", name=name)
                return None
        sys.meta_path.insert(0, Block())
        from ptv2_kernels.backends import cuda
        why = cuda.BACKEND.availability()
        assert why and "not built" in why and "pip install" in why, why
        info = cuda.build_info()
        assert info["built"] is False and info["archs"] == [], info
        print(why)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ---- the kernels themselves, on the CPU: csrc/*.cu built with an emulated CUDA execution model ----

EMU_CASES = [
    dict(B=2, Hq=4, Hkv=2, N=19, P=5, D=32, T=2, causal=True, mask=True, dropout_p=0.2, prefix_dropout_p=0.2,
         dtype=torch.float16, glse=True),
    dict(B=2, Hq=2, Hkv=2, N=21, P=3, D=40, T=1, dtype=torch.bfloat16, unaligned=True),
    dict(B=2, Hq=2, Hkv=1, N=9, P=0, D=64, T=1, mask=True, empty=True, dtype=torch.float16, glse=True),
    dict(B=1, Hq=2, Hkv=1, N=33, P=33, D=128, T=1, causal=True, dtype=torch.bfloat16),
]


@pytest.fixture(scope="module")
def emulated_backend(tmp_path_factory):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "emu"))
    try:
        import build as emu_build
    finally:
        sys.path.pop(0)
    why = emu_build.unavailable()
    if why:
        pytest.skip(f"cannot build the CPU kernel emulator: {why}")
    import importlib.util

    path = emu_build.build(tmp_path_factory.mktemp("emu"), int(os.environ.get("MAX_JOBS", "2")))
    spec = importlib.util.spec_from_file_location("_C", path)
    emu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu)
    return emu


def _run_emulated(monkeypatch, emulated, q, k, v, pk, pv, mask, index, params, glse_seed=None):
    """Forward and all five gradients through the real backend and binding on the emulated kernels,
    checked against the float64 reference (with a random LSE gradient when ``glse_seed`` is given)."""
    import contextlib
    import types

    from ptv2_kernels.reference import prefix_attention_reference

    monkeypatch.setattr(cuda_backend, "_C_MODULE", emulated)
    monkeypatch.setattr(cuda_backend, "_sm_count", lambda dev: 3)
    monkeypatch.setattr(torch.cuda, "device", lambda dev: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: types.SimpleNamespace(cuda_stream=0))
    dt = q.dtype
    g = torch.Generator().manual_seed(7)
    out, lse = BACKEND.forward(q, k, v, pk, pv, mask, index, params)
    go = torch.randn(out.shape, generator=g).to(dt)
    glse = None
    if glse_seed is not None:
        glse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(glse_seed))
        glse = torch.where(torch.isfinite(lse), glse, torch.zeros_like(glse))
    grads = BACKEND.backward(go, glse, q, k, v, pk, pv, mask, index, out, lse, params, (True,) * 5)

    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, pk, pv)]
    ppk, ppv = (leaves[3][0], leaves[4][0]) if index is None else (leaves[3], leaves[4])
    ref, ref_lse = prefix_attention_reference(
        leaves[0], leaves[1], leaves[2], ppk, ppv, mask, causal=params.causal, softmax_scale=params.softmax_scale,
        dropout_p=params.dropout_p, prefix_dropout_p=params.prefix_dropout_p, prefix_index=index,
        seed=params.seed, return_lse=True)
    loss = (ref * go.double()).sum()
    if glse is not None:
        loss = loss + (ref_lse.masked_fill(~torch.isfinite(ref_lse), 0) * glse.double()).sum()
    ref_grads = torch.autograd.grad(loss, leaves, allow_unused=True)

    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin), "lse: -inf rows differ"
    assert (out[~fin] == 0).all(), "rows that see nothing must give zeros"
    if fin.any():
        print(f"lse       max err {(lse[fin].double() - ref_lse[fin]).abs().max().item():.2e}")
        assert (lse[fin].double() - ref_lse[fin]).abs().max() < 1e-4
    tol = 4e-3 if dt == torch.float16 else 3e-2
    for name, got, want, inp in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), (out, *grads),
                                    (ref, *ref_grads), (q, q, k, v, pk, pv)):
        want = torch.zeros_like(inp, dtype=torch.float64) if want is None else want
        assert got.shape == inp.shape and got.dtype == dt, name
        if got.numel() == 0:
            continue
        diff = (got.double() - want).abs()
        scale = max(1.0, want.abs().max().item())
        print(f"{name:9s} max err {diff.max().item():.2e} mean {diff.mean().item():.2e} (tol {tol * scale:.2e})")
        assert diff.max().item() <= tol * scale, f"{name}: {diff.max().item():.3e} > {tol * scale:.3e}"


@pytest.mark.slow
@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: f"D{c['D']}-{str(c['dtype'])[6:]}-N{c['N']}-P{c['P']}")
def test_kernels_on_cpu_emulator(case, emulated_backend, monkeypatch):
    """The real backend + binding + kernel source against the float64 reference, on the CPU."""
    import math

    c = case
    g = torch.Generator().manual_seed(0)
    dt = c["dtype"]

    def rnd(*shape):
        x = torch.randn(math.prod(shape) + 1, generator=g).to(dt)
        return x[1:].view(*shape) if c.get("unaligned") else x[:-1].view(*shape)

    B, Hq, Hkv, N, P, D, T = (c[x] for x in ("B", "Hq", "Hkv", "N", "P", "D", "T"))
    q, k, v = rnd(B, Hq, N, D), rnd(B, Hkv, N, D), rnd(B, Hkv, N, D)
    pk, pv = rnd(T, Hkv, P, D), rnd(T, Hkv, P, D)
    mask = (torch.rand(B, N, generator=g) > 0.3) if c.get("mask") else None
    if c.get("empty"):
        mask[0] = False
    index = torch.randint(0, T, (B,), generator=g) if T > 1 else None
    params = Params(bool(c.get("causal")), D ** -0.5, c.get("dropout_p", 0.0), c.get("prefix_dropout_p", 0.0), 99)
    _run_emulated(monkeypatch, emulated_backend, q, k, v, pk, pv, mask, index, params,
                  glse_seed=3 if c.get("glse") else None)


# ---- on demand: the GPU correctness matrix on the CPU emulator (PTV2_EMU_MATRIX=1, many minutes) ----

EMU_MATRIX_BASE = dict(B=2, Hq=4, Hkv=2, N=97, P=7, D=64)
EMU_MATRIX = [  # the cases of tests/gpu/test_cuda_gpu.py, which cannot be imported without a GPU
    dict(), dict(N=1, P=1), dict(N=7, P=0), dict(N=129, P=20, D=32), dict(N=64, P=64, D=128),
    dict(N=97, P=33, D=128, Hq=2, Hkv=2), dict(D=40), dict(D=96, P=5), dict(D=8, N=17), dict(causal=True),
    dict(causal=True, N=129, P=0, D=32), dict(mask=True), dict(mask=True, causal=True, D=128), dict(bank=3),
    dict(bank=2, prefix_dropout_p=0.2), dict(Hq=6, Hkv=1), dict(Hq=8, Hkv=2, causal=True, mask=True),
    dict(dropout_p=0.1), dict(dropout_p=0.3, causal=True, mask=True), dict(prefix_dropout_p=0.1),
    dict(prefix_dropout_p=0.25, D=128, P=40),
    dict(dropout_p=0.1, prefix_dropout_p=0.1, bank=3, causal=True, mask=True, Hq=6, Hkv=2, N=129, P=20),
    dict(layout="packed"), dict(layout="unaligned", D=40), dict(layout="unaligned", D=64, mask=True, bank=2),
    dict(B=5, N=33, P=129, D=64), dict(empty_rows=True, P=0, mask=True),
    dict(empty_rows=True, P=0, mask=True, causal=True, dropout_p=0.2),
]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PTV2_EMU_MATRIX") != "1",
                    reason="the whole GPU matrix takes many minutes on the emulator; PTV2_EMU_MATRIX=1 runs it")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", EMU_MATRIX, ids=["-".join(f"{k}{v}" for k, v in c.items()) or "base"
                                                  for c in EMU_MATRIX])
def test_gpu_matrix_on_cpu_emulator(case, dtype, emulated_backend, monkeypatch):
    """Forward, LSE and all five gradients of every GPU-matrix case, emulated, against float64."""
    import math

    c = {**EMU_MATRIX_BASE, **case}
    B, Hq, Hkv, N, P, D = (c[x] for x in ("B", "Hq", "Hkv", "N", "P", "D"))
    T = c.get("bank") or 1
    layout = c.get("layout")
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, off=0):  # off=1: base pointer off 16-byte alignment (the scalar load path)
        return torch.randn(math.prod(shape) + off, generator=g).to(dtype)[off:].view(*shape)

    if layout == "packed":  # q, k, v as views of one (B, N, Hq + 2 Hkv, D) projection
        qkv = rnd(B, N, Hq + 2 * Hkv, D)
        q, k, v = (qkv[:, :, a:z].transpose(1, 2) for a, z in ((0, Hq), (Hq, Hq + Hkv), (Hq + Hkv, Hq + 2 * Hkv)))
    else:
        off = int(layout == "unaligned")
        q, k, v = rnd(B, Hq, N, D, off=off), rnd(B, Hkv, N, D, off=off), rnd(B, Hkv, N, D, off=off)
    pk, pv = rnd(T, Hkv, P, D, off=int(layout == "unaligned")), rnd(T, Hkv, P, D)
    mask = None
    if c.get("mask"):
        mask = torch.rand(B, N, generator=g) > 0.3
        mask[0] = True
        mask[1, N // 2:] = False  # right padding
    if c.get("empty_rows"):
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[0] = False  # row 0 sees nothing (P = 0)
    index = torch.randint(0, T, (B,), generator=g) if c.get("bank") else None
    params = Params(bool(c.get("causal")), D ** -0.5, c.get("dropout_p", 0.0), c.get("prefix_dropout_p", 0.0), 12345)

    _run_emulated(monkeypatch, emulated_backend, q, k, v, pk, pv, mask, index, params)
