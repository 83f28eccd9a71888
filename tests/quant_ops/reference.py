"""A naive reference of DESIGN.md's quantizers, written from the contract with explicit loops over groups.

Independent of ``kvtool.quant_ops`` internals (no block sizes, no packing): it flattens the channel axis
head-major (c = h*D + d) and walks groups one by one. Same parameter storage rule as the contract: delta and
min are rounded to float16 for float16 input (float32 otherwise) before quantizing.
"""

from __future__ import annotations

import numpy as np


def _pdtype(x):
    return np.float16 if x.dtype == np.float16 else np.float32


def quant_group(vals: np.ndarray, bits: int, pdtype) -> np.ndarray:
    """Eq. (2) on one group (any shape); returns the dequantized values as float64."""
    v = vals.astype(np.float32)
    mn, mx = np.float32(v.min()), np.float32(v.max())
    delta = pdtype((mx - mn) / np.float32(2**bits - 1))
    mn_s = pdtype(mn)
    d32, m32 = np.float32(delta), np.float32(mn_s)
    q = np.zeros(v.shape, np.float32) if d32 == 0 else np.clip(np.rint((v - m32) / d32), 0, 2**bits - 1)
    return (q.astype(np.float32) * d32 + m32).astype(np.float64)


def ref_side(x: np.ndarray, axis: str, group: int | None, bits: int, outlier_pct: float = 0.0) -> np.ndarray:
    """Reference quantize-dequantize of one [B, H, N, D] side; returns the input dtype."""
    b, h, n, d = x.shape
    pd = _pdtype(x)
    flat = x.transpose(0, 2, 1, 3).reshape(b, n, h * d)  # [B, N, C], c = h*D + d
    out = flat.astype(np.float64).copy()
    for bi in range(b):
        if axis == "tensor":
            rows = flat[bi].astype(np.float32)
            if outlier_pct:
                k = int(rows.size * outlier_pct / 200)
                srt = np.sort(rows, axis=None)
                lo, hi = srt[k], srt[rows.size - k - 1]
                keep = (rows < lo) | (rows > hi)
                dense = rows.copy()
                dense[keep] = lo
                mn, mx = np.float32(lo), np.float32(hi)
                delta = pd((mx - mn) / np.float32(2**bits - 1))
                d32, m32 = np.float32(delta), np.float32(pd(mn))
                q = np.zeros_like(dense) if d32 == 0 else np.clip(np.rint((dense - m32) / d32), 0, 2**bits - 1)
                res = (q * d32 + m32).astype(np.float64)
                res[keep] = rows[keep]
                out[bi] = res
            else:
                out[bi] = quant_group(flat[bi], bits, pd)
        elif axis == "token":
            for t in range(n):
                for j in range(0, h * d, group):
                    out[bi, t, j:j + group] = quant_group(flat[bi, t, j:j + group], bits, pd)
        else:  # channel
            g = n if group is None else group
            nq = (n // g) * g if g else 0
            for c in range(h * d):
                for s in range(0, nq, g):
                    out[bi, s:s + g, c] = quant_group(flat[bi, s:s + g, c], bits, pd)
    return out.reshape(b, n, h, d).transpose(0, 2, 1, 3).astype(x.dtype)


def outlier_kv(b=1, h=4, n=40, d=16, seed=0, dtype=np.float32):
    """K with a few large channels and per-channel offsets, V plain normal."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((b, h, n, d)).astype(np.float32) + rng.standard_normal((1, h, 1, d)) * 2
    k[:, :, :, rng.choice(d, 2, replace=False)] *= 15.0
    v = rng.standard_normal((b, h, n, d)).astype(np.float32)
    return k.astype(dtype), v.astype(dtype)
