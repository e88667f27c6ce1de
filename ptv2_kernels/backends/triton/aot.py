"""Ahead-of-time compile check: every kernel x autotune config x dtype x head-dim block x feature flags
for ``GPUTarget("cuda", arch, 32)``, without a GPU (and without the interpreter).

Each compile is specialized as a real launch is: the host code of ``launch.py`` runs on CPU tensors
with the kernels replaced by recorders, and the recorded arguments go through Triton's own
specialization (pointers and ints divisible by 16 marked so, ints equal to 1 made constants), so the
table shows the variant a GPU would run. ``compile_all([80, 90])`` returns one row per compile:
``{kernel, config, dtype, head_dim, arch, flags, pruned, ok, n_regs, spill, stack, shared, error}`` (per
thread: registers, spill-store bytes and stack frame, read from ptxas's ``-v`` report); ``ok`` is
False when the compile fails, or, for a config the pruning keeps (one autotuning may choose), when its
shared memory exceeds the architecture's per-block limit or, on sm_90 (``SPILL_CHECKED_ARCHS``), it
spills registers
(``pruned`` rows are configs the pruning never selects for that dtype on that arch, compiled at the
smallest head dim only to show they build).
Run ``python -m ptv2_kernels.backends.triton.aot 80,90 [--full]`` for a table, and
``python -m ptv2_kernels.backends.triton.aot 90 --spill-table=float16`` to re-measure
``configs.SPILLS`` (every config, head dim and flags variant; minutes per dtype).

The matrix is described in ``jobs``. Head
dims that are not powers of two (40, 72, 96...) compile to the same code as their padded block (64,
128): the head dim is a runtime argument, only ``BLOCK_D`` is a compile-time one.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

# A job's flags variant: "all" features on (the most code: mask, bank, causal, both dropouts, a grad of
# the LSE), "none", or "det": all features on the deterministic path of the kernels that have one
# (dprefix: a different reduction, not an extra feature).
# The problem whose real launch arguments give each compile its specialization (Triton's JIT marks
# pointers and ints divisible by 16, and turns ints equal to 1 into constants): sizes as P-Tuning v2
# and decoders have them, multiples of 16; GQA 2 keeps the group size a runtime value.
_LAUNCH_PROBLEM = dict(B=2, Hq=16, Hkv=8, N=128, P=16)


SPILL_CHECKED_ARCHS = (90,)  # where a kept config that spills fails the check (H100/H200)


def _kernel_fns():
    from . import backward, forward

    return {"fwd": forward._fwd_kernel, "dkdv": backward._bwd_dkdv_kernel, "dq": backward._bwd_dq_kernel,
            "dprefix": backward._bwd_dprefix_kernel, "preprocess": backward._bwd_preprocess}


class _Recorder:
    """Stands in for a kernel handle: ``handle[grid](*args, **kwargs)`` records the call, runs nothing."""

    def __init__(self, kind, seen):
        self.kind, self.seen = kind, seen

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.seen.__setitem__(self.kind, (args, kwargs))


@functools.lru_cache(maxsize=None)
def launch_arguments(dtype: str, head_dim: int, variant: str) -> dict:
    """{kind: (positional, keyword arguments)} of every kernel the backend launches, forward and full
    backward, for ``_LAUNCH_PROBLEM`` in ``dtype`` at ``head_dim`` with ``variant``'s features: the
    host code of launch.py runs on CPU tensors with the kernels replaced by recorders."""
    import torch

    from ..base import Params
    from . import backward, launch

    seen = {}
    kinds = ("fwd", "dkdv", "dq", "dprefix", "dprefix_det")
    real_kernels, real_pre = launch.kernels, backward._bwd_preprocess
    launch.kernels = lambda: {k: (_Recorder(k, seen), {}) for k in kinds}
    backward._bwd_preprocess = _Recorder("preprocess", seen)
    was_det = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(variant == "det")
        B, Hq, Hkv, N, P = (_LAUNCH_PROBLEM[k] for k in ("B", "Hq", "Hkv", "N", "P"))
        feats = variant != "none"
        drop = 0.1 if variant in ("all", "det") else 0.0
        T = 2 if feats else 1
        dt = getattr(torch, dtype)
        q, k, v = (torch.zeros(B, h, N, head_dim, dtype=dt) for h in (Hq, Hkv, Hkv))
        pk, pv = (torch.zeros(T, Hkv, P, head_dim, dtype=dt) for _ in range(2))
        mask = torch.ones(B, N, dtype=torch.bool) if feats else None
        index = torch.zeros(B, dtype=torch.int64) if feats else None
        params = Params(causal=feats, softmax_scale=head_dim ** -0.5, dropout_p=drop, prefix_dropout_p=drop,
                        seed=1)
        out, lse = launch.forward(q, k, v, pk, pv, mask, index, params)
        glse = torch.zeros_like(lse) if feats else None
        launch.backward(out, glse, q, k, v, pk, pv, mask, index, out, lse, params, (True,) * 5)
    finally:
        launch.kernels, backward._bwd_preprocess = real_kernels, real_pre
        torch.use_deterministic_algorithms(was_det)
    if "dprefix_det" in seen:
        seen["dprefix"] = seen.pop("dprefix_det")
    return seen


def _specialize(fn, args, kwargs, blocks):
    """(signature, constexprs, attrs) for ``triton.compile``, as the JIT derives them from a launch."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.backends.nvidia.compiler import CUDABackend

    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")})
    values.update(blocks)  # the job's config, not whatever the recorded launch chose
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[p.name] = ty
        if ty == "constexpr":  # an int equal to 1
            constexprs[p.name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs


def _compile_one(job):
    kind, cfg_index, dtype, head_dim, arch, variant, pruned = job
    import triton
    from triton.backends.compiler import GPUTarget

    from . import configs as C

    fn = _kernel_fns()[kind]
    if kind == "preprocess":
        blocks, warps, stages, cfg_name = {"BLOCK_M": C.PREPROCESS_BLOCK_M}, 4, 1, f"BLOCK_M={C.PREPROCESS_BLOCK_M}"
    else:
        cfg = C.CONFIGS[kind][cfg_index]
        blocks, warps, stages = dict(cfg.kwargs), cfg.num_warps, cfg.num_stages
        cfg_name = ",".join(f"{k}={v}" for k, v in blocks.items()) + f",w{warps},s{stages}"
    row = dict(kernel=kind, index=cfg_index, config=cfg_name, dtype=dtype, head_dim=head_dim, arch=arch,
               flags=variant, pruned=pruned, ok=False, n_regs=None, shared=None, stack=None, spill=None,
               error=None)
    limit = C.SHARED_LIMIT.get(arch, C.SHARED_LIMIT[80])
    import resource

    t0 = [resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
          for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    try:
        args, kwargs = launch_arguments(dtype, head_dim, variant)[kind]
        signature, constexprs, attrs = _specialize(fn, args, kwargs, blocks)
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        k, log = _compile_with_ptxas_log(src, GPUTarget("cuda", arch, 32),
                                         {"num_warps": warps, "num_stages": stages})
        row["shared"] = int(k.metadata.shared)
        row.update(_ptxas_resources(log))
        if pruned:
            row["ok"] = True  # never selected: it only has to build
        elif row["shared"] > limit:
            row["error"] = f"shared {row['shared']} B > {limit} B per block on sm_{arch}"
        elif arch not in SPILL_CHECKED_ARCHS:
            row["ok"] = True  # spills printed, not held against it: configs.SPILLS is measured on sm_90
        elif row["spill"] is None:
            row["error"] = "no ptxas report to read spills from (this Triton lacks TRITON_DUMP_PTXAS_LOG)"
        elif row["spill"]:
            row["error"] = f"spills {row['spill']} B of registers per thread"
        else:
            row["ok"] = True
    except Exception as e:  # report, never raise: the caller prints the table
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    t1 = [resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
          for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    row["cpu_s"] = round(sum(t1) - sum(t0), 2)  # compile CPU time (this process and ptxas)
    return row


def _compile_with_ptxas_log(src, target, options):
    """``triton.compile`` that always runs ptxas (no cache hit) and returns its ``-v`` report too: the
    only place a spill is visible without a GPU."""
    import contextlib
    import io

    import triton
    from triton import knobs

    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True  # triton prints the ptxas -v log it already asks for
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        kernel = triton.compile(src, target=target, options=options)
    return kernel, out.getvalue()


def _ptxas_resources(log: str) -> dict:
    """{n_regs, stack, spill} per thread from a ptxas ``-v`` report (None when absent)."""
    import re

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    return {"n_regs": grab(r"Used (\d+) registers"), "stack": grab(r"(\d+) bytes stack frame"),
            "spill": grab(r"(\d+) bytes spill stores")}


def jobs(archs, dtypes=("float16", "bfloat16", "float32"), head_dims=(16, 32, 64, 128), kernels=None,
         full=False):
    """The compile matrix: (kernel, config index, dtype, head dim, arch, flags variant, pruned).

    Default (~3 minutes on two idle cores): every config of every kernel in every dtype, the first
    dtype at head dim 32 and the others at the smallest (compile time grows steeply with the tile: up
    to 15 s per kernel at head dim 128, 20-50 s for fp32's exact-FMA dots); every head-dim block once
    per kernel in the first dtype with the smallest config the pruning keeps there; the feature-free
    variant once per kernel; every all-features job again on the deterministic path of a kernel that
    has one (dprefix). ``full=True`` compiles every config in every dtype at the largest head dim the
    pruning keeps it for (~12 CPU-minutes per arch). Configs the pruning never keeps for a dtype
    compile at the smallest head dim, marked pruned.
    """
    from . import configs as C

    kinds = list(kernels or ["fwd", "dkdv", "dq", "dprefix", "preprocess"])
    elem = {"float16": 2, "bfloat16": 2, "float32": 4}
    big, small = max(head_dims), min(head_dims)
    fns = _kernel_fns()
    out = []

    def add(job):
        if job not in out:
            out.append(job)
        kind, ci, dtype, hd, arch, variant, pruned = job
        if variant == "all" and any(p.name == "DETERMINISTIC" for p in fns[kind].params):
            det_kept = C.kept(kind, C.CONFIGS[kind][ci], C.block_d(hd), elem[dtype],
                              C.SHARED_LIMIT.get(arch, C.SHARED_LIMIT[80]), "det")
            add((kind, ci, dtype, hd, arch, "det", pruned or not det_kept))

    for arch in archs:
        limit = C.SHARED_LIMIT.get(arch, C.SHARED_LIMIT[80])
        for kind in kinds:
            if kind == "preprocess":  # a row reduction: one compile per dtype, every block for the first
                for dt in dtypes:
                    for hd in head_dims:
                        if hd == big or dt == dtypes[0]:
                            add((kind, 0, dt, hd, arch, "all", False))
                continue
            cfgs = C.CONFIGS[kind]
            for dtype in dtypes:
                target = big if full else (32 if dtype == dtypes[0] else small)
                for ci, cfg in enumerate(cfgs):
                    # with every feature on: the most code; the largest head dim up to target that is kept
                    fits = [hd for hd in head_dims
                            if hd <= target and C.kept(kind, cfg, C.block_d(hd), elem[dtype], limit)]
                    if fits:
                        add((kind, ci, dtype, max(fits), arch, "all", False))
                    else:  # never selected for this dtype here: still check it compiles, at the smallest block
                        add((kind, ci, dtype, small, arch, "all", True))
            # every head-dim block in the first dtype, with the last (smallest) config kept at each
            dt = dtypes[0]
            for hd in head_dims:
                ci = next((i for i in reversed(range(len(cfgs)))
                           if C.kept(kind, cfgs[i], C.block_d(hd), elem[dt], limit)), None)
                if ci is not None:
                    add((kind, ci, dt, hd, arch, "all", False))
            # the feature-free path once per kernel and arch
            add((kind, 0, dtypes[0], 64 if 64 in head_dims else small, arch, "none", False))
    return out


def compile_all(archs, dtypes=("float16", "bfloat16", "float32"), head_dims=(16, 32, 64, 128), kernels=None,
                workers=None, full=False) -> list:
    """Compile the matrix for each arch in ``archs`` (ints, e.g. [80, 90]); one dict per compile."""
    archs = [int(str(a).replace("sm_", "")) for a in archs]
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # interpreted kernels cannot be compiled: redo it in a child without the interpreter
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET")
        arg = json.dumps(dict(archs=archs, dtypes=list(dtypes), head_dims=list(head_dims), kernels=kernels,
                              full=full))
        res = subprocess.run([sys.executable, "-m", __name__, "--json", arg], env=env, capture_output=True,
                             text=True, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])
    todo = jobs(archs, dtypes, head_dims, kernels, full)
    workers = workers or min(len(todo), os.cpu_count() or 1)
    if workers <= 1:
        return [_compile_one(j) for j in todo]
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(_compile_one, todo, chunksize=2))


def spill_sweep(arch: int, dtype: str, head_dims=(16, 32, 64, 128), variants=("all", "nodrop", "det")) -> list:
    """Jobs for every config of every tuned kernel at each head dim in each flags variant it has: what
    ``configs.SPILLS`` is measured from."""
    from . import configs as C

    fns = _kernel_fns()
    return [(kind, ci, dtype, hd, arch, variant, False)
            for kind in C.CONFIGS for ci in range(len(C.CONFIGS[kind])) for hd in head_dims for variant in variants
            if variant != "det" or any(p.name == "DETERMINISTIC" for p in fns[kind].params)]


def spill_table(rows) -> dict:
    """``{(kind, config index, element bytes, variant): head-dim blocks that spill}`` from compiled
    rows, in ``configs.SPILLS``'s form."""
    from . import configs as C

    table = {}
    for r in rows:
        if r.get("spill"):
            key = (r["kernel"], r["index"], {"float32": 4}.get(r["dtype"], 2), r["flags"])
            table[key] = tuple(sorted(set(table.get(key, ())) | {C.block_d(r["head_dim"])}))
    return dict(sorted(table.items()))


def spilling_fallbacks(arch: int, elem_sizes=(2, 4), head_dims=(16, 32, 64, 128)) -> list:
    """Lines naming each (kernel, element size, head dim, variant) where every config spills, so the
    pruning falls back to the smallest tile, which spills too."""
    from . import configs as C

    limit = C.SHARED_LIMIT.get(arch, C.SHARED_LIMIT[80])
    lines = []
    for kind, cfgs in C.CONFIGS.items():
        for elem in elem_sizes:
            for hd in head_dims:
                bd = C.block_d(hd)
                for variant in ("all", "nodrop") + (("det",) if kind == "dprefix" else ()):
                    if not any(C.kept(kind, c, bd, elem, limit, variant) for c in cfgs):
                        cfg = C.fallback_config(kind, bd, elem)
                        lines.append(f"sm_{arch} {kind} {8 * elem}-bit D={hd} {variant}: every config spills; "
                                     f"falls back to {cfg.kwargs}, w{cfg.num_warps}, s{cfg.num_stages}")
    return lines


def format_table(rows) -> str:
    lines = [f"{'arch':>5} {'kernel':<10} {'config':<34} {'dtype':<9} {'D':>4} {'flags':<6} "
             f"{'regs':>5} {'spill':>6} {'stack':>6} {'shared':>7}  status"]
    for r in rows:
        lines.append(f"sm_{r['arch']:<2} {r['kernel']:<10} {r['config']:<34} {r['dtype']:<9} {r['head_dim']:>4} "
                     f"{r['flags']:<6} {str(r['n_regs']):>5} {str(r.get('spill')):>6} {str(r.get('stack')):>6} "
                     f"{str(r['shared']):>7}  "
                     f"{('ok' if r['ok'] else 'FAIL ' + str(r['error'])) + (' (pruned)' if r['pruned'] else '')}")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--json":
        kw = json.loads(argv[1])
        print(json.dumps(compile_all(**kw)))
        return 0
    full = "--full" in argv
    sweep = [a.split("=", 1)[1] for a in argv if a.startswith("--spill-table=")]
    argv = [a for a in argv if a != "--full" and not a.startswith("--spill-table=")]
    archs = [int(a.replace("sm_", "")) for a in (argv[0] if argv else "80,90").split(",")]
    t0 = time.time()
    if sweep:  # --spill-table=float16: the measurements behind configs.SPILLS, one arch, one dtype
        rows = [_compile_one(j) for j in spill_sweep(archs[0], sweep[0])]
        print(format_table(rows))
        print("SPILLS (add to configs.SPILLS):", spill_table(rows))
        return 0
    rows = compile_all(archs, full=full)
    print(format_table(rows))
    bad = [r for r in rows if not r["ok"]]
    cpu = sum(r.get("cpu_s") or 0 for r in rows)
    print(f"{len(rows)} compiles, {len(bad)} failed, {time.time() - t0:.0f} s wall, {cpu:.0f} s CPU")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
