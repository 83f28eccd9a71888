"""Installed versions of kvtool and the libraries it drives, for manifests and results files.

One function, ``library_versions``; it reads package metadata only (nothing is imported) and leaves out
packages that are not installed.
"""

from __future__ import annotations

DEFAULT_LIBRARIES = ("kvtool", "torch", "transformers", "optimum-intel", "optimum", "nncf", "openvino", "onnx",
                     "onnxruntime", "datasets", "numpy")


def library_versions(names: tuple[str, ...] | list[str] = DEFAULT_LIBRARIES) -> dict[str, str]:
    """``{distribution name: version}`` for each installed distribution in ``names``."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
