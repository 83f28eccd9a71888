"""Build of kvtool's optional native kernels (kvtool/quant_ops/_native.cpp); everything else is in pyproject.toml.

The extension is optional: where no C++ compiler is found, ``pip install`` still succeeds and
``kvtool.quant_ops.native`` reports why the portable numpy/torch path runs instead. Flags are portable: -O3
for the baseline x86-64 (or other) ISA; the AVX2+F16C code is compiled per function (``#pragma GCC target``)
and chosen at run time by cpuid, so the binary runs on any x86-64 machine. ``-ffp-contract=off`` keeps
quantization bit-identical to numpy (no fused multiply-add); no -ffast-math for the same reason.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -fopenmp-simd: only the `omp simd` loop pragmas (no OpenMP runtime; threads are std::thread)
BASE_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-fvisibility=hidden", "-fopenmp-simd",
              "-pthread"]


class OptionalBuildExt(build_ext):
    """A failed compile (no compiler, too old for C++17 / _Float16) leaves the pure-Python fallback: the
    extension is optional, and ``kvtool.quant_ops.native.reason()`` says it was not built."""

    def build_extension(self, ext):
        if os.environ.get("KVTOOL_NO_NATIVE_BUILD") == "1":
            print("kvtool: KVTOOL_NO_NATIVE_BUILD=1, skipping the native kernels", file=sys.stderr)
            return
        try:
            super().build_extension(ext)
        except Exception as e:  # compiler missing or too old
            print(f"kvtool: native kernels not built: {e}", file=sys.stderr)
            print("kvtool: the portable numpy/torch quant_ops path will run", file=sys.stderr)


ext = Extension("kvtool.quant_ops._native", sources=["kvtool/quant_ops/_native.cpp"],
                depends=["kvtool/quant_ops/_native_impl.h", "kvtool/quant_ops/_native_attention.h",
                         "kvtool/quant_ops/_native_prefix.h"], language="c++",
                extra_compile_args=BASE_FLAGS if os.name != "nt" else ["/O2", "/std:c++17"],
                extra_link_args=["-pthread"] if os.name != "nt" else [], optional=True)

setup(ext_modules=[ext], cmdclass={"build_ext": OptionalBuildExt})
