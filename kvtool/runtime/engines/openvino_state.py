"""The OpenVINO state-owned engine: runs the *stateful* LM export, whose graph keeps OpenVINO's fused
attention-with-KV-cache kernel, while kvtool owns what the cache holds.

The stateful graph appends each step's exact K/V to its own states. At load time the graph is edited (a
graph edit written here, as no library offers it) so that it also returns those new K/V (the second input
of the ``Concat(past, new)`` that feeds each ``Assign``); kvtool stores them in ``GraphKVCache`` (the
packed ``QuantizedKVStore`` per layer, or fp buffers). After every step, each state whose stored contents
differ from what the graph appended — a side (K or V of one layer) where tokens became quantized since the
last write, or every side in ``simulate`` mode — is overwritten, together with the other side of its
layer, with kvtool's dequantized cache through OpenVINO's variable-state API (``VariableState.state =
Tensor``). OpenVINO offers no partial state write (``state.state`` is a converted copy on CPU), so a rewrite
costs a full copy of the layer's cache; layers where nothing was quantized (fp16, or per-channel schemes
whose new tokens wait in the fp residual) are not touched. The semantics are DESIGN.md's:
the graph attends to the dequantized past plus the exact new tokens, like the torch engine's packed cache.

The states keep a dequantized working copy of the cache in the KV cache precision (as the stateless
engine's graph-input buffers do); it does not reduce runtime memory below the fp cache. It does not
export graphs or run the ``ov-u8``/``ov-u4`` compression (``OpenVINOStatefulEngine`` does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvtool.errors import InputError
from kvtool.runtime.engines.openvino_engine import _OpenVINOGraphs
from kvtool.runtime.kvspec import KVSpec


def _expose_new_kv(model) -> dict[str, str]:
    """Edit ``model`` in place: for every ``Assign(Concat(past, new))`` add an output returning ``new``
    (``[1, H, t, D]``). Returns {variable id: name of the added output}."""
    outs: dict[str, str] = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Assign":
            continue
        src = op.input_value(0).get_node()
        var = op.get_variable_id()
        if src.get_type_name() != "Concat" or len(src.input_values()) != 2:
            raise InputError(f"language model: state {var} is not written as Concat(past, new); kvtool cannot "
                             f"own this stateful graph's cache (export it stateless)")
        name = f"kvtool_new.{var}"
        out = model.add_outputs([src.input_value(1)])[0]
        out.get_tensor().set_names({name})
        outs[var] = name
    model.validate_nodes_and_infer_types()
    return outs


def _layer_side(var: str, num_layers: int) -> tuple[int, int]:
    """(layer, 0 for key / 1 for value) of an optimum-intel state id such as
    ``past_key_values.3.keypresent.3.key``."""
    head = var.split("present.")[0]
    parts = head.strip(".").split(".")
    try:
        layer, side = int(parts[1]), {"key": 0, "value": 1}[parts[2]]
    except (IndexError, KeyError, ValueError):
        raise InputError(f"language model: state id {var!r} does not name a layer's key or value") from None
    if not 0 <= layer < num_layers:
        raise InputError(f"language model: state id {var!r} names layer {layer} of {num_layers}")
    return layer, side


class OpenVINOStateOwnedEngine(_OpenVINOGraphs):
    """Stateful LM graph (fused attention over its states), KV contents owned by kvtool (see module doc)."""

    def __init__(self, path: str | Path, spec: KVSpec, device: str = "CPU", manifest=None,
                 inference_precision: str | None = None, kv_precision: str | None = None):
        """``kv_precision``: the states' element type (``KV_CACHE_PRECISION``): f32 or f16; default f16 for
        ``kv="fp16"`` (as named), else f32 when inference runs in f32, else f16 (never OpenVINO's u8, which
        would quantize on top of kvtool)."""
        if kv_precision not in (None, "f16", "f32"):
            raise InputError(f"kv_precision: expected f16 or f32, got {kv_precision!r}")
        self.inference_precision = inference_precision
        self.kv_precision = kv_precision
        self.state_writes = 0  # states rewritten by kvtool (benchmarks report it)
        self._tensors: dict[int, tuple] = {}
        super().__init__(path, spec, device, manifest)

    def _config(self) -> dict:
        cfg = self._base_config()
        prec = self.kv_precision or ("f32" if cfg.get("INFERENCE_PRECISION_HINT") == "f32"
                                     and not self.spec.is_fp else "f16")
        cfg["KV_CACHE_PRECISION"] = prec
        return cfg

    def _load_graphs(self) -> None:
        import openvino as ov

        if self.spec.is_ov:
            raise InputError(f"kv: {self.spec.scheme} is OpenVINO's own compression; kvtool cannot own that cache")
        core = ov.Core()
        cfg = self._config()
        self._compile_aux_graphs(core)
        model = self._read_language_model(core, stateful_needed_by="kv_owner=kvtool")
        self.new_outputs = _expose_new_kv(model)
        self.lm_names = [i.get_any_name() for i in model.inputs]
        self.lm = self._compile(core, model, cfg, "language_model (stateful, kvtool-owned KV)")
        self.lm_req = self.lm.create_infer_request()
        self.kv_dtype = np.float32 if cfg["KV_CACHE_PRECISION"] == "f32" else np.float16
        self.head_major = True
        self._states = {}
        for s in self.lm_req.query_state():
            if s.name not in self.new_outputs:
                raise InputError(f"language model: state {s.name} has no Assign kvtool could follow")
            self._states[_layer_side(s.name, self.num_layers)] = s
        if len(self._states) != 2 * self.num_layers:
            raise InputError(f"language model: {len(self._states)} KV states for {self.num_layers} layers")
        self._out_of = {ls: self.new_outputs[s.name] for ls, s in self._states.items()}

    # -- the engine interface ------------------------------------------------------------------------
    def start(self, prepared, max_new_tokens: int = 64) -> None:
        """``Engine.start``: empty OpenVINO's states (``reset_state``), then the prompt as in ``GraphEngine``."""
        self.lm_req.reset_state()
        super().start(prepared, max_new_tokens)

    def _step(self, embeds: np.ndarray, pos: np.ndarray) -> np.ndarray:
        t = embeds.shape[1]
        n = self.kv.n_tokens
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, n + t), dtype=np.int64),
                 "position_ids": pos, "beam_idx": np.zeros(1, dtype=np.int32)}
        feeds = {k: v for k, v in feeds.items() if k in self.lm_names}
        req = self.lm_req
        req.infer(feeds, share_inputs=True, share_outputs=True)
        logits = req.get_tensor("logits").data[0, -1].copy()
        before = [self.kv.quantized_counts(i) for i in range(self.num_layers)]
        for i in range(self.num_layers):
            self.kv.append(i, req.get_tensor(self._out_of[i, 0]).data, req.get_tensor(self._out_of[i, 1]).data)
        self.kv.advance(t)
        self._sync_states(before)
        return logits

    def _sync_states(self, before: list[tuple[int, int]]) -> None:
        """Overwrite each state whose tokens kvtool's cache now holds differently from the graph's exact
        append: a side whose quantized token count grew (packed), or every side (simulate)."""
        import openvino as ov

        if not self.spec.quantizes:
            return
        simulate = self.spec.mode == "simulate"
        for i in range(self.num_layers):
            after = self.kv.quantized_counts(i)
            if not (simulate or any(a > b for a, b in zip(after, before[i], strict=True))):
                continue
            # both states of the layer, even when only one side changed: on OpenVINO 2026.4's CPU plugin,
            # writing only V of a layer corrupted the next step's attention (found by experiment against the
            # stateless graph); the pair is written together
            k, v = self.kv.dequantized(i)  # [1, H, N, D] views, only changed tokens rewritten
            for side, arr in ((0, k), (1, v)):
                # an ROI tensor over kvtool's [1, H, cap, D] buffer (strided, no copy here); the plugin copies
                # it at the assignment
                self._states[i, side].state = ov.Tensor(self._whole(arr), [0, 0, 0, 0], list(arr.shape))
                self.state_writes += 1

    def _whole(self, view: np.ndarray):
        """A shared ``ov.Tensor`` over the whole buffer ``view`` is the first tokens of (cached per buffer)."""
        import openvino as ov

        base = view.base if view.base is not None else view
        key = id(base)
        hit = self._tensors.get(key)
        if hit is None or hit[0] is not base:
            if not base.flags.c_contiguous or base.ndim != 4:
                raise AssertionError("state-owned engine: kvtool's KV buffers must be contiguous [1, H, cap, D]")
            if len(self._tensors) >= 2 * self.num_layers:  # the buffers were reallocated: drop the old ones
                self._tensors.clear()
            hit = (base, ov.Tensor(base, shared_memory=True))
            self._tensors[key] = hit
        return hit[1]

    def kv_work_nbytes(self) -> int:
        """``Engine.kv_work_nbytes``: kvtool's dequantization buffers plus OpenVINO's states (the working copy
        the graph attends to)."""
        state = 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv.n_tokens
        return int((self.kv.work_nbytes if self.spec.quantizes else 0) + state * np.dtype(self.kv_dtype).itemsize)

    def kv_work_what(self) -> str:
        """``GraphEngine.kv_work_what`` for the state-owned engine."""
        buffers = "kvtool's dequantization buffers plus " if self.spec.quantizes else ""
        return (f"{buffers}OpenVINO's states (all layers, K and V, the tokens held, in the states' precision): the "
                "working copy the graph attends to, beside kvtool's own cache (kv_bytes)")

    def info(self) -> dict:
        """``Engine.info``: compile config, kv_owner ``kvtool``, the number of state rewrites."""
        return {**super().info(), "config": self._config(), "stateful": True, "kv_owner": "kvtool",
                "state_writes": self.state_writes}
