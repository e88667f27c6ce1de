"""Triton jit helpers for the counter-based dropout hash of ``ptv2_kernels.dropout`` (bit-exact).

All arithmetic is on uint32 words (wrapping multiplication), exactly as the torch implementation:

    row_hash = fmix32(key ^ (row * 0x2545F491));  bits = fmix32(row_hash ^ (col * 0x9E3779B9))
    dropped  = (bits >> 8) < threshold

``key`` arrives as a signed int32 launch argument (the uint32 key reinterpreted, see ``signed32``), rows
and columns as int64 (only their low 32 bits matter, as in ``rows & MASK32``).
"""

import triton
import triton.language as tl


def signed32(x: int) -> int:
    """A uint32 value as the int32 with the same bits (kernel arguments are signed)."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= (1 << 31) else x


@triton.jit
def _u32(c: tl.constexpr):
    # a uint32 constant: built as int64 then truncated, so literals >= 2**31 keep their bits
    return tl.full([], c, tl.int64).to(tl.uint32)


@triton.jit
def fmix32(x):
    """murmur3's finalizer on uint32."""
    x = x ^ (x >> 16)
    x = x * _u32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * _u32(0xC2B2AE35)
    return x ^ (x >> 16)


@triton.jit
def row_hash(key, rows):
    """Per-row hash: ``key`` int32 scalar (uint32 bits), ``rows`` int64 tensor."""
    k = key.to(tl.uint32, bitcast=True)
    r = rows.to(tl.uint32)  # truncation keeps the low 32 bits
    return fmix32((r * _u32(0x2545F491)) ^ k)


@triton.jit
def keep_from_row_hash(rh, cols, threshold):
    """True where kept; ``rh`` uint32 (broadcastable), ``cols`` int64, ``threshold`` int32 in [0, 2**24]."""
    c = cols.to(tl.uint32)
    bits = fmix32(rh ^ (c * _u32(0x9E3779B9)))
    return (bits >> 8).to(tl.int32) >= threshold


@triton.jit
def keep_mask(key, rows, cols, threshold):
    """Keep mask of broadcast ``rows[:, None]``-style and ``cols[None, :]``-style int64 tensors."""
    return keep_from_row_hash(row_hash(key, rows), cols, threshold)
