"""Build of kvtool's optional native kernels (kvtool/quant_ops/_native.cpp); everything else is in pyproject.toml.

The extension is optional: where no C++ compiler (or no OpenMP) is found, ``pip install`` still succeeds and
``kvtool.quant_ops.native`` reports why the portable numpy/torch path runs instead. Flags are portable: -O3
for the baseline x86-64 (or other) ISA; the AVX2+F16C code is compiled per function (``#pragma GCC target``)
and chosen at run time by cpuid, so the binary runs on any x86-64 machine. ``-ffp-contract=off`` keeps
quantization bit-identical to numpy (no fused multiply-add); no -ffast-math for the same reason.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

BASE_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-fvisibility=hidden"]


class OptionalBuildExt(build_ext):
    """Try with OpenMP, then without; a failure leaves the pure-Python fallback (the extension is optional)."""

    def build_extension(self, ext):
        if os.environ.get("KVTOOL_NO_NATIVE_BUILD") == "1":
            print("kvtool: KVTOOL_NO_NATIVE_BUILD=1, skipping the native kernels", file=sys.stderr)
            return
        base_c, base_l = list(ext.extra_compile_args), list(ext.extra_link_args)
        for omp in (True, False):
            ext.extra_compile_args = base_c + (["-fopenmp"] if omp else ["-fopenmp-simd"])
            ext.extra_link_args = base_l + (["-fopenmp"] if omp else [])
            try:
                super().build_extension(ext)
                return
            except Exception as e:  # compiler missing or too old: try again, then fall back
                print(f"kvtool: native kernels not built ({'with' if omp else 'without'} OpenMP): {e}",
                      file=sys.stderr)
        print("kvtool: the portable numpy/torch quant_ops path will run", file=sys.stderr)


ext = Extension("kvtool.quant_ops._native", sources=["kvtool/quant_ops/_native.cpp"],
                depends=["kvtool/quant_ops/_native_impl.h"], language="c++",
                extra_compile_args=BASE_FLAGS if os.name != "nt" else ["/O2", "/std:c++17"], optional=True)

setup(ext_modules=[ext], cmdclass={"build_ext": OptionalBuildExt})
