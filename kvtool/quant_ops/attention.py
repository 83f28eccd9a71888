"""Decode attention straight from a ``QuantizedKVStore``'s packed codes (the fused native kernel), and its
portable fallback.

``decode_attention(q, store)`` computes ``softmax(q K^T * scale) V`` for one decode step of one layer:

    q      [B, Hq, D] float (numpy or CPU torch); Hq a multiple of the store's kv heads H (GQA: query head
           j reads kv head j // (Hq / H), as transformers' ``repeat_kv``)
    store  a packed ``QuantizedKVStore`` holding N >= 1 tokens of K and V ``[B, H, N, D]``
    extra  optional ``(k_x, v_x)`` ``[B, H, X, D]`` float16/float32: X exact tokens after the store's N, in
           the same softmax (the current step's own K/V, which DESIGN.md's semantics attend to exactly before
           they are stored compressed; the runtime's packed OpenVINO engine passes them)
    ->     [B, Hq, D] float32 (numpy, or torch for torch q)

The native kernel (``_native.cpp``, hand-written) never materialises K or V: it reads the packed codes and
their per-group (delta, min) and the fp16 residual tokens, folding the scales in (KIVI's insight):

- per-channel groups of g tokens (K): ``q . k_n = sum_d (q_d delta_gd) c_nd + sum_d q_d min_gd`` — q is
  scaled by the group's delta once per g tokens, and ``q . min_g`` is one constant per group;
- per-token groups (V): ``sum_n p_n (delta_n c_n + min_n) = sum_n (p_n delta_n) c_n + sum_n p_n min_n`` —
  the token's delta folds into its attention weight; per-token K and per-channel V fold the same way.

Arithmetic is float32 (scores, a vectorised exp with relative error < 6e-7, accumulations); the tests bound
its difference from a float64 reference by the rounding analysis written there. Threads (std::thread, spawned
per call when the step is large enough; no workers spinning between layers) run over (batch row, kv head)
with all its query heads, so a kv head's codes are unpacked once per step.

Runs natively when ``native.available()``, both sides are per-channel-g / per-token groups or unquantized
(bits 16, fp16 scheme), in ``packed`` mode, on numpy or CPU torch float16/float32. Otherwise (uniform, or<s>,
g-CN, simulate mode, CUDA, no build) the portable path dequantizes the store and runs the same softmax in
numpy float32 — ``attention_path(store)`` says which and why. It reads the store through its public members
(``format``, ``side_layout``); it does not own the store's layout (``store``, ``packing``) or know about models.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from kvtool.errors import InputError
from kvtool.quant_ops import native
from kvtool.quant_ops.affine import is_torch
from kvtool.quant_ops.granularity import PerChannel


def _np(x):
    if x is None:
        return None
    return x.detach().numpy() if is_torch(x) else x


def attention_path(store) -> tuple[str, str]:
    """``("native" | "portable", reason)`` for ``decode_attention`` on this store."""
    if not native.available():
        return "portable", native.reason()
    if store.mode != "packed":
        return "portable", f"store mode {store.mode!r}: the fused kernel reads packed stores"
    fmt = store.format
    if fmt is None:
        return "portable", "the store is empty"
    if fmt.device != "cpu" or str(fmt.dtype).split(".")[-1] not in ("float16", "float32"):
        return "portable", f"{fmt.dtype} on {fmt.device}: the fused kernel takes CPU float16/float32"
    for which in ("k", "v"):
        lay = store.side_layout(which)
        if lay.simulate:
            return "portable", "simulate mode"
        if lay.kind not in ("grid", "dense"):
            return "portable", (f"{which.upper()} of scheme {str(store.spec)!r} has statistics spanning the token "
                                f"axis (uniform / or<s> / g-CN): no fused kernel")
    return "native", native.reason()


@functools.lru_cache(maxsize=64)
def _segments(block: tuple[int, ...], flat: bool, h: int, d: int, sh: int, sg: int) -> tuple:
    """Per-token params -> per kv head, the runs of D sharing one (delta, min): int64 [H, S, 3] of
    (d0, d1, offset of the head's param column, without batch and token terms) and int64 [H] counts.
    ``sh`` / ``sg``: the params' strides (elements) over heads and groups. Cached: the same every step."""
    runs = []
    for hi in range(h):
        cur, row = None, []
        for di in range(d):
            if flat:
                key = (0, (hi * d + di) // block[3])
            else:
                key = (hi // block[1], di // block[3])
            if key != cur:
                row.append([di, di + 1, key[0] * sh + key[1] * sg])
                cur = key
            else:
                row[-1][1] = di + 1
        runs.append(row)
    width = max(len(r) for r in runs)
    seg = np.zeros((h, width, 3), np.int64)
    for hi, r in enumerate(runs):
        seg[hi, :len(r)] = r
    return seg, np.array([len(r) for r in runs], np.int64)


def _side_tuple(lay) -> tuple:
    """The 13-tuple ``_native.decode_attention`` reads for one side (see ``_native.cpp``), from the store's
    ``SideLayout``."""
    if lay.kind == "dense":
        return (2, 16, 0, 1, None, None, None, 0, 0, 0, None, None, _np(lay.dense))
    resid = _np(lay.residual)
    if lay.n_quantized == 0:
        return (2, lay.bits, 0, 1, None, None, None, 0, 0, 0, None, None, resid)
    b, h, d = lay.head_shape
    codes = _np(lay.codes)
    delta, mn = _np(lay.delta), _np(lay.mn)
    ps = tuple(s // delta.itemsize for s in delta.strides)
    if lay.flat:  # [B, 1, rows, H*D] -> [B, H, rows, D] (a strided view)
        codes = codes.reshape(b, codes.shape[2], h, d).transpose(0, 2, 1, 3)
    if isinstance(lay.granularity, PerChannel):
        return (0, lay.bits, lay.n_quantized, lay.token_block, codes, delta, mn, ps[0], ps[1], ps[2], None, None,
                resid)
    seg, nseg = _segments(lay.block_size, lay.flat, h, d, ps[1], ps[3])
    return (1, lay.bits, lay.n_quantized, 1, codes, delta, mn, ps[0], 0, ps[2], seg, nseg, resid)


def _threads(threads: int | None) -> int:
    if threads is not None:
        return max(1, int(threads))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def sdpa_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Plain decode SDPA in float32: q [B, Hq, D], k / v [B, H, N, D] -> [B, Hq, D] (the portable path)."""
    b, hq, d = q.shape
    rep = hq // k.shape[1]
    qg = q.reshape(b, k.shape[1], rep, d).astype(np.float32)
    s = np.einsum("bhrd,bhnd->bhrn", qg, k.astype(np.float32, copy=False)) * np.float32(scale)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.einsum("bhrn,bhnd->bhrd", s, v.astype(np.float32, copy=False)).reshape(b, hq, d)


def _check_extra(extra, b: int, h: int, d: int) -> tuple:
    if extra is None:
        return None, None
    if len(extra) != 2:
        raise InputError(f"decode_attention extra: expected a pair (k_x, v_x), got {len(extra)} items")
    kx, vx = (np.ascontiguousarray(_np(x)) for x in extra)
    for name, x in (("k_x", kx), ("v_x", vx)):
        if x.ndim != 4 or (x.shape[0], x.shape[1], x.shape[3]) != (b, h, d) or x.dtype not in (np.float16,
                                                                                              np.float32):
            raise InputError(f"decode_attention extra {name} {tuple(x.shape)} {x.dtype}: expected [B={b}, "
                             f"H={h}, X, D={d}] float16/float32")
    if kx.shape[2] != vx.shape[2]:
        raise InputError(f"decode_attention extra: k_x holds {kx.shape[2]} tokens, v_x {vx.shape[2]}")
    return kx, vx


def native_decode(q: np.ndarray, store, scale: float, threads: int, kx=None, vx=None,
                  out: np.ndarray | None = None) -> np.ndarray:
    """The native kernel without ``decode_attention``'s checks, for a caller that has checked once that
    ``attention_path(store)`` is native and that q (C-contiguous float32 [B, Hq, D]) and the extra tokens
    (C-contiguous [B, H, X, D] float16/32, or None) match the store: the runtime's per-layer op. ``out``: a
    C-contiguous float32 array of q's shape to write (and return) instead of a new one."""
    if out is None:
        out = np.empty(q.shape, np.float32)
    ks, vs = _side_tuple(store.side_layout("k")), _side_tuple(store.side_layout("v"))
    native._load()[0].decode_attention(q, out, ks, vs, scale, threads, kx, vx)
    return out


def decode_attention(q, store, scale: float | None = None, threads: int | None = None, extra=None):
    """One decode step's attention output ``[B, Hq, D]`` float32 from ``store`` (see the module docstring),
    over its N tokens plus, with ``extra=(k_x, v_x)``, X exact tokens after them.

    ``scale`` defaults to ``1/sqrt(D)``; ``threads`` to the CPUs this process may use. Raises InputError for
    a q or extra tokens that do not match the store (rank, B, D, Hq not a multiple of H) or an empty store."""
    if store.n_tokens == 0:
        raise InputError("decode_attention: the store is empty; append tokens first")
    qn = _np(q)
    (bk, hk, dk), (_, hv, dv) = store.format.k, store.format.v
    if qn.ndim != 3 or qn.shape[0] != bk or qn.shape[2] != dk or qn.shape[1] % hk or dv != dk or hv != hk:
        raise InputError(f"decode_attention q {tuple(qn.shape)}: expected [B={bk}, Hq (a multiple of H={hk}), "
                         f"D={dk}] with K and V of one head dim")
    kx, vx = _check_extra(extra, bk, hk, dk)
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    path, _ = attention_path(store)
    if path == "native":
        out = native_decode(np.ascontiguousarray(qn, dtype=np.float32), store, scale, _threads(threads), kx, vx)
    else:
        k, v = store.dequantize()
        k, v = _np(k.cpu() if is_torch(k) else k), _np(v.cpu() if is_torch(v) else v)
        if kx is not None:
            k = np.concatenate([k.astype(np.float32, copy=False), kx.astype(np.float32, copy=False)], axis=2)
            v = np.concatenate([v.astype(np.float32, copy=False), vx.astype(np.float32, copy=False)], axis=2)
        out = sdpa_reference(qn, k, v, scale)
    if is_torch(q):
        import torch

        return torch.from_numpy(out)
    return out
