"""The OpenVINO engine: runs an export's stateless graphs with the KV cache held by kvtool (``GraphKVCache``),
or — for ``kv="ov-u8"|"ov-u4"`` — the stateful language model with OpenVINO's own KV-cache compression.

At load time the stateless LM graph is edited (a graph edit written here, as no library offers it): each
``present.{i}.key|value`` output that is ``Concat(past, new)`` is replaced by ``new`` alone, and ``logits`` by
its last position, so a step returns only what the caller stores. Inputs go in with ``share_inputs=True``
in the graph's KV element type. It does not export or compress weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvtool.errors import InputError
from kvtool.runtime.engines.graph_base import GraphEngine
from kvtool.runtime.kvspec import KVSpec

_NP_OF_OV = {"f32": np.float32, "f16": np.float16}
# Tokens per prefill call of the stateful engine with kv=fp16 on CPU when ``prefill_chunk`` is not given, for a
# prompt longer than it (``stateful_chunking_saves_memory``; 0 would be one call). The exported graph builds its
# attention mask and activations for the whole call (one call over 4k tokens held 805 MiB of intermediates on
# the issue-13 LLaVA model, chunks of 1024 held 561 MiB). This is Qwen2-VL's fp16 default on CPU (the paged
# engine, LLaVA's, takes 1-D positions only); measured on the Qwen2-VL bench model: docs/BENCHMARKS.md,
# "Qwen2-VL fp16 on the stateful engine's chunked prefill".
PREFILL_CHUNK = 512


def stateful_chunking_saves_memory(tokens: int, chunk: int) -> bool:
    """Whether the stateful engine's prefill of ``tokens`` prompt tokens in calls of ``chunk`` holds less than one
    call (the rule when ``prefill_chunk`` is not given, kv=fp16 on CPU). The rule ``openvino_packed.
    chunking_saves_memory`` weighs, with its buffer term zero: the stateful engine's chunks need no exact prompt
    buffer (OpenVINO's states are the cache, appended in place whatever the call size), and one call holds per
    token the activations and a ``[T, T]`` mask row that a chunk holds for ``chunk`` tokens only; so chunking
    holds less exactly when the prompt is longer than a chunk."""
    return chunk > 0 and tokens > chunk


def check_prefill_chunk(value) -> None:
    """``InputError`` (one line) unless ``value`` is None or a token count >= 0 (an int, not a bool)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InputError(f"prefill_chunk: expected a token count >= 0 (0: one call), got {value!r}")

def _lm_only_new(model, manifest):
    """Edit ``model`` in place so each present output that is Concat(past, new) along the token axis returns
    only ``new``, and ``logits`` only the last position. Returns whether every present output was rewired."""
    import openvino.opset13 as ops

    g = manifest.graphs["language_model"]
    kv_is_new = True
    for name in g.outputs:
        result = model.output(name).get_node()  # the Result node
        src = result.input_value(0)
        if name == "logits":
            last = ops.gather(src, ops.constant(np.array([-1], dtype=np.int64)), ops.constant(np.int64(1)))
            result.input(0).replace_source_output(last.output(0))
            continue
        node = src.get_node()
        if node.get_type_name() == "Concat" and len(node.input_values()) == 2 and \
                node.input_value(0).get_node().get_type_name() in ("Parameter", "Convert"):
            result.input(0).replace_source_output(node.input_value(1))
        else:
            kv_is_new = False
    model.validate_nodes_and_infer_types()
    return model, kv_is_new


def _token_major_past(model, names: list[str]) -> None:
    """Edit ``model`` in place so each past input ``[1, H, N, D]`` is taken as ``[N, H, D]`` (transposed back
    inside the graph): the caller's preallocated token-major buffer then feeds the graph without a copy."""
    import openvino as ov
    import openvino.opset13 as ops

    for name in names:
        old = model.input(name).get_node()
        shape = old.get_partial_shape()
        new = ops.parameter(ov.PartialShape([-1, shape[1], shape[3]]), old.get_element_type(), name)
        back = ops.unsqueeze(ops.transpose(new, ops.constant(np.array([1, 0, 2], dtype=np.int64))),
                             ops.constant(np.array([0], dtype=np.int64)))
        for target in list(old.output(0).get_target_inputs()):
            target.replace_source_output(back.output(0))
        model.replace_parameter(model.get_parameters().index(old), new)
        new.output(0).get_tensor().set_names({name})
    model.validate_nodes_and_infer_types()


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 values held as raw uint16 bits (OpenVINO's numpy view of a bf16 tensor) -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 as raw uint16 bits, rounded to nearest even (the inverse of ``bf16_bits_to_f32``)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


class _OpenVINOGraphs(GraphEngine):
    """What both OpenVINO engines share: the compile config, the non-LM graphs, running them."""

    backend = "openvino"
    inference_precision: str | None = None

    def _base_config(self) -> dict:
        cfg: dict = {"PERFORMANCE_HINT": "LATENCY"}
        prec = self.inference_precision or ("f32" if self.manifest.dtype == "fp32" else None)
        if prec:
            cfg["INFERENCE_PRECISION_HINT"] = prec
        return cfg

    def _bind_inputs(self, shapes: dict) -> dict:
        """New tensors of ``shapes`` (input name -> shape), in each input's element type, bound to the LM request
        (``self.lm`` / ``self.lm_req``) once; returns name -> a numpy view of each tensor's memory, which the caller
        writes a decode step's values into before ``infer()`` without inputs (a ``set_tensor`` per input and step
        costs the CPU plugin more inside ``infer`` than in Python: ``OpenVINOPagedEngine.bind_step_inputs``)."""
        import openvino as ov

        views = {}
        for name, shape in shapes.items():
            tensor = ov.Tensor(self.lm.input(name).get_element_type(), list(shape))
            self.lm_req.set_tensor(name, tensor)
            views[name] = tensor.data
        return views

    def _compile(self, core, model, cfg: dict, role: str):
        """``core.compile_model`` with a device that cannot take the graph reported as bad input (e.g. NPU
        and the dynamic KV shapes of a stateless graph)."""
        try:
            return core.compile_model(model, self.device, cfg)
        except RuntimeError as exc:
            lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
            raise InputError(f"device {self.device}: OpenVINO could not compile the {role} graph with {cfg} "
                             f"({lines[-1][:160] if lines else 'no detail'})") from None

    def _compile_aux_graphs(self, core) -> None:
        cfg = self._base_config()
        self.requests = {}
        for role, g in self.manifest.graphs.items():
            f = self.path / g.file
            if not f.is_file():
                raise InputError(f"{self.path}: graph file {g.file} listed in the manifest is missing")
            if role != "language_model":
                self.requests[role] = self._compile(core, str(f), cfg, role).create_infer_request()

    def _read_language_model(self, core, stateful_needed_by: str | None = None):
        """The language-model graph of the export, read (not compiled); with ``stateful_needed_by``, a graph
        without state (sinks) is bad input naming who needs the stateful export."""
        model = core.read_model(str(self.path / self.manifest.graphs["language_model"].file))
        if stateful_needed_by and not model.get_sinks():
            raise InputError(f"{self.path}: {stateful_needed_by} needs a stateful export (export with stateful=True)")
        return model

    def _run(self, role: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        res = self.requests[role].infer(inputs, share_inputs=True, share_outputs=False)
        return [res[o] for o in self.requests[role].model_outputs]

    def _text_embeddings(self, ids: np.ndarray) -> np.ndarray:
        """``GraphEngine._text_embeddings``; after a prompt's call (more than one id) the graph's own ``[1, T,
        hidden]`` output memory is given back (``_shrink``): the caller holds the copy ``_run`` returned."""
        out = super()._text_embeddings(ids)
        if ids.shape[1] > 1:
            self._shrink("text_embeddings", {self.manifest.graphs["text_embeddings"].inputs[0]: ids[:, -1:]})
        return out

    def _shrink(self, role: str, small: dict[str, np.ndarray]) -> None:
        """Free what the CPU plugin keeps from ``role``'s last (large) call: its output and intermediate memory
        stay allocated, sized by that call, until a call of another shape on a new infer request (the same
        request keeps them), so: a new request, then one call on the ``small`` inputs. Measured on the issue-13
        bench export: the text-embeddings graph keeps 32 MiB after an 8k-token prompt (``[1, T, 1024]`` f32),
        freed this way (docs/BENCHMARKS.md, "Prefill memory: the embedding stage and the store append")."""
        self.requests[role] = self.requests[role].get_compiled_model().create_infer_request()
        self.requests[role].infer(small, share_inputs=True, share_outputs=False)


class OpenVINOEngine(_OpenVINOGraphs):
    """The stateless LM export (explicit ``past_key_values`` inputs), KV held by kvtool (``GraphKVCache``); the
    engine of ``kvtool export --stateless`` exports (see module doc for its graph edits)."""

    def __init__(self, path: str | Path, spec: KVSpec, device: str = "CPU", manifest=None,
                 inference_precision: str | None = None, kv_precision: str | None = None,
                 edit_graph: bool = True):
        """``inference_precision``: OpenVINO's INFERENCE_PRECISION_HINT (default f32 for fp32 exports, else
        the device's own); ``kv_precision``: element type of the KV inputs/outputs, i.e. what kvtool holds
        ("f16" halves the bytes crossing each step; the default for ``kv="fp16"``, as named, else the graph's
        own type); ``edit_graph=False`` runs the graph as exported (for benchmarks of the levers)."""
        if kv_precision not in (None, "f16", "f32"):
            raise InputError(f"kv_precision: expected f16 or f32, got {kv_precision!r}")
        self.inference_precision = inference_precision
        self.kv_precision = kv_precision or ("f16" if spec.is_fp else None)
        self.edit_graph = edit_graph
        super().__init__(path, spec, device, manifest)

    def _load_graphs(self) -> None:
        import openvino as ov

        core = ov.Core()
        self._compile_aux_graphs(core)
        model = self._read_language_model(core)
        g = self.manifest.graphs["language_model"]
        self.past_names = self._stateless_past_names("not a stateless export: export without stateful=True or use "
                                                     "kv='ov-u8'")
        self.kv_is_new = False
        if self.edit_graph:
            model, self.kv_is_new = _lm_only_new(model, self.manifest)
            _token_major_past(model, [n for pair in self.past_names for n in pair])
            self.token_major = True
        if self.kv_precision:  # lever: KV inputs/outputs in a narrower element type than the graph's
            from openvino.preprocess import PrePostProcessor

            ppp = PrePostProcessor(model)
            t = {"f16": ov.Type.f16, "f32": ov.Type.f32}[self.kv_precision]
            for k, v in self.past_names:
                ppp.input(k).tensor().set_element_type(t)
                ppp.input(v).tensor().set_element_type(t)
            for i in range(self.num_layers):
                ppp.output(f"present.{i}.key").tensor().set_element_type(t)
                ppp.output(f"present.{i}.value").tensor().set_element_type(t)
            model = ppp.build()
        self.kv_dtype = _NP_OF_OV.get(model.input(self.past_names[0][0]).get_element_type().to_string(), np.float32)
        self.lm_names = list(g.inputs)
        self.out_index = {next(iter(o.get_names())): j for j, o in enumerate(model.outputs)}
        self.lm = self._compile(core, model, self._base_config(), "language_model")
        self.lm_req = self.lm.create_infer_request()

    def _run_lm(self, embeds, mask, pos):
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos}
        for i, (kn, vn) in enumerate(self.past_names):
            feeds[kn], feeds[vn] = self.kv.past(i)
        feeds = {k: v for k, v in feeds.items() if k in self.lm_names}
        res = self.lm_req.infer(feeds, share_inputs=True, share_outputs=False)
        outs = list(res.values())  # in the manifest's output order: logits, present.0.key, present.0.value, ...
        n = self.kv.n_tokens
        new = []
        for i in range(self.num_layers):
            k, v = outs[self.out_index[f"present.{i}.key"]], outs[self.out_index[f"present.{i}.value"]]
            new.append((k, v) if self.kv_is_new else (k[:, :, n:], v[:, :, n:]))
        return outs[self.out_index["logits"]][0, -1], new

    def info(self) -> dict:
        """``Engine.info``: compile config, whether the graph edits applied (new-K/V outputs, token-major past)."""
        return {**super().info(), "config": self._base_config(), "new_kv_outputs": self.kv_is_new,
                "token_major_past": self.token_major}


class OpenVINOStatefulEngine(_OpenVINOGraphs):
    """The stateful LM export (KV inside the graph as OpenVINO states): the anchor deployments run, and the
    home of OpenVINO's own KV compression (``kv="ov-u8"|"ov-u4"``). kvtool holds no KV here."""

    def __init__(self, path: str | Path, spec: KVSpec, device: str = "CPU", manifest=None,
                 inference_precision: str | None = None, kv_precision: str | None = None,
                 prefill_chunk: int | None = None):
        """``kv_precision``: the states' precision for ``kv="fp16"``, f16 (the default, as named) or f32.
        ``prefill_chunk``: the prompt goes through the graph this many tokens per call (0: in one call); None:
        for ``kv="fp16"`` on CPU, ``PREFILL_CHUNK`` where ``stateful_chunking_saves_memory`` holds for the
        prompt, else one call (other devices: one call, not measured there); ``ov-u8``/``ov-u4`` prefill in
        one call unless given (a chunk would attend to the earlier chunks' compressed cache). A chunk sees the
        earlier chunks through the f16 states and its own tokens as computed, so the logits differ from one
        call's only by that f16 rounding; positions are sliced per chunk (Qwen2-VL's ``[3, 1, T]`` too)."""
        if kv_precision not in (None, "f16", "f32"):
            raise InputError(f"kv_precision: expected f16 or f32, got {kv_precision!r}")
        if kv_precision and not spec.is_fp:
            raise InputError(f"kv_precision: applies to kv=fp16; {spec.scheme} sets OpenVINO's own precision")
        check_prefill_chunk(prefill_chunk)
        self.inference_precision = inference_precision
        self.kv_precision = kv_precision
        # None: the rule (stateful_chunking_saves_memory) per prompt, for fp16 on CPU
        self.prefill_auto = prefill_chunk is None and spec.is_fp and device == "CPU"
        self.prefill_chunk = PREFILL_CHUNK if self.prefill_auto else (prefill_chunk or 0)
        self.prefill_chunked: bool | None = None  # whether the last prefill ran in chunks (None: none yet)
        self.n_tokens = 0
        super().__init__(path, spec, device, manifest)

    def _config(self) -> dict:
        cfg = self._base_config()
        s = self.spec
        if s.scheme == "fp16":  # held in fp16 as named, whatever the inference precision
            cfg["KV_CACHE_PRECISION"] = self.kv_precision or "f16"
        elif s.scheme == "ov-u8":
            cfg["KV_CACHE_PRECISION"] = "u8"
        else:
            cfg["KEY_CACHE_PRECISION"] = "u4"
            cfg["VALUE_CACHE_PRECISION"] = "u4"
        if s.is_ov and s.ov_group_size:
            cfg["KEY_CACHE_GROUP_SIZE"] = s.ov_group_size
            cfg["VALUE_CACHE_GROUP_SIZE"] = s.ov_group_size
        if s.is_ov and s.ov_key_by_channel:
            cfg["KEY_CACHE_QUANT_MODE"] = "BY_CHANNEL"
        return cfg

    def _load_graphs(self) -> None:
        import openvino as ov

        if self.spec.quantizes:
            raise InputError(f"kv: {self.spec.scheme} needs kvtool's own KV cache, i.e. a stateless export "
                             f"(this one is stateful); stateful exports take kv=fp16, ov-u8 or ov-u4")
        core = ov.Core()
        cfg = self._config()
        self._compile_aux_graphs(core)
        model = self._read_language_model(core, stateful_needed_by=f"kv={self.spec.scheme}")
        self.lm = self._compile(core, model, cfg, "language_model (stateful, KV settings)")
        self.lm_req = self.lm.create_infer_request()
        self.lm_names = [i.get_any_name() for i in model.inputs]
        self._lm_feed_names = [k for k in ("inputs_embeds", "attention_mask", "position_ids", "beam_idx")
                               if k in self.lm_names]
        self._beam = np.zeros(1, dtype=np.int32)
        self._mask = np.ones((1, 0), dtype=np.int64)

    def start(self, prepared, max_new_tokens: int = 64) -> None:
        """``Engine.start``: empty OpenVINO's states (``reset_state``), then the prompt as in ``GraphEngine``;
        the attention mask for the prompt plus ``max_new_tokens`` is made once (a step feeds a view of it)."""
        self.lm_req.reset_state()
        self.n_tokens = 0
        self._mask = np.ones((1, prepared.n_tokens + max_new_tokens), dtype=np.int64)
        super().start(prepared, max_new_tokens)

    def _n_cached(self) -> int:
        return self.n_tokens

    def run_prompt(self, start: int, end: int) -> np.ndarray:
        """Prompt tokens ``start:end`` through the graph in chunks of ``prefill_chunk`` (``PREFILL_CHUNK``'s
        comment), or in one call where the rule (``prefill_chunk`` not given) says chunks would not hold less;
        the logits of the last one."""
        chunk = self.prefill_chunk
        if self.prefill_auto and not stateful_chunking_saves_memory(end - start, chunk):
            chunk = 0
        if start == 0:
            self.prefill_chunked = bool(chunk) and end - start > chunk
        return self._run_prompt_chunks(start, end, chunk)

    def _step(self, embeds: np.ndarray, pos: np.ndarray) -> np.ndarray:
        t = embeds.shape[1]
        m = self.n_tokens + t
        mask = self._mask[:, :m] if m <= self._mask.shape[1] else np.ones((1, m), dtype=np.int64)
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos, "beam_idx": self._beam}
        if len(feeds) != len(self._lm_feed_names):
            feeds = {k: feeds[k] for k in self._lm_feed_names}
        self.lm_req.infer(feeds, share_inputs=True)
        self.n_tokens += t
        return self.lm_req.get_tensor("logits").data[0, -1].copy()

    def kv_dtype_name(self) -> str:
        """The KV precision the compiled model really holds its states in (OpenVINO's property, which may
        differ from the one asked), as a numpy-style name (u8 / u4 for OpenVINO's own compression)."""
        try:
            prec = str(self.lm.get_property("KV_CACHE_PRECISION"))
        except RuntimeError:  # a plugin without the property holds what was asked
            prec = self._config().get("KV_CACHE_PRECISION", "f32")
        prec = prec.replace("<Type: '", "").replace("'>", "").strip().lower()
        return {"f32": "float32", "float32": "float32", "f16": "float16", "float16": "float16",
                "bf16": "bfloat16", "bfloat16": "bfloat16"}.get(prec, prec)

    def kv_nbytes(self) -> tuple[int, int]:
        """``Engine.kv_nbytes``: the states' bytes — OpenVINO's u8/u4 layout for ``ov-*`` (``ov_kv_nbytes``),
        else the tokens in the precision the states are held in — and the fp16 bytes of the same tokens."""
        from kvtool.runtime.kvspec import ov_kv_nbytes

        fp16 = 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.n_tokens * 2
        if self.spec.is_ov:
            return ov_kv_nbytes(self.spec, self.num_layers, self.num_kv_heads, self.head_dim, self.n_tokens), fp16
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[self.kv_dtype_name()]
        return fp16 // 2 * itemsize, fp16  # the states, in the precision they are held in

    def kv_work_nbytes(self) -> int:
        """``Engine.kv_work_nbytes``: 0, kvtool holds no copy of the cache here."""
        return 0

    def kv_work_what(self) -> str:
        """``GraphEngine.kv_work_what`` for the stateful engine."""
        return "0: the cache is OpenVINO's own states (kvtool holds no copy), counted in kv_bytes"

    def info(self) -> dict:
        """``Engine.info``: the compile config (KV precision / group / mode), stateful, the KV element type, the
        prefill chunk (0: one call), whether it was the rule's (``auto``) or ``given``, and whether the last
        prefill ran in chunks (None: no prefill yet)."""
        return {"config": self._config(), "stateful": True, "kv_dtype": self.kv_dtype_name(),
                "prefill_chunk": self.prefill_chunk,
                "prefill_rule": "auto (stateful_chunking_saves_memory)" if self.prefill_auto else "given",
                "prefill_chunked": self.prefill_chunked}
