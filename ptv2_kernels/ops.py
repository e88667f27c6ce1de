"""``prefix_attention``: attention over ``[shared prefix; tokens]`` with the prefix read in place.

Three tiers, as in the best kernel packages:

1. ``ptv2::prefix_attention_fwd`` / ``ptv2::prefix_attention_bwd``: ``torch.library`` custom ops with
   fake (shape) implementations, so ``torch.compile(fullgraph=True)`` traces through the op;
2. autograd registered on the forward op, saving only the inputs, the output and the LSE;
3. :func:`prefix_attention`, which checks every argument, casts under autocast, picks a backend and
   draws the dropout seed.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional

import torch

from . import backends as _backends
from . import dropout as _dropout
from .backends.base import Params, Problem, lse_dtype

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------------
# Argument checks: each error names the argument, what was expected and what came.


def _check_tensor(name: str, x, rank_desc: str, ranks) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {rank_desc}, got {type(x).__name__}")
    if x.dim() not in ranks:
        raise ValueError(f"{name} must be {'or '.join(f'{r}-D ' for r in ranks)}{rank_desc}, "
                         f"got a {x.dim()}-D tensor of shape {tuple(x.shape)}")


def _is_real(x) -> bool:
    """A real number that is not a bool (the common float and int first: an ABC check is slow)."""
    return type(x) is float or type(x) is int or (not isinstance(x, bool) and isinstance(x, numbers.Real))


def _check_arguments(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale, dropout_p,
                     prefix_dropout_p, prefix_index, generator, return_lse):
    _check_tensor("q", q, "(B, Hq, N, D)", (4,))
    _check_tensor("k", k, "(B, Hkv, N, D)", (4,))
    _check_tensor("v", v, "(B, Hkv, N, D)", (4,))
    _check_tensor("prefix_k", prefix_k, "(Hkv, P, D) or a bank (T, Hkv, P, D)", (3, 4))
    _check_tensor("prefix_v", prefix_v, "(Hkv, P, D) or a bank (T, Hkv, P, D)", (3, 4))
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {_dtype_name(q.dtype)}")
    dtype, device = q.dtype, q.device
    for name, x in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if x.dtype != dtype:
            raise TypeError(f"{name} must have q's dtype {_dtype_name(dtype)}, got {_dtype_name(x.dtype)}")
        if x.device != device:
            raise ValueError(f"{name} must be on q's device {device}, got {x.device}")
    B, Hq, N, D = q.shape
    k_shape = k.shape
    if k_shape[0] != B or k_shape[2] != N or k_shape[3] != D:
        raise ValueError(f"k must be (B, Hkv, N, D) = ({B}, Hkv, {N}, {D}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k_shape)}")
    if v.shape != k_shape:
        raise ValueError(f"v must have k's shape {tuple(k_shape)}, got {tuple(v.shape)}")
    Hkv = k_shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's head count Hq={Hq} must be a multiple of k's head count Hkv={Hkv} "
                         f"(grouped-query attention)")
    if D == 0:
        raise ValueError(f"q's head dim D must be positive, got {D}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v must have prefix_k's shape {tuple(prefix_k.shape)}, "
                         f"got {tuple(prefix_v.shape)}")
    if prefix_k.shape[-3] != Hkv or prefix_k.shape[-1] != D:
        want = f"(Hkv, P, D) = ({Hkv}, P, {D})" if prefix_k.dim() == 3 else f"(T, {Hkv}, P, {D})"
        raise ValueError(f"prefix_k must be {want} to match k, got {tuple(prefix_k.shape)}")

    bank = prefix_k.dim() == 4
    if bank and prefix_index is None:
        raise ValueError(f"prefix_index (B,) is required with a prefix bank (T, Hkv, P, D); "
                         f"got prefix_k of shape {tuple(prefix_k.shape)} and prefix_index=None")
    if not bank and prefix_index is not None:
        raise ValueError(f"prefix_index selects entries of a prefix bank (T, Hkv, P, D), but prefix_k "
                         f"is a single prefix of shape {tuple(prefix_k.shape)}")
    if prefix_index is not None:
        if not isinstance(prefix_index, torch.Tensor):
            raise TypeError(f"prefix_index must be an integer torch.Tensor (B,), "
                            f"got {type(prefix_index).__name__}")
        if prefix_index.dtype not in _INDEX_DTYPES:
            raise TypeError(f"prefix_index must have an integer dtype, got {_dtype_name(prefix_index.dtype)}")
        if tuple(prefix_index.shape) != (B,):
            raise ValueError(f"prefix_index must have shape (B,) = ({B},), got {tuple(prefix_index.shape)}")
        if prefix_index.device != q.device:
            raise ValueError(f"prefix_index must be on q's device {q.device}, got {prefix_index.device}")
        if B and not torch.compiler.is_compiling():
            T = prefix_k.shape[0]
            if prefix_index.device.type == "cpu":
                lo, hi = (int(x) for x in torch.aminmax(prefix_index))
                if lo < 0 or hi >= T:
                    raise ValueError(f"prefix_index values must be in [0, T) = [0, {T}), "
                                     f"got values from {lo} to {hi}")
            else:  # checked on the device: reading the values back would stall every call
                torch._assert_async(((prefix_index >= 0) & (prefix_index < T)).all(),
                                    f"prefix_index values must be in [0, T) = [0, {T})")

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool torch.Tensor (B, N), "
                            f"got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True for real tokens), "
                            f"got {_dtype_name(key_padding_mask.dtype)}")
        if tuple(key_padding_mask.shape) != (B, N):
            raise ValueError(f"key_padding_mask must have shape (B, N) = ({B}, {N}), "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, "
                             f"got {key_padding_mask.device}")

    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if softmax_scale is not None:
        if not _is_real(softmax_scale):
            raise TypeError(f"softmax_scale must be a real number or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    for name, p in (("dropout_p", dropout_p), ("prefix_dropout_p", prefix_dropout_p)):
        if not _is_real(p):
            raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


# --------------------------------------------------------------------------------------------------
# Tier 1: custom ops.


def _params(causal, softmax_scale, dropout_p, prefix_dropout_p, seed) -> Params:
    return Params(causal, float(softmax_scale), float(dropout_p), float(prefix_dropout_p),
                  int(seed) if seed is not None else 0)


@torch.library.custom_op("ptv2::prefix_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
            prefix_v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
            prefix_index: Optional[torch.Tensor], seed: Optional[torch.Tensor], causal: bool,
            softmax_scale: float, dropout_p: float, prefix_dropout_p: float,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    params = _params(causal, softmax_scale, dropout_p, prefix_dropout_p, seed)
    return _backends.get(backend).forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index,
                                          params)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, seed, causal, softmax_scale,
              dropout_p, prefix_dropout_p, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


@torch.library.custom_op("ptv2::prefix_attention_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
            key_padding_mask: Optional[torch.Tensor], prefix_index: Optional[torch.Tensor],
            seed: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, causal: bool,
            softmax_scale: float, dropout_p: float, prefix_dropout_p: float, backend: str,
            needs: list[bool]) -> list[torch.Tensor]:
    params = _params(causal, softmax_scale, dropout_p, prefix_dropout_p, seed)
    grads = _backends.get(backend).backward(grad_out, grad_lse, q, k, v, prefix_k, prefix_v,
                                            key_padding_mask, prefix_index, out, lse, params, needs)
    # A custom op cannot return None: a gradient nobody needs comes back as an empty tensor.
    return [g if g is not None else x.new_empty(0) for g, x in zip(grads, (q, k, v, prefix_k, prefix_v))]


@_bwd_op.register_fake
def _bwd_fake(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, seed, out,
              lse, causal, softmax_scale, dropout_p, prefix_dropout_p, backend, needs):
    return [torch.empty_like(x) if need else x.new_empty(0)
            for x, need in zip((q, k, v, prefix_k, prefix_v), needs)]


# --------------------------------------------------------------------------------------------------
# Tier 2: autograd. Compiled graphs go through the custom ops (registered autograd below); eager calls
# skip the op dispatcher and run the backend under one autograd.Function.


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, seed, causal, softmax_scale,
     dropout_p, prefix_dropout_p, backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, seed, out, lse)
    ctx.settings = (causal, softmax_scale, dropout_p, prefix_dropout_p, backend)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, seed, out, lse = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    if not any(needs):
        return (None,) * 13
    grads = _bwd_op(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, seed,
                    out, lse, *ctx.settings, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 8


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _outside_autocast(device_type: str):
    """Backends compute in the dtypes they were handed (the op has applied autocast already); an
    autocast region around them would recast their float32 accumulations."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _EagerPrefixAttention(torch.autograd.Function):
    """The same forward and backward as the custom ops, called on the backend directly."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, backend, params):
        with _outside_autocast(q.device.type):
            out, lse, saved = backend.forward_saving(q, k, v, prefix_k, prefix_v, key_padding_mask,
                                                     prefix_index, params)
        # everything through save_for_backward: saved-tensor hooks (offloading, memory accounts) see it
        saved = () if saved is None else tuple(saved)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index, *saved)
        ctx.extra = (backend, params)
        ctx.set_materialize_grads(False)  # an unused LSE gets no zero cotangent: its term is skipped
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index, *saved = ctx.saved_tensors
        backend, params = ctx.extra
        saved = tuple(saved) or None
        needs = list(ctx.needs_input_grad[:5])
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        with _outside_autocast(q.device.type):
            grads = backend.backward(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, key_padding_mask,
                                     prefix_index, out, lse, params, needs, saved=saved)
        return (*grads, None, None, None, None)


# --------------------------------------------------------------------------------------------------
# Tier 3: the public function.


def autocast_inputs(tensors):
    """Under autocast, floating inputs (a float32 prefix beside bf16 activations) run in its dtype."""
    device_type = getattr(getattr(tensors[0], "device", None), "type", None)
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
        return tensors  # the argument checks report what is wrong
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) for t in tensors]


def prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=None, *, causal=False,
                     softmax_scale=None, dropout_p=0.0, prefix_dropout_p=0.0, prefix_index=None,
                     generator=None, return_lse=False, backend=None):
    """Attention of ``q`` over ``[prefix; tokens]`` keys and values, reading the prefix in place.

    Args:
        q: ``(B, Hq, N, D)`` queries.
        k, v: ``(B, Hkv, N, D)`` token keys and values; ``Hq % Hkv == 0`` (query head h reads kv head
            ``h // (Hq // Hkv)``). Any strides: the transposed views transformers passes work as-is.
        prefix_k, prefix_v: ``(Hkv, P, D)`` shared by every row, or a bank ``(T, Hkv, P, D)``.
        key_padding_mask: ``(B, N)`` bool, True for real tokens; prefix positions are always visible.
        causal: token i sees every prefix position and tokens ``j <= i``.
        softmax_scale: defaults to ``D ** -0.5``.
        dropout_p: dropout on the attention probabilities (same mask in forward and backward).
        prefix_dropout_p: dropout on the prefix K/V elements, drawn independently for every row.
        prefix_index: ``(B,)`` integer entry of the bank each row reads; required with a bank only.
        generator: the ``torch.Generator`` the dropout seed is drawn from (default generator if None).
        return_lse: also return the ``(B, Hq, N)`` log-sum-exp of the scaled scores (float32; float64
            for float64 inputs); gradients flow through it too.
        backend: ``"cuda"``, ``"triton"``, ``"flash"``, ``"torch"`` or None for the fastest that
            supports the inputs.

    Returns:
        ``(B, Hq, N, D)`` in q's dtype (and the LSE when ``return_lse``). A row that sees nothing
        (P = 0 and all its tokens masked) gives zeros and zero gradients.
    """
    q, k, v, prefix_k, prefix_v = autocast_inputs([q, k, v, prefix_k, prefix_v])
    _check_arguments(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale, dropout_p,
                     prefix_dropout_p, prefix_index, generator, return_lse)
    if backend is not None and backend not in _backends.NAMES:
        raise ValueError(f"backend must be one of {', '.join(_backends.NAMES)} or None, got {backend!r}")
    shared = prefix_k.dim() == 3
    if shared:
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
    D = q.shape[-1]
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)

    if q.numel() == 0:
        out = torch.zeros_like(q) + 0 * (q.sum() + k.sum() + v.sum() + prefix_k.sum() + prefix_v.sum())
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=lse_dtype(q.dtype))
        return (out, lse) if return_lse else out

    prefix_grad = torch.is_grad_enabled() and (prefix_k.requires_grad or prefix_v.requires_grad)
    problem = Problem.describe(q, prefix_index, key_padding_mask, causal, dropout_p, prefix_dropout_p,
                               k.shape[1], prefix_grad)
    chosen = _backends.select(problem, backend)
    # Kernels index with strides but need unit stride along the head dim.
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or prefix_k.stride(-1) != 1 \
            or prefix_v.stride(-1) != 1:
        q, k, v, prefix_k, prefix_v = (x if x.stride(-1) == 1 else x.contiguous()
                                       for x in (q, k, v, prefix_k, prefix_v))
    if prefix_index is not None:
        prefix_index = prefix_index.to(torch.int64).contiguous()
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.contiguous()
    seed = _dropout.draw_seed(generator) if (dropout_p > 0 or prefix_dropout_p > 0) else None

    if torch.compiler.is_compiling():
        out, lse = _fwd_op(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, seed, causal, scale,
                           float(dropout_p), float(prefix_dropout_p), chosen.name)
        return (out, lse) if return_lse else out
    params = _params(causal, scale, dropout_p, prefix_dropout_p, seed)
    if not return_lse:
        with _outside_autocast(q.device.type):
            out = chosen.composed(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params)
        if out is not None:
            return out
    out, lse = _EagerPrefixAttention.apply(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index,
                                           chosen, params)
    return (out, lse) if return_lse else out
