"""Engines: each runs one model's graphs (or the HF model) for the generate loop of ``kvtool.runtime.pipeline``.

An engine answers four calls — ``start(prepared)``, ``run_prompt(start, end)`` and ``run_token(id)``
(both return the last position's logits as a numpy [V] array), ``kv_nbytes()`` — and holds the KV cache
between them. They are imported lazily by backend name, so only the chosen runtime library is loaded.
OpenVINO: a stateless export runs ``OpenVINOEngine``; a stateful one runs ``OpenVINOPackedEngine`` for
kvtool's schemes in packed mode on CPU (or with ``kv_owner="packed"``: the cache held only packed, attention
reading the codes), ``OpenVINOPagedEngine`` for them in simulate mode on CPU (or with ``kv_owner="paged"``),
``OpenVINOStateOwnedEngine`` for them elsewhere (or with ``kv_owner="kvtool"``), else
``OpenVINOStatefulEngine`` (OpenVINO owns the cache: fp16, ov-u8/u4).
"""

from __future__ import annotations


def load_engine(backend: str, path, spec, device: str, **kwargs):
    if backend == "torch":
        from kvtool.runtime.engines.torch_engine import TorchEngine

        return TorchEngine(path, spec, device, **kwargs)
    if backend == "openvino":
        from kvtool.runtime.engines.openvino_engine import OpenVINOEngine, OpenVINOStatefulEngine

        manifest = kwargs.get("manifest")
        owner = kwargs.pop("kv_owner", None)  # "kvtool": kvtool owns a stateful export's cache even for fp16
        if owner not in (None, "kvtool", "paged", "packed", "openvino"):
            raise ValueError(f"kv_owner: expected kvtool, paged, packed or openvino, got {owner!r}")
        stateful = manifest is not None and manifest.stateful
        # a kvtool scheme in packed mode on a stateful CPU export holds its cache only packed
        if stateful and (owner == "packed" or (owner is None and not spec.is_ov and spec.quantizes
                                               and spec.mode == "packed" and device == "CPU")):
            from kvtool.runtime.engines.openvino_packed import OpenVINOPackedEngine

            return OpenVINOPackedEngine(path, spec, device, **kwargs)
        # simulate mode on a stateful CPU export runs the paged engine (fastest of the two, docs/BENCHMARKS.md)
        if stateful and not spec.is_ov and (owner == "paged" or (owner is None and spec.quantizes
                                                                  and device == "CPU")):
            from kvtool.runtime.engines.openvino_paged import OpenVINOPagedEngine

            return OpenVINOPagedEngine(path, spec, device, **kwargs)
        if stateful and not spec.is_ov and (spec.quantizes or owner == "kvtool"):
            from kvtool.runtime.engines.openvino_state import OpenVINOStateOwnedEngine

            return OpenVINOStateOwnedEngine(path, spec, device, **kwargs)
        if spec.is_ov or stateful:
            return OpenVINOStatefulEngine(path, spec, device, **kwargs)
        return OpenVINOEngine(path, spec, device, **kwargs)
    if backend == "onnxruntime":
        from kvtool.runtime.engines.onnx_engine import ONNXEngine

        return ONNXEngine(path, spec, device, **kwargs)
    raise ValueError(f"unknown backend {backend!r}")
