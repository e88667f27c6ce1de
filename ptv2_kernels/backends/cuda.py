"""CUDA backend: the compiled extension ``ptv2_kernels._C`` (csrc/), sm_80+, on tensor cores (forward:
mma.sync with scores and output in registers; backward: wmma).

The extension takes data pointers, shapes and strides (no libtorch), so this module allocates every
output with torch, passes the current stream of the inputs' device, and guards that device. It is
imported lazily: the package and this module import without the extension, and the backend then
explains in ``availability()`` why it cannot run and how to build it.

Kernels (see csrc/): forward (online softmax over [prefix; tokens], LSE out); backward preprocess
(delta = rowsum(dO * O) - grad_lse); dQ; token dK/dV; prefix dK/dV reduced over the batch inside the
kernel into a float32 (T, Hkv, P, D) buffer (extra memory independent of B) with atomics, so the backend
declines a prefix gradient under ``torch.use_deterministic_algorithms(True)``. Only the kernels for
gradients in ``needs`` run.
"""

from __future__ import annotations

import importlib
import math
import warnings
from typing import Optional

import torch

from .. import dropout as _dropout
from .base import FEATURES, Backend, Params

BUILD_HINT = ("build it with `pip install -e . --no-deps` (or `pip install .`) on a machine with nvcc; "
              "PTV2_CUDA_ARCHS=90 (say) limits the build to one GPU architecture")

_C_MODULE = None
_C_ERROR: Optional[BaseException] = None
_SM_COUNT: dict = {}


def _load():
    """The extension module, or None (the import error is kept in ``_C_ERROR``)."""
    global _C_MODULE, _C_ERROR
    if _C_MODULE is None and _C_ERROR is None:
        try:
            _C_MODULE = importlib.import_module("ptv2_kernels._C")
        except Exception as e:  # not built, or built against something missing here
            _C_ERROR = e
    return _C_MODULE


def _require():
    mod = _load()
    if mod is None:
        raise RuntimeError(f"the CUDA backend is unavailable: {_unavailable_reason()}")
    return mod


def _unavailable_reason() -> str:
    err = _C_ERROR
    if isinstance(err, ModuleNotFoundError) and "ptv2_kernels._C" in str(err):
        return f"needs the compiled extension ptv2_kernels._C, which is not built; {BUILD_HINT}"
    return (f"cannot load the compiled extension ptv2_kernels._C ({type(err).__name__}: {err}); "
            f"rebuild it: {BUILD_HINT}")


def _arch_runs(cc: int, sass: list, ptx: int) -> bool:
    """Whether code built for ``sass`` (SASS) and ``ptx`` (PTX) runs on compute capability ``cc``."""
    if any(a // 10 == cc // 10 and a <= cc and not (a == 90 and cc != 90) for a in sass):
        return True  # SASS runs on the same major version with an equal or newer minor (sm_90 only on 9.0)
    return bool(ptx) and ptx <= cc


def _cuda_ver(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def build_info() -> dict:
    """What ``python -m ptv2_kernels.info`` reports about the compiled extension."""
    mod = _load()
    if mod is None:
        return {"built": False, "archs": [], "ptx_arch": None, "error": _unavailable_reason(), "path": None}
    return {
        "built": True,
        "archs": list(mod.compiled_archs()),
        "ptx_arch": int(mod.ptx_arch()) or None,
        "error": None,
        "path": getattr(mod, "__file__", None),
        "cuda_runtime": int(mod.cuda_runtime_version()),
    }


def _dtype_code(mod, dtype: torch.dtype) -> int:
    if dtype == torch.float16:
        return int(mod.DTYPE_FLOAT16)
    if dtype == torch.bfloat16:
        return int(mod.DTYPE_BFLOAT16)
    raise TypeError(f"the CUDA backend supports float16 and bfloat16, got {dtype}")


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _vec_ok(tensors, head_dim: int) -> bool:
    """16-byte vector loads are legal: aligned base pointers, row strides multiples of 8 elements."""
    if head_dim % 8:
        return False
    for t in tensors:
        if t is None:
            continue
        if t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:-1]):
            return False
    return True


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _alert_atomic_prefix_grad():
    """Selection refuses this backend for a deterministic prefix gradient at forward time; this catches
    determinism switched on between forward and backward. Raises, or warns under warn_only=True, as
    PyTorch's own atomic ops do."""
    msg = ("the cuda backend sums the prefix gradient with float atomics, but "
           "torch.use_deterministic_algorithms(True) was set after the forward chose it: enable it before "
           "the forward (the triton or torch backend is then chosen) or pass backend='triton'")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)


class CudaBackend(Backend):
    name = "cuda"
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    features = frozenset(FEATURES) - {"deterministic_prefix_grad"}
    head_dims = "multiples of 8 from 8 to 128"
    feature_notes = {"deterministic_prefix_grad": "it sums the prefix gradient over the batch with float "
                     "atomics, which torch.use_deterministic_algorithms(True) rules out"}

    def availability(self) -> Optional[str]:
        if _load() is None:
            return _unavailable_reason()
        return None

    def supports_head_dim(self, head_dim: int) -> bool:
        return 8 <= head_dim <= 128 and head_dim % 8 == 0

    def device_reason(self, device: torch.device) -> Optional[str]:
        if device.type != "cuda":
            return f"runs on cuda tensors, got {device.type}"
        if not torch.cuda.is_available():
            return "needs a CUDA device, and torch.cuda.is_available() is False"
        idx = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        cc = major * 10 + minor
        name = torch.cuda.get_device_name(idx)
        if cc < 80:
            return f"needs compute capability 8.0 or newer (sm_80+), got {major}.{minor} ({name})"
        mod = _load()
        if mod is not None:
            runtime, driver = int(mod.cuda_runtime_version()), int(mod.cuda_driver_version())
            if driver and driver < runtime:
                return (f"was built with CUDA {_cuda_ver(runtime)}, newer than this driver supports "
                        f"(CUDA {_cuda_ver(driver)}); update the driver or rebuild with an older nvcc")
            sass, ptx = list(mod.compiled_archs()), int(mod.ptx_arch())
            if not _arch_runs(cc, sass, ptx):
                built = ", ".join(f"sm_{a}" for a in sass) + (f" + PTX compute_{ptx}" if ptx else "")
                return (f"was built for {built}, which cannot run on this GPU ({name}, sm_{cc}); rebuild "
                        f"with PTV2_CUDA_ARCHS={cc} pip install -e . --no-deps")
        return None

    # ---- argument packing -------------------------------------------------------------------------
    @staticmethod
    def _common(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params) -> dict:
        B, Hq, N, D = q.shape
        T, Hkv, P, _ = prefix_k.shape
        a = {
            "q": q.data_ptr(), "k": k.data_ptr(), "v": v.data_ptr(),
            "pk": prefix_k.data_ptr(), "pv": prefix_v.data_ptr(),
            "B": B, "Hq": Hq, "Hkv": Hkv, "N": N, "P": P, "D": D, "T": T,
            "q_sb": q.stride(0), "q_sh": q.stride(1), "q_sn": q.stride(2),
            "k_sb": k.stride(0), "k_sh": k.stride(1), "k_sn": k.stride(2),
            "v_sb": v.stride(0), "v_sh": v.stride(1), "v_sn": v.stride(2),
            "pk_st": prefix_k.stride(0), "pk_sh": prefix_k.stride(1), "pk_sp": prefix_k.stride(2),
            "pv_st": prefix_v.stride(0), "pv_sh": prefix_v.stride(1), "pv_sp": prefix_v.stride(2),
            "scale": float(params.softmax_scale),
            "causal": bool(params.causal),
        }
        if key_padding_mask is not None:
            a["mask"] = key_padding_mask.data_ptr()
            a["m_sb"], a["m_sn"] = key_padding_mask.stride(0), key_padding_mask.stride(1)
        if prefix_index is not None:
            a["pindex"] = prefix_index.data_ptr()
        if params.dropout_p > 0:
            a["dropout"] = True
            a["drop_scale"] = 1.0 / (1.0 - params.dropout_p) if params.dropout_p < 1 else 0.0
            a["key_attn"] = _dropout.stream_key(params.seed, _dropout.STREAM_ATTENTION)
            a["thr_attn"] = _dropout.drop_threshold(params.dropout_p)
        if params.prefix_dropout_p > 0:
            a["pdropout"] = True
            a["pdrop_scale"] = 1.0 / (1.0 - params.prefix_dropout_p) if params.prefix_dropout_p < 1 else 0.0
            a["key_pk"] = _dropout.stream_key(params.seed, _dropout.STREAM_PREFIX_K)
            a["key_pv"] = _dropout.stream_key(params.seed, _dropout.STREAM_PREFIX_V)
            a["thr_pref"] = _dropout.drop_threshold(params.prefix_dropout_p)
        return a

    @staticmethod
    def _prepare(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index):
        for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"the CUDA backend needs {name} on q's device and dtype ({q.device}, {q.dtype}), "
                                f"got ({t.device}, {t.dtype})")
        q, k, v, prefix_k, prefix_v = (_last_contig(t) for t in (q, k, v, prefix_k, prefix_v))
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask.to(torch.bool)
        if prefix_index is not None:
            prefix_index = prefix_index.to(device=q.device, dtype=torch.int64).contiguous()
        return q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index

    def forward(self, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params: Params):
        mod = _require()
        q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index = self._prepare(
            q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index)
        B, Hq, N, D = q.shape
        out = torch.empty_like(q)
        lse = torch.empty((B, Hq, N), device=q.device, dtype=torch.float32)
        a = self._common(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params)
        a.update(out=out.data_ptr(), lse=lse.data_ptr(),
                 o_sb=out.stride(0), o_sh=out.stride(1), o_sn=out.stride(2),
                 vec=_vec_ok((q, k, v, prefix_k, prefix_v), D))
        with torch.cuda.device(q.device):
            stream = torch.cuda.current_stream(q.device).cuda_stream
            mod.forward(a, _dtype_code(mod, q.dtype), stream)
        return out, lse

    def backward(self, grad_out, grad_lse, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index,
                 out, lse, params: Params, needs, saved=None):
        need_q, need_k, need_v, need_pk, need_pv = (bool(x) for x in needs)
        if not any((need_q, need_k, need_v, need_pk, need_pv)):
            return None, None, None, None, None
        mod = _require()
        if (need_pk or need_pv) and torch.are_deterministic_algorithms_enabled():
            _alert_atomic_prefix_grad()
        q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index = self._prepare(
            q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index)
        grad_out = _last_contig(grad_out.to(q.dtype))
        out = _last_contig(out)
        B, Hq, N, D = q.shape
        T, Hkv, P, _ = prefix_k.shape
        dev = q.device
        lse = lse.to(torch.float32).contiguous()
        glse = grad_lse.to(torch.float32).contiguous() if grad_lse is not None else None
        delta = torch.empty((B, Hq, N), device=dev, dtype=torch.float32)

        a = self._common(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, params)
        a.update(out=out.data_ptr(), lse=lse.data_ptr(), dout=grad_out.data_ptr(), delta=delta.data_ptr(),
                 o_sb=out.stride(0), o_sh=out.stride(1), o_sn=out.stride(2),
                 do_sb=grad_out.stride(0), do_sh=grad_out.stride(1), do_sn=grad_out.stride(2),
                 vec=_vec_ok((q, k, v, prefix_k, prefix_v, grad_out), D))
        if glse is not None:
            a["grad_lse"] = glse.data_ptr()

        dq = torch.empty_like(q) if need_q else None
        dk = torch.empty_like(k) if need_k else None
        dv = torch.empty_like(v) if need_v else None
        dpk = torch.zeros((T, Hkv, P, D), device=dev, dtype=torch.float32) if need_pk else None
        dpv = torch.zeros((T, Hkv, P, D), device=dev, dtype=torch.float32) if need_pv else None
        if dq is not None:
            a.update(dq=dq.data_ptr(), dq_sb=dq.stride(0), dq_sh=dq.stride(1), dq_sn=dq.stride(2))
        if dk is not None:
            a.update(dk=dk.data_ptr(), dk_sb=dk.stride(0), dk_sh=dk.stride(1), dk_sn=dk.stride(2))
        if dv is not None:
            a.update(dv=dv.data_ptr(), dv_sb=dv.stride(0), dv_sh=dv.stride(1), dv_sn=dv.stride(2))
        if dpk is not None:
            a["dpk"] = dpk.data_ptr()
        if dpv is not None:
            a["dpv"] = dpv.data_ptr()

        code = _dtype_code(mod, q.dtype)
        with torch.cuda.device(dev):
            stream = torch.cuda.current_stream(dev).cuda_stream
            mod.backward_preprocess(a, code, stream)
            if need_q:
                mod.backward_dq(a, code, stream)
            if need_k or need_v:
                mod.backward_dkv(a, code, stream)
            if (need_pk or need_pv) and P > 0 and N > 0 and B > 0:
                # Split the B*G*ceil(N/BM) query tiles of each kv head into chunks so that about two
                # waves of blocks cover the GPU; partial sums go to the fp32 buffers by atomicAdd.
                tiles = B * (Hq // Hkv) * math.ceil(N / mod.dprefix_block_m())
                per_chunk = math.ceil(P / mod.dprefix_block_n(D)) * Hkv
                a["chunks"] = max(1, min(tiles, math.ceil(2 * _sm_count(dev) / per_chunk)))
                mod.backward_dprefix(a, code, stream)
        return (dq, dk, dv,
                dpk.to(prefix_k.dtype) if dpk is not None else None,
                dpv.to(prefix_v.dtype) if dpv is not None else None)


BACKEND = CudaBackend()
