"""Where the packed engine's chunked prefill computes each chunk's attention to the exact earlier prompt tokens
(``OpenVINOPackedEngine(prefix_attention=...)``; the op's prefill case (p) in ``openvino_packed``):

- ``"graph"``: each layer's exact prompt K/V so far (the token-major f16/f32 prefill buffer) is fed as the
  graph's past; the graph converts it to float32, concatenates it with the chunk's K/V and runs its SDPA with a
  [T, P+T] mask — per layer and chunk, float32 copies of the whole past (the 1,064 MiB peak at 8k tokens in
  docs/BENCHMARKS.md);
- ``"op"``: the graph is fed an empty past (its SDPA sees only the chunk: no float32 copy of the past, no big
  mask), and the layer's ``PackedKVAttention`` op computes the chunk's attention itself, from its own layer's
  buffer plus the chunk, with ``quant_ops.prefix.prefix_attention`` (the native multi-query kernel, or its numpy
  fallback, named in ``info()``), returns it as the op's output, then writes the chunk into the buffer. The
  first chunk (no past yet) is the chunk's causal attention over itself (a one-call prefill's): the kernel over
  an empty past (``causal_attention``), or, where the SDPA is kept, the SDPA's output as it is.

The graph's SDPA (``removes_sdpa``): with ``"op"`` the graph is edited without it (``openvino_packed._packed_lm``):
its only use there was the first chunk's / a one-call prefill's causal attention over the call's own tokens
(the op's cases (a) and (p) with no earlier tokens); on every decode step and every later chunk the op
discarded it (~0.8 ms per decode token and ~0.5 s of a 2k prefill on the bench model: docs/BENCHMARKS.md,
"h-sdpa"). The op is then fed the SDPA's inputs (q, k_new, v_new; no sdpa_out) and computes those cases itself
(``causal_attention``: ``quant_ops.prefix`` over an empty past, native or its numpy path), its output in q's
element type (the SDPA's). The graph's mask subgraph then feeds nothing and goes with it; the past Parameters
stay graph inputs (fed empty) though no op reads them. ``KVTOOL_KEEP_SDPA=1`` keeps the SDPA under ``"op"`` (the
op then takes its output for those cases, as before: A/B comparisons); ``"graph"`` always keeps it (it attends
to the exact past fed as the graph's input). ``info()["graph_sdpa"]`` says "removed" or "kept".

Both compute the same attention (the exact prompt, one softmax per query over the P earlier tokens and the
chunk's tokens up to itself; DESIGN.md's full-precision prefill); they differ in summation order only. The op
reads only its own layer's buffer, so it works whatever order the layers' chunks run in. Default (None):
``"op"`` where the native kernel is built (as fast as the graph's SDPA, less memory: docs/BENCHMARKS.md), else
``"graph"`` (the numpy fallback costs ~3x the prefill's CPU). This module holds no state.
"""

from __future__ import annotations

import os

import numpy as np

from kvtool.errors import InputError

PREFIX_MODES = ("graph", "op")
KEEP_SDPA_ENV = "KVTOOL_KEEP_SDPA"
PORTABLE_QUERY_BLOCK = 1024  # causal_attention's query block on the numpy path


def removes_sdpa(mode: str) -> bool:
    """Whether the LM graph is edited without its SDPA for prefix mode ``mode`` (module docstring): "op", unless
    ``KVTOOL_KEEP_SDPA=1`` (read where the graph is edited: at load, and where ``packed_order`` switches order)."""
    return mode == "op" and os.environ.get(KEEP_SDPA_ENV) != "1"


def resolve(value: str | None) -> tuple[str, str]:
    """(mode, why) for the engine option ``prefix_attention`` (None: the default rule, module docstring).
    InputError naming the option for anything but None, "graph" or "op"."""
    from kvtool.quant_ops import prefix

    if value is not None and value not in PREFIX_MODES:
        raise InputError(f"prefix_attention: expected graph or op, got {value!r}")
    kernel, why = prefix.path()
    if value is None:
        value = "op" if kernel == "native" else "graph"
        return value, f"default: {why}" if value == "op" else f"default: no native prefix kernel ({why})"
    return value, "given" if value == "graph" else f"given: {why}"


def chunk_attention(layer, q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray,
                    dst: np.ndarray | None = None) -> np.ndarray:
    """The chunk's exact attention for ``layer`` (an ``openvino_packed._Layer`` with a prefill buffer under way):
    queries ``q`` [1, Hq, T, D] over the buffer's first n tokens ``[n, H, D]`` plus ``k_new`` / ``v_new``
    [1, H, T, D] (causal) -> [1, Hq, T, D] float32, written into ``dst`` (the op's float32 output) when given.
    Records the kernel's scratch in ``layer.scratch_peak`` and counts the call in ``layer.prefix_calls``."""
    kb, vb, n = layer.prefill
    out = _attend(layer, q, kb[:n], vb[:n], k_new, v_new, dst)
    layer.prefix_calls += 1
    return out


def causal_attention(layer, q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray,
                     dst: np.ndarray | None = None) -> np.ndarray:
    """What the removed SDPA computed (module docstring): the causal attention of the call's T queries ``q``
    [1, Hq, T, D] over its own ``k_new`` / ``v_new`` [1, H, T, D] (no earlier tokens) -> [1, Hq, T, D] float32,
    into ``dst`` when given. Counts the call in ``layer.causal_calls``."""
    from kvtool.quant_ops import prefix

    h, t, d = k_new.shape[1], k_new.shape[2], k_new.shape[3]
    layer.causal_calls += 1
    if prefix.path()[0] == "native" or t <= PORTABLE_QUERY_BLOCK:
        empty = np.empty((0, h, d), k_new.dtype if k_new.dtype in (np.float16, np.float32) else np.float32)
        return _attend(layer, q, empty, empty, k_new, v_new, dst)
    # the numpy path holds a [H, Hq/H * T, T] float32 score block for T new tokens: query blocks instead, each
    # over the tokens before it as its past (token-major views) plus itself
    out = np.empty(q.shape, np.float32) if dst is None else dst.reshape(q.shape)
    for s in range(0, t, PORTABLE_QUERY_BLOCK):
        e = min(s + PORTABLE_QUERY_BLOCK, t)
        kp, vp = k_new[0, :, :s].transpose(1, 0, 2), v_new[0, :, :s].transpose(1, 0, 2)
        out[:, :, s:e] = _attend(layer, q[:, :, s:e], kp, vp, k_new[:, :, s:e], v_new[:, :, s:e], None)
    return out


def _attend(layer, q, k_past, v_past, k_new, v_new, dst) -> np.ndarray:
    """``quant_ops.prefix.prefix_attention`` for ``layer``, recording its scratch in ``layer.scratch_peak``."""
    from kvtool.quant_ops import prefix

    out = prefix.prefix_attention(q, k_past, v_past, k_new, v_new, layer.scale, layer.threads,
                                  out=None if dst is None else dst.reshape(q.shape))
    _, hq, t, d = q.shape
    # rows per task: at most KV_PREFIX_ROWS (512) of _native_prefix.h; per-thread scratch ~ (2 rows + 2 * 64 keys) x
    # D + rows x 64 floats
    rows = min(512, t * (hq // k_new.shape[1]))
    layer.scratch_peak = max(layer.scratch_peak, layer.threads * 4 * ((2 * rows + 128) * d + 64 * rows))
    return out


def info(engine) -> dict:
    """``info()`` keys: ``prefix_attention`` ("graph" | "op"), why, the kernel that ran (the op's calls over an
    earlier chunk), ``graph_sdpa`` ("removed" | "kept", ``removes_sdpa``) and ``graph_sdpa_op_calls`` (the op's
    calls that computed what the removed SDPA did: a prefill's first chunk, or a prefill in one call)."""
    from kvtool.quant_ops import prefix

    mode, why = engine.prefix_attention
    calls = sum(layer.prefix_calls for layer in engine.layers)
    kernel = prefix.path()[0] if mode == "op" else "openvino sdpa (graph)"
    kept = not engine.layers or engine.layers[0].sdpa
    return {"prefix_attention": mode, "prefix_attention_reason": why, "prefix_attention_kernel": kernel,
            "prefix_attention_op_calls": calls, "graph_sdpa": "kept" if kept else "removed",
            "graph_sdpa_op_calls": sum(layer.causal_calls for layer in engine.layers)}
