"""The packed engine's LM graph split into per-layer sub-models, and the layer-major exact prefill that runs them.

Split (``split_layers``): the packed engine's edited LM graph (``openvino_packed._packed_lm``: no KV state, token-
major ``kvtool_past.{i}.key|value`` Parameters, one attention op per layer) is cut at the residual stream's
layer boundaries into ``L`` layer sub-models (hidden ``[1, T, hidden]`` in -> hidden out, with that layer's
attention op, its past Parameters and the position / mask inputs it needs) and a head (final norm + lm_head).
The boundaries are found structurally, not by friendly names: starting at ``inputs_embeds``, the residual stream
is the chain of ``Add`` nodes that take the stream value itself (through ``Convert``) plus a branch computed from
it; a decoder layer is two links of the chain (attention, then MLP). The split is checked: ``2 L`` links, the
branch of link ``2 i`` reading layer ``i``'s past Parameters and no other layer's (or, where the graph's SDPA was
removed and no past is read, ``packed_prefix``: holding layer ``i``'s attention op, by its friendly name
``ov_packed_ext.NODE_NAME``, and no other), every sub-model reaching
``inputs_embeds`` only for its shape (``ShapeOf``: the mask and position subgraphs of optimum's export take the
sequence length from it) except layer 0, and the head reaching no past at all. Where any check fails the split
is refused with the reason (``LayerSplitError``), and the engine keeps today's chunk-major prefill and says so
in ``info()["prefill_order_reason"]``. The attention op is opaque here but for its friendly name (whatever
``_packed_lm`` inserted; its own attributes travel with ``ov.Model.clone``).

Layer-major prefill (``layer_major_prefill``): layer 0 runs over all chunks of the prompt (its op writes each
chunk's exact K/V into layer 0's buffer, the op's prefill case (p), and its SDPA attends to the buffer fed as
the past), then layer 0's sub-model memory is released and its buffer appended to its store (in head-major
chunks, ``store_chunked``: the store as one append leaves it) and freed; then layer 1 on layer 0's output
hidden states, and so on. Only one layer's exact buffer exists at a time, plus the prompt's hidden states
``[T, hidden]`` (one float32 array, the engine's ``inputs_embeds`` itself, each chunk's output written over its
input: a chunk of layer ``i`` needs only its own input rows and the layer's K/V buffer). In the last layer a
chunk's rows are dead once it ran (only the last position goes on), so their pages are given back
(``drop_rows``) while that layer's buffer fills. The head then runs on the last position only. The stores
end holding what a one-call prefill appends (the same tokens, appended once per layer), and each prompt token
attends to the exact earlier prompt K/V, as DESIGN.md's full-precision prefill; chunk and layer boundaries change
only the SDPA's summation order and, where the compiled graph keeps bf16 activations, the rounding at the layer
boundary (a sub-model's output is float32).

Another layer's past read for its shape only (optimum's mask takes the past length from layer 0's key) is
rewired to the layer's own past of the same shape. Weights: no full LM is compiled beside the sub-models by
default (``DECODE_FULL_LM``: the CPU plugin repacks the int4 weights per compiled model and shares nothing between
a full LM and sub-models cut from the same ``ov.Model``: +82 MiB peak at 8k on the bench model), so decode runs
through them as well (``LayerRunner.step``: L + 1 calls per token, run as a chain, ``DecodeChain``: every input
set once, each layer's output tensor the next one's input, all op slots synced and committed once per token;
-16% CPU per token against feeding every call, where the earlier fixed feeds saved 5%; docs/BENCHMARKS.md, "h-chain").

Memory (docs/BENCHMARKS.md, "layer-major exact prefill as the default"): each compiled sub-model keeps its own
intermediate memory, sized by its largest call; with ``prefix_attention="op"`` (the native prefix kernel) the
graph is fed an empty past, so that is chunk-sized, and ``CompiledModel.release_memory()`` after each layer's
prefill (``RELEASE_MEMORY``) frees it: 589 vs 727 MiB (chunk-major) at 8k, below genai u4's 644, ~parity at 2k.
So ``DEFAULT_ORDER`` ("auto") picks the order per prompt where the op prefix runs (``packed_order``: chunk-major
while all layers' buffers fit a budget, its decode one full-LM call per token instead of L + 1; layer-major above
it) and is chunk-major, named, where the graph attends to the exact past (growing ``[T, P+T]`` intermediates per sub-model: 2.8 GiB at 8k). ``release_memory`` is called
only where the layer's last call had more than one token (``LayerRunner.release``: OpenVINO 2026.4's CPU plugin
re-allocates a released graph only when the next call's shapes differ from the last call's).

Does not: decide when the engine uses it (``openvino_packed``, from ``prefill_order``), change the attention op or
how it attends (an empty past fed by the engine works the same), or run with a stateful graph.
"""

from __future__ import annotations

import functools

import numpy as np

from kvtool.runtime.engines import ov_packed_ext

PAST = "kvtool_past.{i}.{kv}"
HIDDEN = "kvtool_hidden"
EMBEDS = "inputs_embeds"


class LayerSplitError(ValueError):
    """The LM graph could not be cut into per-layer sub-models (the message says where)."""


def _consumers(value) -> list:
    return [t.get_node() for t in value.get_target_inputs()]


def _through_convert(value) -> list:
    """``value`` and the outputs of the ``Convert`` chains hanging on it (the stream may change type)."""
    out, todo = [], [value]
    while todo:
        v = todo.pop()
        out.append(v)
        todo += [n.output(0) for n in _consumers(v) if n.get_type_name() == "Convert"]
    return out


def _upstream(node, stop: set = frozenset()):
    """``node`` and every node it is computed from, each once (depth first; a generator, so a search can stop),
    not walking above (nor yielding) nodes in ``stop``."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        yield n
        todo += [x.get_node() for x in n.input_values()]


def _is_constant(value) -> bool:
    """Whether ``value`` is computed from Constants only (a weight, an epsilon, their decompression)."""
    return not any(n.get_type_name() == "Parameter" for n in _upstream(value.get_node()))


def _params_reached(value, stop: set, through_shape: bool = True) -> set[str]:
    """Names of the Parameters ``value`` depends on, not walking above nodes in ``stop``; with
    ``through_shape=False`` not above ``ShapeOf`` either (a shape-only use)."""
    seen, names, todo = set(), set(), [value.get_node()]
    while todo:
        n = todo.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        kind = n.get_type_name()
        if kind == "Parameter":
            names.add(n.output(0).get_any_name())
            continue
        if not through_shape and kind in ("ShapeOf",):
            continue
        todo += [x.get_node() for x in n.input_values()]
    return names


def residual_chain(model) -> list:
    """The residual stream of ``model``: ``[embeds, add_1, ..., add_n]`` outputs, where each ``add_k`` is the one
    ``Add`` taking the stream value (through ``Convert``) and a non-constant other input. LayerSplitError where
    there is no ``inputs_embeds`` input or a link is ambiguous."""
    try:
        x = model.input(EMBEDS)
    except RuntimeError:
        raise LayerSplitError(f"the LM graph has no {EMBEDS} input") from None
    chain = [x.get_node().output(0)]
    while True:
        cur = chain[-1]
        adds = []
        for v in _through_convert(cur):
            for n in _consumers(v):
                if n.get_type_name() != "Add":
                    continue
                other = [u for u in n.input_values() if u != v]
                if other and not _is_constant(other[0]):
                    adds.append(n)
        adds = list(dict.fromkeys(adds))
        if not adds:
            return chain
        if len(adds) > 1:
            raise LayerSplitError(f"the residual stream forks after link {len(chain) - 1} ({len(adds)} Adds)")
        chain.append(adds[0].output(0))


def _param(like, name: str):
    import openvino as ov
    import openvino.opset13 as ops

    p = ops.parameter(ov.PartialShape([1, -1, like.get_partial_shape()[2]]), like.get_element_type(), name)
    p.output(0).get_tensor().set_names({name})
    return p


def _reachable_params(result) -> list:
    return [n for n in _upstream(result) if n.get_type_name() == "Parameter"]


def _cut(model, num_layers: int, index: int):
    """One sub-model of a clone of ``model``: layer ``index`` (0..L-1) or the head (``index == L``)."""
    import openvino as ov
    import openvino.opset13 as ops

    m = model.clone()
    chain = residual_chain(m)
    if len(chain) - 1 != 2 * num_layers:
        raise LayerSplitError(f"the residual stream has {len(chain) - 1} Add links for {num_layers} layers "
                              f"(expected two per layer: attention and MLP)")
    what = f"layer {index}" if index < num_layers else "the head (final norm + lm_head)"
    if index < num_layers:
        out = chain[2 * index + 2]
    else:
        results = [r for r in m.get_results() if "logits" in r.input_value(0).get_names()] or list(m.get_results())
        if len(results) != 1:
            raise LayerSplitError(f"the LM graph has {len(m.get_results())} outputs and none named logits")
        out = results[0].input_value(0)
    start = chain[min(2 * index, 2 * num_layers)]
    embeds = m.input(EMBEDS).get_node()
    params = {p.output(0).get_any_name(): p for p in m.get_parameters()}
    own = {PAST.format(i=index, kv=kv) for kv in ("key", "value")} if index < num_layers else set()
    pasts = {PAST.format(i=i, kv=kv) for i in range(num_layers) for kv in ("key", "value")}
    # what the sub-model reads by value (not only by shape), with the stream cut at its input
    stop = {start.get_node()} if index else set()
    by_value = _params_reached(out, stop, through_shape=False)
    # the attention ops it holds (by ov_packed_ext.NODE_NAME): exactly its layer's, where no past is read by value
    # (the graph's SDPA removed: the op reads no past input), else its own past, read by value
    ops_held = sorted(n.get_friendly_name() for n in _upstream(out.get_node(), stop)
                      if n.get_friendly_name().startswith(ov_packed_ext.NODE_NAME.split("{")[0]))
    own_op = [ov_packed_ext.NODE_NAME.format(i=index)] if index < num_layers else []
    if not (by_value & pasts == own or (not by_value & pasts and ops_held == own_op)):
        raise LayerSplitError(f"{what} reads the past inputs {sorted(by_value & pasts)} by value, not {sorted(own)}, "
                              f"and holds the attention ops {ops_held}, not {own_op}")
    if index and EMBEDS in by_value:
        raise LayerSplitError(f"{what} reads {EMBEDS}'s values, not only its shape")
    by_shape = _params_reached(out, stop) & pasts
    if index:  # a new stream input; what read inputs_embeds (its shape) reads it instead
        p = _param(start, HIDDEN)
        for t in list(start.get_target_inputs()):
            t.replace_source_output(p.output(0))
        if embeds.output(0).get_partial_shape().compatible(p.output(0).get_partial_shape()):
            for t in list(embeds.output(0).get_target_inputs()):
                t.replace_source_output(p.output(0))
    for name in sorted(by_shape - own):  # another layer's past read for its shape (the mask's past length)
        src = params[name]
        mine = params.get(PAST.format(i=index, kv=name.rsplit(".", 1)[1]))
        if mine is None or mine.get_output_partial_shape(0) != src.get_output_partial_shape(0) \
                or mine.get_output_element_type(0) != src.get_output_element_type(0):
            raise LayerSplitError(f"{what} reads {name}'s shape, and has no past input of the same shape")
        for t in list(src.output(0).get_target_inputs()):
            t.replace_source_output(mine.output(0))
    res = ops.result(out)
    sub = ov.Model([res], _reachable_params(res), f"kvtool_{'head' if index == num_layers else f'layer_{index}'}")
    names = {q.output(0).get_any_name() for q in sub.get_parameters()}
    if names & pasts not in (own, set()) or (index and EMBEDS in names):
        raise LayerSplitError(f"{what} still reads {sorted(names & (pasts | {EMBEDS}))} after the cut")
    sub.validate_nodes_and_infer_types()
    return sub


def split_layers(model, num_layers: int) -> tuple[list, object]:
    """Cut the packed engine's edited LM ``model`` (not modified: each sub-model is cut from its own clone, the
    weights' Constants shared) into ``num_layers`` layer sub-models and a head (module docstring). Layer 0
    takes ``inputs_embeds``, layer ``i > 0`` and the head ``kvtool_hidden``, float ``[1, T, hidden]``; layer
    ``i`` takes ``kvtool_past.{i}.key|value`` (another layer's past read for its shape only, e.g. the mask's
    past length, is rewired to this layer's, of the same shape) and whichever of ``attention_mask``,
    ``position_ids``, ``beam_idx`` it reads, and outputs the layer's hidden ``[1, T, hidden]``; the head outputs
    ``logits`` [1, T, V]. Returns (layer models, head model). LayerSplitError naming the failed check."""
    layers = [_cut(model, num_layers, i) for i in range(num_layers)]
    return layers, _cut(model, num_layers, num_layers)


def layer_chunking_saves_memory(tokens: int, num_layers: int, num_kv_heads: int, head_dim: int, hidden: int,
                                intermediate: int, itemsize: int = 2) -> bool:
    """(``openvino_packed.chunking_saves_memory``'s arguments; ``tokens`` and ``num_layers`` do not enter.) Whether a layer-major prefill in chunks holds less than the same prefill unchunked (the default rule of
    the layer-major order; ``openvino_packed.chunking_saves_memory`` is the chunk-major one). Chunking adds one
    layer's exact K/V buffer, ``2 * kv_heads * head_dim * itemsize`` bytes per prompt token (the hidden states
    ``[T, hidden]`` are held either way: the prompt's embeddings, overwritten); one unchunked call holds one
    layer's float32 activations, ``4 * (3 * intermediate + 6 * hidden)`` bytes per token plus its ``[T, T]``
    mask. Per token: 4 KiB vs 65 KiB on the issue-13 bench model (8 KV heads x 128, hidden 1024, intermediate
    2816), 16 KiB vs 233 KiB on llava-1.5-7b (32 x 128, 4096, 11008): every LLaVA-family shape chunks."""
    return 2 * num_kv_heads * head_dim * itemsize < 4 * (3 * intermediate + 6 * hidden)


# The default prefill order of the packed engine (None: not given; module docstring, "Memory"): "auto" picks one
# per prompt where the op prefix runs (``packed_order``; layer-major: 589 vs 727 MiB peak at 8k on the issue-13
# bench model), else chunk-major; "layer" / "chunk": that order.
DEFAULT_ORDER = "auto"
# Whether the layer-major prefill calls ``CompiledModel.release_memory`` after each layer (``LayerRunner.release``;
# without it every sub-model keeps its chunk-sized intermediates: 792 vs 589 MiB at 8k).
RELEASE_MEMORY = True
# Whether the one-token steps (the last prompt token, decode) run a full LM compiled beside the sub-models
# (True: +82 MiB peak at 8k, the weights repacked twice) or the L + 1 sub-models (False: their decode chain,
# ``DecodeChain``; docs/BENCHMARKS.md, "h-chain").
DECODE_FULL_LM = False
# Whether ``LayerRunner.step``'s one-token calls on non-empty stores (decode) run as a chain (``_decode``,
# ``DecodeChain``): every input tensor set on its request once, layer ``i``'s output tensor layer ``i + 1``'s input,
# the positions one shared tensor, all layers' op slots synced before the first call and committed after the last
# (False: every input fed on every call, as a prompt's calls are). docs/BENCHMARKS.md, "h-calls" and "h-chain".
DECODE_FIXED_FEEDS = True
RELEASE_GUARD = ("layer {i}: a {t}-token call right after release_memory() of a {t}-token call; OpenVINO's CPU "
                 "plugin would run it on freed memory (ov_layers.LayerRunner.release)")


def load_runner(engine, core, model, cfg: dict, order: str | None):
    """For ``OpenVINOPackedEngine._load_graphs``: (the ``LayerRunner`` of ``model`` split and compiled, or None,
    and the reason, for ``info()["prefill_order_reason"]``). ``order``: ``layer`` -> split, or (None, why not)
    where the graph cannot be split: the chunk-major prefill, never silently; ``chunk`` -> (None, ...); None ->
    ``DEFAULT_ORDER``."""
    if order == "chunk":
        return None, "chunk-major: prefill_order=chunk given"
    if order is None and DEFAULT_ORDER == "chunk":  # ("auto": packed_order asks for an order where it decides)
        return None, "chunk-major: the default (ov_layers.DEFAULT_ORDER)"
    if order is None and engine.prefix_attention[0] != "op":
        return None, ("chunk-major: the default where the exact-prefix attention runs in the graph "
                      f"(prefix_attention={engine.prefix_attention[0]}: {engine.prefix_attention[1]}; each layer "
                      "sub-model would keep its own [T, P+T] intermediates)")
    try:
        subs, head = split_layers(model, engine.num_layers)
    except LayerSplitError as exc:
        return None, f"chunk-major: the LM graph cannot be split by layer ({exc})"
    runner = LayerRunner([engine._compile(core, m, cfg, f"language_model layer {i}") for i, m in enumerate(subs)],
                         engine._compile(core, head, cfg, "language_model head"), engine.layers)
    steps = "the full LM compiled for the one-token steps" if DECODE_FULL_LM else "no full LM (steps run them too)"
    return runner, f"layer-major: {len(subs)} layer sub-models + head compiled for the chunked prefill, {steps}"


class LayerRunner:
    """The compiled layer sub-models and head of ``split_layers`` and their infer requests; runs the LM as
    ``L + 1`` calls (no full LM compiled beside them: the CPU plugin repacks the weights per compiled model)."""

    chunking_saves_memory = staticmethod(layer_chunking_saves_memory)

    def __init__(self, compiled_layers: list, compiled_head, layers: list):
        """``layers``: the engine's ``_Layer`` objects, in order (layer ``i``'s op is in sub-model ``i``; the C++
        op route's ``sync``/``commit`` run around each sub-model's inference)."""
        self.compiled, self.layers = compiled_layers, layers
        self.reqs = [c.create_infer_request() for c in compiled_layers]
        self.head_compiled, self.head_req = compiled_head, compiled_head.create_infer_request()
        self.names = [{i.get_any_name() for i in c.inputs} for c in compiled_layers]
        self.hidden_name = [EMBEDS if i == 0 else HIDDEN for i in range(len(self.reqs))]
        self._beam = np.zeros(1, dtype=np.int32)
        self.n_states = sum(len(r.query_state()) for r in (*self.reqs, self.head_req))
        self.last_t = [0] * len(self.reqs)  # tokens of each sub-model's last call
        self.released: list[int | None] = [None] * len(self.reqs)  # last_t when its memory was released
        # the decode chain set on the requests (``DecodeChain``), None where a request was replaced (``release``) or
        # a call outside the chain fed other tensors (``layer``, ``head``)
        self.chain: DecodeChain | None = None

    def release(self, i: int) -> None:
        """With ``RELEASE_MEMORY``: free layer ``i``'s intermediate memory (each compiled sub-model keeps its own,
        sized by its largest call, where a full LM reuses one set across its layers): a new request, then
        ``CompiledModel.release_memory``. Only where the layer's last call had more than one token: OpenVINO
        2026.4's CPU plugin re-allocates a released graph's memory only when the next call's input shapes differ
        from the last call's (the same shapes run on freed memory: "Memory has not been allocated" on the first
        node, then glibc's heap-corruption abort), and the next call of a layer after its prefill is a one-token
        step. ``layer`` refuses a call that would meet that fault (``RELEASE_GUARD``)."""
        if RELEASE_MEMORY and self.last_t[i] > 1:
            self.reqs[i] = None
            self.compiled[i].release_memory()
            self.reqs[i] = self.compiled[i].create_infer_request()
            self.released[i], self.chain = self.last_t[i], None

    def layer(self, i: int, x: np.ndarray, pos: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Layer ``i`` on hidden states ``x`` [1, T, hidden] at positions ``pos`` ([1, T] or [3, 1, T]) with the
        exact past ``k, v`` [P, H, D] fed to its past inputs (P = 0: the op reads its store); the mask covers
        P + T. -> the layer's output [1, T, hidden], a view of the request's output (valid until its next call)."""
        t = x.shape[1]
        if self.released[i] == t:  # (never from the engine: its calls after a prefill have one token)
            raise RuntimeError(RELEASE_GUARD.format(i=i, t=t))
        feeds = {self.hidden_name[i]: x, PAST.format(i=i, kv="key"): k, PAST.format(i=i, kv="value"): v,
                 "attention_mask": np.ones((1, k.shape[0] + t), dtype=np.int64), "position_ids": pos,
                 "beam_idx": self._beam}
        names = self.names[i]
        if EMBEDS in names and i:  # (never: split_layers rewires it; kept for a graph that reads it by shape)
            feeds[EMBEDS] = x
        req, self.chain = self.reqs[i], None  # (its tensors replace the chain's on this request)
        ov_packed_ext.infer(self.layers[i:i + 1], req, {n: a for n, a in feeds.items() if n in names})
        self.last_t[i], self.released[i] = t, None
        return req.get_output_tensor(0).data

    def head(self, x: np.ndarray) -> np.ndarray:
        """Final norm + lm_head on hidden states ``x`` [1, T, hidden]: the last position's logits [V] (a copy)."""
        self.chain = None  # (x replaces the chain's last link as the head's input)
        self.head_req.infer({HIDDEN: x}, share_inputs=True, share_outputs=True)
        return self.head_req.get_output_tensor(0).data[0, -1].copy()

    def prefill(self, kv, rows: np.ndarray, pos: np.ndarray, chunk: int) -> np.ndarray:
        """``layer_major_prefill`` of the prompt's embedding rows ``rows`` [T, hidden], written over as the
        hidden states where they are a writable float32 array (the engine's ``embeds``, not read again), else a
        float32 copy."""
        if not rows.flags.writeable or rows.dtype != np.float32 or not rows.flags.c_contiguous:
            rows = np.ascontiguousarray(rows, dtype=np.float32).copy()
        return layer_major_prefill(self, kv, rows, pos, chunk)

    def step(self, embeds: np.ndarray, pos: np.ndarray, kv) -> np.ndarray:
        """All layers then the head on ``embeds`` [1, T, hidden] (not written), each layer fed ``kv.past(i)``
        (``openvino_packed._PackedKV``; empty outside a chunk-major prefill: the ops read their stores and append
        the T tokens), ``kv`` then advanced by T: the last position's logits [V]. Each layer's output is copied
        before it is the next one's input; after a multi-token call (a prompt not chunked) each layer's memory is
        released (``release``; a multi-token call on non-empty stores is not: two such calls of one shape
        would meet ``RELEASE_GUARD``); the head gets the last position only."""
        if DECODE_FIXED_FEEDS and embeds.shape[1] == 1 and kv.n_tokens and all(kv.past(i)[2] == 0 for i in range(len(self.reqs))):
            return self._decode(embeds, pos, kv)
        x = embeds
        prompt = not kv.n_tokens  # a prompt in one call into empty stores (not the op's case (c))
        for i in range(len(self.reqs)):
            k, v, _ = kv.past(i)
            x = self.layer(i, x, pos, k, v).copy()  # not request i's memory as request i + 1's input
            if prompt and x.shape[1] > 1:  # its T-sized intermediates freed as in a chunked prefill
                self.release(i)
        logits = self.head(x[:, -1:])
        kv.advance(embeds.shape[1])
        return logits

    def _decode(self, embeds: np.ndarray, pos: np.ndarray, kv) -> np.ndarray:
        """``step`` for one token on non-empty stores (decode, the last prompt token), as a chain (``DecodeChain``,
        set up on the first such call after any other): ``embeds`` and ``pos`` copied into the chain's input
        tensors, every layer's op slot synced, the ``L`` sub-models and the head run with no feeds (each reads its
        predecessor's output tensor), the slots committed. Same values as ``step``'s general path, bit for bit
        (``tests/runtime/test_packed_feeds.py``)."""
        ch = self.chain
        if ch is None or ch.pos.shape != pos.shape:
            ch = self.chain = DecodeChain(self, embeds.shape[-1], pos, kv._empty)
        ch.x0[...] = embeds
        ch.pos[...] = pos
        ov_packed_ext.infer_chain(self.layers, [*self.reqs, self.head_req])
        self.last_t, self.released = [1] * len(self.reqs), [None] * len(self.reqs)
        kv.advance(1)
        return ch.logits()


class DecodeChain:
    """The one-token decode's tensors, set on the sub-models' requests once (``LayerRunner._decode``): layer 0
    reads ``x0`` [1, 1, hidden] float32, layer ``i + 1`` (and the head) the output tensor of layer ``i`` (set as
    that request's output: the CPU plugin writes into it), every layer the shared positions ``pos`` ([1, 1] or
    [3, 1, 1] int64), the empty past, the one-token mask and ``beam_idx``. Per token the caller only writes
    ``x0`` and ``pos`` and runs the requests in order: no Python feed dispatch, no output copied between layers.
    The output tensors own their memory (a later multi-token call on a request resizes it; any such call drops
    the chain)."""

    def __init__(self, runner: LayerRunner, hidden: int, pos: np.ndarray, empty: np.ndarray):
        import openvino as ov

        self.x0_t = ov.Tensor(ov.Type.f32, ov.Shape([1, 1, hidden]))
        self.pos_t = ov.Tensor(np.zeros(pos.shape, np.int64))
        self.x0, self.pos = self.x0_t.data, self.pos_t.data  # numpy views of the two tensors' memory
        empty_t = ov.Tensor(empty)
        fixed = {"attention_mask": ov.Tensor(np.ones((1, 1), np.int64)), "beam_idx": ov.Tensor(np.zeros(1, np.int32)),
                 "position_ids": self.pos_t}
        prev = self.x0_t
        for i, req in enumerate(runner.reqs):
            names = runner.names[i]
            req.set_tensor(runner.hidden_name[i], prev)
            for name in names:
                if name in fixed:
                    req.set_tensor(name, fixed[name])
                elif name.startswith("kvtool_past."):
                    req.set_tensor(name, empty_t)
                elif name == EMBEDS and i:  # (never: split_layers rewires it; a graph that reads it by shape)
                    req.set_tensor(name, prev)
            out = req.get_compiled_model().output(0)
            prev = ov.Tensor(out.get_element_type(), ov.Shape([1, 1, hidden]))
            req.set_output_tensor(0, prev)
        runner.head_req.set_tensor(HIDDEN, prev)
        self.head_req = runner.head_req
        self.keep = (empty_t, fixed)  # alive as long as the requests read them

    def logits(self) -> np.ndarray:
        """The head's last-position logits [V] after the chain ran (a copy)."""
        return self.head_req.get_output_tensor(0).data[0, -1].copy()


def layer_major_prefill(runner: LayerRunner, kv, hidden: np.ndarray, pos: np.ndarray, chunk: int) -> np.ndarray:
    """The layer-major exact prefill (module docstring) of the prompt rows ``hidden`` [T, hidden] (float32, written
    over: each layer's output replaces its input, chunk by chunk) at positions ``pos`` ([1, T] or [3, 1, T]) into
    the empty stores of ``kv`` (``openvino_packed._PackedKV``), ``chunk`` tokens per call (> 0). Layer ``i``'s
    exact buffer is allocated (``kv.begin_prefill(T, [i])``), filled by its op chunk by chunk, appended to its
    store and freed (``kv.end_prefill()``) before layer ``i + 1`` starts. Returns the last position's logits [V];
    ``kv`` advanced by T. On an error every buffer is dropped and the error raised."""
    t, last = hidden.shape[0], len(runner.reqs) - 1
    try:
        for i in range(len(runner.reqs)):
            kv.begin_prefill(t, [i])
            for s in range(0, t, chunk):
                e = min(s + chunk, t)
                k, v, _ = kv.past(i)
                hidden[s:e] = runner.layer(i, hidden[None, s:e], np.ascontiguousarray(pos[..., s:e]), k, v)[0]
                if i == last and e < t:  # dead: only the last position goes on (to the head)
                    drop_rows(hidden, s, e)
            runner.release(i)  # the layer's chunk-sized intermediates freed before its store grows
            kv.end_prefill()
    except BaseException:
        for layer in kv.layers:
            layer.prefill = None
        raise
    kv.advance(t)
    return runner.head(hidden[None, -1:])


MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def drop_rows(a: np.ndarray, start: int, end: int) -> int:
    """Give the pages that lie wholly inside rows [start, end) of the C-contiguous array ``a`` back to the OS
    (``madvise(MADV_DONTNEED)``, Linux): their contents read as zeros afterwards, the array stays valid, and no
    byte outside those rows changes (a page shared with another row is kept). For rows that will not be read
    again: the layer-major prefill's hidden states in the last layer, whose inputs die chunk by chunk while that
    layer's exact K/V buffer fills (the prefill's peak is then one layer earlier: docs/BENCHMARKS.md, "Prefill
    memory"). Returns the bytes dropped; 0 (nothing done) where madvise is not there."""
    import mmap

    if not a.flags.c_contiguous or end <= start:
        return 0
    row = a.strides[0]
    lo, hi = a.ctypes.data + start * row, a.ctypes.data + end * row
    page = mmap.PAGESIZE
    lo, hi = -(-lo // page) * page, hi // page * page
    if hi <= lo:
        return 0
    madvise = _madvise()
    if madvise is None or madvise(lo, hi - lo, MADV_DONTNEED) != 0:
        return 0
    return hi - lo


@functools.cache
def _madvise():
    """libc's ``madvise`` (loaded once per process), or None where it is not there."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn
