"""Full Triton autotuning on one case, run twice: the first call times every config pruning keeps, the
second finds each kernel's choice in the autotuner's cache and times nothing (marker: gpu).

The tier-1 GPU run cuts autotuning to one config per kernel (``PTV2_TRITON_AUTOTUNE=one``) everywhere
else; this is the case that exercises the real tuning path and its cache.
"""

import time

import pytest
import torch

from helpers import Case, check_against_reference
from ptv2_kernels.backends.triton import configs, launch

pytestmark = pytest.mark.gpu

# A shape no other test uses, so the autotuner's cache (keyed on size bucket, P, group, head-dim
# block, flags and dtypes) has no entry for it yet: N 200 -> bucket 256, P 24, GQA 2.
CASE = Case(B=3, Hq=4, Hkv=2, N=200, P=24, D=64, mask=True, causal=True)


@pytest.fixture
def timed_configs(monkeypatch):
    """Configs timed per kernel kind, counted by wrapping each autotuner's ``_bench``."""
    monkeypatch.setenv(configs.AUTOTUNE_KNOB, "full")
    counts = {}
    for kind, (fn, _) in launch.kernels().items():
        if not hasattr(fn, "_bench"):  # the untimed deterministic kernel
            continue
        real = fn._bench

        def bench(*args, _kind=kind, _real=real, **kwargs):
            counts[_kind] = counts.get(_kind, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(fn, "_bench", bench)
    return counts


def _chosen():
    return {kind: dict(fn.cache) for kind, (fn, _) in launch.kernels().items() if hasattr(fn, "cache")}


def test_full_autotuning_then_cache_hit(timed_configs):
    t0 = time.perf_counter()
    check_against_reference(CASE, "triton", torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    first = dict(timed_configs)
    chosen = _chosen()
    print(f"\nfirst call {first_s:.1f} s, configs timed per kernel: {first}")
    assert {"fwd", "dkdv", "dq", "dprefix"} <= set(first), f"some kernel was not tuned: {first}"
    assert all(n >= 2 for n in first.values()), f"full tuning timed a single config somewhere: {first}"

    timed_configs.clear()
    t0 = time.perf_counter()
    check_against_reference(CASE, "triton", torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    second_s = time.perf_counter() - t0
    print(f"second call {second_s:.1f} s, configs timed: {dict(timed_configs)}")
    assert timed_configs == {}, f"the second call re-tuned: {dict(timed_configs)}"
    assert _chosen() == chosen, "the cached choices changed between two identical calls"
    for kind, cache in chosen.items():
        for key, cfg in cache.items():
            print(f"  {kind:8s} {key} -> {cfg}")
