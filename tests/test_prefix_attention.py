"""The prefix_attention op against the float64 reference: every backend, feature and gradient."""

import os

import pytest
import torch

from helpers import Case, check_against_reference, deterministic_algorithms, make_inputs, run
from ptv2_kernels import backends, prefix_attention, prefix_attention_reference

ODD = [
    Case(B=1, N=1, P=1, D=8),
    Case(B=3, N=7, P=13, D=16),
    Case(B=1, N=97, P=1, D=40),
    Case(B=3, N=7, P=0, D=16),
    Case(B=2, N=129, P=13, D=64, Hq=1, Hkv=1),
    Case(B=1, N=13, P=7, D=128),
]
FEATURES = [
    Case(mask=True),
    Case(mask=True, empty_rows=True, P=0),
    Case(mask=True, empty_rows=True, P=3),
    Case(causal=True, N=13),
    Case(causal=True, mask=True, N=13, P=0, empty_rows=True),
    Case(Hq=6, Hkv=2, N=9),
    Case(Hq=4, Hkv=1, causal=True, mask=True),
    Case(T=3, B=4),
    Case(T=2, B=3, Hq=4, Hkv=2, mask=True, causal=True),
    Case(dropout_p=0.3),
    Case(prefix_dropout_p=0.25),
    Case(dropout_p=0.2, prefix_dropout_p=0.1, T=3, B=3, Hq=4, Hkv=2, mask=True, causal=True),
    Case(transposed=True, Hq=4, Hkv=2),
    Case(needs=(False, False, False, True, True)),
    Case(needs=(True, False, True, False, False), T=2, B=3),
    Case(needs=(False, False, False, False, True), prefix_dropout_p=0.5, mask=True),
]
ALL = ODD + FEATURES
# The kernel backends run this same check over their own case lists: tests/test_triton_backend.py,
# tests/test_cuda_backend.py and tests/gpu/.


@pytest.mark.parametrize("case", ALL, ids=str)
def test_torch_backend_float32(case):
    check_against_reference(case, "torch", torch.float32)


@pytest.mark.parametrize("case", ALL, ids=str)
def test_torch_backend_float64_exact(case):
    check_against_reference(case, "torch", torch.float64, slack=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [ODD[1], FEATURES[11], FEATURES[4]], ids=str)
def test_torch_backend_half(case, dtype):
    check_against_reference(case, "torch", dtype)


def test_rows_that_see_nothing_are_zero_with_zero_gradients():
    case = Case(B=2, N=5, P=0, mask=True, empty_rows=True)
    _, inputs, mask, index = make_inputs(case)
    out, lse, grads = run(prefix_attention, inputs, mask, index, case, backend="torch")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isinf(lse[1]).all() and (lse[1] < 0).all()
    for g in grads[:3]:
        assert torch.isfinite(g).all()
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))


def test_output_keeps_query_layout():
    case = Case(transposed=True)
    _, (q, k, v, pk, pv), _, _ = make_inputs(case)
    out = prefix_attention(q, k, v, pk, pv)
    assert out.stride() == q.stride()  # so the (B, N, H, D) view transformers wants costs nothing


def test_gradient_not_required_is_not_computed(monkeypatch):
    seen = {}
    torch_backend = backends.get("torch")
    original = type(torch_backend).backward

    def spy(self, *args, **kwargs):
        seen["needs"] = list(args[-1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(torch_backend), "backward", spy)
    case = Case(needs=(False, False, False, True, False))
    _, inputs, mask, index = make_inputs(case)
    out = prefix_attention(*inputs, backend="torch")
    out.sum().backward()
    assert seen["needs"] == [False, False, False, True, False]
    assert inputs[3].grad is not None and inputs[4].grad is None


def test_shared_prefix_equals_bank_of_one():
    case = Case(B=3)
    _, (q, k, v, pk, pv), _, _ = make_inputs(case)
    shared = prefix_attention(q, k, v, pk, pv)
    bank = prefix_attention(q, k, v, pk[None], pv[None], prefix_index=torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(shared, bank, rtol=0, atol=0)


def test_default_scale_and_explicit_scale():
    case = Case()
    masters, _, _, _ = make_inputs(case, torch.float64)
    a = prefix_attention(*masters, softmax_scale=0.3)
    b = prefix_attention_reference(*masters, softmax_scale=0.3)
    torch.testing.assert_close(a, b)
    c = prefix_attention(*masters)
    d = prefix_attention(*masters, softmax_scale=16 ** -0.5)
    torch.testing.assert_close(c, d, rtol=0, atol=0)


def test_empty_batch():
    q = torch.randn(0, 2, 5, 16)
    k = torch.randn(0, 2, 5, 16)
    pk = torch.randn(2, 3, 16, requires_grad=True)
    out = prefix_attention(q, k, k, pk, pk.detach())
    assert out.shape == (0, 2, 5, 16)
    out.sum().backward()
    assert torch.equal(pk.grad, torch.zeros_like(pk))


def test_autocast_runs_in_autocast_dtype():
    case = Case()
    _, inputs, _, _ = make_inputs(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = (x.to(torch.bfloat16) for x in inputs[:3])  # activations from autocast Linears
        out = prefix_attention(q, k, v, *inputs[3:], backend="torch")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert inputs[3].grad.dtype == torch.float32


def test_dispatch_prefers_the_flash_backend_on_cpu():
    problem = backends.Problem(torch.device("cpu"), torch.float32, 64, frozenset())
    assert backends.select(problem).name == "flash"


def test_dispatch_knows_when_a_deterministic_prefix_gradient_is_needed(monkeypatch):
    """The op tells dispatch when the prefix will get a gradient under torch.use_deterministic_algorithms,
    so that no backend reducing it with atomics is chosen (tests/test_cuda_backend.py)."""
    seen, real = [], backends.select
    monkeypatch.setattr(backends, "select", lambda problem, name=None: seen.append(problem) or real(problem, name))
    _, inputs, _, _ = make_inputs(Case())
    frozen = inputs[:3] + [x.detach() for x in inputs[3:]]
    with deterministic_algorithms():
        prefix_attention(*inputs)
        prefix_attention(*frozen)
        with torch.no_grad():
            prefix_attention(*inputs)
    prefix_attention(*inputs)
    assert ["deterministic_prefix_grad" in p.features for p in seen] == [True, False, False, False]


def test_no_backend_lists_every_reason():
    problem = backends.Problem(torch.device("meta"), torch.float32, 64, frozenset())
    with pytest.raises(backends.NoBackendError) as err:
        backends.select(problem)
    text = str(err.value)
    for name in backends.NAMES:
        assert f"  {name}: " in text, text


def test_named_backend_that_cannot_run_says_why():
    case = Case()
    masters, _, _, _ = make_inputs(case, torch.float64)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run these inputs: it .*float64"):
        prefix_attention(*masters, backend="triton")
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run"):
        prefix_attention(*masters, backend="cuda")


def test_torch_compile_fullgraph():
    case = Case(mask=True)
    _, (q, k, v, pk, pv), mask, _ = make_inputs(case)

    def layer(q, k, v, pk, pv, mask):
        return prefix_attention(q * 2, k, v, pk, pv, mask, causal=True, backend="torch").sum(-1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager = layer(q, k, v, pk, pv, mask)
    got = compiled(q, k, v, pk, pv, mask)
    torch.testing.assert_close(got, eager)
    gp = torch.autograd.grad(got.sum(), pk)[0]
    ge = torch.autograd.grad(eager.sum(), pk)[0]
    torch.testing.assert_close(gp, ge)


@pytest.mark.skipif(os.environ.get("PTV2_SKIP_INDUCTOR") == "1", reason="PTV2_SKIP_INDUCTOR=1")
def test_torch_compile_inductor():
    case = Case()
    _, (q, k, v, pk, pv), _, _ = make_inputs(case)
    fn = torch.compile(lambda *a: prefix_attention(*a).relu(), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v, pk, pv), prefix_attention(q, k, v, pk, pv).relu())


def test_torch_compile_fullgraph_on_the_first_call():
    """A compiled function may be the very first caller of the op in a process (no eager warm-up)."""
    import subprocess
    import sys
    code = ("import torch\nfrom ptv2_kernels import prefix_attention\n"
            "x = [torch.randn(2, 2, 5, 8, requires_grad=True) for _ in range(3)]\n"
            "p = [torch.randn(2, 3, 8, requires_grad=True) for _ in range(2)]\n"
            "f = torch.compile(lambda *a: prefix_attention(*a), fullgraph=True, backend='aot_eager')\n"
            "f(*x, *p).sum().backward()\nprint(p[0].grad.abs().sum() > 0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "tensor(True)"
