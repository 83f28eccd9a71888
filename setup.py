"""Build of kvtool's optional native kernels (kvtool/quant_ops/_native.cpp); everything else is in pyproject.toml.

The extension is optional: where no C++ compiler is found, ``pip install`` still succeeds and
``kvtool.quant_ops.native`` reports why the portable numpy/torch path runs instead. Flags are portable: -O3
for the baseline x86-64 (or other) ISA; the AVX2+F16C code is compiled per function (``#pragma GCC target``)
and chosen at run time by cpuid, so the binary runs on any x86-64 machine. ``-ffp-contract=off`` keeps
quantization bit-identical to numpy (no fused multiply-add); no -ffast-math for the same reason.
"""

import glob
import os
import subprocess
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
        if os.environ.get("KVTOOL_NO_NATIVE_BUILD") == "1" and not isinstance(ext, OptionalOVExtension):
            print("kvtool: KVTOOL_NO_NATIVE_BUILD=1, skipping the native kernels", file=sys.stderr)
            return
        try:
            super().build_extension(ext)
        except Exception as e:  # compiler missing or too old
            print(f"kvtool: native kernels not built: {e}", file=sys.stderr)
            print("kvtool: the portable numpy/torch quant_ops path will run" if not isinstance(ext, OptionalOVExtension)
                  else "kvtool: the packed engine will run its Python op", file=sys.stderr)


def openvino_dir() -> str | None:
    """The openvino package's directory (its wheel ships include/ and libs/), or None. ``pip install`` builds in
    an isolated environment that has openvino from pyproject's build-system requires; where it does not (a build
    without that requirement), the target interpreter is asked without the isolation's PYTHONPATH (``-E``)."""
    try:
        import openvino

        return os.path.dirname(openvino.__file__)
    except ImportError:
        pass
    try:
        r = subprocess.run([sys.executable, "-E", "-c", "import os, openvino; print(os.path.dirname(openvino.__file__))"],
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


class OptionalOVExtension(Extension):
    """kvtool's packed attention as an OpenVINO C++ extension op (kvtool/runtime/engines/_ov_packed_op.cpp), built
    against the installed openvino wheel's headers and its versioned libopenvino (the wheel has no unversioned
    symlink; it is built with the C++11 ABI, _GLIBCXX_USE_CXX11_ABI=1). Optional: without openvino or its headers
    the engine runs its Python op and says so (``info()["route"]``, ``kvtool.runtime.engines.ov_packed_ext``)."""


def ov_extension() -> Extension | None:
    if os.name == "nt" or os.environ.get("KVTOOL_NO_OV_EXTENSION_BUILD") == "1":
        print("kvtool: OpenVINO extension op not built (Windows or KVTOOL_NO_OV_EXTENSION_BUILD=1)", file=sys.stderr)
        return None
    ov = openvino_dir()
    libs = sorted(glob.glob(os.path.join(ov, "libs", "libopenvino.so.*"))) if ov else []
    if not ov or not os.path.isdir(os.path.join(ov, "include", "openvino")) or not libs:
        print("kvtool: OpenVINO extension op not built (no openvino wheel with include/ and libs/ found); the packed "
              "engine will run its Python op", file=sys.stderr)
        return None
    lib = os.path.basename(libs[0])
    # the kernel's tasks on OpenVINO's own TBB pool where the wheel ships TBB (headers and libtbb.so.12, which
    # libopenvino itself loads; _ov_packed_op.cpp's run_kernel), else std::threads spawned per call
    tbb = sorted(glob.glob(os.path.join(ov, "libs", "libtbb.so.*")))
    use_tbb = bool(tbb) and os.path.isfile(os.path.join(ov, "include", "tbb", "parallel_for.h"))
    tbb_flags = (["-DKV_OP_TBB=1"], [f"-l:{os.path.basename(tbb[0])}"]) if use_tbb else ([], [])
    return OptionalOVExtension(
        "kvtool.runtime.engines._ov_packed_op", sources=["kvtool/runtime/engines/_ov_packed_op.cpp"],
        depends=["kvtool/quant_ops/_native_impl.h", "kvtool/quant_ops/_native_attention.h",
                 "kvtool/quant_ops/_native_quantize_avx2.h", "kvtool/quant_ops/_native_types.h", "kvtool/quant_ops/_native_dispatch.h"], language="c++", include_dirs=[os.path.join(ov, "include")],
        extra_compile_args=[f for f in BASE_FLAGS if f != "-fvisibility=hidden"] + ["-D_GLIBCXX_USE_CXX11_ABI=1", "-Wno-unused-function"]
        + tbb_flags[0],
        # no rpath: pip builds against the isolated build environment's openvino, which is gone after the install;
        # the op is loaded into a process that has imported openvino, and the dynamic loader satisfies the
        # versioned DT_NEEDED (libopenvino.so.<release>) with that already-loaded library. Another openvino release
        # at run time fails the load, and the engine names the Python op route with the reason.
        extra_link_args=["-pthread", f"-L{os.path.join(ov, 'libs')}", f"-l:{lib}"] + tbb_flags[1], optional=True)


ext = Extension("kvtool.quant_ops._native", sources=["kvtool/quant_ops/_native.cpp"],
                depends=["kvtool/quant_ops/_native_impl.h", "kvtool/quant_ops/_native_attention.h",
                         "kvtool/quant_ops/_native_prefix.h", "kvtool/quant_ops/_native_quantize_avx2.h", "kvtool/quant_ops/_native_types.h", "kvtool/quant_ops/_native_dispatch.h"], language="c++",
                extra_compile_args=BASE_FLAGS if os.name != "nt" else ["/O2", "/std:c++17"],
                extra_link_args=["-pthread"] if os.name != "nt" else [], optional=True)

ov_ext = ov_extension()
setup(ext_modules=[ext] + ([ov_ext] if ov_ext else []), cmdclass={"build_ext": OptionalBuildExt})
