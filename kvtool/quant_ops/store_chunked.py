"""Append a token-major ``[T, H, D]`` prompt to a ``QuantizedKVStore`` without a head-major copy of all of it.

A runtime's exact prefill buffer is token-major (``[T, H, D]``, the graph's past layout); the store takes
head-major ``[B, H, T, D]``. ``append_token_major`` appends such a buffer in token chunks, each copied
head-major (``chunk x H x D`` values, a few MiB) instead of one ``T x H x D`` copy, and the store ends holding
exactly what one ``store.append`` of the whole buffer holds: the same codes, group params, residual and buffer
capacities (tests/quant_ops/test_store_chunked.py checks every scheme family at 2/3/4/8 bits). Per side:

- per-token groups, and per-channel groups of g tokens (``_GridSide``): each group is quantized on its own and
  the codes are token tiles of P tokens, so chunks of a multiple of ``lcm(flush, P)`` tokens (``flush``: g, or
  the residual window R of a per-channel side) leave no partial group or tile between chunks; a ragged last
  chunk leaves its remainder in the residual exactly as one append would. A per-token side with a sliding
  window keeps its newest R tokens exact as they pass (each chunk copies the R waiting ones: O(R)).
  The growable buffers are sized once to what one append holds (``_Grow.hint``), so no chunk reallocates;
- an unquantized side (``_DenseSide``, bits 16 / fp16): chunks of any size into the buffer sized once;
- statistics spanning the token axis (uniform, ``or<s>``, g-CN: ``_BlockSide``): the first append is ONE block
  whose statistics span every token, which cannot be split, so such a side takes the one-shot head-major copy
  (its own side only; the other side still goes in chunks);
- simulate mode, torch tensors: ``store.append`` of one head-major copy (what the caller did before).

Does not: change what the store holds or when it quantizes, or take a batch (B = 1: a runtime's prefill).
"""

from __future__ import annotations

import math

import numpy as np

CHUNK = 512  # tokens per head-major copy (rounded up to a side's alignment): 1 MiB per side at 8 x 128 f16


def _head_major(x: np.ndarray) -> np.ndarray:
    """``[T, H, D]`` -> a contiguous ``[1, H, T, D]`` copy."""
    return np.ascontiguousarray(x.transpose(1, 0, 2))[None]


def _plan(side, t: int, chunk: int) -> tuple[int, list] | None:
    """(tokens per chunk, [(grow buffer, capacity hint)]) for appending ``t`` tokens to ``side`` in chunks, or
    None where the side must take them in one append (statistics spanning the tokens, simulate)."""
    from kvtool.quant_ops.packing import packed_rows
    from kvtool.quant_ops.store import _DenseSide, _GridSide

    if isinstance(side, _DenseSide):
        if side.simulate:
            return None
        empty = side.n == 0 and side.data.max_tokens is None  # one append allocates max(t, 16) (``_Grow``)
        return chunk, [(side.data, max(t, 16))] if empty else []
    if not isinstance(side, _GridSide):
        return None
    align = math.lcm(side.flush, side.p)
    step = -(-chunk // align) * align
    if side.n:  # not empty: no sizes to foresee (the buffers grow as in any append)
        return step, []
    nq = max(t - side.slide, 0) if side.slide else t // side.flush * side.flush
    hints = []
    if nq:
        for g, cap in ((side.codes, packed_rows(nq, side.bits)), (side.delta, nq // side.tb),
                       (side.mn, nq // side.tb)):
            if g.max_tokens is None:
                hints.append((g, cap))
    return step, hints


def append_token_major(store, k: np.ndarray, v: np.ndarray, chunk: int = CHUNK) -> None:
    """``store.append`` of ``k, v`` given token-major ``[T, H, D]`` (numpy, e.g. views of a prefill buffer; not
    written, not kept): appended in head-major chunks of about ``chunk`` tokens where a side's groups allow it,
    else in one head-major copy (module docstring). The store ends as after ``store.append(k.transpose(1, 0,
    2)[None], v.transpose(1, 0, 2)[None])``. InputError as ``store.append`` for a bad dtype / shape."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: expected a positive number of tokens")
    kv, vv = k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None]  # views: the store's checks only
    if store.mode != "packed" or not isinstance(k, np.ndarray) or not isinstance(v, np.ndarray):
        store.append(_head_major(k), _head_major(v))
        return
    store._check(kv, vv)
    t = k.shape[0]
    if t == 0:
        return
    for side, x in ((store._k, k), (store._v, v)):
        plan = _plan(side, t, chunk)
        if plan is None:
            side.append(_head_major(x))
            continue
        step, hints = plan
        for g, cap in hints:
            g.hint = cap
        try:
            for s in range(0, t, step):
                side.append(_head_major(x[s:s + step]))
        finally:
            for g, _ in hints:
                g.hint = None
