"""Counter-based dropout masks shared by every backend.

A keep/drop decision is a pure function of ``(seed, stream, row, col)``, so the torch backend, the
Triton and CUDA kernels and the reference draw the *same* mask for the same seed: forward and
backward regenerate it instead of storing it, and tests compare backends bit for bit with dropout on.

The hash works on uint32 words (murmur3's finalizer, ``fmix32``):

    key      = fmix32(fmix32(seed_lo + stream * 0x9E3779B9) ^ seed_hi)      # host, once per launch
    row_hash = fmix32(key ^ (row * 0x2545F491))                              # once per row
    bits     = fmix32(row_hash ^ (col * 0x9E3779B9))                         # once per element
    dropped  = (bits >> 8) < threshold,   threshold = round(p * 2**24)

with all arithmetic modulo 2**32. Streams and their (row, col) numbering:

- ``STREAM_ATTENTION``: probability ``(b, h, i, j)`` of the ``(B, Hq, N, P + N)`` attention matrix over
  ``[prefix; tokens]``: ``row = (b * Hq + h) * N + i``, ``col = j`` (prefix keys first).
- ``STREAM_PREFIX_K`` / ``STREAM_PREFIX_V``: element ``(b, h, p, d)`` of row b's copy of the prefix
  keys / values ``(B, Hkv, P, D)``: ``row = (b * Hkv + h) * P + p``, ``col = d``.
"""

from __future__ import annotations

import math

import torch

STREAM_ATTENTION = 0
STREAM_PREFIX_K = 1
STREAM_PREFIX_V = 2

MASK32 = 0xFFFFFFFF
ROW_MULT = 0x2545F491
COL_MULT = 0x9E3779B9
STREAM_MULT = 0x9E3779B9
FMIX_MULT_1 = 0x85EBCA6B
FMIX_MULT_2 = 0xC2B2AE35
THRESHOLD_BITS = 24


def fmix32_int(x: int) -> int:
    """murmur3 fmix32 on a Python int (host side)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * FMIX_MULT_1) & MASK32
    x ^= x >> 13
    x = (x * FMIX_MULT_2) & MASK32
    x ^= x >> 16
    return x


def stream_key(seed: int, stream: int) -> int:
    """The per-launch uint32 key of one stream, as a Python int in [0, 2**32)."""
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    return fmix32_int(fmix32_int(lo + stream * STREAM_MULT) ^ hi)


def drop_threshold(p: float) -> int:
    """Elements whose top 24 hash bits fall below this are dropped."""
    return int(round(p * (1 << THRESHOLD_BITS)))


def draw_seed(generator: torch.Generator | None) -> torch.Tensor:
    """One 62-bit seed from ``generator`` (the default CPU generator when None), as a 0-dim CPU tensor.

    A tensor rather than an int so that torch.compile traces the draw instead of baking a constant.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, 2**62, (), generator=generator, device=device, dtype=torch.int64).cpu()


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # int64 products of two 32-bit words overflow; split the constant into 16-bit halves instead.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 on an int64 tensor holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, FMIX_MULT_1)
    x = x ^ (x >> 13)
    x = _mul32(x, FMIX_MULT_2)
    return x ^ (x >> 16)


def dropped(key: int, rows: torch.Tensor, cols: torch.Tensor, p: float) -> torch.Tensor:
    """Bool tensor, True where dropped; ``rows`` and ``cols`` are int64 and broadcast together."""
    row_hash = fmix32(_mul32(rows & MASK32, ROW_MULT) ^ key)
    bits = fmix32(row_hash ^ _mul32(cols & MASK32, COL_MULT))
    return (bits >> 8) < drop_threshold(p)


def attention_keep(seed: int, p: float, batch: int, heads: int, n: int, keys: int, device) -> torch.Tensor:
    """Keep mask ``(B, Hq, N, P + N)`` of ``STREAM_ATTENTION``."""
    rows = torch.arange(batch * heads * n, device=device, dtype=torch.int64).view(batch, heads, n, 1)
    cols = torch.arange(keys, device=device, dtype=torch.int64)
    return ~dropped(stream_key(seed, STREAM_ATTENTION), rows, cols, p)


def prefix_keep(seed: int, stream: int, p: float, batch: int, heads: int, length: int, dim: int,
                device, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask ``(len(rows), Hkv, P, D)`` of a prefix stream for batch rows ``rows`` (all when None)."""
    if rows is None:
        rows = torch.arange(batch, device=device, dtype=torch.int64)
    idx = (rows.view(-1, 1, 1) * heads + torch.arange(heads, device=device).view(1, -1, 1)) * length
    idx = (idx + torch.arange(length, device=device).view(1, 1, -1)).unsqueeze(-1)
    cols = torch.arange(dim, device=device, dtype=torch.int64)
    return ~dropped(stream_key(seed, stream), idx, cols, p)


# --------------------------------------------------------------------------------------------------
# Platform-RNG masks: the flash backend's. One pass of the device's own generator, seeded from the
# op's seed and the stream, so forward and backward regenerate the same mask. They are not the hash
# masks above (backends that share the hash agree bit for bit; these agree only with themselves).


def _platform_generator(seed: int, stream: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(stream_key(seed, stream))


def _platform_keep(seed: int, stream: int, p: float, shape, device) -> torch.Tensor:
    # One int32 draw decides two elements: int32 random_() fills [0, 2**31), so each 16-bit half of a
    # word holds (at least) 15 random bits; keep those 15 and compare each half with p * 2**15. A
    # third of the cost of bernoulli_, which draws one number per element.
    count = math.prod(shape)
    words = torch.empty((count + 1) // 2, dtype=torch.int32, device=device)
    words.random_(generator=_platform_generator(seed, stream, device)).bitwise_and_(0x7FFF7FFF)
    keep = words.view(torch.int16) >= round(p * (1 << 15))
    return keep[:count].view(shape)


def platform_attention_keep(seed: int, p: float, batch: int, heads: int, n: int, keys: int,
                            device) -> torch.Tensor:
    """Keep mask ``(B, Hq, N, P + N)`` over ``[prefix; tokens]`` from the platform RNG."""
    return _platform_keep(seed, STREAM_ATTENTION, p, (batch, heads, n, keys), device)


def platform_prefix_keep(seed: int, stream: int, p: float, batch: int, heads: int, length: int, dim: int,
                         device) -> torch.Tensor:
    """Keep mask ``(B, Hkv, P, D)`` of every row's copy of the prefix keys or values (``stream``)."""
    return _platform_keep(seed, stream, p, (batch, heads, length, dim), device)
