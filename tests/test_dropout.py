"""Dropout: keep rates, reproducibility, forward/backward consistency, per-row prefix masks."""

import pytest
import torch

from ptv2_kernels import dropout, prefix_attention, prefix_attention_reference


def test_fmix32_matches_python_ints():
    xs = torch.tensor([0, 1, 2, 0xFFFFFFFF, 0x12345678, 0x80000000], dtype=torch.int64)
    assert dropout.fmix32(xs).tolist() == [dropout.fmix32_int(int(x)) for x in xs]


@pytest.mark.parametrize("masks", [dropout.attention_keep, dropout.platform_attention_keep],
                         ids=["hash", "platform"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p, masks):
    keep = masks(seed=7, p=p, batch=4, heads=4, n=64, keys=81, device="cpu")
    rate = keep.float().mean().item()
    # 81920 Bernoulli draws: 5 standard deviations is under 0.01
    assert abs(rate - (1 - p)) < 0.01, rate


@pytest.mark.parametrize("attention,prefix", [(dropout.attention_keep, dropout.prefix_keep),
                                              (dropout.platform_attention_keep, dropout.platform_prefix_keep)],
                         ids=["hash", "platform"])
def test_masks_are_uncorrelated_across_rows_columns_and_streams(attention, prefix):
    keep = attention(seed=3, p=0.5, batch=1, heads=1, n=256, keys=256, device="cpu").float()[0, 0]
    for a, b in ((keep[:-1], keep[1:]), (keep[:, :-1], keep[:, 1:]), (keep[:, 0::2], keep[:, 1::2])):
        c = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(c) < 0.02
    a = prefix(3, dropout.STREAM_PREFIX_K, 0.5, 8, 2, 16, 32, "cpu")
    b = prefix(3, dropout.STREAM_PREFIX_V, 0.5, 8, 2, 16, 32, "cpu")
    assert (a == b).float().mean().item() < 0.6


def _inputs(B=3, H=2, N=6, P=4, D=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype, requires_grad=True)  # noqa: E731
    return mk(B, H, N, D), mk(B, H, N, D), mk(B, H, N, D), mk(H, P, D), mk(H, P, D)


def test_same_seed_same_result_other_seed_other_result():
    x = _inputs()
    run = lambda s: prefix_attention(*x, dropout_p=0.5, prefix_dropout_p=0.3,  # noqa: E731
                                     generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_default_generator_follows_manual_seed():
    x = _inputs()
    torch.manual_seed(11)
    a = prefix_attention(*x, dropout_p=0.5)
    torch.manual_seed(11)
    b = prefix_attention(*x, dropout_p=0.5)
    assert torch.equal(a, b)


def test_gradcheck_with_fixed_seed():
    """The backward uses exactly the forward's masks: finite differences agree."""
    x = _inputs(B=2, N=3, P=2, D=4)

    def fn(*args):
        return prefix_attention(*args, dropout_p=0.4, prefix_dropout_p=0.3, causal=True,
                                generator=torch.Generator().manual_seed(5))

    assert torch.autograd.gradcheck(fn, x, eps=1e-6, atol=1e-6)


def test_prefix_dropout_is_independent_across_rows():
    H, N, P, D = 2, 4, 6, 8
    g = torch.Generator().manual_seed(1)
    q1, k1, v1 = (torch.randn(1, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    q, k, v = (t.expand(4, -1, -1, -1) for t in (q1, k1, v1))  # four identical rows
    pk, pv = torch.randn(H, P, D, dtype=torch.float64), torch.randn(H, P, D, dtype=torch.float64)
    out = prefix_attention(q, k, v, pk, pv, prefix_dropout_p=0.5, generator=torch.Generator().manual_seed(0))
    for i in range(1, 4):
        assert not torch.allclose(out[0], out[i])
    same = prefix_attention(q, k, v, pk, pv)
    torch.testing.assert_close(same[0], same[3])
    masks = dropout.prefix_keep(9, dropout.STREAM_PREFIX_K, 0.5, 4, H, P, D, "cpu")
    assert not torch.equal(masks[0], masks[1])


def test_dropout_expectation_is_unbiased():
    x = [t.detach() for t in _inputs(B=1, N=8, P=8, D=8)]
    clean = prefix_attention(*x)
    g = torch.Generator().manual_seed(0)
    mean = sum(prefix_attention(*x, dropout_p=0.3, generator=g) for _ in range(400)) / 400
    assert (mean - clean).abs().max().item() < 0.12


def test_hash_backends_and_reference_draw_the_same_masks():
    x = _inputs()
    a = prefix_attention(*x, dropout_p=0.3, prefix_dropout_p=0.2, generator=torch.Generator().manual_seed(4),
                         backend="torch")
    b = prefix_attention_reference(*x, dropout_p=0.3, prefix_dropout_p=0.2,
                                   generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
