"""The fused decode attention over packed codes (``quant_ops.attention``, native kernel) against a naive
float64 reference: dequantize the store, then softmax(q K^T / sqrt(D)) V.

Tolerance, from the kernel's float32 arithmetic (u = 2^-24) and the reference's inputs (the store's
dequantized K, V, rounded once more to their dtype: rho = 2^-11 for float16, 2^-23 for float32):
- a score's error: the kernel forms sum_d (q_d delta) c_nd + sum_d q_d min over D terms, each term at most
  |q_d| * 4 max|k_d| (|delta c| and |min| are each within ~2 max|x| of the data), so
  delta_s = scale * sum_d |q_d| max_n|k_nd| * (4 (D + 8) u + rho);
- softmax weights then change by at most a factor exp(2 delta_s) ~ 1 + 2.2 delta_s, the exp approximation
  adds < 6e-7 relative (4x for margin), the weight sum and p.V accumulate N + D + 16 roundings over terms
  of size <= 3 max|v|, and V's own rounding rho:
  |out - ref| <= max|v| * (2.2 delta_s + 2.4e-6 + rho + 3 (N + D + 16) u).
A wrong scale, group, token order or head mapping gives errors of order max|v|, far above this.
The bound holds for any order of the sums (a sum of m terms in float32, in any order or tree, is within
(m - 1) u sum|terms| of the exact one): the AVX2 kernel's two accumulators per token, its 4-way tile sums
and the softmax's 8-lane weight sum use other orders than the baseline ISA's loops and meet the same bound.
"""

import math

import numpy as np
import pytest

from kvtool.errors import InputError
from kvtool.quant_ops import QuantizedKVStore, native
from kvtool.quant_ops.attention import attention_path, decode_attention

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.reason()}")

U = 2.0**-24


def _reference(q, k, v, scale):
    b, hq, d = q.shape
    h = k.shape[1]
    k64, v64 = k.astype(np.float64), v.astype(np.float64)
    s = np.einsum("bhrd,bhnd->bhrn", q.astype(np.float64).reshape(b, h, hq // h, d), k64) * scale
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhrn,bhnd->bhrd", p, v64).reshape(b, hq, d)


def _tolerance(q, k, v, scale):
    """Per (batch, query head) bound of the module docstring, broadcast over D."""
    b, hq, d = q.shape
    h, n = k.shape[1], k.shape[2]
    rho = 2.0**-11 if k.dtype == np.float16 else 2.0**-23
    kmax = np.abs(k.astype(np.float64)).max(axis=2)  # [B, H, D]
    vmax = np.abs(v.astype(np.float64)).max(axis=(2, 3))  # [B, H]
    rep = hq // h
    qa = np.abs(q.astype(np.float64)).reshape(b, h, rep, d)
    ds = scale * np.einsum("bhrd,bhd->bhr", qa, kmax) * (4 * (d + 8) * U + rho)
    tol = vmax[:, :, None] * (2.2 * ds + 2.4e-6 + rho + 3 * (n + d + 16) * U)
    return tol.reshape(b, hq, 1)


def _kv(rng, b, h, n, d, dtype):
    k = (rng.standard_normal((b, h, n, d)) * 2).astype(np.float32)
    k[..., rng.choice(d, 3, replace=False)] *= 25.0  # outlier channels, as trained keys have
    v = rng.standard_normal((b, h, n, d)).astype(np.float32)
    v[..., 1] += 4.0  # a channel with an offset: the min terms matter
    return k.astype(dtype), v.astype(dtype)


def _check(scheme, kb, vb, b, h, rep, d, n, dtype, seed=0, steps=3, extra=0, extra_dtype=np.float32):
    """``extra`` > 0: that many exact tokens (of ``extra_dtype``) passed beside the store, in the softmax."""
    rng = np.random.default_rng(seed)
    k, v = _kv(rng, b, h, n + extra, d, dtype)
    kx, vx = k[:, :, n:].astype(extra_dtype), v[:, :, n:].astype(extra_dtype)
    k, v = k[:, :, :n], v[:, :, :n]
    store = QuantizedKVStore(scheme, kb, vb)
    n0 = max(n - steps, 0)
    if n0:
        store.append(k[:, :, :n0], v[:, :, :n0])  # a prefill block, then decode tokens one by one
    for t in range(n0, n):
        store.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert attention_path(store)[0] == "native"
    q = rng.standard_normal((b, h * rep, d)).astype(np.float32)
    scale = 1 / math.sqrt(d)
    out = decode_attention(q, store, extra=(kx, vx) if extra else None)
    kk, vv = store.dequantize()
    if extra:  # the reference attends to the dequantized store plus the exact extra tokens
        kk = np.concatenate([kk.astype(np.float32), kx.astype(np.float32)], axis=2)
        vv = np.concatenate([vv.astype(np.float32), vx.astype(np.float32)], axis=2)
    ref = _reference(q, kk, vv, scale)
    err = np.abs(out.astype(np.float64) - ref)
    tol = _tolerance(q, kk, vv, scale)
    assert out.shape == (b, h * rep, d) and out.dtype == np.float32
    assert (err <= tol).all(), f"max err {err.max():.3e}, tol {tol.min():.3e}"
    return err.max(), tol.min()


@pytest.mark.parametrize("scheme", ["g-KC32VT32", "g-KT32VC32", "g-C32", "g-T64"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_schemes_and_bits(scheme, bits):
    _check(scheme, bits, bits, 1, 2, 4, 64, 77, np.float32, seed=bits)


@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("n", [1, 5, 33, 130])
def test_head_dims_and_ragged_tokens(d, n):
    """Ragged N (not a multiple of the group 32 or of any tile), N = 1 (all in the residual)."""
    _check("g-KC32VT32", 2, 4, 1, 2, 2, d, n, np.float32, seed=d + n)


@pytest.mark.parametrize("rep", [1, 4, 7])
def test_gqa(rep):
    _check("g-KT16VC16", 4, 2, 2, 3, rep, 64, 50, np.float32, seed=rep)


@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("scheme,kb,vb", [("g-KC32VT32", 2, 2), ("g-KT32VC32", 2, 4), ("g-KC32VT64", 3, 8),
                                          ("g-KT32VC32", 8, 3), ("g-KC128VT128", 2, 2), ("g-KT128VC128", 4, 2)])
def test_one_query_head_per_kv_head(scheme, kb, vb, d):
    """MHA (rep = 1), which the AVX2 kernel runs on its own paths: K scores with two accumulators per token
    and one 4-way sum per 2-bit tile; V over column blocks (64 columns, then the rest: 80 = 64 + 16) whose
    accumulators stay in registers across all tiles. Ragged N = 203 (not a multiple of 4, 32 or 128), float16
    store, outlier channels; per-channel and per-token groups at 2/3/4/8 bits."""
    h = 8 if d == 80 else 2  # H*D a multiple of the per-token group 128
    _check(scheme, kb, vb, 1, h, 1, d, 203, np.float16, seed=d + kb + vb)


@pytest.mark.parametrize("scheme,h", [("g-KC16VT16", 4), ("g-KT128VC16", 4), ("g-T48", 3)])
def test_float16_store(scheme, h):
    """float16 caches (the runtime's), per-token groups spanning heads (128 = 2 * 64) or cutting across
    them (48 neither divides nor is a multiple of D = 64: the flat layout)."""
    _check(scheme, 2, 2, 1, h, 2, 64, 41, np.float16)


@pytest.mark.parametrize("kb,vb", [(16, 2), (2, 16), (3, 8)])
def test_k_and_v_bits_apart(kb, vb):
    """One side unquantized (bits 16, read as the residual) or at other bits than the other side."""
    _check("g-KC16VT16", kb, vb, 1, 2, 2, 80, 35, np.float32)


@pytest.mark.parametrize("scheme,kb,vb", [("g-KC32VT32", 2, 4), ("g-KT32VC32", 3, 2), ("g-C32", 8, 8),
                                          ("g-T16", 4, 3), ("g-KC128VT128", 2, 2)])
@pytest.mark.parametrize("d,n,rep,x", [(64, 1, 1, 1), (80, 45, 4, 1), (128, 130, 2, 3), (64, 7, 7, 2)])
def test_extra_exact_tokens(scheme, kb, vb, d, n, rep, x):
    """The current step's exact K/V passed beside the store (``extra``) join the same softmax: ragged N,
    N = 1, GQA, head dims 64/80/128, per-channel and per-token groups, outlier channels, float16 extras."""
    h = 8 if d == 80 else 2  # H*D a multiple of the per-token group 128 of g-KC128VT128
    _check(scheme, kb, vb, 1, h, rep, d, n, np.float16 if d == 80 else np.float32, seed=d + n + x, extra=x,
           extra_dtype=np.float16 if n == 45 else np.float32)


def test_extra_tokens_portable_path_and_bad_extra():
    """The portable path (g-CN) takes the extra tokens too; extra tokens of the wrong shape are refused."""
    rng = np.random.default_rng(5)
    k, v = _kv(rng, 1, 2, 25, 64, np.float32)
    q = rng.standard_normal((1, 4, 64)).astype(np.float32)
    k[:, :, 24] = 20 * q.reshape(1, 2, 2, 64)[:, :, 0]  # an extra token that takes a visible share of the weight
    v[:, :, 24] = 10.0
    store = QuantizedKVStore("g-CN", 4, 4)
    store.append(k[:, :, :24], v[:, :, :24])
    assert attention_path(store)[0] == "portable"
    kk, vv = store.dequantize()
    ref = _reference(q, np.concatenate([kk, k[:, :, 24:]], 2), np.concatenate([vv, v[:, :, 24:]], 2), 1 / 8)
    np.testing.assert_allclose(decode_attention(q, store, extra=(k[:, :, 24:], v[:, :, 24:])), ref, atol=1e-5)
    assert np.abs(decode_attention(q, store) - ref).max() > 1e-3  # the extra token matters
    with pytest.raises(InputError, match="extra k_x"):
        decode_attention(q, store, extra=(k[:, :1, 24:], v[:, :, 24:]))
    with pytest.raises(InputError, match="k_x holds 1 tokens, v_x 2"):
        decode_attention(q, store, extra=(k[:, :, 24:], v[:, :, 23:]))


def test_fp16_scheme_and_torch():
    import torch

    rng = np.random.default_rng(1)
    k, v = _kv(rng, 1, 2, 20, 64, np.float16)
    store = QuantizedKVStore("g-KC8VT8", 2, 2)
    store.append(torch.from_numpy(k), torch.from_numpy(v))
    q = torch.from_numpy(rng.standard_normal((1, 4, 64)).astype(np.float32))
    out = decode_attention(q, store)
    assert isinstance(out, torch.Tensor)
    kk, vv = store.dequantize()
    ref = _reference(q.numpy(), kk.numpy(), vv.numpy(), 1 / 8)
    assert (np.abs(out.numpy() - ref) <= _tolerance(q.numpy(), kk.numpy(), vv.numpy(), 1 / 8)).all()
    _check("fp16", 16, 16, 1, 2, 2, 64, 20, np.float16)


def test_fallback_paths_agree():
    """Schemes without a fused kernel (g-CN, uniform) and a disabled native build take the portable
    path, say so, and still give the reference's answer."""
    rng = np.random.default_rng(2)
    k, v = _kv(rng, 1, 2, 24, 64, np.float32)
    q = rng.standard_normal((1, 2, 64)).astype(np.float32)
    for scheme in ("g-CN", "uniform"):
        store = QuantizedKVStore(scheme, 4, 4)
        store.append(k, v)
        path, why = attention_path(store)
        assert path == "portable" and "g-CN" in why
        kk, vv = store.dequantize()
        np.testing.assert_allclose(decode_attention(q, store), _reference(q, kk, vv, 1 / 8), rtol=0, atol=1e-5)


def test_bad_query():
    store = QuantizedKVStore("g-KC8VT8", 2, 2)
    with pytest.raises(InputError, match="empty"):
        decode_attention(np.zeros((1, 2, 64), np.float32), store)
    store.append(np.zeros((1, 2, 8, 64), np.float32), np.zeros((1, 2, 8, 64), np.float32))
    with pytest.raises(InputError, match="multiple of H=2"):
        decode_attention(np.zeros((1, 3, 64), np.float32), store)
    with pytest.raises(InputError, match="D=64"):
        decode_attention(np.zeros((1, 2, 32), np.float32), store)


def test_tolerance_discriminates():
    """The bound is loose (worst case), yet a 2% error in the softmax scale already breaks it."""
    rng = np.random.default_rng(3)
    k, v = _kv(rng, 1, 2, 40, 64, np.float32)
    store = QuantizedKVStore("g-KC16VT16", 2, 2)
    store.append(k, v)
    q = rng.standard_normal((1, 4, 64)).astype(np.float32)
    kk, vv = store.dequantize()
    tol = _tolerance(q, kk, vv, 1 / 8)
    ref = _reference(q, kk, vv, 1 / 8)
    assert (np.abs(decode_attention(q, store) - ref) <= tol).all()
    assert not (np.abs(decode_attention(q, store, scale=1.02 / 8) - ref) <= tol).all()


def test_baseline_isa():
    """The portable (non-AVX2) attention code of the same binary passes the same checks."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "KVTOOL_NATIVE_ISA": "baseline", "PYTHONPATH": root}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "(schemes_and_bits and 2) or gqa or ragged or float16 or one_query_head"], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    assert " passed" in res.stdout and "failed" not in res.stdout


def test_threads_give_the_same_answer():
    """A step large enough to run on several threads (one task per batch row and kv head) equals the
    one-thread result bit for bit and meets the bound."""
    rng = np.random.default_rng(4)
    k, v = _kv(rng, 2, 4, 700, 128, np.float16)
    store = QuantizedKVStore("g-KC128VT128", 2, 2)
    store.append(k, v)
    q = rng.standard_normal((2, 16, 128)).astype(np.float32)
    one = decode_attention(q, store, threads=1)
    np.testing.assert_array_equal(decode_attention(q, store, threads=3), one)
    kk, vv = store.dequantize()
    scale = 1 / math.sqrt(128)
    assert (np.abs(one - _reference(q, kk, vv, scale)) <= _tolerance(q, kk, vv, scale)).all()
