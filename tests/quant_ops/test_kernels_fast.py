"""The torch CPU fast paths of ``kernels`` against the numpy path, byte for byte: the float16 dequantize
(codes read as float16 subnormals, one addcmul), its unpacking on int32 words and on plain bytes, the
per-token partial last tile, the fallback when subnormals are flushed, and quantize_block's clamp skipping
on edge values (constant groups, exact ties, subnormal and huge ranges)."""

import numpy as np
import pytest
import torch

from kvtool.quant_ops import kernels
from kvtool.quant_ops.affine import block_for, choose_qparams_affine, dequantize_affine, quantize_affine
from kvtool.quant_ops.packing import pack_tokens


def _numpy_path(xs: np.ndarray, block, bits):
    d, m = choose_qparams_affine(xs, block, bits)
    codes = quantize_affine(xs, block, d, m, bits)
    return pack_tokens(codes, bits), d, m, dequantize_affine(codes, block, d, m)


def _check(xs: np.ndarray, axis, group, bits):
    block, _ = block_for(axis, group, tuple(xs.shape))
    packed, d, m, ref = _numpy_path(xs, block, bits)
    xt = torch.from_numpy(xs)
    pt, dt, mt = kernels.quantize_block(xt, block, bits)
    np.testing.assert_array_equal(dt.numpy(), d)
    np.testing.assert_array_equal(mt.numpy(), m)
    np.testing.assert_array_equal(pt.numpy(), packed)
    big = torch.full(xs.shape[:2] + (xs.shape[2] + 5, xs.shape[3]), 7.0, dtype=xt.dtype)
    out = big[:, :, :xs.shape[2]]  # a strided view of a larger buffer, as the store passes
    kernels.dequantize_packed(pt, bits, block, dt, mt, out)
    np.testing.assert_array_equal(out.numpy(), ref)
    assert bool((big[:, :, xs.shape[2]:] == 7.0).all())  # nothing written past the view


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis,group", [("channel", 8), ("token", 8), ("token", None), ("tensor", None),
                                        ("channel", None)])
@pytest.mark.parametrize("d,tokens", [(16, 32), (6, 40), (16, 37)])
def test_half_dequantize_equals_numpy(bits, axis, group, d, tokens, monkeypatch):
    monkeypatch.setattr(kernels, "HALF_MIN_TOKENS", 1)  # the float16 path even for short blocks
    monkeypatch.setattr(kernels, "CPU_CHUNK", 128)  # several chunks
    if axis == "channel" and group and tokens % group:
        tokens = tokens // group * group
    g = d if (axis == "token" and group is None) else (3 if axis == "token" and d == 6 else group)
    rng = np.random.default_rng(bits * 100 + d + tokens)
    for h in (3, 1):
        x = (rng.standard_normal((2, h, tokens, d)) * rng.choice([0.01, 1.0, 300.0], size=(2, h, 1, d)))
        _check(x.astype(np.float16), axis, g, bits)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # max + 3 steps can round past 65504
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis,group", [("channel", 8), ("token", 8)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_edge_values_equal_numpy(bits, axis, group, dtype, monkeypatch):
    """Constant groups (delta 0), exact ties at half steps (round half to even), subnormal float16 deltas
    (codes clamped), ranges near the float16 limit, signed zeros: the fast quantize and dequantize agree
    with the numpy path bit for bit."""
    monkeypatch.setattr(kernels, "HALF_MIN_TOKENS", 1)
    qmax = 2**bits - 1
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((1, 4, 16, 8)).astype(np.float32)
    ties = np.array([0.0, qmax] + [k + 0.5 for k in range(min(qmax, 6))], np.float32)
    if axis == "channel":  # group = 8 tokens of one channel
        x[0, 0, :8, 0] = 1.25  # constant group
        x[0, 0, :len(ties), 1] = ties  # delta = 1 exactly: every x.5 is a tie
        x[0, 1, :8, :] = rng.standard_normal((8, 8)) * 1e-7  # subnormal float16 deltas
        x[0, 2, :8, :] = rng.choice([-65504.0, 65504.0, -0.0, 0.0], size=(8, 8))
    else:  # group = 8 channels of one token
        x[0, 0, 0, :] = -3.5
        x[0, 0, 1, :len(ties)] = ties
        x[0, 1, :, :] = rng.standard_normal((16, 8)) * 1e-7
        x[0, 2, :4, :] = rng.choice([-65504.0, 65504.0, -0.0, 0.0], size=(4, 8))
    x[0, 3] = rng.integers(-4, 5, size=(16, 8))  # small integers: many exact ties
    if dtype == np.float32:
        x[0, 1] *= 1e-33  # float32 subnormal spreads
    _check(x.astype(dtype), axis, group, bits)


def test_flushed_subnormals_fall_back_to_float32(monkeypatch):
    monkeypatch.setattr(kernels, "HALF_MIN_TOKENS", 1)
    monkeypatch.setattr(kernels, "_subnormal_half_ok", lambda: False)
    calls = []
    f32 = kernels._dequantize_f32
    monkeypatch.setattr(kernels, "_dequantize_f32", lambda *a: calls.append(1) or f32(*a))
    x = np.random.default_rng(3).standard_normal((1, 2, 32, 16)).astype(np.float16)
    _check(x, "channel", 8, 2)
    assert calls


def test_default_settings_layer_sized_block():
    """Default chunking on a [1, 4, 512, 128] float16 block (one chunk per head, int32-word unpacking),
    the study's K/V groupings at 2 and 4 bits."""
    x = np.random.default_rng(5).standard_normal((1, 4, 512, 128)).astype(np.float16)
    for bits in (2, 4):
        _check(x, "channel", 128, bits)
        _check(x, "token", 128, bits)


def test_subnormal_probe_holds_here():
    assert kernels._subnormal_half_ok()
