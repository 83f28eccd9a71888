"""The native C++ quant_ops kernels (``quant_ops.native``) against the numpy path, byte for byte: codes,
params and dequantized values, for every grouping the store uses (per-channel g, g-CN, per-token g | D,
g a multiple of D, the flat layout, per-tensor), 2/3/4/8 bits, float16/float32, tile offsets, strided
inputs and outputs, on the AVX2 path and on the portable baseline build; the store gives the same answers
with the native path on and off, and says which ran."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kvtool.quant_ops import QuantizedKVStore, native
from kvtool.quant_ops.affine import (
    block_for,
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
    to_flat,
)
from kvtool.quant_ops.packing import pack_tokens

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.reason()}")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GROUPINGS = [("channel", 8), ("channel", None), ("token", 8), ("token", None), ("token", 48), ("token", 12),
             ("tensor", None), ("channel", 3)]


def _inputs(rng, dtype, h, n, d):
    x = (rng.standard_normal((2, h, n, d)) * 3).astype(np.float32)
    x[:, :, :, 1] *= 30.0  # an outlier channel
    x[0, 0, :, 2] = 1.5  # a constant channel: delta 0, dequantizes to itself
    x[1, :, 0, :] = np.linspace(-1, 1, d)  # exact ties (x - min) / delta = k + 1/2 at some bit widths
    return x.astype(dtype)


def check_all(seed: int = 0) -> int:
    """Compare native and numpy on every case; returns the number of cases (raises on a mismatch)."""
    rng = np.random.default_rng(seed)
    cases = 0
    for dtype in (np.float16, np.float32):
        for bits in (2, 3, 4, 8):
            for h, n, d in [(4, 37, 16), (2, 64, 24), (3, 5, 8), (2, 1, 16), (2, 19, 12)]:
                for axis, g in GROUPINGS:
                    x = _inputs(rng, dtype, h, n, d)
                    try:
                        block, flat = block_for(axis, g if g is not None or axis != "token" else d, x.shape)
                    except ValueError:
                        continue
                    v = to_flat(x) if flat else x
                    if axis == "channel" and g and n % g:
                        v = v[:, :, :n // g * g]  # a strided view, as the store passes
                    if v.shape[2] == 0:
                        continue
                    dd, mm = choose_qparams_affine(v, block, bits)
                    codes = quantize_affine(v, block, dd, mm, bits)
                    for off in range(8 // bits if bits != 3 else 8):
                        p, d2, m2 = native.quantize_block(v, block, bits, off)
                        np.testing.assert_array_equal(d2, dd)
                        np.testing.assert_array_equal(m2, mm)
                        np.testing.assert_array_equal(p, pack_tokens(codes, bits, off))
                        cases += 1
                    big = np.full(v.shape[:2] + (v.shape[2] + 3, v.shape[3]), 7, dtype)
                    out = big[:, :, :v.shape[2]]  # a strided output view
                    native.dequantize_packed(native.quantize_block(v, block, bits)[0], bits, block, dd, mm, out)
                    np.testing.assert_array_equal(out, dequantize_affine(codes, block, dd, mm))
                    assert (big[:, :, v.shape[2]:] == 7).all()
    return cases


@needs_native
def test_native_equals_numpy():
    assert check_all() > 700


def baseline_isa_output(code: str) -> str:
    """Run ``code`` (Python) in a child process whose native kernels use the portable (non-AVX2) code of the same
    binary (``KVTOOL_NATIVE_ISA=baseline``, checked in the child), as a CPU without AVX2 would; -> its stdout."""
    env = {**os.environ, "KVTOOL_NATIVE_ISA": "baseline", "PYTHONPATH": ROOT}
    code = "from kvtool.quant_ops import native; assert native.info()['isa'] == 'baseline'; " + code
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@needs_native
def test_baseline_isa_equals_numpy():
    """The portable (non-AVX2) code of the same binary, as a CPU without AVX2 would run it."""
    out = baseline_isa_output("from tests.quant_ops.test_native import check_all; print(check_all(1))")
    assert int(out.split()[-1]) > 700


def _stream(store, k, v, steps):
    n0 = k.shape[2] - steps
    store.append(k[:, :, :n0], v[:, :, :n0])
    for t in range(n0, k.shape[2]):
        store.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    return store.dequantize(), store.nbytes


@needs_native
@pytest.mark.parametrize("scheme", ["g-KC16VT32", "g-KT64VC8", "g-C8", "g-T16", "g-CN", "uniform", "or2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_store_same_with_native_off(scheme, bits, monkeypatch):
    import torch

    rng = np.random.default_rng(bits)
    k = _inputs(rng, np.float16, 2, 45, 32)
    v = _inputs(rng, np.float16, 2, 45, 32)
    on = {lib: _stream(QuantizedKVStore(scheme, bits, bits), *conv(k, v), 9)
          for lib, conv in (("numpy", lambda a, b: (a, b)), ("torch", lambda a, b: (torch.from_numpy(a),
                                                                                    torch.from_numpy(b))))}
    assert QuantizedKVStore(scheme, bits, bits).kernel_info()["path"] == "native"
    monkeypatch.setattr(native, "_load", lambda: (None, "switched off by the test"))
    assert QuantizedKVStore(scheme, bits, bits).kernel_info() == {
        "native": False, "path": "portable", "isa": None, "reason": "switched off by the test"}
    off_np = _stream(QuantizedKVStore(scheme, bits, bits), k, v, 9)
    off_t = _stream(QuantizedKVStore(scheme, bits, bits), torch.from_numpy(k), torch.from_numpy(v), 9)
    for (a, an), (b, bn) in ((on["numpy"], off_np), (on["torch"], off_t), (on["torch"], off_np)):
        assert an == bn
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_disabled_by_env_reports_itself():
    env = {**os.environ, "KVTOOL_NATIVE": "0", "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-m", "kvtool.cli", "kv-roundtrip", "--scheme", "g-T16", "--bits", "2",
                          "--tokens", "16", "--json"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)[0]["kernel"] == "portable"
    code = "from kvtool.quant_ops import native; print(native.reason())"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert "KVTOOL_NATIVE=0" in out.stdout


@needs_native
def test_bad_arguments_raise():
    mod = native._load()[0]
    x = np.zeros((1, 1, 4, 8), np.float16)
    with pytest.raises(ValueError, match="bits=5"):
        mod.quantize_pack(x, np.zeros((1, 1, 1, 8), np.uint8), np.zeros((1, 1, 4, 1), np.float16),
                          np.zeros((1, 1, 4, 1), np.float16), 1, 1, 8, 5, 0)
    with pytest.raises(ValueError, match="do not match"):
        mod.quantize_pack(x, np.zeros((1, 1, 2, 8), np.uint8), np.zeros((1, 1, 4, 1), np.float16),
                          np.zeros((1, 1, 4, 1), np.float16), 1, 1, 8, 2, 0)
    with pytest.raises(TypeError, match="format"):
        mod.quantize_pack(x.astype(np.float64), np.zeros((1, 1, 1, 8), np.uint8),
                          np.zeros((1, 1, 4, 1), np.float16), np.zeros((1, 1, 4, 1), np.float16), 1, 1, 8, 2, 0)
