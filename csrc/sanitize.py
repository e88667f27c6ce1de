"""Run the CUDA kernels under compute-sanitizer (memcheck, racecheck, synccheck, initcheck).

One command on a GPU machine, after building the extension (``pip install -e . --no-deps``):

    python csrc/sanitize.py                 # every tool over every shape
    python csrc/sanitize.py --tools memcheck racecheck --quick
    python csrc/sanitize.py --dry-run       # no GPU: the commands, and the shapes through the CPU backend

Each tool re-runs this file in ``--driver`` mode under ``compute-sanitizer``; the driver calls the
backend's forward and full backward (and the prefix-only backward) over several small shapes that hit
the edges: odd sizes, P = 0, a head dim padded to its tile, GQA, a bank, masks with empty rows,
causal, both dropouts, and unaligned (scalar-load) inputs. Only the ptv2 kernels are instrumented
(``--kernel-name kns=ptv2``; ``--all-kernels`` instruments torch's too). Exit status 0 when every
tool reports no error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

SHAPES = [
    # B, Hq, Hkv, N, P, D, T, flags
    (1, 1, 1, 1, 1, 64, 1, ""),
    (2, 4, 2, 37, 7, 64, 1, "causal"),
    (2, 2, 1, 65, 0, 32, 1, "mask,empty"),
    (3, 2, 2, 33, 20, 128, 2, "bank,mask,causal"),
    (2, 4, 4, 17, 9, 40, 1, "dropout,pdropout,unaligned"),
    (2, 6, 2, 70, 33, 96, 3, "bank,dropout,pdropout,causal,mask"),
]
QUICK = SHAPES[:3]


def driver(shapes, backend: str = "cuda") -> None:
    """Every shape through ``backend``'s forward and backward: the CUDA kernels under the sanitizer, or
    (``--dry-run``) the pure-PyTorch backend on CPU, which checks the inputs each shape builds."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ptv2_kernels import backends
    from ptv2_kernels.backends.base import Params

    BACKEND = backends.get(backend)
    dev = torch.device("cuda" if backend == "cuda" else "cpu")
    why = BACKEND.availability() or BACKEND.device_reason(dev)
    if why:
        raise SystemExit(f"the {backend} backend {why}")
    dtypes = (torch.float16, torch.bfloat16) if dev.type == "cuda" else (torch.float32,)
    for (B, Hq, Hkv, N, P, D, T, flags) in shapes:
        f = set(flags.split(",")) - {""}
        for dtype in dtypes:
            torch.manual_seed(0)

            def rnd(*shape):
                if "unaligned" in f:
                    n = 1
                    for s in shape:
                        n *= s
                    return torch.randn(n + 1, device=dev, dtype=dtype)[1:].view(*shape)
                return torch.randn(*shape, device=dev, dtype=dtype)

            q, k, v = rnd(B, Hq, N, D), rnd(B, Hkv, N, D), rnd(B, Hkv, N, D)
            pk, pv = rnd(T, Hkv, P, D), rnd(T, Hkv, P, D)
            mask = None
            if "mask" in f:
                mask = torch.rand(B, N, device=dev) > 0.3
                if "empty" in f:
                    mask[0] = False
            index = torch.randint(0, T, (B,), device=dev) if "bank" in f else None
            params = Params(causal="causal" in f, softmax_scale=D ** -0.5,
                            dropout_p=0.2 if "dropout" in f else 0.0,
                            prefix_dropout_p=0.2 if "pdropout" in f else 0.0, seed=7)
            out, lse = BACKEND.forward(q, k, v, pk, pv, mask, index, params)
            go = torch.randn_like(out)
            glse = torch.randn_like(lse)
            BACKEND.backward(go, glse, q, k, v, pk, pv, mask, index, out, lse, params, (True,) * 5)
            BACKEND.backward(go, None, q, k, v, pk, pv, mask, index, out, lse, params,
                             (False, False, False, True, True))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            print(f"ok B={B} Hq={Hq} Hkv={Hkv} N={N} P={P} D={D} T={T} {flags or '-'} {dtype}", flush=True)


TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")


def find_sanitizer():
    san = shutil.which("compute-sanitizer")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if san is None and home and os.path.exists(os.path.join(home, "bin", "compute-sanitizer")):
            san = os.path.join(home, "bin", "compute-sanitizer")
    return san


def sanitizer_command(san: str, tool: str, args) -> list:
    """compute-sanitizer running this file's driver under ``tool`` (only the ptv2 kernels instrumented
    unless --all-kernels)."""
    cmd = [san, "--tool", tool, "--error-exitcode", "99"]
    if not args.all_kernels:
        cmd += ["--kernel-name", "kns=ptv2"]
    if tool == "racecheck":
        cmd += ["--racecheck-report", "all"]
    return cmd + [sys.executable, os.path.abspath(__file__), "--driver"] + (["--quick"] if args.quick else [])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tools", nargs="+", default=list(TOOLS))
    ap.add_argument("--quick", action="store_true", help="only the first three shapes")
    ap.add_argument("--all-kernels", action="store_true", help="also instrument torch's kernels")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU needed: print each tool's command, run the shapes through the CPU torch backend")
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    unknown = sorted(set(args.tools) - set(TOOLS))
    if unknown:
        ap.error(f"--tools: unknown tool {unknown[0]!r} (choose from {', '.join(TOOLS)})")
    shapes = QUICK if args.quick else SHAPES
    if args.driver:
        driver(shapes)
        return 0
    if args.dry_run:
        for tool in args.tools:
            print(f"=== {tool} (dry run, not run): {' '.join(sanitizer_command('compute-sanitizer', tool, args))}")
        driver(shapes, backend="torch")
        return 0

    san = find_sanitizer()
    if san is None:
        print("compute-sanitizer not found (it ships with the CUDA toolkit: put its bin/ on PATH)")
        return 2
    failed = []
    for tool in args.tools:
        cmd = sanitizer_command(san, tool, args)
        print(f"=== {tool}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.run(cmd).returncode
        print(f"=== {tool}: exit {rc} in {time.time() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(f"{tool} (exit {rc})")
    print("sanitizer: " + ("FAILED: " + ", ".join(failed) if failed else f"clean ({', '.join(args.tools)})"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
