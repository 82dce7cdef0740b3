"""Builds memloc_kernels._C with CMake (Ninja when available); everything else is in pyproject.toml.

Environment switches:
  MEMLOC_SKIP_NATIVE=1   build no extension at all (the package then runs on its reference and
                         Triton backends).
  MEMLOC_CUDA=1 / 0      force the CUDA kernels on / off. Default: on when nvcc is found and the
                         torch visible to the build is a CUDA build.
  CMAKE_ARGS             extra CMake arguments, e.g. -DMEMLOC_CUDA_ARCHITECTURES=90-real.
  CMAKE_BUILD_TYPE       Release (default) or Debug.
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


def _want_cuda() -> bool:
    forced = os.environ.get("MEMLOC_CUDA")
    if forced is not None:
        return forced.strip().lower() not in ("0", "", "off", "false", "no")
    if shutil.which("nvcc") is None:
        return False
    try:
        import torch  # not present inside an isolated build environment: no CUDA then
    except ImportError:
        return False
    return torch.version.cuda is not None


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DMEMLOC_WITH_CUDA={'ON' if _want_cuda() else 'OFF'}",
        ]
        if shutil.which("ninja") or _ninja_from_pip():
            cmake_args.append("-GNinja")
        cmake_args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]
        jobs = ["-j", str(os.cpu_count() or 2)]
        subprocess.run(["cmake", str(ROOT), *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, *jobs], cwd=build_temp, check=True)


def _ninja_from_pip() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


skip_native = os.environ.get("MEMLOC_SKIP_NATIVE", "").strip().lower() in ("1", "on", "true", "yes")
setup(
    ext_modules=[] if skip_native else [CMakeExtension("memloc_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
