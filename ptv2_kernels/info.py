"""``python -m ptv2_kernels.info``: versions, devices, and which backends run here (and why not).

``--aot sm_80,sm_90`` compiles every Triton kernel configuration for those GPU targets without a GPU,
specialized as a real launch specializes it (divisibility hints), prints registers, spill stores,
stack and shared memory per configuration, and exits non-zero if any fails to compile, or, where
pruning lets autotuning choose it, exceeds shared memory or spills on sm_90 (H100/H200).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

import torch

from . import __version__, backends


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as e:  # any failure to import is worth showing as-is
        return f"not available ({type(e).__name__}: {e})"


def _device_line() -> str:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, " \
           f"{props.multi_processor_count} SMs)"


def report() -> str:
    lines = [
        f"ptv2-kernels {__version__}",
        f"python       {platform.python_version()} ({sys.executable})",
        f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton       {_version('triton')}",
        f"transformers {_version('transformers')}",
        f"peft         {_version('peft')}",
        f"device       {_device_line()}",
        "",
        "backends (dispatch order on cuda: " + " > ".join(backends.PRIORITY["cuda"])
        + "; on cpu: " + " > ".join(backends.PRIORITY["cpu"]) + ")",
    ]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in backends.NAMES:
        b = backends.get(name)
        why = b.availability() or b.device_reason(device)
        state = "available" if why is None else f"unavailable here: {why}"
        lines.append(f"  {name:7s} {state}")
        if b.dtypes:
            dtypes = ", ".join(str(d).replace("torch.", "") for d in b.dtypes)
            lines.append(f"          dtypes {dtypes}; head dims {b.head_dims}; "
                         f"features {', '.join(sorted(b.features))}")
        if b.paths:
            lines.append(f"          paths: {b.paths}")
        build_info = getattr(importlib.import_module(type(b).__module__), "build_info", None)
        if build_info is not None:
            lines.append(f"          build: {build_info()}")
    return "\n".join(lines)


def _parse_archs(text: str) -> list:
    archs = []
    for part in text.split(","):
        part = part.strip().lower().removeprefix("sm_").removeprefix("sm")
        if not part.isdigit():
            raise SystemExit(f"--aot expects comma-separated targets like sm_80,sm_90, got {text!r}")
        archs.append(int(part))
    return archs


def aot(archs: list) -> int:
    from .backends.triton import aot as triton_aot

    rows = triton_aot.compile_all(archs)
    failed = [r for r in rows if not r["ok"]]
    print(triton_aot.format_table(rows))
    for arch in archs:
        for line in triton_aot.spilling_fallbacks(arch):
            print("warning: " + line)
    print(f"{len(rows) - len(failed)} of {len(rows)} configurations compiled for "
          + ", ".join(f"sm_{a}" for a in archs) + " with the launch's specialization; "
          + (f"{len(failed)} FAILED (too much shared memory, a spill or a compile error)" if failed
             else "none a pruning keeps exceeds shared memory, or spills on "
             + ", ".join(f"sm_{a}" for a in triton_aot.SPILL_CHECKED_ARCHS)))
    return 1 if failed or not rows else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptv2_kernels.info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aot", metavar="TARGETS",
                        help="compile every Triton configuration for these targets, e.g. sm_80,sm_90")
    args = parser.parse_args(argv)
    if args.aot:
        return aot(_parse_archs(args.aot))
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
