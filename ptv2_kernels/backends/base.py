"""What a backend is: a declaration of what it supports, and a forward and a backward.

The op layer (``ptv2_kernels.ops``) checks and normalizes the arguments, then hands every backend the
same thing:

- ``q`` ``(B, Hq, N, D)``, ``k``/``v`` ``(B, Hkv, N, D)``: any strides, last dim contiguous.
- ``prefix_k``/``prefix_v``: always a bank ``(T, Hkv, P, D)`` (a shared prefix arrives as T = 1),
  ``prefix_index``: None (every row reads entry 0) or int64 ``(B,)`` on the device, in range.
- ``key_padding_mask``: None or bool ``(B, N)``, True for real tokens.
- ``params``: the scalar settings (``Params``); ``seed`` is only meaningful when a dropout is on.

``forward`` returns ``(out, lse)``: ``out`` ``(B, Hq, N, D)`` in q's dtype, allocated with q's memory
layout (``torch.empty_like(q)``), and ``lse`` ``(B, Hq, N)`` in ``lse_dtype(q.dtype)`` (float32; float64
only for the torch backend's float64), the natural-log log-sum-exp of the
scaled scores over every visible key (-inf for a row that sees nothing; its output is zeros).

Eager calls go through ``forward_saving``, which may also return tensors for its own backward (the
``saved=`` argument; compiled graphs always recompute). ``backward`` gets ``grad_out`` (any strides),
``grad_lse`` (None, or float32 ``(B, Hq, N)`` when the caller back-propagates through the returned LSE: it enters as ``delta = rowsum(dO * O) - grad_lse``),
the forward's inputs and outputs, and ``needs``: five bools for (q, k, v, prefix_k, prefix_v). It
returns five tensors or None, None exactly where ``needs`` is False, each in its input's dtype and shape
(``dprefix_*`` as ``(T, Hkv, P, D)``); a gradient not needed is not computed. A backend that declares
the ``deterministic_prefix_grad`` feature gives bitwise reproducible gradients while
``torch.are_deterministic_algorithms_enabled()``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# "deterministic_prefix_grad": the prefix will get a gradient while torch.use_deterministic_algorithms is
# on, so its batch reduction must give the same bits on every run (no float atomics)
FEATURES = ("causal", "key_padding_mask", "bank", "gqa", "dropout", "prefix_dropout",
            "deterministic_prefix_grad")


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The LSE is float32, except float64 for float64 inputs (so float64 checks stay exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Params(NamedTuple):  # a tuple: built on every call, at a fifth of a frozen dataclass's cost
    causal: bool
    softmax_scale: float
    dropout_p: float
    prefix_dropout_p: float
    seed: int


class Problem(NamedTuple):
    """What dispatch needs to know about one call, derived from its arguments."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    features: frozenset

    @staticmethod
    def describe(q, prefix_index, key_padding_mask, causal, dropout_p, prefix_dropout_p, hkv,
                 prefix_grad=False):
        """``prefix_grad``: whether prefix_k or prefix_v will be differentiated (the determinism
        setting is read here, at forward time, since that is when the backend is chosen)."""
        present = (("causal", causal), ("key_padding_mask", key_padding_mask is not None),
                   ("bank", prefix_index is not None), ("gqa", q.shape[1] != hkv), ("dropout", dropout_p > 0),
                   ("prefix_dropout", prefix_dropout_p > 0),
                   ("deterministic_prefix_grad", prefix_grad and torch.are_deterministic_algorithms_enabled()))
        return Problem(q.device, q.dtype, q.shape[-1], frozenset(name for name, on in present if on))


class Backend:
    """Base class; subclasses set the declaration and implement forward/backward."""

    name: str = ""
    devices: tuple = ()
    dtypes: tuple = ()
    features: frozenset = frozenset(FEATURES)
    head_dims: str = ""  # in words, for info and errors
    feature_notes: dict = {}  # why an unsupported feature is missing, in words, for errors
    paths: str = ""  # how it computes, and when it switches path, in words, for info

    def availability(self) -> Optional[str]:
        """None when the backend can run on this installation, else why not."""
        return None

    def supports_head_dim(self, head_dim: int) -> bool:
        return True

    def device_reason(self, device: torch.device) -> Optional[str]:
        if device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)} tensors, got {device.type}"
        return None

    def reason(self, problem: Problem) -> Optional[str]:
        """None when the backend can run ``problem``, else why not, in words."""
        why = self.availability()
        if why:
            return why
        why = self.device_reason(problem.device)
        if why:
            return why
        if problem.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"supports dtypes {names}, got {str(problem.dtype).replace('torch.', '')}"
        if not self.supports_head_dim(problem.head_dim):
            return f"supports head dims {self.head_dims}, got {problem.head_dim}"
        missing = sorted(problem.features - self.features)
        if missing:
            said = (f"{m} ({self.feature_notes[m]})" if m in self.feature_notes else m for m in missing)
            return f"does not support {', '.join(said)}"
        return None

    def forward(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params):
        raise NotImplementedError

    def forward_saving(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params):
        """The eager autograd forward: ``(out, lse, saved)``, ``saved`` being a tuple of tensors this
        backend's backward can reuse instead of recomputing (passed back as ``saved=``); None by default."""
        return (*self.forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params), None)

    def backward(self, grad_out, grad_lse, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index,
                 out, lse, params: Params, needs, saved=None):
        raise NotImplementedError

    def composed(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params):
        """For an eager call that returns no LSE: the output computed with differentiable torch ops
        (autograd records them; no autograd.Function), or None to go through ``forward_saving`` and
        ``backward``. For sizes where the Function's Python overhead dominates."""
        return None
