"""``store_chunked.append_token_major`` (a token-major prompt appended in head-major chunks) against one
``store.append`` of the whole prompt: the same codes, params, residual, capacities, and the same dequantized
cache, for every scheme family at 2/3/4/8 bits (K and V bits apart), ragged lengths, residual windows."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.quant_ops import QuantizedKVStore
from kvtool.quant_ops.store_chunked import append_token_major

SCHEMES = ["g-KC16VT16", "g-KT16VC16", "g-C16", "g-CN", "g-T16", "uniform", "or2", "g-KCNVT16", "fp16"]
BITS = [(2, 2), (3, 4), (4, 8), (8, 3)]


def _arrays(side):
    """Every held array of a store side (what a kernel or ``dequantize`` reads), as numpy copies."""
    out = {}
    for name in ("data", "codes", "delta", "mn", "resid"):
        g = getattr(side, name, None)
        if g is not None and g.buf is not None:
            out[name] = (np.array(g.buf[:, :, :g.n]), g.buf.shape[2])
    for i, (s, blk) in enumerate(getattr(side, "blocks", [])):
        out[f"block{i}"] = (s, np.array(blk.qdata), np.array(blk.delta), np.array(blk.mn))
    return out


def _same(a, b) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            if isinstance(x, np.ndarray):
                assert x.dtype == y.dtype and x.shape == y.shape, key
                np.testing.assert_array_equal(x, y, err_msg=key)
            else:
                assert x == y, key


def _pair(scheme, kb, vb, t, residual=None, dtype=np.float16, seed=0, chunk=48):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((t, 2, 32)).astype(dtype)
    v = rng.standard_normal((t, 2, 32)).astype(dtype)
    k[:, :, 3] *= 20  # an outlier channel
    one = QuantizedKVStore(scheme, kb, vb, residual=residual)
    one.append(np.ascontiguousarray(k.transpose(1, 0, 2))[None], np.ascontiguousarray(v.transpose(1, 0, 2))[None])
    chunked = QuantizedKVStore(scheme, kb, vb, residual=residual)
    append_token_major(chunked, k, v, chunk=chunk)
    return one, chunked, k, v


def _check(one, chunked) -> None:
    for a, b in ((one._k, chunked._k), (one._v, chunked._v)):
        _same(_arrays(a), _arrays(b))
        assert (a.nq, a.n) == (b.nq, b.n)
    assert one.nbytes == chunked.nbytes and one.capacity_nbytes == chunked.capacity_nbytes
    assert one.quantized_counts == chunked.quantized_counts
    for x, y in zip(one.dequantize(), chunked.dequantize(), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("t", [1, 37, 160, 203])
def test_chunked_equals_one_append(scheme, bits, t):
    one, chunked, _, _ = _pair(scheme, *bits, t)
    _check(one, chunked)


@pytest.mark.parametrize("scheme,residual", [("g-KC16VT16", 32), ("g-T16", 24), ("g-C16", 48), ("uniform", 32),
                                             ("g-KT16VC16", 16)])
@pytest.mark.parametrize("t", [5, 70, 203])
def test_chunked_with_residual_window(scheme, residual, t):
    one, chunked, _, _ = _pair(scheme, 2, 3, t, residual=residual, chunk=40)
    _check(one, chunked)


@pytest.mark.parametrize("scheme", ["g-KC16VT16", "g-T16", "uniform"])
def test_decode_after_chunked_prefill_matches(scheme):
    """The stores stay equal through later one-token appends (the decode steps after a prefill), f32 too."""
    one, chunked, _, _ = _pair(scheme, 2, 4, 131, dtype=np.float32, chunk=32)
    rng = np.random.default_rng(1)
    for _ in range(20):
        k, v = (rng.standard_normal((1, 2, 1, 32)).astype(np.float32) for _ in range(2))
        one.append(k, v)
        chunked.append(k, v)
    _check(one, chunked)


def test_chunks_are_really_taken():
    """A grid side gets several appends (not one head-major copy of all): the plan's step is the aligned chunk."""
    from kvtool.quant_ops.store_chunked import _plan

    store = QuantizedKVStore("g-KC16VT16", 2, 2)
    step, hints = _plan(store._k, 203, 48)
    assert step == 48 and len(hints) == 3  # lcm(16, 2-bit tile) divides 48; codes / delta / mn sized once
    assert _plan(QuantizedKVStore("uniform", 2, 2)._k, 203, 48) is None  # one block: statistics span all tokens
    store = QuantizedKVStore("g-KC128VT128", 2, 2)
    assert _plan(store._k, 8190, 500)[0] == 512


def test_empty_and_bad_input():
    store = QuantizedKVStore("g-KC16VT16", 2, 2)
    append_token_major(store, np.zeros((0, 2, 32), np.float16), np.zeros((0, 2, 32), np.float16))
    assert store.n_tokens == 0
    with pytest.raises(ValueError, match="chunk=0"):
        append_token_major(store, np.zeros((4, 2, 32), np.float16), np.zeros((4, 2, 32), np.float16), chunk=0)
    from kvtool.errors import InputError

    with pytest.raises(InputError):
        append_token_major(store, np.zeros((4, 2, 32), np.int32), np.zeros((4, 2, 32), np.int32))
