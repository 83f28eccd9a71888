"""Exact multi-query prefix attention: T new queries over P exact past tokens plus the T new tokens (causal),
in one softmax — the attention of one chunk of a chunked prefill, computed from a token-major K/V buffer.

    prefix_attention(q, k_past, v_past, k_new, v_new, scale, threads=None, out=None) -> out
    prefix_attention_numpy(...)      the portable reference path (numpy, key blocks, online softmax)
    path() -> (name, reason)         "native" (the C++ kernel, ``_native_prefix.h``) or "portable", and why

Shapes: ``q`` [1, Hq, T, D] float32 (any float dtype is converted); ``k_past`` / ``v_past`` [P, H, D] float16 or
float32, token-major (P may be 0); ``k_new`` / ``v_new`` [1, H, T, D] float16 or float32; Hq a multiple of H
(grouped-query attention: query head ``h * Hq/H + i`` reads kv head ``h``). Query ``t`` attends to the P past
tokens and to new tokens ``0..t``: ``softmax(q k^T * scale) v`` with every score in one softmax (the rule of
causal self-attention with a KV cache, as the graph's SDPA with a [T, P+T] mask computes it). Returns
[1, Hq, T, D] float32. ``ValueError`` naming the input for mismatched shapes.

The native kernel computes in float32 (FMA on the AVX2 path), key blocks of 64 loaded once per 128 to 512 query
rows (as many as leave two tasks per thread), an online softmax (running max and sum; its exp on 8 AVX2 lanes),
threads over (kv head, query block). The numpy path does the same
blocking at 1,024 keys with numpy's float32 matmul; it is ~3x slower inside the packed engine (docs/BENCHMARKS.md)
and is what runs where the extension is not built or ``KVTOOL_NATIVE=0`` — ``path()`` says which. This module
holds no state and does not decide when a prefill is chunked (``runtime.engines.openvino_packed`` does).
"""

from __future__ import annotations

import os

import numpy as np

from kvtool.quant_ops import native


def path() -> tuple[str, str]:
    """("native", "native C++ multi-query prefix kernel (<isa>)") where the extension is built and enabled, else
    ("portable", why)."""
    mod = native._load()[0]
    if mod is not None and hasattr(mod, "prefix_attention"):
        return "native", f"native C++ multi-query prefix kernel ({mod.isa()})"
    why = native.reason() if mod is None else "the built extension predates prefix_attention (rebuild it)"
    return "portable", f"numpy prefix attention: {why}"


def _check(q, k_past, v_past, k_new, v_new) -> tuple[int, int, int, int, int]:
    if q.ndim != 4 or q.shape[0] != 1:
        raise ValueError(f"prefix_attention: q must be [1, Hq, T, D], got {q.shape}")
    _, hq, t, d = q.shape
    if k_new.ndim != 4 or k_new.shape[0] != 1 or k_new.shape[2:] != (t, d) or v_new.shape != k_new.shape:
        raise ValueError(f"prefix_attention: k_new / v_new must be [1, H, {t}, {d}], got {k_new.shape} / "
                         f"{v_new.shape}")
    h = k_new.shape[1]
    if hq % h:
        raise ValueError(f"prefix_attention: {hq} query heads is not a multiple of {h} kv heads")
    if k_past.ndim != 3 or k_past.shape[1:] != (h, d) or v_past.shape != k_past.shape:
        raise ValueError(f"prefix_attention: k_past / v_past must be [P, {h}, {d}], got {k_past.shape} / "
                         f"{v_past.shape}")
    return hq, h, t, d, k_past.shape[0]


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _float(x: np.ndarray) -> np.ndarray:
    """float16 / float32 with a contiguous last axis (what the kernel reads), else a float32 copy."""
    if x.dtype in (np.float16, np.float32) and (x.shape[-1] <= 1 or x.strides[-1] == x.itemsize):
        return x
    return np.ascontiguousarray(x, dtype=np.float32)


def prefix_attention(q: np.ndarray, k_past: np.ndarray, v_past: np.ndarray, k_new: np.ndarray,
                     v_new: np.ndarray, scale: float, threads: int | None = None,
                     out: np.ndarray | None = None) -> np.ndarray:
    """The chunk's exact attention (module docstring) -> [1, Hq, T, D] float32, written into ``out`` when given
    (float32, that shape, last axis contiguous). Native where ``path()`` says so, else the numpy path."""
    hq, h, t, d, _ = _check(q, k_past, v_past, k_new, v_new)
    mod = native._load()[0]
    if mod is None or not hasattr(mod, "prefix_attention"):
        res = prefix_attention_numpy(q, k_past, v_past, k_new, v_new, scale)
        if out is None:
            return res
        out[...] = res
        return out
    if out is None or out.dtype != np.float32 or out.shape != (1, hq, t, d) or out.strides[-1] != 4:
        out = np.empty((1, hq, t, d), np.float32)
    qf = q if q.dtype == np.float32 and (d <= 1 or q.strides[-1] == 4) else np.ascontiguousarray(q, np.float32)
    mod.prefix_attention(qf, out, _float(k_past), _float(v_past), _float(k_new), _float(v_new), float(scale),
                         int(threads or _threads()))
    return out


def prefix_attention_numpy(q: np.ndarray, k_past: np.ndarray, v_past: np.ndarray, k_new: np.ndarray,
                           v_new: np.ndarray, scale: float, block: int = 1024) -> np.ndarray:
    """The portable path: float32 numpy, keys in blocks of ``block`` (past blocks converted one at a time, so
    no float32 copy of the whole past), online softmax over the blocks. -> [1, Hq, T, D] float32."""
    hq, h, t, d, p = _check(q, k_past, v_past, k_new, v_new)
    rep = hq // h
    qs = q[0].astype(np.float32).reshape(h, rep * t, d) * np.float32(scale)  # rows (i, t) of each kv head
    m = np.full((h, rep * t, 1), -np.inf, np.float32)
    l_sum = np.zeros((h, rep * t, 1), np.float32)
    acc = np.zeros((h, rep * t, d), np.float32)

    def update(s: np.ndarray, v: np.ndarray) -> None:
        nonlocal m
        mx = np.maximum(m, s.max(axis=-1, keepdims=True))
        c = np.exp(m - mx)
        e = np.exp(s - mx)
        acc[...] = acc * c + e @ v
        l_sum[...] = l_sum * c + e.sum(axis=-1, keepdims=True)
        m = mx

    for j in range(0, p, block):
        kb = k_past[j:j + block].astype(np.float32).transpose(1, 2, 0)  # [h, d, n]
        vb = v_past[j:j + block].astype(np.float32).transpose(1, 0, 2)  # [h, n, d]
        update(qs @ kb, vb)
    s = qs @ k_new[0].astype(np.float32).transpose(0, 2, 1)  # [h, rep*t, t]
    s.reshape(h, rep, t, t)[:, :, np.triu(np.ones((t, t), bool), 1)] = -np.inf
    update(s, v_new[0].astype(np.float32))
    return (acc / l_sum).reshape(1, hq, t, d)
