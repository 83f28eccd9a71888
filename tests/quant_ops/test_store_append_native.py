"""The store's one-token append fast path (``_GridSide._append_native``: one native quantize + pack + OR into
the held buffers) against the general path (``QuantizedBlock.from_float`` + OR in numpy) on random inputs:
the same codes, params and dequantized values, bit for bit."""

import numpy as np
import pytest

from kvtool.quant_ops import QuantizedKVStore, native
from kvtool.quant_ops.store import _GridSide

pytestmark = pytest.mark.skipif(not native.available(), reason="native extension not built")


def _fill(scheme, bits, dtype, d, h, n_prompt, n_steps, seed, fast: bool, monkeypatch):
    calls = {"fast": 0}
    orig = _GridSide._append_native

    def spy(self, x):
        if not fast:
            return False
        ok = orig(self, x)
        calls["fast"] += ok
        return ok

    monkeypatch.setattr(_GridSide, "_append_native", spy)
    rng = np.random.default_rng(seed)
    st = QuantizedKVStore(scheme, bits[0], bits[1])
    k = rng.standard_normal((1, h, n_prompt, d)).astype(dtype)
    v = rng.standard_normal((1, h, n_prompt, d)).astype(dtype)
    v[:, :, :, 3] *= 40  # an outlier channel
    st.append(k, v)
    for _ in range(n_steps):
        k1 = rng.standard_normal((1, h, 1, d)).astype(dtype)
        v1 = (rng.standard_normal((1, h, 1, d)) * rng.uniform(0.01, 5)).astype(dtype)
        st.append(k1, v1)
    monkeypatch.setattr(_GridSide, "_append_native", orig)
    return st, calls["fast"]


def _side_arrays(st, which):
    lay = st.side_layout(which)
    return [np.asarray(a) for a in (lay.codes, lay.delta, lay.mn, lay.residual) if a is not None]


@pytest.mark.parametrize("scheme,bits", [("g-KC128VT128", (2, 2)), ("g-KC128VT128", (3, 4)),
                                         ("g-KC64VT64", (4, 8)), ("g-KT128VC128", (2, 2)),
                                         ("g-KC128VT128", (8, 2))])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("d,n_prompt", [(128, 37), (64, 1), (128, 130), (80, 5)])
def test_one_token_append_matches_general_path(scheme, bits, dtype, d, n_prompt, monkeypatch):
    h = 8 if d == 80 else 4  # D_model a multiple of the per-token group
    new, n_fast = _fill(scheme, bits, dtype, d, h, n_prompt, 19, 7, True, monkeypatch)
    old, n_old = _fill(scheme, bits, dtype, d, h, n_prompt, 19, 7, False, monkeypatch)
    assert n_old == 0
    # one per-token side per scheme here takes the fast path each step, unless its groups span heads
    # unevenly (D=80, groups of 64 or 128: the flat layout, left to the general path)
    assert n_fast == (0 if d == 80 else 19)
    for which in ("k", "v"):
        for a, b in zip(_side_arrays(new, which), _side_arrays(old, which), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert np.array_equal(a, b)
    for a, b in zip(new.dequantize(), old.dequantize(), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_accumulate_ors_into_a_partly_filled_tile():
    """``quantize_pack(..., offset, accumulate=1)`` == the tile OR-ed with a fresh pack at that offset."""
    mod = native._load()[0]
    rng = np.random.default_rng(3)
    for bits in (2, 3, 4, 8):
        x = rng.standard_normal((1, 2, 1, 128)).astype(np.float32)
        p = {2: 4, 3: 8, 4: 2, 8: 1}[bits]
        for off in range(p):
            fresh = np.empty((1, 2, {2: 1, 3: 3, 4: 1, 8: 1}[bits], 128), np.uint8)
            d1, m1 = np.empty((1, 2, 1, 1), np.float32), np.empty((1, 2, 1, 1), np.float32)
            mod.quantize_pack(x, fresh, d1, m1, 1, 1, 128, bits, off)
            base = rng.integers(0, 256, fresh.shape, dtype=np.uint8)
            tile = base.copy()
            d2, m2 = np.empty_like(d1), np.empty_like(m1)
            mod.quantize_pack(x, tile, d2, m2, 1, 1, 128, bits, off, 1)
            assert np.array_equal(tile, base | fresh)
            assert np.array_equal(d1, d2) and np.array_equal(m1, m2)


def test_append_checks_still_refuse_a_changed_format():
    """The append's check shortcut (numpy K/V of the first append's format) leaves every mismatch to the full
    checks: dtype, H, D, K and V token counts apart, a non-float array."""
    from kvtool.errors import InputError

    st = QuantizedKVStore("g-KC128VT128", 2, 2)
    k = np.zeros((1, 2, 4, 128), np.float16)
    st.append(k, k)
    st.append(k[:, :, :1], k[:, :, :1])  # the format: taken
    bad = [(k.astype(np.float32), k.astype(np.float32)), (k[:, :1], k[:, :1]),
           (np.zeros((1, 2, 1, 64), np.float16),) * 2, (k[:, :, :2], k[:, :, :1]),
           (k.astype(np.int32), k.astype(np.int32))]
    for kb, vb in bad:
        with pytest.raises(InputError):
            st.append(kb, vb)
    assert st.n_tokens == 5
