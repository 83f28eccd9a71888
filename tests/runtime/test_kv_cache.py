"""The runtime's KV caches against naive references on random K/V (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtool.quant_ops import QuantizedKVStore, fake_quant_kv
from kvtool.runtime.kv_cache import GraphKVCache, make_quant_cache
from kvtool.runtime.kvspec import make_kv_spec

H, D = 4, 32


def _chunks(rng, sizes, dtype=np.float32):
    return [(rng.standard_normal((1, H, t, D)).astype(dtype), rng.standard_normal((1, H, t, D)).astype(dtype))
            for t in sizes]


@pytest.mark.parametrize("token_major", [True, False])
def test_graph_cache_fp_returns_the_concatenated_past(token_major):
    rng = np.random.default_rng(0)
    kv = GraphKVCache(make_kv_spec("fp16"), 2, H, D, token_major=token_major)
    kv.reset(capacity=8)  # forces growth below
    seen_k, seen_v = [], []
    for k, v in _chunks(rng, [5, 1, 1, 7, 1]):
        for i in range(2):
            pk, pv = kv.past(i)
            if seen_k:
                ref_k, ref_v = np.concatenate(seen_k, 2), np.concatenate(seen_v, 2)
                if token_major:  # [N, H, D]
                    pk, pv = pk.transpose(1, 0, 2)[None], pv.transpose(1, 0, 2)[None]
                np.testing.assert_array_equal(pk, ref_k)
                np.testing.assert_array_equal(pv, ref_v)
            else:
                assert pk.shape[0 if token_major else 2] == 0
            kv.append(i, k, v)
        kv.advance(k.shape[2])
        seen_k.append(k)
        seen_v.append(v)
    assert kv.n_tokens == 15 and kv.nbytes == 2 * kv.fp16_nbytes == 2 * 2 * H * D * 15 * 4  # held in f32


@pytest.mark.parametrize("scheme,bits", [("g-KC128VT128", 2), ("g-T128", 4), ("uniform", 3), ("or2", 2)])
def test_graph_cache_packed_equals_a_fresh_store(scheme, bits):
    rng = np.random.default_rng(1)
    spec = make_kv_spec(scheme, bits, bits, "packed")
    kv = GraphKVCache(spec, 1, H, D, token_major=True)
    kv.reset(capacity=4)
    ref = QuantizedKVStore(scheme, k_bits=bits, v_bits=bits, mode="packed")
    for k, v in _chunks(rng, [150] + [1] * 12):
        if ref.n_tokens:
            rk, rv = ref.dequantize()
            pk, pv = kv.past(0)
            np.testing.assert_array_equal(pk.transpose(1, 0, 2)[None], rk)
            np.testing.assert_array_equal(pv.transpose(1, 0, 2)[None], rv)
        kv.append(0, k, v)
        kv.advance(k.shape[2])
        ref.append(k, v)
    assert kv.nbytes == ref.nbytes < kv.fp16_nbytes


def test_graph_cache_simulate_requantizes_the_whole_past_each_step():
    rng = np.random.default_rng(2)
    spec = make_kv_spec("uniform", 2, 2, "simulate")
    kv = GraphKVCache(spec, 1, H, D)
    cache_k = cache_v = None
    for k, v in _chunks(rng, [20, 1, 1, 1]):
        if cache_k is not None:  # naive: quantize the cache as it stands, attend to it, keep it quantized
            cache_k, cache_v = fake_quant_kv(cache_k, cache_v, "uniform", k_bits=2, v_bits=2)
            pk, pv = kv.past(0)
            np.testing.assert_allclose(pk, cache_k, rtol=0, atol=1e-6)
            np.testing.assert_allclose(pv, cache_v, rtol=0, atol=1e-6)
        kv.append(0, k, v)
        kv.advance(k.shape[2])
        cache_k = k if cache_k is None else np.concatenate([cache_k, k], 2)
        cache_v = v if cache_v is None else np.concatenate([cache_v, v], 2)


def test_torch_simulate_cache_quantizes_all_but_the_newest_token_every_pass():
    g = torch.Generator().manual_seed(0)
    cache = make_quant_cache(make_kv_spec("g-KC128VT128", 2, 2, "simulate"), num_layers=1)
    ref_k = ref_v = None
    raw_v = torch.zeros(1, H, 0, D)
    for t in [9, 1, 1, 1]:
        k, v = torch.randn(1, H, t, D, generator=g), torch.randn(1, H, t, D, generator=g)
        raw_v = torch.cat([raw_v, v], 2)
        out_k, out_v = cache.update(k, v, 0)
        # V (per-token groups) really is quantized; K (per-channel, 128-token groups) is still in its residual
        assert (out_v[:, :, :-1] - raw_v[:, :, :-1]).abs().max() > 1e-3
        ref_k = k if ref_k is None else torch.cat([ref_k, k], 2)
        ref_v = v if ref_v is None else torch.cat([ref_v, v], 2)
        qk, qv = fake_quant_kv(ref_k[:, :, :-1], ref_v[:, :, :-1], "g-KC128VT128", k_bits=2, v_bits=2)
        ref_k, ref_v = torch.cat([qk, ref_k[:, :, -1:]], 2), torch.cat([qv, ref_v[:, :, -1:]], 2)
        torch.testing.assert_close(out_k, ref_k, rtol=0, atol=1e-6)
        torch.testing.assert_close(out_v, ref_v, rtol=0, atol=1e-6)
    assert cache.get_seq_length() == 12


def test_torch_packed_cache_returns_the_stored_past_plus_the_exact_new_tokens():
    g = torch.Generator().manual_seed(1)
    cache = make_quant_cache(make_kv_spec("g-T128", 2, 2, "packed"), num_layers=1)
    store = QuantizedKVStore("g-T128", k_bits=2, v_bits=2, mode="packed")
    raw_k = torch.zeros(1, H, 0, D)
    for t in [7, 1, 1]:
        k, v = torch.randn(1, H, t, D, generator=g), torch.randn(1, H, t, D, generator=g)
        out_k, _ = cache.update(k, v, 0)
        if store.n_tokens:
            pk, _ = store.dequantize()
            torch.testing.assert_close(out_k, torch.cat([pk, k], 2), rtol=0, atol=0)
            assert (pk - raw_k).abs().max() > 1e-3  # the past is there, quantized
        else:
            torch.testing.assert_close(out_k, k, rtol=0, atol=0)
        store.append(k, v)
        raw_k = torch.cat([raw_k, k], 2)
    assert cache.get_seq_length() == 9


@pytest.mark.parametrize("layout", ["head_major", "token_major"])
def test_graph_cache_quantized_counts_and_dequantized_views(layout):
    """What the state-owned engine relies on: ``quantized_counts`` grows exactly when tokens become held
    quantized (K per-channel: by whole groups of 128; V per-token: every token), and ``dequantized`` equals a
    fresh store's dequantization in either buffer layout, across buffer growth."""
    rng = np.random.default_rng(3)
    spec = make_kv_spec("g-KC128VT128", 2, 2, "packed")
    kv = GraphKVCache(spec, 2, H, D, token_major=layout == "token_major", head_major=layout == "head_major")
    kv.reset(capacity=16)
    ref = QuantizedKVStore("g-KC128VT128", k_bits=2, v_bits=2, mode="packed")
    n = 0
    for k, v in _chunks(rng, [100, 1, 27, 1, 130, 1]):
        for i in range(2):
            kv.append(i, k, v)
        ref.append(k, v)
        kv.advance(k.shape[2])
        n += k.shape[2]
        assert kv.quantized_counts(0) == (n // 128 * 128, n)
        rk, rv = ref.dequantize()
        dk, dv = kv.dequantized(1)
        assert dk.shape == (1, H, n, D)
        np.testing.assert_array_equal(dk, rk)
        np.testing.assert_array_equal(dv, rv)
        if layout == "head_major":  # the state-owned engine hands these views' buffers to OpenVINO
            assert dk.base is not None and dk.base.flags.c_contiguous and dk.base.shape[:2] == (1, H)
    fp = GraphKVCache(make_kv_spec("fp16"), 1, H, D, head_major=True)
    fp.append(0, *_chunks(rng, [3])[0])
    fp.advance(3)
    assert fp.quantized_counts(0) == (0, 0)
