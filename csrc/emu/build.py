"""Build the CUDA kernels for the CPU, with an emulated execution model, as a drop-in ``_C`` module.

This checks the kernels' logic (indexing, masking, dropout hashing, online softmax, the prefix
gradient's chunked reduction, barrier placement, reads of shared memory never written: shared memory
is poisoned with NaN before every block) on a machine without a GPU. It runs the *same* csrc/*.cu
source text: only the launch lines are rewritten to ``emu_launch``. Each block runs as 128
std::threads with std::barrier for __syncthreads/__syncwarp; wmma fragments hold the whole 16x16 tile
in every lane (mma in fp32 from the 16-bit inputs, as the tensor cores do), while the register-level
``mma_16816`` and ``ldsm_x4`` (csrc/mma.cuh) really are distributed: each lane holds only its
documented fragment and the warp assembles the operands (emu/mma.cuh), so fragment-layout mistakes
show up, and a misaligned ldmatrix row aborts. It cannot see what only hardware shows (wmma alignment
faults, shared-memory limits, real races between lanes of a fragment, timing):
tests/gpu/test_cuda_gpu.py and csrc/sanitize.py do that on a GPU.

    python csrc/emu/build.py OUTDIR     # writes OUTDIR/_C<ext suffix>; needs g++ (C++20) and the
                                        # CUDA headers (cuda_fp16.h) of a toolkit install
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent
KERNELS = ("fwd", "bwd_dq", "bwd_dkv")


def cuda_include() -> str | None:
    cands = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(os.path.realpath(nvcc)).parent.parent
        cands.append(real / "include")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(Path(home) / "include")
    for c in cands:
        if (c / "cuda_fp16.h").is_file():
            return str(c)
    return None


def cuda_lib() -> str | None:
    inc = cuda_include()
    if inc is None:
        return None
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
        p = Path(inc).parent / sub / "libcudart_static.a"
        if p.is_file():
            return str(p)
    return None


def unavailable() -> str | None:
    """Why the emulator cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "g++ is not installed"
    if cuda_include() is None:
        return "the CUDA headers (cuda_fp16.h) were not found"
    if cuda_lib() is None:
        return "libcudart_static.a was not found"
    return None


def transform(src: str) -> str:
    """Rewrite the launch lines of a kernel file for the emulator; the kernels stay untouched."""
    s = re.sub(r"PTV2_CHECK_CUDA\(\s*cudaFuncSetAttribute[\s\S]*?\);\n", "", src)
    s, n = re.subn(r"(\w+<[^<>]*>)<<<\(unsigned\)blocks, kThreads, [^>]*>>>\(p\);", r"emu_launch(\1, blocks, p);", s)
    s = re.sub(r"return launch_status\([^)]*\);", "return std::string();", s)
    if "<<<" in s or n == 0:
        raise RuntimeError("csrc/emu/build.py: a kernel launch was not rewritten; update transform()")
    return '#include "emu_launch.h"\n' + s


def build(outdir: str | os.PathLike, jobs: int = 2) -> Path:
    why = unavailable()
    if why:
        raise RuntimeError(f"cannot build the kernel emulator: {why}")
    import pybind11

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    for name in KERNELS:
        (out / f"{name}_emu.cpp").write_text(transform((CSRC / f"{name}.cu").read_text()))
    inc = ["-I", str(HERE), "-I", str(CSRC), "-I", cuda_include()]
    # -fno-strict-aliasing: the kernels read pairs of 16-bit elements as one uint32 fragment register
    flags = ["-std=c++20", "-O2", "-fPIC", "-w", "-fno-strict-aliasing", *inc]
    py = ["-I", sysconfig.get_paths()["include"], "-I", pybind11.get_include(),
          '-DPTV2_CUDA_ARCHS_STR="80"', "-DPTV2_PTX_ARCH=0"]
    units = [(out / f"{n}_emu.cpp", []) for n in KERNELS] + [(HERE / "driver.cpp", []),
                                                              (CSRC / "binding.cpp", py)]

    def compile_one(unit):
        src, extra = unit
        obj = out / (src.stem + ".o")
        subprocess.run(["g++", *flags, *extra, "-c", str(src), "-o", str(obj)], check=True)
        return str(obj)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        objs = list(ex.map(compile_one, units))
    target = out / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["g++", "-shared", "-o", str(target), *objs, cuda_lib(), "-lpthread", "-ldl", "-lrt"],
                   check=True)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(build(sys.argv[1], int(os.environ.get("MAX_JOBS", "2"))))
