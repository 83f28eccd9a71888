"""Session-wide fixtures: tiny offline checkpoints and their exports, built once per test session.

``tiny_model(name)`` builds a tiny random checkpoint with ``kvtool.models.make_tiny_model`` (no hub).
``exported(name, backend, wbits, dtype)`` exports it once with ``kvtool.export.export_model`` and caches the
directory for the rest of the session, so the runtime and eval tests share exports instead of redoing them.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    cache: dict[str, Path] = {}

    def build(name: str = "tiny-llava") -> Path:
        if name not in cache:
            from kvtool.models import make_tiny_model

            cache[name] = make_tiny_model(name, tmp_path_factory.mktemp(name.replace("-", "_")))
        return cache[name]

    return build


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_model):
    cache: dict[tuple, Path] = {}

    def build(name: str = "tiny-llava", backend: str = "openvino", wbits: int = 16, dtype: str = "fp32",
              **extra) -> Path:
        # the OpenVINO export is stateful unless stateful=False: one cache entry for both spellings
        extra.setdefault("stateful", backend == "openvino")
        key = (name, backend, wbits, dtype, tuple(sorted(extra.items())))
        if key not in cache:
            from kvtool.export import ExportConfig, export_model

            out = tmp_path_factory.mktemp(f"{name}_{backend}_w{wbits}_{dtype}".replace("-", "_"))
            export_model(ExportConfig(model=str(tiny_model(name)), output=str(out), backend=backend,
                                      wbits=wbits, dtype=dtype, **extra))
            cache[key] = out
        return cache[key]

    return build
