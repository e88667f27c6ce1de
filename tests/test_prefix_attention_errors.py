"""Bad input: every error names the argument, what was expected and what came."""

import math

import pytest
import torch

from ptv2_kernels import prefix_attention


def _ok(B=2, Hq=4, Hkv=2, N=5, P=3, D=16, dtype=torch.float32):
    return dict(q=torch.randn(B, Hq, N, D, dtype=dtype), k=torch.randn(B, Hkv, N, D, dtype=dtype),
                v=torch.randn(B, Hkv, N, D, dtype=dtype), prefix_k=torch.randn(Hkv, P, D, dtype=dtype),
                prefix_v=torch.randn(Hkv, P, D, dtype=dtype))


def _call(**changes):
    args = _ok()
    kwargs = {}
    for name, value in changes.items():
        (args if name in args else kwargs)[name] = value
    return prefix_attention(args["q"], args["k"], args["v"], args["prefix_k"], args["prefix_v"], **kwargs)


BAD = [
    (dict(q=[1.0]), TypeError, r"q must be a torch.Tensor \(B, Hq, N, D\), got list"),
    (dict(q=torch.randn(4, 5, 16)), ValueError, r"q must be 4-D \(B, Hq, N, D\), got a 3-D tensor of shape \(4, 5, 16\)"),
    (dict(k=torch.randn(2, 2, 5)), ValueError, r"k must be 4-D .*got a 3-D tensor"),
    (dict(prefix_k=torch.randn(3, 16)), ValueError, r"prefix_k must be 3-D or 4-D \(Hkv, P, D\) or a bank"),
    (dict(q=torch.randint(0, 3, (2, 4, 5, 16))), TypeError, r"q must be float16, bfloat16, float32 or float64, got int64"),
    (dict(v=torch.randn(2, 2, 5, 16, dtype=torch.float16)), TypeError, r"v must have q's dtype float32, got float16"),
    (dict(prefix_v=torch.randn(2, 3, 16, dtype=torch.float64)), TypeError, r"prefix_v must have q's dtype float32, got float64"),
    (dict(k=torch.randn(2, 2, 6, 16)), ValueError, r"k must be \(B, Hkv, N, D\) = \(2, Hkv, 5, 16\) to match q \(2, 4, 5, 16\), got \(2, 2, 6, 16\)"),
    (dict(v=torch.randn(2, 2, 5, 8)), ValueError, r"v must have k's shape \(2, 2, 5, 16\), got \(2, 2, 5, 8\)"),
    (dict(k=torch.randn(2, 3, 5, 16), v=torch.randn(2, 3, 5, 16)), ValueError, r"Hq=4 must be a multiple of k's head count Hkv=3"),
    (dict(prefix_k=torch.randn(2, 3, 8), prefix_v=torch.randn(2, 3, 8)), ValueError, r"prefix_k must be \(Hkv, P, D\) = \(2, P, 16\) to match k, got \(2, 3, 8\)"),
    (dict(prefix_v=torch.randn(2, 4, 16)), ValueError, r"prefix_v must have prefix_k's shape \(2, 3, 16\), got \(2, 4, 16\)"),
    (dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16)), ValueError, r"prefix_index \(B,\) is required with a prefix bank"),
    (dict(prefix_index=torch.tensor([0, 1])), ValueError, r"prefix_index selects entries of a prefix bank .* single prefix of shape \(2, 3, 16\)"),
    (dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16), prefix_index=torch.tensor([0, 3])), ValueError, r"prefix_index values must be in \[0, T\) = \[0, 3\), got values from 0 to 3"),
    (dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16), prefix_index=torch.tensor([-1, 0])), ValueError, r"got values from -1 to 0"),
    (dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16), prefix_index=torch.tensor([0, 1, 2])), ValueError, r"prefix_index must have shape \(B,\) = \(2,\), got \(3,\)"),
    (dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16), prefix_index=torch.tensor([0.0, 1.0])), TypeError, r"prefix_index must have an integer dtype, got float32"),
    (dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16), prefix_index=[0, 1]), TypeError, r"prefix_index must be an integer torch.Tensor \(B,\), got list"),
    (dict(key_padding_mask=torch.ones(2, 5)), TypeError, r"key_padding_mask must be bool \(True for real tokens\), got float32"),
    (dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape \(B, N\) = \(2, 5\), got \(2, 6\)"),
    (dict(key_padding_mask=torch.ones(2, 1, 1, 5, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape \(B, N\) = \(2, 5\), got \(2, 1, 1, 5\)"),
    (dict(softmax_scale=math.inf), ValueError, r"softmax_scale must be finite, got inf"),
    (dict(softmax_scale=math.nan), ValueError, r"softmax_scale must be finite, got nan"),
    (dict(softmax_scale="0.1"), TypeError, r"softmax_scale must be a real number or None, got str"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\), got -0.1"),
    (dict(prefix_dropout_p=1.5), ValueError, r"prefix_dropout_p must be in \[0, 1\), got 1.5"),
    (dict(causal=1), TypeError, r"causal must be a bool, got int"),
    (dict(generator=3), TypeError, r"generator must be a torch.Generator or None, got int"),
    (dict(backend="sdpa"), ValueError, r"backend must be one of cuda, triton, flash, torch or None, got 'sdpa'"),
    (dict(return_lse="no"), TypeError, r"return_lse must be a bool, got str"),
]


@pytest.mark.parametrize("changes,error,message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_input_is_named(changes, error, message):
    with pytest.raises(error, match=message):
        _call(**changes)


def test_wrong_device_is_named():
    args = _ok()
    with pytest.raises(ValueError, match=r"k must be on q's device cpu, got meta"):
        prefix_attention(args["q"], args["k"].to("meta"), args["v"], args["prefix_k"], args["prefix_v"])


def test_unsupported_head_dim_on_a_kernel_backend():
    args = _ok(D=12)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run these inputs"):
        prefix_attention(*args.values(), backend="triton")


def test_non_contiguous_inputs_need_no_copy_by_the_caller():
    B, N, H, D = 2, 5, 4, 16
    qkv = torch.randn(B, N, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    pk, pv = torch.randn(H, 3, D), torch.randn(H, 3, D)
    torch.testing.assert_close(prefix_attention(q, k, v, pk, pv),
                               prefix_attention(q.contiguous(), k.contiguous(), v.contiguous(), pk, pv))
