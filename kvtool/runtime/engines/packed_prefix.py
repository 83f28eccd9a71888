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
  first chunk (no past yet) takes the graph's SDPA output as it is: with an empty past it is already the
  chunk's exact causal attention (a one-call prefill's), so the kernel runs on chunks 2.. only.

Both compute the same attention (the exact prompt, one softmax per query over the P earlier tokens and the
chunk's tokens up to itself; DESIGN.md's full-precision prefill); they differ in summation order only. The op
reads only its own layer's buffer, so it works whatever order the layers' chunks run in. Default (None):
``"op"`` where the native kernel is built (as fast as the graph's SDPA, less memory: docs/BENCHMARKS.md), else
``"graph"`` (the numpy fallback costs ~3x the prefill's CPU). This module holds no state.
"""

from __future__ import annotations

import numpy as np

from kvtool.errors import InputError

PREFIX_MODES = ("graph", "op")


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
    from kvtool.quant_ops import prefix

    kb, vb, n = layer.prefill
    out = prefix.prefix_attention(q, kb[:n], vb[:n], k_new, v_new, layer.scale, layer.threads,
                                  out=None if dst is None else dst.reshape(q.shape))
    _, hq, t, d = q.shape
    # rows per task: at most KV_PREFIX_ROWS (512) of _native_prefix.h; per-thread scratch ~ (2 rows + 2 * 64 keys) x
    # D + rows x 64 floats
    rows = min(512, t * (hq // k_new.shape[1]))
    layer.scratch_peak = max(layer.scratch_peak, layer.threads * 4 * ((2 * rows + 128) * d + 64 * rows))
    layer.prefix_calls += 1
    return out


def info(engine) -> dict:
    """``info()`` keys: ``prefix_attention`` ("graph" | "op"), why, and the kernel that ran (the op's calls)."""
    from kvtool.quant_ops import prefix

    mode, why = engine.prefix_attention
    calls = sum(layer.prefix_calls for layer in engine.layers)
    kernel = prefix.path()[0] if mode == "op" else "openvino sdpa (graph)"
    return {"prefix_attention": mode, "prefix_attention_reason": why, "prefix_attention_kernel": kernel,
            "prefix_attention_op_calls": calls}
