"""KIVI's full-precision window (``residual=R``) against a naive re-implementation of KIVI's rule.

The reference follows jy-yuan/KIVI ``models/llama_kivi.py`` step by step with plain lists: the prefill splits
K into ``N - N mod R`` quantized + ``N mod R`` full tokens and V into ``N - R`` quantized + the newest R; each
decode step appends to the full part, quantizes K's full part once it holds R tokens and V's oldest full
token once it holds R + 1. A quantized block's values come from ``reference.ref_side`` (the contract's loop
quantizer, independent of quant_ops). Per-token sides follow KIVI's V rule, every other side KIVI's K rule
(``fake.residual_window``).
"""

import numpy as np
import pytest
import torch

from kvtool.errors import InputError
from kvtool.quant_ops import QuantizedKVStore, fake_quant_kv, parse_scheme
from kvtool.quant_ops.fake import residual_window
from tests.quant_ops.reference import outlier_kv, ref_side


def _quant(x, spec, which, bits):
    axis, group = spec.side(which)
    pct = spec.outlier_pct if spec.kind == "outlier" else 0.0
    axis = "tensor" if spec.kind in ("uniform", "outlier") else axis
    return ref_side(x, axis, group, bits, pct)


def _kivi_side(x, spec, which, bits, prefill, R):
    """KIVI's rule for one side fed a prefill of ``prefill`` tokens then one token at a time; returns the
    dequantized cache and the number of exact (full) tokens at the end."""
    slide = spec.side(which)[0] == "token" and spec.kind == "group"
    quant: list[np.ndarray] = []  # dequantized blocks, oldest first
    n0 = prefill
    if slide:  # KIVI's V: the newest R tokens stay full
        q = max(n0 - R, 0)
    else:  # KIVI's K: N mod R tokens stay full
        q = n0 - n0 % R
    if q:
        quant.append(_quant(x[:, :, :q], spec, which, bits))
    full = x[:, :, q:n0]
    for t in range(n0, x.shape[2]):
        full = np.concatenate([full, x[:, :, t:t + 1]], axis=2)
        if slide and full.shape[2] > R:
            quant.append(_quant(full[:, :, :1], spec, which, bits))
            full = full[:, :, 1:]
        elif not slide and full.shape[2] == R:
            quant.append(_quant(full, spec, which, bits))
            full = full[:, :, :0]
    return np.concatenate(quant + [full], axis=2), full.shape[2]


SCHEMES = ["g-KC16VT16", "g-KC32VT16", "g-T16", "g-C16", "g-KT16VC16", "uniform", "or2", "g-CN", "g-KCNVT16"]


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("prefill,R", [(37, 32), (64, 32), (10, 32), (50, 16)])
def test_packed_store_follows_kivi_rule(lib, scheme, prefill, R):
    spec = parse_scheme(scheme)
    if spec.kind == "group" and any(spec.side(w) == ("channel", 32) for w in "kv") and R % 32:
        pytest.skip("window not a multiple of the group (refused, tested below)")
    k, v = outlier_kv(b=1, h=2, n=prefill + 45, d=16, seed=5, dtype=np.float16)
    conv = torch.from_numpy if lib == "torch" else (lambda a: a)
    store = QuantizedKVStore(scheme, 2, 3, residual=R)
    store.append(conv(k[:, :, :prefill]), conv(v[:, :, :prefill]))
    n_total = k.shape[2]
    for t in range(prefill, n_total):
        store.append(conv(k[:, :, t:t + 1]), conv(v[:, :, t:t + 1]))
        if t % 7 == 0 or t == n_total - 1:  # check along the way, incremental dequantize included
            rk, nk = _kivi_side(k[:, :, :t + 1], spec, "k", 2, prefill, R)
            rv, nv = _kivi_side(v[:, :, :t + 1], spec, "v", 3, prefill, R)
            kh, vh = store.dequantize()
            kh, vh = (kh.numpy(), vh.numpy()) if lib == "torch" else (kh, vh)
            np.testing.assert_array_equal(kh, rk)
            np.testing.assert_array_equal(vh, rv)
            n = t + 1
            assert (nk, nv) == (residual_window(spec, "k", n, R), residual_window(spec, "v", n, R))
            # the window is exact, the tokens before it are not (2/3-bit codes move values)
            np.testing.assert_array_equal(kh[:, :, n - nk:], k[:, :, n - nk:t + 1])
            np.testing.assert_array_equal(vh[:, :, n - nv:], v[:, :, n - nv:t + 1])
            if n - nv:
                assert not np.array_equal(vh[:, :, :n - nv], v[:, :, :n - nv])
            assert (store._k.nq, store._v.nq) == (n - nk, n - nv)


def test_kivi_numbers_for_r128():
    """The issue's case, KIVI's R = 128 on g-KC128VT128: 300 prompt tokens then 20 decoded -> K holds
    320 mod 128 = 64 tokens exact, V its newest 128."""
    k, v = outlier_kv(b=1, h=2, n=320, d=64, seed=7, dtype=np.float16)
    store = QuantizedKVStore("g-KC128VT128", 2, 2, residual=128)
    store.append(k[:, :, :300], v[:, :, :300])
    for t in range(300, 320):
        store.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    kh, vh = store.dequantize()
    assert (store._k.nq, store._v.nq) == (256, 192)
    np.testing.assert_array_equal(kh[:, :, 256:], k[:, :, 256:])
    np.testing.assert_array_equal(vh[:, :, 192:], v[:, :, 192:])
    rk, rv = fake_quant_kv(k, v, "g-KC128VT128", 2, 2, residual=128)  # one block: the same split
    np.testing.assert_array_equal(kh, rk)
    np.testing.assert_array_equal(vh, rv)


@pytest.mark.parametrize("scheme", ["g-KC16VT16", "uniform", "g-T16"])
def test_simulate_mode_keeps_the_window_of_the_past(scheme):
    """simulate: after each append every token but the newest is re-quantized over the current cache,
    except the window of that past, which stays as it is."""
    spec = parse_scheme(scheme)
    k, v = outlier_kv(b=1, h=2, n=60, d=16, seed=9, dtype=np.float32)
    R = 16
    store = QuantizedKVStore(scheme, 2, 2, mode="simulate", residual=R)
    ck, cv = k[:, :, :25].copy(), v[:, :, :25].copy()

    def requant(c, which):
        n = c.shape[2] - 1
        w = residual_window(spec, which, n, R)
        axis = spec.side(which)
        nq = n - w
        if axis == ("channel", 16):
            nq = nq // 16 * 16
        if nq:
            c[:, :, :nq] = _quant(c[:, :, :nq], spec, which, 2)

    requant(ck, "k")
    requant(cv, "v")
    store.append(k[:, :, :25], v[:, :, :25])
    for t in range(25, 60):
        store.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        ck, cv = np.concatenate([ck, k[:, :, t:t + 1]], 2), np.concatenate([cv, v[:, :, t:t + 1]], 2)
        requant(ck, "k")
        requant(cv, "v")
    kh, vh = store.dequantize()
    np.testing.assert_allclose(kh, ck, rtol=0, atol=1e-6)
    np.testing.assert_allclose(vh, cv, rtol=0, atol=1e-6)
    w = residual_window(spec, "v", 59, R)
    np.testing.assert_array_equal(vh[:, :, 59 - w:], v[:, :, 59 - w:])


def test_residual_errors():
    with pytest.raises(InputError, match=r"^residual=24: expected a multiple of g-KC16VT16's per-channel group "
                                         r"of 16 tokens"):
        QuantizedKVStore("g-KC16VT16", 2, 2, residual=24)
    with pytest.raises(InputError, match=r"^residual=0: expected a positive number of tokens"):
        QuantizedKVStore("g-T16", 2, 2, residual=0)
    with pytest.raises(InputError, match=r"^residual=8: scheme fp16 keeps every token exact"):
        QuantizedKVStore("fp16", 16, 16, residual=8)
    k = np.zeros((1, 1, 4, 16))
    with pytest.raises(InputError, match=r"^k dtype float64: expected one of float16, bfloat16, float32$"):
        fake_quant_kv(k, k, "g-T16", 2, 2)
