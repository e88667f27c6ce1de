"""Autotune configurations of the prefix-attention kernels, their pruning, and the interpreter config.

Each kernel has a short list tuned for sm_80 (A100: 164 KiB shared memory per block) and sm_90 (H100:
227 KiB); ``prune`` drops the configs that spill registers for the launch's head dim, dtype and
flags (``SPILLS``, measured) and those whose estimated shared memory cannot fit the device (the estimate
is the software-pipelined tiles: ``num_stages`` copies of the streamed operands plus the resident
tiles, which matches the compiled kernels' shared memory on sm_80 and bounds it on sm_90), and ``aot.compile_all`` checks the real numbers for every config.
Under ``TRITON_INTERPRET=1`` nothing is tuned: one small config (16-wide blocks, the smallest
``tl.dot`` accepts) keeps the interpreter fast.
"""

from __future__ import annotations

import functools
import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cfg(num_warps, num_stages, **blocks):
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)


# Forward: BLOCK_M query rows per program, BLOCK_N keys streamed per step.
FWD_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),  # big query tile: best for long N on H100/A100 at D <= 128
    _cfg(4, 3, BLOCK_M=128, BLOCK_N=32),  # same rows, half the K/V stages: fits fp32 / D=128 on sm_80
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),   # twice the programs: fills the GPU for small B*H*N
    _cfg(4, 2, BLOCK_M=64, BLOCK_N=32),   # smallest: short N (P-Tuning v2 classification, N ~ 128)
]
# Token dK/dV: BLOCK_N keys resident per program, BLOCK_M query rows streamed.
DKDV_CONFIGS = [
    _cfg(8, 2, BLOCK_N=128, BLOCK_M=64),  # many keys per program: amortizes the q/dO stream
    _cfg(4, 3, BLOCK_N=64, BLOCK_M=64),   # balanced, the FA2 default shape
    _cfg(4, 2, BLOCK_N=64, BLOCK_M=32),   # low register pressure: fp32 and D=128
    _cfg(4, 3, BLOCK_N=32, BLOCK_M=64),   # more programs for small N
    _cfg(4, 2, BLOCK_N=32, BLOCK_M=32),   # fp32 at D >= 64: exact-FMA dots unroll per element, no spills
]
# dQ: BLOCK_M query rows resident, BLOCK_N keys streamed (prefix then tokens).
DQ_CONFIGS = [
    _cfg(8, 2, BLOCK_M=128, BLOCK_N=64),  # big tile: long sequences
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),   # balanced
    _cfg(4, 2, BLOCK_M=64, BLOCK_N=32),   # low register pressure: fp32 and D=128
    _cfg(4, 3, BLOCK_M=32, BLOCK_N=64),   # more programs for small N
    _cfg(4, 2, BLOCK_M=32, BLOCK_N=32),   # fp32 at D >= 64: exact-FMA dots unroll per element, no spills
]
# dprefix: BLOCK_P prefix keys resident, BLOCK_M query rows of the long B*G*N sequence streamed.
DPREFIX_CONFIGS = [
    _cfg(8, 2, BLOCK_P=128, BLOCK_M=64),  # all of a typical prefix (P <= 128) in one program
    _cfg(8, 2, BLOCK_P=64, BLOCK_M=64),   # P ~ 64 (the recipes use 4..128); 8 warps: fp32 dK/dV partials
                                          # of 64 x D rows spill with 4 warps at D = 128
    _cfg(8, 2, BLOCK_P=32, BLOCK_M=64),   # short prefixes (P <= 32): no wasted lanes
    _cfg(4, 2, BLOCK_P=64, BLOCK_M=32),   # low register pressure: fp32 and D=128
    _cfg(4, 2, BLOCK_P=32, BLOCK_M=32),   # fp32 at D >= 64: exact-FMA dots unroll per element, no spills
]
PREPROCESS_BLOCK_M = 64  # rows per program of the delta pass (a bandwidth-bound row reduction)

INTERPRET_BLOCKS = {
    "fwd": dict(BLOCK_M=16, BLOCK_N=16),
    "dkdv": dict(BLOCK_N=16, BLOCK_M=16),
    "dq": dict(BLOCK_M=16, BLOCK_N=16),
    "dprefix": dict(BLOCK_P=16, BLOCK_M=16),
}

CONFIGS = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS, "dprefix": DPREFIX_CONFIGS}

# which blocks are streamed through the pipeline (x num_stages) and which stay resident, per kernel
_STREAMED = {"fwd": ("BLOCK_N", 2), "dkdv": ("BLOCK_M", 2), "dq": ("BLOCK_N", 2), "dprefix": ("BLOCK_M", 2)}
_RESIDENT = {"fwd": ("BLOCK_M", 1), "dkdv": ("BLOCK_N", 2), "dq": ("BLOCK_M", 2), "dprefix": ("BLOCK_P", 2)}

# Configs that spill registers on sm_90 (pruned on every architecture; sm_80 spills in other places,
# reported by `aot` but not measured here), measured by
# `python -m ptv2_kernels.backends.triton.aot 90 --spill-table=<dtype>` (ptxas's spill stores, each
# compile specialized as a real launch): (kind, config index, element bytes, flags variant) -> the
# head-dim blocks at which the config spills (not monotone: ptxas sometimes spills a smaller block and
# not a larger one). Variants: "all" (mask, bank, causal and dropout on: dropout's hash keeps many
# more registers live), "nodrop" (the same without dropout), "det" (all, on the deterministic dprefix
# path). fp16 and bf16 compile alike (element bytes 2). fp32 runs its dots as exact FMA loops
# unrolled per element: its entries, from the "all" variant at the block where a config first
# spilled and every larger one, stand for "nodrop" too.
SPILLS = {
    ('dkdv', 0, 2, 'all'): (128,), ('dkdv', 0, 2, 'nodrop'): (128,), ('dkdv', 0, 4, 'all'): (16, 32, 64, 128),
    ('dkdv', 1, 2, 'all'): (64, 128), ('dkdv', 1, 2, 'nodrop'): (64, 128),
    ('dkdv', 1, 4, 'all'): (16, 32, 64, 128), ('dkdv', 2, 2, 'all'): (128,), ('dkdv', 2, 2, 'nodrop'): (128,),
    ('dkdv', 2, 4, 'all'): (64, 128), ('dkdv', 3, 2, 'all'): (128,), ('dkdv', 3, 2, 'nodrop'): (128,),
    ('dkdv', 3, 4, 'all'): (16, 32, 64, 128), ('dkdv', 4, 2, 'all'): (16,), ('dkdv', 4, 4, 'all'): (128,),
    ('dprefix', 0, 2, 'all'): (64, 128), ('dprefix', 0, 2, 'det'): (64, 128),
    ('dprefix', 0, 2, 'nodrop'): (128,), ('dprefix', 0, 4, 'all'): (32, 64, 128),
    ('dprefix', 0, 4, 'det'): (16, 32, 64, 128), ('dprefix', 1, 2, 'all'): (128,),
    ('dprefix', 1, 2, 'det'): (128,), ('dprefix', 1, 4, 'all'): (64, 128),
    ('dprefix', 1, 4, 'det'): (32, 64, 128), ('dprefix', 2, 2, 'all'): (32,), ('dprefix', 2, 2, 'det'): (32,),
    ('dprefix', 2, 4, 'all'): (64, 128), ('dprefix', 2, 4, 'det'): (128,),
    ('dprefix', 3, 2, 'all'): (64, 128), ('dprefix', 3, 2, 'det'): (64, 128),
    ('dprefix', 3, 2, 'nodrop'): (128,), ('dprefix', 3, 4, 'all'): (64, 128),
    ('dprefix', 3, 4, 'det'): (64, 128), ('dprefix', 4, 2, 'all'): (128,), ('dprefix', 4, 2, 'det'): (128,),
    ('dprefix', 4, 4, 'all'): (128,), ('dprefix', 4, 4, 'det'): (128,), ('dq', 0, 2, 'all'): (128,),
    ('dq', 0, 4, 'all'): (16, 32, 64, 128), ('dq', 1, 2, 'all'): (128,), ('dq', 1, 4, 'all'): (16, 32, 64, 128),
    ('dq', 2, 4, 'all'): (64, 128), ('dq', 3, 4, 'all'): (64, 128), ('dq', 4, 4, 'all'): (128,),
    ('fwd', 0, 2, 'all'): (128,), ('fwd', 0, 4, 'all'): (16, 32, 64, 128), ('fwd', 1, 2, 'all'): (64, 128),
    ('fwd', 1, 2, 'nodrop'): (128,), ('fwd', 1, 4, 'all'): (16, 32, 64, 128), ('fwd', 2, 2, 'all'): (128,),
    ('fwd', 2, 4, 'all'): (16, 32, 64, 128), ('fwd', 3, 4, 'all'): (64, 128),
}

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block, opt-in maximum


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def estimate_shared(kind: str, config: triton.Config, block_d_: int, elem_bytes: int) -> int:
    kw = config.kwargs
    s_name, s_count = _STREAMED[kind]
    r_name, r_count = _RESIDENT[kind]
    streamed = config.num_stages * s_count * kw[s_name] * block_d_
    return (streamed + r_count * kw[r_name] * block_d_) * elem_bytes


@functools.lru_cache(maxsize=None)
def device_shared_limit(device_index: int) -> int:
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(device_index)["max_shared_mem"])


def spill_variant(dropout: bool, deterministic: bool = False) -> str:
    """The ``SPILLS`` variant of a launch's flags."""
    return "det" if deterministic else "all" if dropout else "nodrop"


def spills(kind: str, config: triton.Config, block_d_: int, elem_bytes: int, variant: str) -> bool:
    if elem_bytes == 4 and variant == "nodrop":
        variant = "all"  # fp32 is measured with every feature on only
    return block_d_ in SPILLS.get((kind, CONFIGS[kind].index(config), elem_bytes, variant), ())


def kept(kind: str, config: triton.Config, block_d_: int, elem_bytes: int, limit: int, variant: str = "all") -> bool:
    """Whether pruning keeps ``config`` for this head-dim block, element size, shared-memory limit and
    flags variant: it must neither spill (``SPILLS``) nor need more shared memory than the device has."""
    if spills(kind, config, block_d_, elem_bytes, variant):
        return False
    return estimate_shared(kind, config, block_d_, elem_bytes) <= limit


def _current_shared_limit() -> int:
    import torch

    try:
        return device_shared_limit(torch.cuda.current_device())
    except Exception:  # no driver: keep the sm_80 bound
        return SHARED_LIMIT[80]


def kept_configs(kind: str, configs, block_d_: int, elem_bytes: int, variant: str = "all") -> list:
    """The configs pruning keeps on the current device, in list order (never empty)."""
    limit = _current_shared_limit()
    keep = [c for c in configs if kept(kind, c, block_d_, elem_bytes, limit, variant)]
    # nothing fits without spilling (fp32 at large head dims, see SPILLS): the smallest tile, so at
    # least one config always survives; `aot` lists these cases
    return keep or [fallback_config(kind, block_d_, elem_bytes)]


def fallback_config(kind: str, block_d_: int, elem_bytes: int) -> triton.Config:
    return min(CONFIGS[kind], key=lambda c: estimate_shared(kind, c, block_d_, elem_bytes))


AUTOTUNE_KNOB = "PTV2_TRITON_AUTOTUNE"


def autotune_mode() -> str:
    """``full`` (default): time every config pruning keeps; ``one``: take the first kept config untimed,
    which cuts a GPU test run to one compile per kernel specialization (correctness, not speed)."""
    mode = os.environ.get(AUTOTUNE_KNOB, "full").strip().lower() or "full"
    if mode not in ("full", "one"):
        raise ValueError(f"{AUTOTUNE_KNOB} must be 'full' or 'one', got {mode!r}")
    return mode


def make_prune(kind: str):
    """early_config_prune for ``kind``: keep configs whose shared memory fits the current device (and
    only the first of them when ``PTV2_TRITON_AUTOTUNE=one``)."""

    def prune(configs, named_args, **kwargs):
        import torch

        bd = kwargs.get("BLOCK_D") or named_args.get("BLOCK_D")
        elem = next(a for a in named_args.values() if isinstance(a, torch.Tensor)).element_size()
        variant = spill_variant(bool(kwargs.get("DROPOUT") or kwargs.get("PREFIX_DROPOUT")))
        keep = kept_configs(kind, configs, bd, elem, variant)
        return keep[:1] if autotune_mode() == "one" else keep

    return prune


def untimed_dprefix_config(P: int, block_d_: int, elem_bytes: int) -> triton.Config:
    """The dprefix config of deterministic mode, chosen by rule, not by timing: the reduction order
    depends on the blocks, so a timed choice could differ between processes and change the bits.
    The rule: the smallest prefix block that holds all P keys (one pass over the queries, no wasted
    lanes), else the largest; list order (more rows per step first) breaks ties."""
    keep = kept_configs("dprefix", DPREFIX_CONFIGS, block_d_, elem_bytes, spill_variant(True, deterministic=True))
    whole = [c for c in keep if c.kwargs["BLOCK_P"] >= P]
    if whole:
        return min(whole, key=lambda c: c.kwargs["BLOCK_P"])
    return max(keep, key=lambda c: c.kwargs["BLOCK_P"])
