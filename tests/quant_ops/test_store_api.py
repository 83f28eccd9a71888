"""The store's public members (what the runtime caches and the fused attention read) and its simulate mode's
two variants (``keep_newest``, ``requantize=False``) against naive re-implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtool.errors import InputError
from kvtool.quant_ops import QuantizedKVStore, fake_quant_kv, parse_scheme
from kvtool.quant_ops.granularity import PerChannel, PerToken
from kvtool.quant_ops.store import StoreFormat
from tests.quant_ops.reference import outlier_kv


def _naive(k, v, scheme, steps, keep_newest=1, exact_steps=()):
    """Simulate written out: after each append (but those in ``exact_steps``) re-quantize all but the newest
    ``keep_newest`` tokens over them."""
    ck = cv = None
    for i, (a, b) in enumerate(steps):
        ck = k[:, :, a:b] if ck is None else np.concatenate([ck, k[:, :, a:b]], axis=2)
        cv = v[:, :, a:b] if cv is None else np.concatenate([cv, v[:, :, a:b]], axis=2)
        m = ck.shape[2] - keep_newest
        if i not in exact_steps and m >= 1:
            qk, qv = fake_quant_kv(ck[:, :, :m], cv[:, :, :m], scheme, 2, 2)
            ck = np.concatenate([qk, ck[:, :, m:]], axis=2)
            cv = np.concatenate([qv, cv[:, :, m:]], axis=2)
    return ck, cv


STEPS = [(0, 20)] + [(t, t + 1) for t in range(20, 30)]


@pytest.mark.parametrize("scheme", ["g-KC8VT16", "uniform", "or2"])
def test_keep_newest_zero_requantizes_everything_held(scheme):
    k, v = outlier_kv(b=1, h=2, n=30, d=16, seed=1, dtype=np.float32)
    store = QuantizedKVStore(parse_scheme(scheme), 2, 2, mode="simulate", keep_newest=0)
    for a, b in STEPS:
        store.append(k[:, :, a:b], v[:, :, a:b])
    kh, vh = store.dequantize()
    rk, rv = _naive(k, v, scheme, STEPS, keep_newest=0)
    np.testing.assert_array_equal(kh, rk)
    np.testing.assert_array_equal(vh, rv)
    assert np.abs(vh[:, :, -1] - v[:, :, -1]).max() > 1e-3  # even the newest token moved


def test_requantize_false_appends_exactly_once():
    k, v = outlier_kv(b=1, h=2, n=30, d=16, seed=2, dtype=np.float32)
    store = QuantizedKVStore("g-T16", 2, 2, mode="simulate")
    for i, (a, b) in enumerate(STEPS):
        store.append(k[:, :, a:b], v[:, :, a:b], requantize=i != 0)
        if i == 0:  # the full-precision prefill: held exactly
            np.testing.assert_array_equal(store.dequantize()[0], k[:, :, :20])
    rk, rv = _naive(k, v, "g-T16", STEPS, exact_steps=(0,))
    np.testing.assert_array_equal(store.dequantize()[0], rk)
    np.testing.assert_array_equal(store.dequantize()[1], rv)
    with pytest.raises(InputError, match="simulate mode only"):
        QuantizedKVStore("g-T16", 2, 2).append(k, v, requantize=False)


def test_simulate_store_keeps_its_cache_in_the_out_buffers():
    """Given out buffers, a simulate store holds its dense cache there (no second copy) and later appends land
    in them; the values equal a store that never saw buffers."""
    k, v = outlier_kv(b=1, h=2, n=30, d=16, seed=3, dtype=np.float32)
    store = QuantizedKVStore("g-KC8VT16", 2, 2, mode="simulate", keep_newest=0)
    ref = QuantizedKVStore("g-KC8VT16", 2, 2, mode="simulate", keep_newest=0)
    kb, vb = np.zeros((1, 2, 40, 16), np.float32), np.zeros((1, 2, 40, 16), np.float32)
    for a, b in STEPS:
        store.append(k[:, :, a:b], v[:, :, a:b])
        ref.append(k[:, :, a:b], v[:, :, a:b])
        ko, vo = store.dequantize(out=(kb, vb))
        rk, rv = ref.dequantize()
        np.testing.assert_array_equal(ko, rk)
        np.testing.assert_array_equal(vo, rv)
        np.testing.assert_array_equal(kb[:, :, :b], rk)  # written in place, before the views are taken
    assert np.shares_memory(store.side_layout("k").dense, kb) and np.shares_memory(store.side_layout("v").dense, vb)


def test_quantized_counts_format_and_layouts():
    k, v = outlier_kv(b=1, h=2, n=40, d=16, seed=4, dtype=np.float16)
    store = QuantizedKVStore("g-KC16VT16", 2, 4)
    assert store.format is None and store.quantized_counts == (0, 0)
    store.append(k[:, :, :37], v[:, :, :37])
    assert store.format == StoreFormat(False, np.dtype(np.float16), "cpu", (1, 2, 16), (1, 2, 16))
    assert store.quantized_counts == (32, 37)  # K: whole groups of 16 tokens; V: every token
    lk, lv = store.side_layout("k"), store.side_layout("v")
    assert (lk.kind, lk.granularity, lk.n_tokens, lk.n_quantized, lk.token_block) == ("grid", PerChannel(16), 37,
                                                                                      32, 16)
    assert (lv.kind, lv.granularity, lv.bits, lv.n_quantized, lv.token_block) == ("grid", PerToken(16), 4, 37, 1)
    np.testing.assert_array_equal(lk.residual, k[:, :, 32:37])  # the 5 tokens waiting for their group
    assert lv.residual is None and lk.delta.shape[2] == 2 and lv.delta.shape[2] == 37
    assert lk.codes.dtype == np.uint8 and lk.block_size == (1, 1, 16, 1) and not lk.flat
    with pytest.raises(InputError, match="'k' or 'v'"):
        store.side_layout("q")
    spanning = QuantizedKVStore("uniform", 2, 2)
    spanning.append(k, v)
    assert spanning.side_layout("k").kind == "spanning" and spanning.quantized_counts == (40, 40)
    sim = QuantizedKVStore("g-KC16VT16", 2, 2, mode="simulate")
    sim.append(torch.from_numpy(k), torch.from_numpy(v))
    lay = sim.side_layout("v")
    assert sim.quantized_counts == (0, 0) and lay.kind == "dense" and lay.simulate and lay.dense.shape[2] == 40
    assert sim.format.torch and sim.format.dtype == torch.float16
    fp = QuantizedKVStore("fp16")
    fp.append(k, v)
    assert fp.side_layout("k").kind == "dense" and not fp.side_layout("k").simulate
