"""Benchmark of ``prefix_attention`` against the ways P-Tuning v2 attention is computed today.

Providers (one axis):

- ``ptv2-triton`` / ``ptv2-cuda``: the op with that backend (prefix read in place, no copies).
- ``ptv2-flash``: the CPU default backend (the CPU flash kernel over each row's ``[prefix; tokens]``,
  joined for the call and not kept; skipped, with its reason, where it cannot run).
- ``ptv2-torch``: the pure-PyTorch backend (on a GPU only with PTV2_BENCH_TORCH=1).
- ``peft-route``: what PEFT / the authors' code do per layer: expand the prefix over the batch, cat it
  in front of K and V, widen the mask to ``(B, 1, N, P+N)`` (built once outside the timing, as a model
  builds it once per forward for all layers), repeat K/V heads for GQA (as transformers does when a
  mask is present), SDPA. Like transformers' SDPA path, it passes no mask when nothing is padded and
  attention is bidirectional (``PTV2_BENCH_PEFT_MASK=always`` passes the widened mask anyway). Its
  backward includes the batch sum of the prefix gradient (expand's backward) and the cat's backward.
- ``sdpa-preconcat``: SDPA on K/V that are already ``[prefix; tokens]`` (the cat is excluded from the
  timing, and the per-row prefix gradient is left unsummed): the best any materializing approach can
  do. No mask when nothing is padded and not causal (flash path), ``causal_lower_right`` for causal
  (token i sees the prefix and tokens j <= i), a ``(B, 1, 1, P+N)`` mask with padding; GQA through
  ``enable_gqa``.
- ``eager``: the reference formulation (``prefix_attention_reference``: materialized scores and
  probabilities).

Modes: ``fwd`` (forward with autograd recording, as in training), ``bwd`` (backward of a retained
graph), ``fwd+bwd``.

FLOPs (nominal, dense, counted the same for every provider; padding is not subtracted):
forward ``4 * B * Hq * N * (N + P) * D``; when causal the token part is halved:
``4 * B * Hq * N * (N / 2 + P) * D``; backward 2.5x the forward; forward+backward 3.5x.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import benchlib

# --------------------------------------------------------------------------------------------------
# FLOPs


def attention_flops(B, Hq, N, P, D, causal, mode="fwd"):
    """Nominal FLOPs of prefix attention (see the module docstring)."""
    keys = P + (N / 2 if causal else N)  # causal: every query sees the whole prefix and half the tokens
    fwd = 4.0 * B * Hq * N * keys * D
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


FLOP_FORMULA = ("fwd = 4*B*Hq*N*(N+P)*D (causal: 4*B*Hq*N*(N/2+P)*D); bwd = 2.5*fwd; "
                "fwd+bwd = 3.5*fwd; nominal, padding not subtracted")

# --------------------------------------------------------------------------------------------------
# grids

ALL_PROVIDERS = ("ptv2-triton", "ptv2-cuda", "ptv2-flash", "ptv2-torch", "peft-route", "sdpa-preconcat", "eager")


def _chosen_providers() -> tuple:
    """PTV2_BENCH_PROVIDERS=a,b,...: time only these (a shorter run, e.g. against the baselines only)."""
    names = tuple(p.strip() for p in os.environ.get("PTV2_BENCH_PROVIDERS", "").split(",") if p.strip())
    unknown = [p for p in names if p not in ALL_PROVIDERS]
    if unknown:
        raise ValueError(f"PTV2_BENCH_PROVIDERS: unknown provider(s) {', '.join(unknown)}; "
                         f"known: {', '.join(ALL_PROVIDERS)}")
    return names or ALL_PROVIDERS


PROVIDERS = _chosen_providers()
MODES = ("fwd", "bwd", "fwd+bwd")


def _grid():
    """(grid name, B, Hq, Hkv, N, P, D, causal, padding, dtype) for this run; PTV2_BENCH_GRID=<name>
    keeps one grid (a full run split over several invocations)."""
    dev, quick = benchlib.device(), benchlib.quick()
    cases = _all_cases(dev, quick)
    names = sorted({c[0] for c in cases})
    only = os.environ.get("PTV2_BENCH_GRID", "").strip()
    if only and only not in names:
        raise ValueError(f"PTV2_BENCH_GRID must be one of {', '.join(names)} on this device, got {only!r}")
    return [c for c in cases if not only or c[0] == only]


def _cpu_cases():
    """The CPU grid, float32: MiniLM (D=32) and bert-base (D=64) heads at P-Tuning v2's batch, sequence
    and prefix lengths, and one tiny shape where a call costs only its host-side work."""
    cases = [("minilm" if D == 32 else "bert-base", 32, 12, 12, N, P, D, False, pad, torch.float32)
             for D, N, P, pad in itertools.product((32, 64), (64, 128, 256), (16, 64), (0.0, 0.3))]
    cases.append(("host", 1, 1, 1, 8, 2, 8, False, 0.0, torch.float32))
    return cases


def _all_cases(dev, quick):
    cases = []
    if dev.type == "cpu" and not benchlib.smoke():
        return _cpu_cases()
    if dev.type == "cpu":  # smoke run: tiny shapes, float32
        for N, P, pad in itertools.product((32,), (8,), (0.0, 0.3)):
            cases.append(("ptv2", 2, 2, 2, N, P, 16, False, pad, torch.float32))
        cases.append(("decoder", 1, 4, 2, 64, 8, 16, True, 0.0, torch.float32))
        return cases
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)
    # P-Tuning v2 grid: BERT-large-like heads, the sequence lengths and prefix lengths of the recipes.
    ns, ps = ((128, 512), (16, 128)) if quick else ((128, 256, 512), (16, 64, 128))
    for dtype, N, P, pad in itertools.product(dtypes, ns, ps, (0.0, 0.3)):
        cases.append(("ptv2", 32, 16, 16, N, P, 64, False, pad, dtype))
    # Long-context decoder grid: llama-style GQA 32/8, D=128, causal, about 16k tokens per batch.
    ns, ps = ((1024, 4096), (16, 128)) if quick else ((1024, 4096, 8192), (16, 128))
    for dtype, N, P in itertools.product(dtypes, ns, ps):
        cases.append(("decoder", max(1, 16384 // N), 32, 8, N, P, 128, True, 0.0, dtype))
    return cases


def _case_id(c):
    grid, B, Hq, Hkv, N, P, D, causal, pad, dtype = c
    dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    return f"{grid}-B{B}-H{Hq}x{Hkv}-N{N}-P{P}-D{D}-pad{int(round(pad * 100))}-{dt}"


CASES = _grid()

# --------------------------------------------------------------------------------------------------
# inputs


def lengths_for(B, N, padding):
    """Valid lengths: row 0 full, then linearly down to N * (1 - 2 * padding), so the mean padding
    fraction is ``padding`` (0.3: lengths from N down to 0.4 N)."""
    if padding <= 0 or B == 1:
        return [N] * B
    lo = N * (1 - 2 * padding)
    return [max(1, int(round(N - (N - lo) * b / (B - 1)))) for b in range(B)]


def make_inputs(B, Hq, Hkv, N, P, D, padding, dtype, device, seed=0):
    """q, k, v in transformers' layout ((B, N, H, D) memory viewed as (B, H, N, D)), the prefix, the mask."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):  # drawn on the device: host-side generation of 50M values would dominate setup
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    q = rnd(B, N, Hq, D).transpose(1, 2).requires_grad_()
    k = rnd(B, N, Hkv, D).transpose(1, 2).requires_grad_()
    v = rnd(B, N, Hkv, D).transpose(1, 2).requires_grad_()
    pk = rnd(Hkv, P, D).requires_grad_()
    pv = rnd(Hkv, P, D).requires_grad_()
    mask = None
    if padding > 0:
        lens = torch.tensor(lengths_for(B, N, padding))
        mask = (torch.arange(N)[None, :] < lens[:, None]).to(device)
    return q, k, v, pk, pv, mask


# --------------------------------------------------------------------------------------------------
# providers: each returns (forward callable, leaves that receive gradients, note)


def _ptv2(backend, q, k, v, pk, pv, mask, causal):
    from ptv2_kernels import prefix_attention
    from ptv2_kernels.backends import NoBackendError, Problem, select

    problem = Problem.describe(q, None, mask, causal, 0.0, 0.0, k.shape[1])
    try:
        select(problem, backend)
    except NoBackendError as e:
        pytest.skip(f"ptv2-{backend}: {e}")

    def fwd():
        return prefix_attention(q, k, v, pk, pv, mask, causal=causal, backend=backend)

    return fwd, (q, k, v, pk, pv), f"prefix_attention(backend={backend!r})"


def _peft_route(q, k, v, pk, pv, mask, causal):
    B, Hq, N, D = q.shape
    Hkv, P = k.shape[1], pk.shape[1]
    G = Hq // Hkv
    # The widened mask, built once (a model builds it once per forward and shares it across layers).
    # As transformers builds it for SDPA: with nothing padded and bidirectional attention it skips the
    # mask (flash path); PTV2_BENCH_PEFT_MASK=always keeps the widened mask in every case.
    policy = os.environ.get("PTV2_BENCH_PEFT_MASK", "auto").strip().lower()
    if policy not in ("auto", "always"):
        raise ValueError(f"PTV2_BENCH_PEFT_MASK must be 'auto' or 'always', got {policy!r}")
    wide = None
    if mask is not None or causal or policy == "always":
        wide = torch.ones(B, 1, N, P + N, dtype=torch.bool, device=q.device)
        if mask is not None:
            wide[:, :, :, P:] &= mask[:, None, None, :]
        if causal:
            wide[:, :, :, P:] &= torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    repeat = G > 1 and wide is not None  # transformers uses SDPA's enable_gqa only without a mask

    def fwd():
        pk_b = pk.unsqueeze(0).expand(B, -1, -1, -1)  # the prefix encoder's output for every row
        pv_b = pv.unsqueeze(0).expand(B, -1, -1, -1)
        kc = torch.cat([pk_b, k], dim=2)  # the cache update: [prefix; tokens] per layer
        vc = torch.cat([pv_b, v], dim=2)
        if repeat:  # transformers' repeat_kv
            kc = kc[:, :, None].expand(B, Hkv, G, P + N, D).reshape(B, Hq, P + N, D)
            vc = vc[:, :, None].expand(B, Hkv, G, P + N, D).reshape(B, Hq, P + N, D)
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=wide, enable_gqa=G > 1 and not repeat)

    how = "widened (B,1,N,P+N) bool mask" if wide is not None else "no mask (nothing padded: transformers skips it)"
    return fwd, (q, k, v, pk, pv), f"expand + cat + {how} + SDPA"


def _sdpa_preconcat(q, k, v, pk, pv, mask, causal):
    from torch.nn.attention.bias import causal_lower_right

    B, Hq, N, D = q.shape
    Hkv, P = k.shape[1], pk.shape[1]
    with torch.no_grad():
        kc = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
        vc = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
    kc.requires_grad_()
    vc.requires_grad_()
    gqa = Hq != Hkv
    if causal and mask is None:
        attn_mask, how = causal_lower_right(N, P + N), "causal_lower_right"
    elif mask is None:
        attn_mask, how = None, "no mask"
    elif not causal:
        attn_mask = torch.cat([torch.ones(B, P, dtype=torch.bool, device=q.device), mask], 1)[:, None, None, :]
        how = "(B,1,1,P+N) mask"
    else:
        full = torch.ones(B, 1, N, P + N, dtype=torch.bool, device=q.device)
        full[:, :, :, P:] &= mask[:, None, None, :] & torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
        attn_mask, how = full, "(B,1,N,P+N) mask"

    def fwd():
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=attn_mask, enable_gqa=gqa)

    try:  # CausalBias with GQA depends on the torch build: fall back to heads repeated up front
        out = fwd()
        torch.autograd.grad(out, (q, kc, vc), torch.ones_like(out))
        del out
    except RuntimeError as e:
        if not gqa or benchlib.is_oom(e):
            raise
        G = Hq // Hkv
        with torch.no_grad():
            kc = kc.repeat_interleave(G, 1)
            vc = vc.repeat_interleave(G, 1)
        kc.requires_grad_()
        vc.requires_grad_()
        how += f"; heads repeated up front (enable_gqa failed: {str(e).splitlines()[0][:120]})"

        def fwd():
            return F.scaled_dot_product_attention(q, kc, vc, attn_mask=attn_mask)

    return fwd, (q, kc, vc), f"SDPA on pre-concatenated K/V ({how}{', enable_gqa' if gqa else ''})"


def _eager(q, k, v, pk, pv, mask, causal):
    from ptv2_kernels import prefix_attention_reference

    def fwd():
        return prefix_attention_reference(q, k, v, pk, pv, mask, causal=causal)

    return fwd, (q, k, v, pk, pv), "prefix_attention_reference (materialized scores)"


def build(provider, tensors, causal):
    q, k, v, pk, pv, mask = tensors
    if provider.startswith("ptv2-"):
        return _ptv2(provider[len("ptv2-"):], q, k, v, pk, pv, mask, causal)
    return {"peft-route": _peft_route, "sdpa-preconcat": _sdpa_preconcat, "eager": _eager}[provider](
        q, k, v, pk, pv, mask, causal)


def callable_for(mode, fwd, leaves):
    """The timed callable of ``mode``."""
    if mode == "fwd":
        return fwd
    out = fwd()
    grad = torch.randn_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)
    return lambda: torch.autograd.grad(fwd(), leaves, grad)


def _provider_skip_reason(provider):
    dev = benchlib.device()
    if provider == "ptv2-triton" and dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None  # the Triton interpreter: checks the provider's path on CPU, measures nothing
    if provider in ("ptv2-triton", "ptv2-cuda") and dev.type != "cuda":
        return (f"{provider}: GPU provider ({benchlib.gpu_skip_reason() or 'CPU run'}"
                + ("; TRITON_INTERPRET=1 runs the Triton one through the interpreter)" if provider == "ptv2-triton" else ")"))
    if provider == "ptv2-torch" and dev.type == "cuda" and not benchlib.flag("PTV2_BENCH_TORCH"):
        return "ptv2-torch: the CPU reference backend; set PTV2_BENCH_TORCH=1 to time it on a GPU"
    if dev.type == "cuda" and not benchlib.HAS_GPU:
        return f"{provider}: {benchlib.NO_GPU_REASON}"
    return None


def _measure(benchmark, provider, case, mode):
    grid, B, Hq, Hkv, N, P, D, causal, pad, dtype = case
    try:
        tensors = make_inputs(B, Hq, Hkv, N, P, D, pad, dtype, benchlib.device())
        fwd, leaves, note = build(provider, tensors, causal)
        fn = callable_for(mode, fwd, leaves)
        fn()  # first call: compile / autotune
        benchlib.sync()
        peak = benchlib.peak_memory_delta(fn)
        # on CPU the calls above already warmed up and a call of the grid takes up to seconds
        timing = benchlib.run_benchmark(benchmark, fn, warmup=2 if benchlib.on_gpu() else 1)
        return timing, peak, note
    except Exception as e:  # out of memory is a result ("cannot run"), anything else is a bug
        if benchlib.is_oom(e):
            return f"{provider}: out of memory ({str(e).splitlines()[0][:160]})"
        raise


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_prefix_attention(record, case, provider, mode):
    benchmark = record
    why = _provider_skip_reason(provider)
    if why:
        pytest.skip(why)
    grid, B, Hq, Hkv, N, P, D, causal, pad, dtype = case
    benchmark.group = f"prefix_attention {mode} {_case_id(case)}"
    result = _measure(benchmark, provider, case, mode)
    if isinstance(result, str):
        benchlib.free_memory()
        pytest.skip(result)
    timing, peak, note = result
    flops = attention_flops(B, Hq, N, P, D, causal, mode)
    benchmark.extra_info.update({
        "subject": "prefix_attention", "grid": grid, "provider": provider, "mode": mode, "note": note,
        "B": B, "Hq": Hq, "Hkv": Hkv, "N": N, "P": P, "D": D, "causal": causal, "padding": pad,
        "dtype": str(dtype).replace("torch.", ""), "flops": flops, "flop_formula": FLOP_FORMULA,
        "tflops": flops / (timing["median_us"] * 1e-6) / 1e12 if timing["median_us"] > 0 else None,
        "peak_mem_bytes": peak,
    })
