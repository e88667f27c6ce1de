"""Builds the optional CUDA extension ``ptv2_kernels._C`` with CMake + Ninja (metadata: pyproject.toml).

Environment knobs, read here and passed to CMake unchanged:

- ``PTV2_CUDA_ARCHS``: SM architectures, e.g. ``"90"`` or ``"80;86;89;90"`` (the default); SASS for
  each, PTX for the newest.
- ``PTV2_SKIP_CUDA_BUILD=1``: install without the extension (the Triton and torch backends still work).
- ``MAX_JOBS``: parallel compile jobs (default: the number of CPUs).
- ``PTV2_PTXAS_VERBOSE=1``: print registers / shared memory / spills of every kernel (``-Xptxas -v``).

Without nvcc the package installs without the extension and says so in one line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;86;89;90"


def _find_nvcc() -> str | None:
    for env in ("CUDACXX",):
        path = os.environ.get(env)
        if path and Path(path).is_file():
            return path
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _skip_reason() -> str | None:
    if os.environ.get("PTV2_SKIP_CUDA_BUILD", "").strip().lower() in ("1", "true", "yes", "on"):
        return "PTV2_SKIP_CUDA_BUILD is set"
    if _find_nvcc() is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH to build it)"
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11  # from the isolated build environment (pyproject build-system.requires)

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        archs = os.environ.get("PTV2_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
        # A persistent build folder (build/ is git-ignored) keyed by Python and architectures, so a
        # repeated `pip install -e .` recompiles only what changed.
        tag = "".join(ch if ch.isalnum() else "_" for ch in archs)
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("MAX_JOBS", "").strip() or str(os.cpu_count() or 1)
        cmake = shutil.which("cmake") or "cmake"
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPTV2_CUDA_ARCHS={archs}",
            f"-DMAX_JOBS={jobs}",
            "-DPTV2_SKIP_CUDA_BUILD=OFF",
            f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}",
        ]
        ninja = shutil.which("ninja")
        if ninja:
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        if os.environ.get("PTV2_PTXAS_VERBOSE"):
            args.append("-DPTV2_PTXAS_VERBOSE=ON")
        print(f"ptv2_kernels: building the CUDA extension for PTV2_CUDA_ARCHS={archs} with {jobs} jobs",
              flush=True)
        subprocess.run(args, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs, "--target", "_C"], check=True)
        # (configure returns early without a CUDA compiler; setup.py already checked for nvcc)
        built = list(out.parent.glob("_C*.so")) + list(out.parent.glob("_C*.pyd"))
        if not out.exists():
            if not built:
                raise RuntimeError(f"ptv2_kernels: CMake finished but no _C module appeared in {out.parent}")
            shutil.copyfile(built[0], out)


_why = _skip_reason()
if _why:
    print(f"ptv2_kernels: building WITHOUT the CUDA extension: {_why}; the triton and torch backends "
          f"still work", file=sys.stderr, flush=True)
    ext_modules = []
else:
    ext_modules = [CMakeExtension("ptv2_kernels._C")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
