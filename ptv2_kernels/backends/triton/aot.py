"""Ahead-of-time compile check: every kernel x autotune config x dtype x head-dim block x feature flags
for ``GPUTarget("cuda", arch, 32)``, without a GPU (and without the interpreter).

``compile_all([80, 90])`` returns one row per compile:
``{kernel, config, dtype, head_dim, arch, flags, pruned, ok, n_regs, shared, error}``; ``ok`` is False
when the compile fails or its shared memory exceeds the architecture's per-block limit for a config the
pruning keeps (``pruned`` rows are configs the pruning never selects for that dtype on that arch,
compiled at the smallest head dim only to show they build).
Run ``python -m ptv2_kernels.backends.triton.aot 80,90 [--full]`` for a table.

The matrix is described in ``jobs``. Head
dims that are not powers of two (40, 72, 96...) compile to the same code as their padded block (64,
128): the head dim is a runtime argument, only ``BLOCK_D`` is a compile-time one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_FLOAT_ARGS = {"qk_scale", "sm_scale", "drop_scale", "pdrop_scale"}
_FP32_PTRS = {"LSE", "LSE2", "DELTA", "GLSE", "DPK", "DPV"}
_PTRS = {"Q", "K", "V", "PK", "PV", "O", "DO", "DK", "DV", "DQ"}
_FLAG_NAMES = ("CAUSAL", "HAS_MASK", "HAS_BANK", "DROPOUT", "PREFIX_DROPOUT", "HAS_GLSE")
# the flags a job turns on: "all" features (the most code), "none", or "det": all features on the
# deterministic path of the kernels that have one (a different reduction, not an extra feature)
_VARIANTS = {"all": _FLAG_NAMES, "none": (), "det": _FLAG_NAMES + ("DETERMINISTIC",)}


def _kernel_fns():
    from . import backward, forward

    return {"fwd": forward._fwd_kernel, "dkdv": backward._bwd_dkdv_kernel, "dq": backward._bwd_dq_kernel,
            "dprefix": backward._bwd_dprefix_kernel, "preprocess": backward._bwd_preprocess}


def _signature(fn, dtype: str):
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in _PTRS:
            sig[name] = "*" + _DTYPES[dtype]
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name == "PIDX":
            sig[name] = "*i64"
        elif name == "KPM":
            sig[name] = "*u8"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


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
    bd = C.block_d(head_dim)
    constexprs = dict(blocks, BLOCK_D=bd)
    for p in fn.params:
        if p.name in _VARIANTS["det"]:
            constexprs[p.name] = p.name in _VARIANTS[variant]
        elif p.name == "PREC":
            constexprs["PREC"] = "ieee" if dtype == "float32" else "tf32"
    row = dict(kernel=kind, config=cfg_name, dtype=dtype, head_dim=head_dim, arch=arch,
               flags=variant, pruned=pruned, ok=False, n_regs=None, shared=None, stack=None,
               error=None)
    limit = C.SHARED_LIMIT.get(arch, C.SHARED_LIMIT[80])
    import resource

    t0 = [resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
          for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, dtype), constexprs=constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": stages})
        row["n_regs"] = getattr(k, "n_regs", None)
        row["shared"] = int(k.metadata.shared)
        # registers are only known after loading on a device: read them (and the spill stack) from the cubin
        regs, row["stack"] = _resources_from_cubin(k)
        if row["n_regs"] is None:
            row["n_regs"] = regs
        if row["shared"] > limit and not pruned:
            row["error"] = f"shared {row['shared']} B > {limit} B per block on sm_{arch}"
        else:
            row["ok"] = True
    except Exception as e:  # report, never raise: the caller prints the table
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    t1 = [resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
          for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    row["cpu_s"] = round(sum(t1) - sum(t0), 2)  # compile CPU time (this process and ptxas)
    return row


def _resources_from_cubin(k):
    """(registers, stack bytes) per thread from the cubin (``cuobjdump --dump-resource-usage``)."""
    import shutil
    import tempfile

    cubin = k.asm.get("cubin") if hasattr(k, "asm") else None
    import triton.backends.nvidia as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if not cubin or not tool:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = {}
    for tok in out.replace(",", " ").split():
        for name in ("REG", "STACK"):
            if tok.startswith(name + ":") and name not in found:
                found[name] = int(tok[len(name) + 1:])
    return found.get("REG"), found.get("STACK")


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
        kind, variant = job[0], job[5]
        if variant == "all" and any(p.name == "DETERMINISTIC" for p in fns[kind].params):
            add(job[:5] + ("det",) + job[6:])

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


def format_table(rows) -> str:
    lines = [f"{'arch':>5} {'kernel':<10} {'config':<34} {'dtype':<9} {'D':>4} {'flags':<5} "
             f"{'regs':>5} {'stack':>6} {'shared':>7}  status"]
    for r in rows:
        lines.append(f"sm_{r['arch']:<2} {r['kernel']:<10} {r['config']:<34} {r['dtype']:<9} {r['head_dim']:>4} "
                     f"{r['flags']:<5} {str(r['n_regs']):>5} {str(r.get('stack')):>6} {str(r['shared']):>7}  "
                     f"{('ok' if r['ok'] else 'FAIL ' + str(r['error'])) + (' (pruned)' if r['pruned'] else '')}")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--json":
        kw = json.loads(argv[1])
        print(json.dumps(compile_all(**kw)))
        return 0
    full = "--full" in argv
    argv = [a for a in argv if a != "--full"]
    archs = [int(a.replace("sm_", "")) for a in (argv[0] if argv else "80,90").split(",")]
    t0 = time.time()
    rows = compile_all(archs, full=full)
    print(format_table(rows))
    bad = [r for r in rows if not r["ok"]]
    cpu = sum(r.get("cpu_s") or 0 for r in rows)
    print(f"{len(rows)} compiles, {len(bad)} failed, {time.time() - t0:.0f} s wall, {cpu:.0f} s CPU")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
