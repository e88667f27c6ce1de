"""Triton backend of ``prefix_attention``: fused forward and backward kernels (GPU, sm_80+; CPU through
the Triton interpreter when ``TRITON_INTERPRET=1``, for tests).

Triton is imported only when the backend is used, so ``import ptv2_kernels.backends.triton`` works (and
``availability()`` explains) on an installation without it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..base import FEATURES, Backend, Params


def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # missing, or broken against this torch
        return f"needs triton, which cannot be imported ({type(e).__name__}: {e})"
    return None


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda", "cpu")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    features = frozenset(FEATURES)
    head_dims = "multiples of 8 up to 128"

    def availability(self) -> Optional[str]:
        return _triton_import_error()

    def supports_head_dim(self, head_dim: int) -> bool:
        return 0 < head_dim <= 128 and head_dim % 8 == 0

    def device_reason(self, device: torch.device) -> Optional[str]:
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "needs a CUDA device, and torch sees none"
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                return f"needs compute capability >= 8.0, got {major}.{minor}"
            return None
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                return "runs on CPU tensors only under the Triton interpreter (set TRITON_INTERPRET=1)"
            return None
        return f"runs on cuda (or cpu with TRITON_INTERPRET=1) tensors, got {device.type}"

    def forward(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params):
        from . import launch

        return launch.forward(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params)

    def backward(self, grad_out, grad_lse, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index,
                 out, lse, params: Params, needs, saved=None):
        from . import launch

        return launch.backward(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, key_padding_mask,
                               prefix_index, out, lse, params, needs)


BACKEND = TritonBackend()
