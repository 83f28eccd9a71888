"""The ONNX Runtime engine: runs an ONNX export's stateless graphs (CPU provider, CUDA when present) with the
KV cache held by kvtool (``GraphKVCache``).

At load time the language-model graph is edited in memory (written here; onnxruntime has no such tool):
each ``present.{i}.key|value`` output produced by ``Concat(past, new)`` is re-pointed at ``new`` alone and
``logits`` at its last position, so a step copies out only what the caller stores. With ``kv_precision="f16"``
(the default for ``kv="fp16"``) the past inputs and present outputs are also cast at the graph boundary, so
kvtool holds the cache in float16 whatever the graph computes in. It does not export, and it does not support
OpenVINO's ``ov-u8``/``ov-u4`` KV compression.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvtool.errors import InputError
from kvtool.runtime.engines.graph_base import GraphEngine
from kvtool.runtime.kvspec import KVSpec

_NP_OF_ONNX = {1: np.float32, 10: np.float16}


def _lm_only_new(model, outputs: list[str]) -> bool:
    """Rewire ``model`` (onnx ModelProto, in place); True when every present output now holds only new tokens."""
    from onnx import TensorProto, helper

    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    params = {i.name for i in g.input}
    all_new = True
    for name in outputs:
        node = producers.get(name)
        if name == "logits":
            full = "kvtool_logits_full"
            if node is None:
                continue
            node.output[list(node.output).index(name)] = full
            for n in g.node:
                n.input[:] = [full if x == name else x for x in n.input]
            idx = "kvtool_last_index"
            if idx not in inits:
                g.initializer.append(helper.make_tensor(idx, TensorProto.INT64, [1], [-1]))
            g.node.append(helper.make_node("Gather", [full, idx], [name], axis=1))
            continue
        if node is not None and node.op_type == "Concat" and len(node.input) == 2 and node.input[0] in params:
            full = f"kvtool_full_{name}"
            node.output[0] = full
            for n in g.node:
                if n is not node:
                    n.input[:] = [full if x == name else x for x in n.input]
            g.node.append(helper.make_node("Identity", [node.input[1]], [name]))
        else:
            all_new = False
    for o in g.output:  # token axis of present outputs is now the new tokens only; leave shapes symbolic
        if o.name != "logits" and o.type.tensor_type.HasField("shape") and len(o.type.tensor_type.shape.dim) == 4:
            o.type.tensor_type.shape.dim[2].dim_param = "new_tokens"
    return all_new


def _kv_boundary_f16(model, past: list[str], present: list[str]) -> None:
    """Edit ``model`` in place so the ``past`` inputs are taken and the ``present`` outputs given as float16,
    cast to / from the graph's own KV element type inside the graph (no-op where that already is float16)."""
    from onnx import TensorProto, helper

    g = model.graph
    for inp in g.input:
        elem = inp.type.tensor_type.elem_type
        if inp.name not in past or elem == TensorProto.FLOAT16:
            continue
        inner = f"kvtool_cast_{inp.name}"
        for n in g.node:
            n.input[:] = [inner if x == inp.name else x for x in n.input]
        inp.type.tensor_type.elem_type = TensorProto.FLOAT16
        g.node.insert(0, helper.make_node("Cast", [inp.name], [inner], to=elem))
    for out in g.output:
        elem = out.type.tensor_type.elem_type
        if out.name not in present or elem == TensorProto.FLOAT16:
            continue
        inner = f"kvtool_uncast_{out.name}"
        for n in g.node:
            n.output[:] = [inner if x == out.name else x for x in n.output]
            n.input[:] = [inner if x == out.name else x for x in n.input]
        out.type.tensor_type.elem_type = TensorProto.FLOAT16
        g.node.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT16))


def _token_major_past(model, names: list[str]) -> None:
    """Edit ``model`` in place so each past input is taken as ``[N, H, D]`` (transposed back to ``[1, H, N, D]``
    inside the graph), letting the caller's token-major buffers feed it without a copy."""
    from onnx import TensorProto, helper

    g = model.graph
    axes = "kvtool_axes0"
    g.initializer.append(helper.make_tensor(axes, TensorProto.INT64, [1], [0]))
    new_nodes = []
    for inp in g.input:
        if inp.name not in names:
            continue
        dims = inp.type.tensor_type.shape.dim
        h, d = dims[1], dims[3]
        inner = f"kvtool_bhnd_{inp.name}"
        for n in g.node:
            n.input[:] = [inner if x == inp.name else x for x in n.input]
        shape = helper.make_tensor_type_proto(inp.type.tensor_type.elem_type, ["past_tokens", h.dim_value or h.dim_param,
                                                                               d.dim_value or d.dim_param])
        inp.type.CopyFrom(shape)
        new_nodes += [helper.make_node("Transpose", [inp.name], [inner + "_t"], perm=[1, 0, 2]),
                      helper.make_node("Unsqueeze", [inner + "_t", axes], [inner])]
    for n in reversed(new_nodes):  # keep the graph topologically sorted: the new nodes go first
        g.node.insert(0, n)


class ONNXEngine(GraphEngine):
    """An ONNX export's stateless graphs on ONNX Runtime, KV held by kvtool (see module doc for its graph edits)."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, spec: KVSpec, device: str = "CPUExecutionProvider", manifest=None,
                 threads: int | None = None, kv_precision: str | None = None):
        """``kv_precision``: ``f16`` casts the KV at the graph boundary so kvtool holds it in float16 (the
        default for ``kv="fp16"``, as named); ``f32`` (or None for a quantizing scheme) keeps the graph's own KV
        element type."""
        if kv_precision not in (None, "f16", "f32"):
            raise InputError(f"kv_precision: expected f16 or f32, got {kv_precision!r}")
        self.threads = threads
        self.kv_precision = kv_precision or ("f16" if spec.is_fp else None)
        super().__init__(path, spec, device, manifest)

    def _session(self, model):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = self.threads
        providers = [self.device] + (["CPUExecutionProvider"] if self.device != "CPUExecutionProvider" else [])
        return ort.InferenceSession(model, sess_options=so, providers=providers)

    def _load_graphs(self) -> None:
        import onnx

        if self.spec.is_ov:
            raise InputError(f"kv: {self.spec.scheme} is OpenVINO's own KV compression; it needs backend openvino")
        self.sessions = {}
        for role, g in self.manifest.graphs.items():
            f = self.path / g.file
            if not f.is_file():
                raise InputError(f"{self.path}: graph file {g.file} listed in the manifest is missing")
            if role != "language_model":
                self.sessions[role] = self._session(str(f))
        g = self.manifest.graphs["language_model"]
        self.past_names = self._stateless_past_names("expected a stateless export with past_key_values inputs")
        model = onnx.load(str(self.path / g.file))  # external data next to the file loads with it
        self.kv_is_new = _lm_only_new(model, list(g.outputs))
        if self.kv_precision == "f16":
            _kv_boundary_f16(model, [n for pair in self.past_names for n in pair],
                             [o for o in g.outputs if o.startswith("present.")])
        _token_major_past(model, [n for pair in self.past_names for n in pair])
        self.token_major = True
        elem = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        self.kv_dtype = _NP_OF_ONNX.get(elem.get(self.past_names[0][0], 1), np.float32)
        self.lm_inputs = [i.name for i in model.graph.input]
        self.lm_outputs = list(g.outputs)
        self.lm = self._session(model.SerializeToString())

    def _run(self, role: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[role].run(None, inputs)

    def _run_lm(self, embeds, mask, pos):
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos}
        for i, (kn, vn) in enumerate(self.past_names):
            feeds[kn], feeds[vn] = self.kv.past(i)
        feeds = {k: v for k, v in feeds.items() if k in self.lm_inputs}
        outs = dict(zip(self.lm_outputs, self.lm.run(self.lm_outputs, feeds), strict=True))
        n = self.kv.n_tokens
        new = []
        for i in range(self.num_layers):
            k, v = outs[f"present.{i}.key"], outs[f"present.{i}.value"]
            new.append((k, v) if self.kv_is_new else (k[:, :, n:], v[:, :, n:]))
        return outs["logits"][0, -1], new

    def info(self) -> dict:
        """``Engine.info``: the execution provider, whether the graph edits applied, the KV element type."""
        return {**super().info(), "provider": self.device, "new_kv_outputs": self.kv_is_new,
                "token_major_past": self.token_major}
