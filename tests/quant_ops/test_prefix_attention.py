"""``quant_ops.prefix.prefix_attention`` (the native multi-query exact-prefix kernel, ``_native_prefix.h``) and its
numpy path against a float64 reference: softmax over [past tokens, new tokens 0..t] of q.k * scale, times V.

Tolerance (``_tolerance``; u = 2^-24, first order). A score is a float32 dot product of D terms plus the
q * scale rounding: |error| <= (D + 2) u scale sum_d |q_d k_d| =: delta (Higham's gamma_n bound for a
sum of n products, FMA or not). The weights exp(s - max) then carry a relative error <= delta + u |s - max|
(the subtraction) + 6e-7 (exp_neg's bound, _native_attention.h) + (6e-7 + u) per online-softmax rescale (one
per key block of 64 at most, applied to the whole accumulator). A relative error eta on every weight moves
a convex combination of V rows by at most 2 eta max|v|; the float32 sums over N keys of p v and of p add
N u max|v| each, and the final division u. So |out - ref| <= max|v| (2 eta + 2 N u + 2 u). On these inputs the
bound is 5e-5 to 1e-3 of max|v| (it grows with the logits' size: the outlier case); it is a worst case, and
the observed errors are 1e-7 to 7e-7 (300-3000x below it, as rounding errors that cancel do); a kernel that drops the past, the causal mask, or shifts the new tokens is off by 0.1 to
1 (``test_the_check_has_power``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kvtool.quant_ops import native, prefix

U = 2.0 ** -24
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NATIVE = pytest.mark.skipif(prefix.path()[0] != "native", reason="native extension not built")


def _reference(q, kp, vp, kn, vn, scale):
    """float64: every query row t over past [0, P) and new [0, t]."""
    _, hq, t, d = q.shape
    h, p = kn.shape[1], kp.shape[0]
    rep = hq // h
    k = np.concatenate([kp.astype(np.float64).transpose(1, 0, 2), kn[0].astype(np.float64)], axis=1)
    v = np.concatenate([vp.astype(np.float64).transpose(1, 0, 2), vn[0].astype(np.float64)], axis=1)
    hidden = np.arange(p + t)[None, :] > p + np.arange(t)[:, None]
    out = np.empty((1, hq, t, d))
    for j in range(hq):
        s = q[0, j].astype(np.float64) @ k[j // rep].T * scale
        s[hidden] = -np.inf
        e = np.exp(s - s.max(axis=1, keepdims=True))
        out[0, j] = (e / e.sum(axis=1, keepdims=True)) @ v[j // rep]
    return out


def _tolerance(q, kp, vp, kn, vn, scale):
    """The module docstring's bound, one number for all outputs (the worst row)."""
    _, hq, t, d = q.shape
    h, p = kn.shape[1], kp.shape[0]
    rep = hq // h
    k = np.abs(np.concatenate([kp.astype(np.float64).transpose(1, 0, 2), kn[0].astype(np.float64)], axis=1))
    qa = np.abs(q[0].astype(np.float64)).reshape(h, rep * t, d)
    s_abs = (qa @ k.transpose(0, 2, 1)).max() * scale  # max over rows and keys of scale * sum |q k|
    n = p + t
    blocks = n // 64 + 1
    eta = (d + 2) * U * s_abs + U * 2 * s_abs + 6e-7 + blocks * (6e-7 + U)
    vmax = max(np.abs(vp).max(initial=0.0), np.abs(vn).max())
    return float(vmax * (2 * eta + 2 * n * U + 2 * U))


def _inputs(rng, hq, h, t, d, p, dtype, outliers=False):
    q = rng.standard_normal((1, hq, t, d), dtype=np.float32)
    kp = rng.standard_normal((p, h, d), dtype=np.float32)
    vp = rng.standard_normal((p, h, d), dtype=np.float32)
    kn = rng.standard_normal((1, h, t, d), dtype=np.float32)
    vn = rng.standard_normal((1, h, t, d), dtype=np.float32)
    if outliers:  # a few huge channels in K and Q: logits of +-100s, the softmax nearly one-hot
        ch = rng.choice(d, 3, replace=False)
        kp[..., ch] *= 40
        kn[..., ch] *= 40
        q[..., ch] *= 8
        vp[..., ch[:1]] *= 30
    return q, kp.astype(dtype), vp.astype(dtype), kn, vn


def _check(fn, q, kp, vp, kn, vn, scale):
    ref = _reference(q, kp, vp, kn, vn, scale)
    got = fn(q, kp, vp, kn, vn, scale)
    assert got.shape == ref.shape and got.dtype == np.float32
    tol = _tolerance(q, kp, vp, kn, vn, scale)
    err = float(np.abs(got - ref).max())
    assert err <= tol, f"max error {err:.3e} > bound {tol:.3e}"
    return err, tol


CASES = [  # (Hq, H, T, D, P, past dtype)
    (4, 4, 5, 64, 0, np.float16),       # no past: causal self-attention of the chunk
    (4, 4, 9, 64, 1, np.float32),       # one past token
    (8, 8, 37, 128, 131, np.float16),   # ragged T and P (not multiples of 16, 64 or 128)
    (8, 2, 1, 128, 200, np.float16),    # T = 1, GQA 4:1
    (6, 2, 70, 80, 77, np.float32),     # head_dim 80, GQA 3:1, T over a query block of 64 rows
    (2, 1, 3, 24, 5, np.float16),       # head_dim not a multiple of 16: the scalar loops
    (4, 4, 130, 64, 300, np.float16),   # several query blocks and key blocks crossing the past/new boundary
    (2, 2, 600, 64, 70, np.float16),    # over KV_PREFIX_ROWS (512) rows per head: two query blocks of one head
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(getattr(x, "__name__", x)) for x in c))
@pytest.mark.parametrize("way", ["native", "numpy"])
def test_against_float64(case, way):
    hq, h, t, d, p, dtype = case
    if way == "native" and prefix.path()[0] != "native":
        pytest.skip("native extension not built")
    fn = prefix.prefix_attention if way == "native" else prefix.prefix_attention_numpy
    q, kp, vp, kn, vn = _inputs(np.random.default_rng(hash(case) % 2 ** 32), *case)
    _check(fn, q, kp, vp, kn, vn, d ** -0.5)


@pytest.mark.parametrize("way", ["native", "numpy"])
def test_outlier_logits(way):
    if way == "native" and prefix.path()[0] != "native":
        pytest.skip("native extension not built")
    fn = prefix.prefix_attention if way == "native" else prefix.prefix_attention_numpy
    q, kp, vp, kn, vn = _inputs(np.random.default_rng(7), 4, 2, 33, 128, 150, np.float16, outliers=True)
    s = np.abs(q[0, 0] @ kn[0, 0].T) / np.sqrt(128)
    assert s.max() > 100  # the case really has large logits
    _check(fn, q, kp, vp, kn, vn, 128 ** -0.5)


@NATIVE
def test_threads_and_strides_give_the_same_answer():
    """Several threads equal one thread bit for bit; strided q (a view) and a past that is a prefix of a larger
    buffer (the engine's ``kb[:n]``) read the same values; ``out`` is written in place."""
    rng = np.random.default_rng(3)
    q, kp, vp, kn, vn = _inputs(rng, 8, 4, 100, 64, 260, np.float16)
    one = prefix.prefix_attention(q, kp, vp, kn, vn, 0.125, threads=1)
    np.testing.assert_array_equal(prefix.prefix_attention(q, kp, vp, kn, vn, 0.125, threads=3), one)
    # rows per task follow the threads (64 to 512 here): the same answer whatever the query blocking
    np.testing.assert_array_equal(prefix.prefix_attention(q, kp, vp, kn, vn, 0.125, threads=16), one)
    big = np.zeros((1, 8, 200, 64), np.float32)
    big[:, :, ::2] = q
    buf_k = np.zeros((400, 4, 64), np.float16)
    buf_v = np.zeros((400, 4, 64), np.float16)
    buf_k[:260], buf_v[:260] = kp, vp
    out = np.empty((1, 8, 100, 64), np.float32)
    res = prefix.prefix_attention(big[:, :, ::2], buf_k[:260], buf_v[:260], kn, vn, 0.125, threads=2, out=out)
    assert res is out
    np.testing.assert_array_equal(out, one)


def test_the_check_has_power():
    """Kernels that drop the past, drop the causal mask (let query t see later new tokens) or misalign the
    new tokens fail ``_check``: the tolerance cannot hide a wrong attention."""
    q, kp, vp, kn, vn = _inputs(np.random.default_rng(11), 4, 2, 20, 64, 50, np.float16)
    scale = 0.125
    _check(prefix.prefix_attention, q, kp, vp, kn, vn, scale)

    def no_past(q, kp, vp, kn, vn, scale):
        return prefix.prefix_attention(q, kp[:0], vp[:0], kn, vn, scale)

    def no_causal(q, kp, vp, kn, vn, scale):  # every query sees all new tokens
        t = q.shape[2]
        full_k = np.concatenate([kp, kn[0].transpose(1, 0, 2)])
        full_v = np.concatenate([vp, vn[0].transpose(1, 0, 2)])
        last = slice(t - 1, t)  # the attention of one "last" query over everything, for every row
        out = np.empty(q.shape, np.float32)
        for i in range(t):
            out[:, :, i:i + 1] = prefix.prefix_attention(q[:, :, i:i + 1], full_k, full_v, kn[:, :, last] * 0,
                                                         vn[:, :, last] * 0, scale)
        return out

    def shifted(q, kp, vp, kn, vn, scale):  # the new tokens' values one position off
        return prefix.prefix_attention(q, kp, vp, kn, np.roll(vn, 1, axis=2), scale)

    for broken in (no_past, no_causal, shifted):
        with pytest.raises(AssertionError, match="max error"):
            _check(broken, q, kp, vp, kn, vn, scale)


def test_bad_shapes():
    q = np.zeros((1, 4, 3, 16), np.float32)
    kn = np.zeros((1, 2, 3, 16), np.float32)
    kp = np.zeros((5, 2, 16), np.float16)
    kn3, kp3 = np.zeros((1, 3, 3, 16), np.float32), np.zeros((5, 3, 16), np.float16)
    with pytest.raises(ValueError, match="4 query heads is not a multiple of 3 kv heads"):
        prefix.prefix_attention(q, kp3, kp3, kn3, kn3, 1.0)
    with pytest.raises(ValueError, match=r"k_past / v_past must be \[P, 2, 16\]"):
        prefix.prefix_attention(q, kp[:, :, :8], kp[:, :, :8], kn, kn, 1.0)
    with pytest.raises(ValueError, match="k_new / v_new must be"):
        prefix.prefix_attention(q, kp, kp, kn[:, :, :2], kn[:, :, :2], 1.0)


def test_fallback_is_named_and_agrees():
    """With the extension off, ``path()`` says "portable" and why, and the numpy path gives the answer."""
    q, kp, vp, kn, vn = _inputs(np.random.default_rng(5), 4, 2, 12, 64, 40, np.float16)
    with native.disabled("off for the test"):
        kind, why = prefix.path()
        assert kind == "portable" and "off for the test" in why
        _check(prefix.prefix_attention, q, kp, vp, kn, vn, 0.125)
    if native.available():
        assert prefix.path()[0] == "native" and native.info()["isa"] in prefix.path()[1]


@NATIVE
def test_baseline_isa():
    """The portable (non-AVX2) code of the same binary passes the same checks."""
    env = {**os.environ, "KVTOOL_NATIVE_ISA": "baseline", "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "(against_float64 and native) or (outlier and native)"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    assert " passed" in res.stdout and "failed" not in res.stdout and "skipped" not in res.stdout
