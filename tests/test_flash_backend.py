"""The flash backend against the float64 reference: the flash path (the platform's flash kernel over each
row's [prefix; tokens]), the materialized path (attention dropout, LSE cotangents) and the prefix-only
backward, both passes, every feature."""

import pytest
import torch

from helpers import Case, check_against_reference, make_inputs, run
from ptv2_kernels import backends, dropout, prefix_attention
from ptv2_kernels.backends.base import Problem
from test_prefix_attention import ALL, FEATURES, ODD


@pytest.fixture
def no_composition(monkeypatch):
    """Every call through the autograd.Function, whatever its size (the paths below are its)."""
    from ptv2_kernels.backends import flash

    monkeypatch.setattr(flash, "_COMPOSED_BYTES", 0)


@pytest.fixture(autouse=True)
def per_row_at_every_length(monkeypatch):
    """The per-row path at the small N these tests use (it starts at N = 128 otherwise)."""
    from ptv2_kernels.backends import flash

    monkeypatch.setattr(flash, "_PER_ROW_FROM_N", 1)


@pytest.fixture(autouse=True)
def reference_draws_platform_masks(monkeypatch):
    """The flash backend's dropout masks come from the platform RNG; the reference draws the same ones."""
    monkeypatch.setattr(dropout, "attention_keep", dropout.platform_attention_keep)
    monkeypatch.setattr(dropout, "prefix_keep",
                        lambda seed, stream, p, b, h, n, d, device, rows=None:
                        dropout.platform_prefix_keep(seed, stream, p, b, h, n, d, device))


RIGHT_PADDED = [  # one flash call per row over the prefix and its real tokens
    Case(B=5, N=9, mask=True, right_padded=True),
    Case(B=4, N=13, mask=True, right_padded=True, causal=True, Hq=4, Hkv=2, transposed=True),
    Case(B=3, N=7, P=0, mask=True, right_padded=True, empty_rows=True),
    Case(B=4, N=8, mask=True, right_padded=True, T=2, needs=(True, False, True, True, False)),
    Case(B=4, N=10, mask=True, right_padded=True, T=3, Hq=4, Hkv=2, prefix_dropout_p=0.3, causal=True),
]
PREFIX_ONLY = [  # the prefix gradients as GEMMs, no flash backward
    Case(needs=(False, False, False, True, True), T=2, B=3, Hq=4, Hkv=2, mask=True, causal=True,
         prefix_dropout_p=0.2, grad_lse=False),
    Case(needs=(False, False, False, False, True), B=4, N=9, mask=True, right_padded=True, grad_lse=False),
]
NO_LSE_GRAD = [Case(**{**c.__dict__, "grad_lse": False}) for c in ALL + RIGHT_PADDED if not c.dropout_p] + PREFIX_ONLY


@pytest.mark.parametrize("case", ALL + RIGHT_PADDED + NO_LSE_GRAD, ids=str)
def test_flash_float32(case):
    check_against_reference(case, "flash", torch.float32)


@pytest.mark.parametrize("case", ALL + RIGHT_PADDED + NO_LSE_GRAD, ids=str)
def test_flash_float64_exact(case):
    check_against_reference(case, "flash", torch.float64, slack=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [ODD[1], FEATURES[4], FEATURES[11],
                                  Case(mask=True, transposed=True, grad_lse=False)], ids=str)
def test_flash_half(case, dtype):
    check_against_reference(case, "flash", dtype)


COMPOSABLE = [c for c in NO_LSE_GRAD if not c.prefix_dropout_p  # with the float64 K/V under _COMPOSED_BYTES
              and 2 * c.B * c.Hkv * (c.P + c.N) * c.D * 8 <= 64 * 1024]


@pytest.mark.parametrize("case", COMPOSABLE, ids=str)
def test_small_calls_without_lse_compose_differentiable_ops(case, monkeypatch):
    """Below _COMPOSED_BYTES of joined K/V, a call that returns no LSE is recorded by autograd op by op
    (no autograd.Function, whose Python overhead dominates at such sizes)."""
    from ptv2_kernels import ops

    monkeypatch.setattr(ops._EagerPrefixAttention, "apply", lambda *a: pytest.fail("autograd.Function ran"))
    check_against_reference(case, "flash", torch.float64, slack=0.0, return_lse=False)
    check_against_reference(case, "flash", torch.float32, return_lse=False)


def test_larger_calls_go_through_the_autograd_function(no_composition):
    """Above _COMPOSED_BYTES the joined K/V is rebuilt in backward rather than kept."""
    case = Case(mask=True, causal=True, Hq=4, Hkv=2, grad_lse=False)
    _, inputs, mask, _ = make_inputs(case)
    out = prefix_attention(*inputs, mask, causal=True, backend="flash")
    assert type(out.grad_fn).__name__ == "_EagerPrefixAttentionBackward"
    check_against_reference(case, "flash", torch.float64, slack=0.0, return_lse=False)


def test_flash_path_is_taken_without_dropout_and_lse_gradient(monkeypatch, no_composition):
    """The flash kernel's backward runs when nothing needs the materialized path, and not otherwise."""
    from ptv2_kernels.backends import flash

    calls = []
    real = flash._flash_backward
    monkeypatch.setattr(flash, "_flash_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = Case(mask=True, transposed=True, grad_lse=False)
    check_against_reference(case, "flash", torch.float64, slack=0.0)
    assert calls == [1]
    check_against_reference(Case(mask=True, dropout_p=0.2), "flash", torch.float64, slack=0.0)
    assert calls == [1]


def test_right_padding_calls_the_flash_kernel_per_row_over_real_tokens(monkeypatch, no_composition):
    from ptv2_kernels.backends import flash

    keys = []
    real = flash._flash
    monkeypatch.setattr(flash, "_flash", lambda q, k, v, **kw: keys.append(k.shape[2]) or real(q, k, v, **kw))
    case = Case(B=5, N=9, mask=True, right_padded=True, grad_lse=False)
    _, inputs, mask, _ = make_inputs(case)
    prefix_attention(*inputs, mask, backend="flash")
    assert keys == [case.P + n for n in mask.sum(-1).tolist()]
    keys.clear()
    monkeypatch.setattr(flash, "_PER_ROW_FROM_N", case.N + 1)  # rows this short: one batched masked call
    prefix_attention(*inputs, mask, backend="flash")
    assert keys == [case.P + case.N]


def test_prefix_only_gradient_skips_the_token_backward(monkeypatch, no_composition):
    """The first layer's q, k, v come from frozen embeddings: only the prefix part's backward runs."""
    from ptv2_kernels.backends import flash

    monkeypatch.setattr(flash, "_flash_backward", lambda *a, **k: pytest.fail("token backward ran"))
    for case in PREFIX_ONLY:
        check_against_reference(case, "flash", torch.float32)


def test_unpadded_batch_is_one_flash_call_over_prefix_and_tokens(monkeypatch, no_composition):
    """A mask with nothing padded is dropped: one unmasked call over P + N keys."""
    from ptv2_kernels.backends import flash

    calls = []
    real = flash._flash
    monkeypatch.setattr(flash, "_flash", lambda q, k, v, **kw: calls.append((k.shape[2], kw["attn_mask"]))
                        or real(q, k, v, **kw))
    case = Case(B=3, N=9, P=4, transposed=True)
    _, inputs, _, _ = make_inputs(case)
    prefix_attention(*inputs, torch.ones(3, 9, dtype=torch.bool), backend="flash")
    assert calls == [(13, None)]


@pytest.mark.parametrize("case", [Case(B=2, N=5, P=3, transposed=True), Case(B=3, N=4, P=2, T=2),
                                  Case(B=2, N=6, P=3, transposed=True, prefix_dropout_p=0.5)], ids=str)
def test_joined_keys_follow_the_token_layout(case):
    """transformers' (B, N, H, D) memory stays (B, P + N, H, D): the tokens' copy is one block per row."""
    from ptv2_kernels.backends import flash

    _, (q, k, v, pk, pv), _, index = make_inputs(case)
    bank = (pk, pv) if case.T else (pk[None], pv[None])
    params = flash.Params(False, 0.5, 0.0, case.prefix_dropout_p, 7)
    call = flash._Joined(q, k, v, *bank, None, index, params)
    joined = call.joined("k")
    assert joined.transpose(1, 2).is_contiguous() == case.transposed
    assert torch.equal(joined[:, :, case.P:], k)
    assert torch.equal(joined, call.joined_differentiable("k"))
    rows = bank[0][index] if case.T else bank[0].expand(case.B, -1, -1, -1)
    if case.prefix_dropout_p:
        kept = joined[:, :, :case.P] != 0
        assert 0 < kept.float().mean() < 1
        rows = torch.where(kept, rows / (1 - case.prefix_dropout_p), torch.zeros_like(rows))
    torch.testing.assert_close(joined[:, :, :case.P], rows)


def _in_fresh_thread(fn):
    """``fn()`` on a new thread, so on an empty workspace; its result or exception comes back."""
    import threading

    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised on the test's thread)
            result["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_workspace_is_reused_across_calls_and_never_joins_a_graph(no_composition):
    from ptv2_kernels.backends import flash

    case = Case(B=3, N=9, P=4, transposed=True, mask=True)
    _, inputs, _, _ = make_inputs(case)

    def two_steps():
        seen = []
        for _ in range(2):
            out = prefix_attention(*inputs, backend="flash")
            torch.autograd.grad(out.sum(), [t for t in inputs[:5]])
            bufs = flash._WORKSPACE.buffers
            seen.append({slot: (b.data_ptr(), b.requires_grad, b.grad_fn) for slot, b in bufs.items()})
        return seen

    first, second = _in_fresh_thread(two_steps)
    assert set(first) == {"k", "v"} and first == second
    assert all(not needs_grad and fn is None for _, needs_grad, fn in first.values())


def test_workspace_made_in_inference_mode_serves_training_calls(no_composition):
    case = Case(B=2, N=5, P=3, transposed=True)
    _, inputs, _, _ = make_inputs(case)

    def inference_then_training():
        with torch.inference_mode():
            prefix_attention(*[t.detach() for t in inputs], backend="flash")
        out = prefix_attention(*inputs, backend="flash")
        return torch.autograd.grad(out.sum(), inputs[3])[0]

    want = torch.autograd.grad(prefix_attention(*inputs, backend="flash").sum(), inputs[3])[0]
    torch.testing.assert_close(_in_fresh_thread(inference_then_training), want, rtol=0, atol=0)


def test_calls_above_the_workspace_bound_keep_no_memory(monkeypatch, no_composition):
    from ptv2_kernels.backends import flash

    monkeypatch.setattr(flash, "_WORKSPACE_BYTES", 64)
    case = Case(B=2, N=6, P=3, transposed=True, mask=True, right_padded=True)
    assert _in_fresh_thread(lambda: (check_against_reference(case, "flash", torch.float64, slack=0.0),
                                     dict(flash._WORKSPACE.buffers))[1]) == {}


def test_backward_reads_head_major_keys_and_values(monkeypatch, no_composition):
    """The flash backward runs faster on head-major K/V; the forward on the tokens' layout."""
    from ptv2_kernels.backends import flash

    layouts = []
    for name in ("_flash", "_flash_backward"):
        real = getattr(flash, name)
        keys = 2 if name == "_flash_backward" else 1
        monkeypatch.setattr(flash, name, lambda *a, _real=real, _i=keys, _n=name, **kw:
                            layouts.append((_n, a[_i].is_contiguous())) or _real(*a, **kw))
    _, inputs, _, _ = make_inputs(Case(B=3, N=9, P=4, transposed=True))
    torch.autograd.grad(prefix_attention(*inputs, backend="flash").sum(), inputs[1])
    assert layouts == [("_flash", False), ("_flash_backward", True)]


def test_merged_output_is_written_in_the_query_layout_without_a_copy():
    case = Case(transposed=True, B=3, N=9, P=4)
    _, (q, k, v, pk, pv), _, _ = make_inputs(case)
    out = prefix_attention(q, k, v, pk, pv, backend="flash")
    assert out.stride() == q.stride()


def test_dropout_masks_equal_in_forward_and_backward():
    """Finite differences through the platform-RNG masks: the backward reuses the forward's masks."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
         for s in ((2, 2, 3, 4),) * 3 + ((2, 2, 4),) * 2]

    def fn(*args):
        return prefix_attention(*args, dropout_p=0.4, prefix_dropout_p=0.3, causal=True, backend="flash",
                                generator=torch.Generator().manual_seed(5))

    assert torch.autograd.gradcheck(fn, x, eps=1e-6, atol=1e-6)


def test_deterministic_prefix_gradient_is_bitwise_repeatable():
    case = Case(B=4, N=33, P=7, mask=True, transposed=True, needs=(False, False, False, True, True))
    _, inputs, mask, index = make_inputs(case)
    first = run(prefix_attention, inputs, mask, index, case, backend="flash")[2]
    again = run(prefix_attention, inputs, mask, index, case, backend="flash")[2]
    assert all(torch.equal(a, b) for a, b in zip(first[3:], again[3:]))
    problem = Problem(torch.device("cpu"), torch.float32, 32, frozenset({"deterministic_prefix_grad"}))
    assert backends.select(problem).name == "flash"


def test_flash_declines_other_devices_with_a_reason():
    problem = Problem(torch.device("meta"), torch.float32, 32, frozenset())
    assert "runs on cpu tensors, got meta" in backends.get("flash").reason(problem)
