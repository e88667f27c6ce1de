"""GPU correctness of the kernel backends at the shapes P-Tuning v2 and decoders use (marker: gpu)."""

import pytest
import torch

from helpers import Case, check_against_reference
from ptv2_kernels import backends

pytestmark = pytest.mark.gpu

BERT_LIKE = [
    Case(B=4, Hq=16, Hkv=16, N=128, P=16, D=64, mask=True),
    Case(B=2, Hq=16, Hkv=16, N=512, P=128, D=64, mask=True, dropout_p=0.1, prefix_dropout_p=0.1),
    Case(B=3, Hq=16, Hkv=16, N=200, P=37, D=64, T=3, mask=True),
    Case(B=2, Hq=16, Hkv=16, N=384, P=64, D=64, needs=(False, False, False, True, True)),
]
LLAMA_LIKE = [
    Case(B=1, Hq=32, Hkv=8, N=2048, P=16, D=128, causal=True),
    Case(B=1, Hq=32, Hkv=8, N=2048, P=128, D=128, causal=True, mask=True),
    Case(B=2, Hq=8, Hkv=2, N=1000, P=13, D=128, causal=True, dropout_p=0.1),
]
ODD = [
    Case(B=3, Hq=4, Hkv=2, N=97, P=13, D=40, mask=True, empty_rows=True),
    Case(B=1, Hq=2, Hkv=1, N=1, P=1, D=8),
    Case(B=2, Hq=6, Hkv=3, N=129, P=0, D=72, causal=True, mask=True, empty_rows=True),
    Case(B=3, Hq=4, Hkv=4, N=7, P=13, D=96, transposed=True, T=2),
]
KERNELS = ("triton", "cuda")


def _require(name, dtype, head_dim):
    """Skip what a backend declares it does not do; fail when it is missing on a GPU machine (an
    unbuilt ``_C`` or a missing Triton is a broken install there, not a reason to skip)."""
    backend = backends.get(name)
    missing = backend.availability()
    if missing and torch.cuda.is_available():
        pytest.fail(f"{name} backend missing on a GPU machine: {missing}", pytrace=False)
    why = missing or backend.reason(backends.Problem(torch.device("cuda"), dtype, head_dim, frozenset()))
    if why:
        pytest.skip(f"{name} backend: {why}")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", BERT_LIKE + LLAMA_LIKE + ODD, ids=str)
def test_kernel_backend_against_float64_reference(case, dtype, backend):
    _require(backend, dtype, case.D)
    check_against_reference(case, backend, dtype, device="cuda")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", ODD[:2], ids=str)
def test_kernel_backend_float32(case, backend):
    _require(backend, torch.float32, case.D)
    check_against_reference(case, backend, torch.float32, device="cuda")


@pytest.mark.parametrize("backend", KERNELS)
def test_prefix_gradient_memory_is_independent_of_batch(backend):
    """Extra memory of the backward beyond its outputs must not grow with B (no per-row prefix)."""
    _require(backend, torch.bfloat16, 64)
    from ptv2_kernels import prefix_attention

    def extra(B):
        H, N, P, D = 16, 256, 128, 64
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        pk, pv = (torch.randn(H, P, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(2))
        out = prefix_attention(q, k, v, pk, pv, backend=backend)
        grad = torch.ones_like(out)  # B-sized like q: allocated before the baseline, it is no workspace
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out.backward(grad)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    small, large = extra(4), extra(32)
    # the delta buffer (B*H*N fp32) is the only batch-sized workspace the backward may allocate
    allowed = 32 * 16 * 256 * 4 * 2
    assert large - small <= allowed, (small, large)
