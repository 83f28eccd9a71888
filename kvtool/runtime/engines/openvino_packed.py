"""The OpenVINO packed engine: the stateful LM export with its KV cache held by kvtool *only* packed
(``QuantizedKVStore`` per layer: codes + group params + the fp residual the scheme defines) and an attention
that reads the packed codes (``quant_ops.attention.decode_attention``, the native fused kernel).

Route: an OpenVINO custom operation (the C++ extension op, or an ``openvino.Op``; "Route" below) inserted per
layer at load time. The graph is edited (a graph edit written here, as no library offers it):

- each ``ReadValue`` of past K/V is replaced by a graph input ``kvtool_past.{i}.key|value``, token-major
  ``[P, H, D]`` in the stores' dtype (transposed, and converted to the graph's type, inside the graph), and
  the ``Assign`` sinks and variables are removed, so OpenVINO holds no KV state at all. Decode calls feed it
  empty (P = 0): the graph's own ``Concat(past, new)`` and SDPA then see only the current call's K/V (causal
  inside the call, exact); a chunked prefill feeds the exact earlier prompt tokens (below);
- after each ``ScaledDotProductAttention`` a ``PackedKVAttention(q, k_new, v_new, sdpa_out)`` op (k_new /
  v_new: the Concat's new input, before any GQA broadcast, so the store holds the kv heads) replaces the
  SDPA's output for the rest of the graph; with ``prefix_attention="op"`` the op, fed (q, k_new, v_new),
  replaces the SDPA itself and computes case (a) too (``packed_prefix.removes_sdpa``, ``info()["graph_sdpa"]``).

The op follows DESIGN.md's semantics (the graph attends to the dequantized past plus the exact new tokens,
which are then stored compressed), by the state of its layer's store:

(a) empty store, T tokens (a prefill): the SDPA's own output (full precision, causal; without the SDPA the
    same attention from ``packed_prefix.causal_attention``); ``first_token="fp"`` is this case for the whole prompt;
(b) T = 1 (decode, and the last prompt token of ``first_token="compressed"``): ``decode_attention`` over
    the packed store plus the exact new token in the same softmax — native where ``attention_path`` says so
    (per-channel-g / per-token groups), else portable;
(c) T > 1 on a non-empty store: portable — this layer's store dequantized, then causal attention over it
    plus the new tokens;

then appends the new K/V to the store.

Prefill in chunks (``prefill_chunk``; 0: one call; by default ``PREFILL_CHUNK`` where ``chunking_saves_memory``
says the exact buffer below costs less than one call's activations, else one call: the buffer grows with
layers x KV heads, the activations with the hidden and MLP widths, so narrow models chunk and a 7B does not). One graph call over the
whole prompt holds its activations and the SDPA's [T, T] mask at once (1,544 MiB peak RSS at 8k tokens on the
long-context bench model, for a 36 MiB packed cache). A prefill into empty stores longer than the chunk runs
chunk by chunk, exactly as DESIGN.md's full-precision prefill: each layer holds the prompt's exact K/V so far
in a preallocated token-major buffer of the stores' dtype (capacity: the prefill's length), fed as the graph's
past, so the graph's SDPA attends to the exact earlier tokens plus the chunk, causally; the op, in its
prefill state (p), writes the chunk's new K/V into the buffer and returns the SDPA's output. When the prefill
ends (``run_prompt`` over [0, T-1), or [0, T) for ``first_token="fp"``), each layer's buffer is appended to its
store (``store_chunked``: head-major chunks, no copy of the whole buffer), so the store holds what a one-call
prefill appends (same groups, blocks, codes; ``kv_bytes`` equal), and freed, layer by layer; the last prompt token and the generated ones then see the compressed cache
as before. The buffer is a transient full-precision copy of the prompt's K/V (all layers: 64 MiB at 2k, 256
MiB at 8k tokens in f16 on the bench model): ``info()["prefill_buffer_bytes"]`` reports its size, apart from
``kv_work_bytes`` (the decode working copy). Chunk boundaries change only the summation order of the SDPA
(and, for an f16 buffer, the past read back rounded to f16 as every f16 KV cache does). Multi-token calls on
a non-empty store stay case (c). With ``prefix_attention="op"`` (the default where the native kernel is built;
``packed_prefix``) the graph's past is fed empty and the op computes the chunk's exact attention from its
buffer. With chunks on, the engine fixes glibc's mmap threshold at 128 KiB
(``mallopt``, process-wide; ``info()["malloc_mmap_threshold"]``): glibc's dynamic threshold otherwise keeps
the growing per-chunk graph intermediates on the heap, and a chunked prefill held *more* than one call
(2,261 vs 1,569 MiB at 8k tokens; 632 vs 538 MiB at 2k in chunks of 256). Not done: a prefill whose later chunks see the earlier ones compressed
(openvino.genai's u4 behaviour, no full-precision copy) — a different semantics. That is the chunk-major order
(``prefill_order="chunk"``); ``prefill_order="layer"`` runs ``ov_layers``' per-layer sub-models, one layer's
buffer at a time, decode through them too (chunk-major, named in ``info()["prefill_order_reason"]``, where the
graph won't split or attends to the exact past itself). The default where the op prefix runs picks one per
prompt (``packed_order``: chunk-major while all layers' buffers fit a budget, decoding in one call per token).

The portable path dequantizes one layer at a time (never silently:
``info()`` names the path per layer with its reason, and ``kvtool run --json`` shows it);
``kv_work_nbytes`` is the largest dequantized working copy a call held: 0 on the native path (it reads the
codes), one layer's K/V in the held dtype (f16 by default, f32 for fp32 exports) on the portable path;
``info()["scratch_bytes"]`` the kernel's scratch or the portable scores.

Route (``ov_packed_ext``): the op is the C++ extension op ``KvtoolPackedKVAttention`` where it is built (its
decode step runs the fused kernel with no Python; every other call goes back to ``_evaluate``), else the
Python op (``openvino.Op``; each of its calls costs ~1 ms of CPU: the CPU plugin re-clones a Python op on every
inference, plus its glue); ``info()["route"]`` / ``["route_reason"]`` say which. Runs on CPU only (the
Python op is evaluated on the host), batch 1; it does not run ``simulate`` mode (the paged engine does) or
OpenVINO's own compression (``ov-u8`` / ``ov-u4``). ``fp16`` runs on request (``kv_owner="packed"``: the
stores hold every token unquantized, the kernel reads them; the stateful engine stays fp16's default).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np

from kvtool.errors import InputError
from kvtool.runtime.engines import ov_packed_ext
from kvtool.runtime.engines.openvino_engine import (
    _OpenVINOGraphs,
    check_prefill_chunk,
)
from kvtool.runtime.kvspec import KVSpec

_PASS_THROUGH = ("Reshape", "Broadcast", "Unsqueeze", "Convert", "Tile", "Squeeze")
# Prompt tokens per graph call of a prefill (0: the whole prompt in one call); module docstring, "Prefill".
PREFILL_CHUNK = 512


def chunking_saves_memory(tokens: int, num_layers: int, num_kv_heads: int, head_dim: int, hidden: int,
                          intermediate: int, itemsize: int = 2) -> bool:
    """Whether an exact chunked prefill of ``tokens`` holds less than one call (the default rule when
    ``prefill_chunk`` is not given). Chunking adds the exact prompt buffer, ``2 * layers * kv_heads * head_dim *
    itemsize`` bytes per token (all layers' K and V); one call holds, per token, one layer's float32
    activations at a time, estimated as ``4 * (3 * intermediate + 6 * hidden)`` (MLP gate / up / product and the
    hidden-sized tensors around attention) plus a row of the graph's float32 ``[T, T]`` causal mask, ``4 * T``.
    Measured (docs/BENCHMARKS.md): the issue-13 model (8 layers x 8 KV heads x 128, hidden 1024, intermediate
    2816: 32 KiB vs 65 KiB per token at 2k) peaks at 1,064 MiB chunked vs 1,545 in one call at 8k; the full
    llava-1.5-7b shape (32 x 32 x 128, hidden 4096, intermediate 11008: 512 KiB vs 233 KiB per token at 2k) held
    ~0.3 GiB *more* chunked at 2k (the 1 GiB buffer against ~0.1 GiB of activations), so it prefills in one call
    below ~73k tokens."""
    buffer = 2 * num_layers * num_kv_heads * head_dim * itemsize
    one_call = 4 * (3 * intermediate + 6 * hidden) + 4 * tokens
    return buffer < one_call


# glibc's mmap threshold the engine fixes for a chunked prefill (bytes): module docstring, "Prefill".
MMAP_THRESHOLD = 128 * 1024


def _fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD`` (``mallopt(M_MMAP_THRESHOLD)``, process-wide): every
    allocation above it is its own mapping, returned to the OS when freed. glibc otherwise raises the threshold
    to the largest block freed (up to 32 MiB), so a chunked prefill's per-chunk graph intermediates, each a
    little larger than the last, land on the heap and stay resident. False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD = -3 (malloc.h)
    except (OSError, AttributeError):
        return False


class _Layer:
    """One layer's packed store and what its op did (shared by the op and the engine)."""

    def __init__(self, index: int, scale: float, dtype):
        self.index, self.scale, self.dtype = index, scale, np.dtype(dtype)
        self.store = None
        self.calls = {"fp": 0, "native": 0, "portable": 0}
        self.path: tuple[str, str] | None = None  # decode path of the last (b)/(c) call, with its reason
        self.native: bool | None = None  # whether the fused kernel reads this layer's store (found once)
        self.decode_path: tuple[str, str] = ("none", "")  # attention_path of the store, found with native
        self.bf16: tuple | None = None  # which op inputs / output are bf16 (fixed once compiled)
        self.f32_out = False  # whether the op's output is float32 (the native kernel then writes it in place)
        self.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.work_peak = 0  # bytes of the largest dequantized K/V one call held (portable path)
        self.scratch_peak = 0  # bytes of the largest other temporary (kernel scratch, scores)
        # a chunked prefill's exact K/V of the prompt so far, token-major [capacity, H, D] each (None: no
        # prefill in chunks under way); the op writes each chunk at rows [n, n + T)
        self.prefill: list | None = None  # [k_buf, v_buf, n]
        self.prefix, self.prefix_calls = "graph", 0  # where a chunk's exact-prefix attention runs (packed_prefix)
        self.sdpa, self.causal_calls = True, 0  # whether the graph's SDPA feeds the op; calls computing it instead
        # decode tokens the C++ op appended to the store itself / left to commit's Python append (ov_packed_ext)
        self.appends = {"op": 0, "python": 0}


class _PackedKV:
    """The engine's cache: the layers' packed stores (``GraphEngine`` calls ``reset`` at each start)."""

    def __init__(self, spec: KVSpec, layers: list[_Layer], num_kv_heads: int, head_dim: int):
        self.spec, self.layers, self.num_kv_heads, self.head_dim = spec, layers, num_kv_heads, head_dim
        self.n_tokens = 0
        self.prefill_peak = 0  # bytes of the largest exact prefill buffer (all layers' K/V) held so far

    def begin_prefill(self, capacity: int, which: list[int] | None = None) -> None:
        """Hold each layer's (``which``: these layers', the layer-major order's one) exact K/V of the next
        ``capacity`` prompt tokens in a token-major buffer of the stores' dtype (allocated lazily by the OS as
        the chunks fill it); the stores stay empty until ``end_prefill``."""
        h, d = self.num_kv_heads, self.head_dim
        chosen = self.layers if which is None else [self.layers[i] for i in which]
        for layer in chosen:
            layer.prefill = [np.empty((capacity, h, d), layer.dtype), np.empty((capacity, h, d), layer.dtype), 0]
        item = self.layers[0].dtype.itemsize if self.layers else 0
        self.prefill_peak = max(self.prefill_peak, 2 * len(chosen) * capacity * h * d * item)

    def end_prefill(self) -> None:
        """Append each layer's buffered prompt K/V to its store and free the buffer, layer by layer. The store
        ends holding exactly what a one-call prefill would have appended (the same groups, blocks and codes):
        ``store_chunked.append_token_major`` copies the token-major buffer head-major a chunk at a time (a few
        MiB), or all at once for a side whose statistics span every token (uniform, or<s>, g-CN)."""
        from kvtool.quant_ops.store_chunked import append_token_major

        for layer in self.layers:
            if layer.prefill is None:
                continue
            kb, vb, n = layer.prefill
            layer.prefill = None
            append_token_major(layer.store, kb[:n], vb[:n])
            del kb, vb

    def past(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Layer ``i``'s exact past for the graph's ``kvtool_past`` inputs: (k, v) ``[P, H, D]`` views of the
        prefill buffer, and P (0 and empty arrays outside a chunked prefill)."""
        pre = self.layers[i].prefill
        if pre is None or self.layers[i].prefix == "op":  # op: the op attends to the buffer (packed_prefix)
            return self._empty, self._empty, 0
        kb, vb, n = pre
        return kb[:n], vb[:n], n

    @functools.cached_property
    def _empty(self) -> np.ndarray:
        dt = self.layers[0].dtype if self.layers else np.float32
        return np.empty((0, self.num_kv_heads, self.head_dim), dt)

    def reset(self, capacity: int = 0) -> None:
        from kvtool.quant_ops import QuantizedKVStore

        s = self.spec
        for layer in self.layers:
            layer.store = QuantizedKVStore(s.quant, k_bits=s.k_bits or 16, v_bits=s.v_bits or 16, mode="packed",
                                           residual=s.residual)
            layer.work_peak = layer.scratch_peak = 0
            layer.native = None
            layer.prefill = None
        self.n_tokens = 0
        self.prefill_peak = 0

    def advance(self, t: int) -> None:
        self.n_tokens += t

    @property
    def nbytes(self) -> int:
        """Bytes really held: packed codes + group params (+ outliers) + the fp residual, all layers."""
        return sum(int(layer.store.nbytes) for layer in self.layers if layer.store is not None)

    @property
    def fp16_nbytes(self) -> int:
        return 2 * len(self.layers) * self.num_kv_heads * self.head_dim * self.n_tokens * 2

    @property
    def work_nbytes(self) -> int:
        """The largest dequantized working copy one op call held: one layer's K/V in the stores' dtype on the
        portable path, 0 where only the native kernel ran (it reads the codes)."""
        return max((layer.work_peak for layer in self.layers), default=0)

    @property
    def scratch_nbytes(self) -> int:
        """The largest other temporary of one call: the kernel's per-thread scratch or the portable scores."""
        return max((layer.scratch_peak for layer in self.layers), default=0)


def _portable_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, kx: np.ndarray, vx: np.ndarray,
                        scale: float, layer: _Layer) -> np.ndarray:
    """Attention of T new queries ``q`` [1, Hq, T, D] over the past ``k, v`` [1, H, N, D] (any float dtype)
    plus the new tokens ``kx, vx`` [1, H, T, D] (causal among themselves), in float32, token chunks of the
    past upcast at a time (no float32 copy of the whole layer). -> [1, Hq, T, D] float32."""
    _, hq, t, d = q.shape
    h, n = k.shape[1], k.shape[2]
    rep = hq // h
    qg = q[0].reshape(h, rep * t, d).astype(np.float32) * np.float32(scale)
    chunk = 1024
    s_past = np.empty((h, rep * t, n), np.float32)
    for c in range(0, n, chunk):
        s_past[:, :, c:c + chunk] = qg @ k[0, :, c:c + chunk].astype(np.float32).transpose(0, 2, 1)
    s_new = qg @ kx[0].astype(np.float32).transpose(0, 2, 1)  # [h, rep*t, t]
    causal = np.triu(np.ones((t, t), bool), 1)
    s_new.reshape(h, rep, t, t)[:, :, causal] = -np.inf
    mx = np.maximum(s_past.max(axis=-1, initial=-np.inf), s_new.max(axis=-1))[..., None]
    s_past -= mx
    np.exp(s_past, out=s_past)
    s_new = np.exp(s_new - mx)
    denom = s_past.sum(-1, keepdims=True) + s_new.sum(-1, keepdims=True)
    out = s_new @ vx[0].astype(np.float32)
    for c in range(0, n, chunk):
        out += s_past[:, :, c:c + chunk] @ v[0, :, c:c + chunk].astype(np.float32)
    out /= denom
    layer.work_peak = max(layer.work_peak, k.nbytes + v.nbytes)
    layer.scratch_peak = max(layer.scratch_peak, s_past.nbytes + 2 * min(chunk, n) * d * h * 4 + out.nbytes)
    return out.reshape(1, hq, t, d)


def _evaluate(layer: _Layer, q, k_new, v_new, sdpa_out, dst: np.ndarray | None = None) -> np.ndarray | None:
    """The op's semantics (module docstring); returns the output, or None for "the SDPA's own" (case a).
    ``dst``: the op's float32 output [1, Hq, T, D], which the native kernels then write (and return).
    ``sdpa_out`` None: no SDPA in the graph, the op computes case (a) itself (``packed_prefix.causal_attention``)."""
    from kvtool.quant_ops.attention import attention_path, native_decode
    from kvtool.runtime.engines.packed_prefix import causal_attention, chunk_attention

    st = layer.store
    t = q.shape[2]
    out = None
    if layer.prefill is not None:  # (p) a chunk of a chunked prefill: attention to the exact past (SDPA or op)
        kb, vb, n = layer.prefill
        # op: the kernel over the buffer + chunk; the first chunk (n = 0) has no past: its causal attention over
        # itself, the graph's SDPA's output (None) where it is kept, as a one-call prefill's
        if layer.prefix == "op" and n:
            out = chunk_attention(layer, q, k_new, v_new, dst)
        elif sdpa_out is None:
            out = causal_attention(layer, q, k_new, v_new, dst)
        kb[n:n + t] = k_new[0].transpose(1, 0, 2)
        vb[n:n + t] = v_new[0].transpose(1, 0, 2)
        layer.prefill[2] = n + t
        layer.calls["fp"] += 1
        return out
    if st.n_tokens == 0:
        layer.calls["fp"] += 1
        out = None if sdpa_out is not None else causal_attention(layer, q, k_new, v_new, dst)
    else:
        if layer.native is None:  # the scheme, bits and dtype decide it: the same for every later call
            layer.decode_path = attention_path(st)
            layer.native = layer.decode_path[0] == "native"
        path = layer.decode_path
        if t == 1 and layer.native:
            qf = np.ascontiguousarray(q[:, :, 0], dtype=np.float32)
            o3 = None if dst is None else dst.reshape(qf.shape)  # a view: the kernel writes the op's output
            out = native_decode(qf, st, layer.scale, layer.threads, np.ascontiguousarray(k_new),
                                np.ascontiguousarray(v_new), out=o3)[:, :, None]
            rep, d = q.shape[1] // k_new.shape[1], q.shape[3]
            scratch = layer.threads * 4 * (rep * (st.n_tokens + 1) + (4 * rep + 2) * d)  # per thread, _native.cpp
            layer.scratch_peak = max(layer.scratch_peak, scratch + out.nbytes)
        else:
            if t > 1:
                path = ("portable", f"{t} new tokens on a non-empty store: this layer dequantized (the fused "
                                    f"kernel takes one query token)")
            k, v = st.dequantize()  # this layer only, in the store's dtype
            out = _portable_attention(q, k, v, k_new, v_new, layer.scale, layer)
        layer.path = path
        layer.calls[path[0]] += 1
    st.append(np.array(k_new, dtype=layer.dtype), np.array(v_new, dtype=layer.dtype))
    return out


def _source(value, stop: set):
    """Walk up from ``value`` through shape-only ops (GQA broadcast, converts) to a node in ``stop``."""
    node = value.get_node()
    for _ in range(8):
        if node in stop:
            return node
        if node.get_type_name() not in _PASS_THROUGH:
            return None
        node = node.input_value(0).get_node()
    return None


def _packed_lm(model, num_layers: int, dtype, prefix: str = "graph") -> list[_Layer]:
    """Edit the stateful LM ``model`` in place (module docstring): no KV state, one ``PackedKVAttention``
    per layer after its SDPA, or in its place where ``packed_prefix.removes_sdpa(prefix)``. Returns the layers'
    shared objects, in layer order. InputError for a graph whose attention is not
    ``SDPA(q, Concat(ReadValue-past, new) ...)`` as optimum-intel's stateful export writes it."""
    import openvino as ov
    import openvino.opset13 as ops

    from kvtool.runtime.engines.packed_prefix import removes_sdpa

    sinks = list(model.get_sinks())
    concats = {}
    for a in sinks:
        src = a.input_value(0).get_node()
        if src.get_type_name() != "Concat" or len(src.input_values()) != 2:
            raise InputError("language model: a state is not written as Concat(past, new); the packed engine "
                             "cannot follow this stateful graph (export it with kvtool export)")
        concats[src] = a
    stop = set(concats)
    sdpas = [op for op in model.get_ordered_ops() if op.get_type_name() == "ScaledDotProductAttention"]
    if len(sdpas) != num_layers or len(concats) != 2 * num_layers:
        raise InputError(f"language model: {len(sdpas)} SDPA ops and {len(concats)} KV states for {num_layers} "
                         f"layers; the packed engine needs one SDPA and two states per layer")
    from kvtool.runtime.engines.packed_pyop import op_class

    cls = op_class()
    layers, pasts = [], []
    for i, sdpa in enumerate(sdpas):
        kc, vc = _source(sdpa.input_value(1), stop), _source(sdpa.input_value(2), stop)
        if kc is None or vc is None:
            raise InputError(f"language model: layer {i}'s SDPA does not read Concat(past, new) K/V")
        d = sdpa.get_input_partial_shape(0)[3].get_length()
        scale = 1.0 / math.sqrt(d)
        if len(sdpa.input_values()) > 4:
            s = sdpa.input_value(4).get_node()
            if s.get_type_name() != "Constant":
                raise InputError(f"language model: layer {i}'s SDPA scale is not a constant")
            scale = float(np.asarray(s.get_data()).reshape(-1)[0])
        layer = _Layer(i, scale, dtype)
        layer.prefix, layer.sdpa = prefix, not removes_sdpa(prefix)  # without it, the SDPA drops out of the graph
        targets = list(sdpa.output(0).get_target_inputs())
        node = ov_packed_ext.make_node([sdpa.input_value(0), kc.input_value(1), vc.input_value(1)]
                                       + [sdpa.output(0)] * layer.sdpa, layer, _evaluate, cls)  # route()'s op
        for t in targets:
            t.replace_source_output(node.output(0))
        layers.append(layer)
        pasts += [(kc, f"kvtool_past.{i}.key"), (vc, f"kvtool_past.{i}.value")]
    et = ov.Type.f32 if np.dtype(dtype) == np.float32 else ov.Type.f16
    for concat, name in pasts:  # each past ReadValue -> a token-major [P, H, D] Parameter of the stores' dtype
        rv = concat.input_value(0).get_node()
        for _ in range(8):
            if rv.get_type_name() == "ReadValue":
                break
            rv = rv.input_value(0).get_node()
        else:
            raise InputError(f"language model: the past input of {name} is not read from a state")
        ps = rv.get_output_partial_shape(0)
        param = ops.parameter(ov.PartialShape([-1, ps[1].get_length(), ps[3].get_length()]), et, name)
        param.output(0).get_tensor().set_names({name})
        x = param.output(0)
        if rv.get_output_element_type(0) != et:
            x = ops.convert(x, rv.get_output_element_type(0)).output(0)
        x = ops.unsqueeze(ops.transpose(x, ops.constant(np.array([1, 0, 2], dtype=np.int64))),
                          ops.constant(np.array([0], dtype=np.int64)))
        rv.output(0).replace(x.output(0))
        model.add_parameters([param])
    for a in sinks:
        model.remove_sink(a)
    for var in list(model.get_variables()):
        model.remove_variable(var)
    model.validate_nodes_and_infer_types()
    return layers


class OpenVINOPackedEngine(_OpenVINOGraphs):
    """Stateful LM graph without KV state; per-layer packed stores read by a fused attention (module doc)."""

    def __init__(self, path: str | Path, spec: KVSpec, device: str = "CPU", manifest=None,
                 inference_precision: str | None = None, kv_precision: str | None = None,
                 prefill_chunk: int | None = None, prefix_attention: str | None = None,
                 prefill_order: str | None = None):
        """``prefill_order``: ``layer`` (``ov_layers``: per-layer sub-models, one layer's exact buffer at a time,
        no full LM compiled; chunk-major where the graph won't split), ``chunk`` (one full-LM call per chunk, all
        layers' buffers), None: ``ov_layers.DEFAULT_ORDER`` (per prompt, ``packed_order``, where
        ``prefix_attention`` is "op", else chunk); ``info()["prefill_order_reason"]`` says why.
        ``kv_precision``: the element type of the stores' residual and params, f16 or f32 (default: f32 when
        inference runs in f32 by the export's dtype, as the paged engine's blocks, else f16).
        ``prefill_chunk``: prompt tokens per graph call of a prefill into empty stores (0: the whole prompt in one
        call; None: ``PREFILL_CHUNK`` where ``chunking_saves_memory`` says the exact buffer costs less than one
        call's activations for that prompt, else one call); the chunks attend to the exact earlier prompt
        tokens (module doc). ``prefix_attention``: "graph" | "op" | None, where those chunks attend to the earlier
        tokens (``packed_prefix``; None: "op" where the native kernel is built)."""
        from kvtool.runtime.engines import packed_prefix

        self.prefix_attention = packed_prefix.resolve(prefix_attention)  # (mode, why)
        if kv_precision not in (None, "f16", "f32"):
            raise InputError(f"kv_precision: expected f16 or f32, got {kv_precision!r}")
        check_prefill_chunk(prefill_chunk)
        if prefill_order not in (None, "layer", "chunk"):
            raise InputError(f"prefill_order: expected layer or chunk, got {prefill_order!r}")
        self.prefill_order = prefill_order
        self.prefill_chunk = PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
        self.prefill_auto = prefill_chunk is None  # chunk only where it holds less (chunking_saves_memory)
        self.prefill_chunked: bool | None = None  # whether the last prefill ran in chunks (None: none yet)
        self.mmap_threshold_fixed = bool(self.prefill_chunk) and _fix_mmap_threshold()
        where = f"kv={spec.scheme} with the packed engine (kv_owner=packed)"
        if device != "CPU":
            raise InputError(f"{where}: runs on CPU only (its attention is a Python op the host evaluates), "
                             f"not {device}")
        if spec.is_ov:
            raise InputError(f"{where}: needs fp16 or a kvtool scheme (g-KC128VT128, uniform, ...); OpenVINO's own "
                             f"ov-u8/ov-u4 run the stateful engine")
        if spec.mode != "packed":
            raise InputError(f"{where}: holds packed stores only; kv_mode={spec.mode} runs the paged engine")
        self.inference_precision = inference_precision
        self.kv_precision = kv_precision
        super().__init__(path, spec, device, manifest)
        # GraphEngine made a GraphKVCache (fp buffers, never touched here): the packed stores replace it
        self.kv = _PackedKV(spec, self.layers, self.num_kv_heads, self.head_dim)  # (each layer's prefix: _packed_lm)

    def _load_graphs(self) -> None:
        import openvino as ov

        core = ov.Core()
        self._compile_aux_graphs(core)
        cfg = self._base_config()
        prec = self.kv_precision or ("f32" if cfg.get("INFERENCE_PRECISION_HINT") == "f32" else "f16")
        self.kv_dtype = np.float32 if prec == "f32" else np.float16
        # made once (as the stateful engine's step does): the past inputs' names, and the step's other feeds
        self._past_names = [(f"kvtool_past.{i}.key", f"kvtool_past.{i}.value") for i in range(self.num_layers)]
        self._beam = np.zeros(1, dtype=np.int32)
        self._core, self._cfg = core, cfg
        from kvtool.runtime.engines import packed_order

        # the LM graph set of the order (packed_order.build): layer-major's sub-models (decode through them too,
        # or a full LM beside them where ov_layers.DECODE_FULL_LM) or chunk-major's full LM; by default the
        # order is picked per prompt (packed_order.choose, from start)
        packed_order.load(self)
        self._absent = [k for k in ("attention_mask", "position_ids", "beam_idx") if k not in self.lm_names]

    def start(self, prepared, max_new_tokens: int = 64) -> None:
        """``GraphEngine.start``, after ``packed_order.choose`` picked this prompt's order (by default)."""
        from kvtool.runtime.engines import packed_order

        packed_order.choose(self, prepared.n_tokens)
        super().start(prepared, max_new_tokens)

    # -- the engine interface ------------------------------------------------------------------------
    def run_prompt(self, start: int, end: int) -> np.ndarray:
        """Prompt positions [start, end) through the LM; the last one's logits [V]. Into empty stores and longer
        than ``prefill_chunk``: in chunks that attend to the exact earlier prompt tokens (the layers' prefill
        buffers, fed as the graph's past), then every layer's tokens appended to its store in one go. Otherwise
        one call (a multi-token call on a non-empty store is the op's case (c))."""
        step = self.prefill_chunk
        if self.kv.n_tokens:  # not a prefill: case (c) of the op
            return super().run_prompt(start, end)
        self.prefill_chunked = bool(step) and end - start > step and (not self.prefill_auto or self._saves(end))
        if not self.prefill_chunked:
            return super().run_prompt(start, end)
        if self.prefill_runner is not None:  # the prompt's embedding rows become the layers' hidden states
            return self.prefill_runner.prefill(self.kv, self.embeds[0, start:end], self.positions[..., start:end], step)
        self.kv.begin_prefill(end - start)
        try:
            logits = self._run_prompt_chunks(start, end, step)
        except BaseException:
            for layer in self.layers:
                layer.prefill = None
            raise
        self.kv.end_prefill()
        return logits

    def _saves(self, tokens: int) -> bool:
        """``chunking_saves_memory`` for this model (hidden from the manifest, the MLP width from the config;
        4 x hidden where the config does not say) and the stores' element size."""
        hidden = self.manifest.lm.hidden_size
        cfg = getattr(self.config, "text_config", None) or self.config
        inter = int(getattr(cfg, "intermediate_size", None) or 4 * hidden)
        rule = chunking_saves_memory if self.prefill_runner is None else self.prefill_runner.chunking_saves_memory
        return rule(tokens, self.num_layers, self.num_kv_heads, self.head_dim, hidden, inter,
                    np.dtype(self.kv_dtype).itemsize)

    def _step(self, embeds: np.ndarray, pos: np.ndarray) -> np.ndarray:
        t = embeds.shape[1]
        if self.layer_runner is not None:  # L + 1 calls; the ops append to the stores
            return self.layer_runner.step(embeds, pos, self.kv)
        # the graph's past is the prefill buffer's tokens during a chunked prefill, else nothing (the ops read
        # the packed stores); the mask covers past plus the call's own tokens (positions come from the caller).
        # Where the past is empty, the past / mask / beam tensors of a call with as many tokens as the last are
        # already set on the request (share_inputs; kept alive in self._fixed): fed again only when they change
        # (16 set_tensor calls less per decode step on the bench model; docs/BENCHMARKS.md, decode breakdown)
        # A decode step whose fixed tensors are set writes the token's embedding row and positions into tensors
        # bound to the request once (_feed_bound, as the paged engine's bind_step_inputs: a set_tensor per input
        # and step costs the CPU plugin more inside infer than in Python)
        pasts = [self.kv.past(i) for i in range(len(self._past_names))]
        p = pasts[-1][2] if pasts else 0
        fixed = getattr(self, "_fixed", None)
        feeds: dict | None = None
        req = self.lm_req
        try:
            if t == 1 and not p and fixed is not None and fixed[0] == 1:
                self._feed_bound(embeds, pos)
            else:
                self._bound = None  # the call below binds other arrays to these inputs
                feeds = {"inputs_embeds": embeds, "position_ids": pos}
                if p or fixed is None or fixed[0] != t:
                    for (kn, vn), (k, v, _) in zip(self._past_names, pasts, strict=True):
                        feeds[kn], feeds[vn] = k, v
                    mask = np.ones((1, p + t), dtype=np.int64)
                    feeds.update({"attention_mask": mask, "beam_idx": self._beam})
                    self._fixed = None if p else (t, mask, pasts)
                for k in self._absent:  # an export without one of them
                    feeds.pop(k, None)
            ov_packed_ext.infer(self.layers, req, feeds)  # the ops (or, after a C++ op's decode, infer) append
        except BaseException:
            self._fixed = self._bound = None  # feed everything again next time
            raise
        self.kv.advance(t)
        return req.get_tensor("logits").data[0, -1].copy()

    def _feed_bound(self, embeds: np.ndarray, pos: np.ndarray) -> None:
        """One decode token's ``inputs_embeds`` ``[1, 1, hidden]`` and ``position_ids`` (``[1, 1]``, Qwen2-VL's
        ``[3, 1, 1]``) written in place into tensors bound to the request once (again after a call that fed
        arrays, or when the positions' shape changes); an export without position_ids gets none."""
        b = getattr(self, "_bound", None)
        if b is None or "position_ids" in b and b["position_ids"].shape != pos.shape:
            b = self._bind_inputs({name: x.shape for name, x in (("inputs_embeds", embeds), ("position_ids", pos))
                                   if name not in self._absent})
            self._bound = b
        b["inputs_embeds"][...] = embeds
        if "position_ids" in b:
            b["position_ids"][...] = pos

    def kv_work_nbytes(self) -> int:
        """Bytes of dequantized scratch held for attention beyond the packed stores: 0 on the native path, at
        most one layer's K/V (held dtype) on the portable path. The chunked prefill's transient exact copy of
        the prompt's K/V is not in it (freed before the first token is decoded): ``info()["prefill_buffer_bytes"]``."""
        return self.kv.work_nbytes

    def kv_work_what(self) -> str:
        """``GraphEngine.kv_work_what`` for the packed engine (``kvtool run --json``: ``pipeline.engine.kv_work``)."""
        return ("0 on the native path (the kernel reads the packed codes); on the portable path one layer's K/V "
                "dequantized in the held dtype, the largest a call held (a chunked prefill's exact prompt copy is "
                "info()['prefill_buffer_bytes'] instead)")

    def layer_paths(self) -> list[dict]:
        """Per layer: ``{"layer", "path": "native" | "portable" | "none", "reason", "calls", "appends"}`` (the
        attention path its op ran, why, how many calls of each kind, and on the C++ route's decode fast path how
        many new tokens the op appended to the store itself (``op``) or left to Python (``python``))."""
        return [{"layer": la.index, "path": (la.path or ("none", "no decode step yet"))[0],
                 "reason": (la.path or ("none", "no decode step yet"))[1], "calls": dict(la.calls),
                 "appends": dict(la.appends)} for la in self.layers]

    def info(self) -> dict:
        """The base engine's info plus ``kv_owner="packed"``, the route, each layer's attention path and the
        scratch/state figures (what ``kvtool run --json`` shows)."""
        from kvtool.runtime.engines import packed_order, packed_prefix

        paths = self.layer_paths()
        kinds = sorted({p["path"] for p in paths})
        return {**super().info(), "config": self._base_config(), "stateful": True, "kv_owner": "packed",
                "route": self.layers[0].route[0] if self.layers else None,
                "route_reason": self.layers[0].route[1] if self.layers else "", "ov_states": self.n_states,
                "attention_path": kinds[0] if len(kinds) == 1 else "mixed",
                "attention_reason": paths[0]["reason"] if paths else "", "layers": paths,
                "scratch_bytes": self.kv.scratch_nbytes, "prefill_chunk": self.prefill_chunk,
                "prefill_rule": f"auto ({'layer_' if self.prefill_runner else ''}chunking_saves_memory)"
                if self.prefill_auto else "given",
                "prefill_chunked": self.prefill_chunked,
                "prefill_order": "layer" if self.prefill_runner is not None else "chunk",
                "decode_graph": "full LM" if self.layer_runner is None else "layer sub-models",
                "prefill_order_reason": packed_order.reason(self), "prefill_order_rule": self.order_rule,
                "order_buffer_budget": packed_order.BUFFER_BUDGET, "order_switches": self.order_switches,
                # a chunked prefill's transient full-precision copy of the prompt's K/V (all layers, the stores'
                # dtype), freed into the packed stores when the prefill ends; 0 when no prefill was chunked
                "prefill_buffer_bytes": self.kv.prefill_peak,
                "malloc_mmap_threshold": MMAP_THRESHOLD if self.mmap_threshold_fixed else None,
                **packed_prefix.info(self)}
