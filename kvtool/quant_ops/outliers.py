"""Outlier split for the study's ``or<s>`` scheme (its code base's definition).

Per tensor (one batch row: all heads, tokens and dims of one layer's K or V), the ``k = int(n * s / 200)``
smallest and as many largest values are kept exactly as a sparse part (flat indices + values in the input
dtype; storage is counted at 32 bits per index); the rest is quantized uniformly with the min/max of the remaining values. The dense codes cover
every position (outlier positions hold a clipped code that dequantization overwrites), so storage is
``bits`` per value plus 48 bits per outlier. Selection is by value (``torch.kthvalue`` /
``numpy.partition`` thresholds), so numpy and torch keep the same positions.

This module only finds outliers and scatters them back; quantization is ``affine``'s.
"""

from __future__ import annotations

import numpy as np

from kvtool.quant_ops.affine import Array, is_torch


def n_outliers_per_side(n: int, pct: float) -> int:
    return int(n * pct / 200)


def split_outliers(x2: Array, pct: float) -> tuple[Array, Array, Array, Array]:
    """For rows ``x2`` [B, n]: ``(idx [M] int64 flat positions into x2, vals [M], dense_min [B],
    dense_max [B])``. The thresholds are the (k+1)-th smallest and largest values of each row; values
    strictly beyond them are the outliers, so ties at a threshold stay in the dense part and both backends
    select the same set (fewer than k per side only when values tie at the threshold)."""
    b, n = x2.shape
    k = n_outliers_per_side(n, pct)
    if is_torch(x2):
        import torch

        lo = torch.stack([_kth_smallest(r, k + 1) for r in x2])
        hi = -torch.stack([_kth_smallest(-r, k + 1) for r in x2])
        mask = (x2 < lo[:, None]) | (x2 > hi[:, None])
        idx = torch.flatten(mask).nonzero().flatten()
        return idx, x2.reshape(-1)[idx], lo, hi
    part = np.partition(x2, [k, n - k - 1], axis=1)
    lo, hi = part[:, k], part[:, n - k - 1]
    mask = (x2 < lo[:, None]) | (x2 > hi[:, None])
    idx = np.flatnonzero(mask)
    return idx, x2.reshape(-1)[idx], lo, hi


def _kth_smallest(row, kth: int):
    """Exact ``kth`` smallest value of a 1-D torch tensor. For a small kth it first keeps only the values
    below a bound taken from a strided sample and checks that at least ``kth`` survived (else it falls back
    to the full ``torch.kthvalue``), which is ~10x faster than ``kthvalue`` over millions of values."""
    import torch

    n = row.numel()
    if n > 1 << 16 and kth * 8 < n:
        sample = row[:: max(1, n // (1 << 15))]
        rank = min(sample.numel(), max(1, int(sample.numel() * 2 * kth / n) + 16))
        bound = torch.kthvalue(sample, rank).values
        cand = row[row <= bound]
        if cand.numel() >= kth:
            return torch.kthvalue(cand, kth).values
    return torch.kthvalue(row, kth).values


def scatter_outliers(out2: Array, idx: Array, vals: Array) -> None:
    """Write the kept values back (in place) into ``out2`` [B, n], which must be a view of the output."""
    if idx.shape[0] == 0:
        return
    flat = out2.view(-1) if is_torch(out2) else np.reshape(out2, -1, copy=False)
    flat[idx.long() if is_torch(idx) else idx] = vals
