"""Engines: each runs one model's graphs (or the HF model) for the generate loop of ``kvtool.runtime.pipeline``.

An engine answers four calls — ``start(prepared)``, ``run_prompt(start, end)`` and ``run_token(id)``
(both return the last position's logits as a numpy [V] array), ``kv_nbytes()`` — and holds the KV cache
between them. They are imported lazily by backend name, so only the chosen runtime library is loaded.
"""

from __future__ import annotations


def load_engine(backend: str, path, spec, device: str, **kwargs):
    if backend == "torch":
        from kvtool.runtime.engines.torch_engine import TorchEngine

        return TorchEngine(path, spec, device, **kwargs)
    if backend == "openvino":
        from kvtool.runtime.engines.openvino_engine import OpenVINOEngine, OpenVINOStatefulEngine

        manifest = kwargs.get("manifest")
        if spec.is_ov or (manifest is not None and manifest.stateful):
            return OpenVINOStatefulEngine(path, spec, device, **kwargs)
        return OpenVINOEngine(path, spec, device, **kwargs)
    if backend == "onnxruntime":
        from kvtool.runtime.engines.onnx_engine import ONNXEngine

        return ONNXEngine(path, spec, device, **kwargs)
    raise ValueError(f"unknown backend {backend!r}")
