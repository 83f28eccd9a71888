"""QuantizedKVStore: packed == fake_quant_kv bit for bit, streaming, incremental dequantize, bytes held,
simulate mode against a naive re-implementation, bad input."""

import numpy as np
import pytest
import torch

from kvtool.errors import InputError
from kvtool.quant_ops import SCHEMES, QuantizedKVStore, fake_quant_kv, parse_scheme
from kvtool.quant_ops.packing import tile_tokens
from tests.quant_ops.reference import outlier_kv

GRID = ["g-C16", "g-T32", "g-KC16VT32", "g-KT32VC16", "g-KC16VT16"]  # fixed-granularity schemes
ALL = [s.replace("128", "16") for s in SCHEMES]


def _np(x):
    return x.numpy() if isinstance(x, torch.Tensor) else x


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("scheme", ALL)
@pytest.mark.parametrize("bits", [(2, 2), (3, 2), (4, 8), (16, 2)])
def test_one_block_equals_fake_quant(lib, scheme, bits):
    k, v = outlier_kv(b=2, h=2, n=37, d=16, seed=1, dtype=np.float16)
    conv = torch.from_numpy if lib == "torch" else (lambda a: a)
    store = QuantizedKVStore(scheme, *bits)
    store.append(conv(k), conv(v))
    kh, vh = store.dequantize()
    assert type(kh) is type(conv(k)) and kh.dtype == conv(k).dtype and kh.shape == k.shape
    rk, rv = fake_quant_kv(k, v, scheme, *bits)
    np.testing.assert_array_equal(_np(kh), rk)
    np.testing.assert_array_equal(_np(vh), rv)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("scheme", GRID)
def test_token_by_token_equals_whole_block(lib, scheme):
    k, v = outlier_kv(b=1, h=2, n=70, d=16, seed=2, dtype=np.float16)
    conv = torch.from_numpy if lib == "torch" else (lambda a: a)
    store = QuantizedKVStore(scheme, 2, 3)
    store.append(conv(k[:, :, :21]), conv(v[:, :, :21]))  # a prefill, then one token at a time
    for t in range(21, 70):
        store.append(conv(k[:, :, t:t + 1]), conv(v[:, :, t:t + 1]))
        assert store.n_tokens == t + 1
    rk, rv = fake_quant_kv(k, v, scheme, 2, 3)
    kh, vh = store.dequantize()
    np.testing.assert_array_equal(_np(kh), rk)
    np.testing.assert_array_equal(_np(vh), rv)


@pytest.mark.parametrize("scheme", ["uniform", "or2", "g-CN", "g-KCNVT16"])
def test_growing_axis_schemes_quantize_in_blocks(scheme):
    k, v = outlier_kv(b=1, h=2, n=60, d=16, seed=3, dtype=np.float16)
    store = QuantizedKVStore(scheme, 4, 4, stream_block=8)
    store.append(k[:, :, :30], v[:, :, :30])
    for t in range(30, 60):
        store.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    kh, vh = store.dequantize()
    spec = parse_scheme(scheme)
    # prefill block, three full stream blocks of 8, 6 residual tokens kept exactly
    pieces = [(0, 30), (30, 38), (38, 46), (46, 54)]
    for which, x, xh in (("k", k, kh), ("v", v, vh)):
        if spec.side(which)[0] == "token":
            continue
        for a, b in pieces:
            ref = fake_quant_kv(x[:, :, a:b], x[:, :, a:b], scheme, 4, 4)[0]
            np.testing.assert_array_equal(xh[:, :, a:b], ref)
        np.testing.assert_array_equal(xh[:, :, 54:], x[:, :, 54:])


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("scheme", ["g-KC16VT32", "or2", "g-CN", "fp16"])
@pytest.mark.parametrize("mode", ["packed", "simulate"])
def test_incremental_dequantize_into_buffers(lib, scheme, mode):
    k, v = outlier_kv(b=1, h=2, n=50, d=16, seed=4, dtype=np.float16)
    conv = torch.from_numpy if lib == "torch" else (lambda a: a)
    store = QuantizedKVStore(scheme, 2, 2, mode=mode, stream_block=8)
    kb, vb = conv(np.zeros((1, 2, 64, 16), np.float16)), conv(np.zeros((1, 2, 64, 16), np.float16))
    store.append(conv(k[:, :, :10]), conv(v[:, :, :10]))
    for t in range(10, 50):
        store.append(conv(k[:, :, t:t + 1]), conv(v[:, :, t:t + 1]))
        ko, vo = store.dequantize(out=(kb, vb))
        kf, vf = store.dequantize()
        assert ko.shape == kf.shape == (1, 2, t + 1, 16)
        np.testing.assert_array_equal(_np(ko), _np(kf))
        np.testing.assert_array_equal(_np(vo), _np(vf))


def test_bytes_held_within_theory():
    n, h, d = 300, 4, 64
    k, v = outlier_kv(b=1, h=h, n=n, d=d, seed=5, dtype=np.float16)
    for scheme, g in (("g-KC128VT128", 128), ("g-T128", 128), ("g-C64", 64), ("g-KT64VC128", 64)):
        for bits in (2, 3, 4, 8):
            store = QuantizedKVStore(scheme, bits, bits)
            store.append(k, v)
            spec = parse_scheme(scheme)
            resid = sum(2 * h * d * (n % grp) for ax, grp in (spec.side("k"), spec.side("v")) if ax == "channel")
            pad = 2 * (-n % tile_tokens(bits)) * h * d * bits // 8  # the last packing tile's unused slots
            bound = (bits + 32 / g) / 16 * store.fp16_nbytes + resid + pad
            assert store.fp16_nbytes == 2 * 2 * h * n * d
            assert store.nbytes <= bound + 1e-9, (scheme, bits, store.nbytes, bound)
            assert store.nbytes >= bits / 16 * store.fp16_nbytes  # codes alone
            assert store.bits_per_value == pytest.approx(spec.bits_per_value(bits, bits, n, h * d))
    store = QuantizedKVStore("fp16")
    store.append(k, v)
    assert store.nbytes == store.fp16_nbytes
    # per-channel residual is counted: 300 = 2*128 + 44 tokens of K wait in fp16
    store = QuantizedKVStore("g-KC128VT128", 2, 2)
    store.append(k, v)
    codes = 2 * (2 * h * 256 * d) // 8 // 2 + (2 * h * n * d) // 8  # K codes + V codes
    params = 2 * 2 * h * 2 * d + 2 * 2 * n * (h * d // 128)
    assert store.nbytes == codes + params + 2 * h * 44 * d


def test_max_tokens_preallocates_without_slack():
    k, v = outlier_kv(b=1, h=2, n=64, d=16, dtype=np.float16)
    store = QuantizedKVStore("g-KC16VT16", 2, 2, max_tokens=64)
    for t in range(64):
        store.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert store.capacity_nbytes == store.nbytes + 2 * 16 * 2 * 16  # only the K residual buffer's slack


def _naive_simulate(k, v, scheme, kb, vb, steps):
    """The study's semantics written out: after each append, re-quantize everything but the newest token."""
    ck, cv = None, None
    for a, b in steps:
        ck = k[:, :, a:b] if ck is None else np.concatenate([ck, k[:, :, a:b]], axis=2)
        cv = v[:, :, a:b] if cv is None else np.concatenate([cv, v[:, :, a:b]], axis=2)
        if ck.shape[2] > 1:
            qk, qv = fake_quant_kv(ck[:, :, :-1], cv[:, :, :-1], scheme, kb, vb)
            ck = np.concatenate([qk, ck[:, :, -1:]], axis=2)
            cv = np.concatenate([qv, cv[:, :, -1:]], axis=2)
    return ck, cv


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("scheme", ["g-KC16VT16", "uniform", "or2", "g-KCNVT16"])
def test_simulate_mode_matches_naive(lib, scheme):
    k, v = outlier_kv(b=1, h=2, n=40, d=16, seed=6, dtype=np.float16)
    conv = torch.from_numpy if lib == "torch" else (lambda a: a)
    steps = [(0, 25)] + [(t, t + 1) for t in range(25, 40)]
    store = QuantizedKVStore(scheme, 2, 2, mode="simulate")
    for a, b in steps:
        store.append(conv(k[:, :, a:b]), conv(v[:, :, a:b]))
    kh, vh = store.dequantize()
    rk, rv = _naive_simulate(k, v, scheme, 2, 2, steps)
    np.testing.assert_array_equal(_np(kh), rk)
    np.testing.assert_array_equal(_np(vh), rv)
    np.testing.assert_array_equal(_np(kh)[:, :, -1], k[:, :, -1])  # the newest token is exact
    assert store.nbytes == store.fp16_nbytes  # simulate holds the dense fp16 cache


def test_reset_and_errors():
    k, v = outlier_kv(b=1, h=2, n=8, d=16, dtype=np.float16)
    store = QuantizedKVStore("g-KC16VT16", 2, 2)
    with pytest.raises(InputError, match="empty"):
        store.dequantize()
    store.append(k, v)
    with pytest.raises(InputError, match="same type"):
        store.append(torch.from_numpy(k), torch.from_numpy(v))
    with pytest.raises(InputError, match="same type"):
        store.append(k.astype(np.float32), v.astype(np.float32))
    with pytest.raises(InputError, match="same type"):
        store.append(k[:, :1], v[:, :1])
    with pytest.raises(InputError, match="out k buffer"):
        store.dequantize(out=(np.zeros((1, 2, 4, 16), np.float16), np.zeros((1, 2, 8, 16), np.float16)))
    store.reset()
    assert store.n_tokens == 0 and store.nbytes == 0 and store.fp16_nbytes == 0
    store.append(torch.from_numpy(k), torch.from_numpy(v))  # a new type after reset is fine
    assert store.n_tokens == 8
    with pytest.raises(InputError, match="mode"):
        QuantizedKVStore("g-T16", mode="fast")
    with pytest.raises(InputError, match="OpenVINO"):
        QuantizedKVStore("ov-u4")
    with pytest.raises(InputError, match="k_bits"):
        QuantizedKVStore("g-T16", k_bits=6)
    with pytest.raises(InputError, match="not a multiple"):
        QuantizedKVStore("g-KC16VT48", 3, 3).append(k, v)


def test_empty_append_is_a_no_op():
    k, v = outlier_kv(b=1, h=2, n=8, d=16, dtype=np.float16)
    store = QuantizedKVStore("g-KC16VT16", 2, 2)
    store.append(k[:, :, :0], v[:, :, :0])
    assert store.n_tokens == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_store_matches_numpy():
    k, v = outlier_kv(b=1, h=4, n=200, d=64, seed=8, dtype=np.float16)
    for scheme in ALL:
        for mode in ("packed", "simulate"):
            sc, sn = QuantizedKVStore(scheme, 2, 3, mode=mode), QuantizedKVStore(scheme, 2, 3, mode=mode)
            for a, b in [(0, 150)] + [(t, t + 1) for t in range(150, 200)]:
                sc.append(torch.from_numpy(k[:, :, a:b]).cuda(), torch.from_numpy(v[:, :, a:b]).cuda())
                sn.append(k[:, :, a:b], v[:, :, a:b])
            (kc, vc), (kn, vn) = sc.dequantize(), sn.dequantize()
            assert kc.device.type == "cuda"
            np.testing.assert_array_equal(kc.cpu().numpy(), kn)
            np.testing.assert_array_equal(vc.cpu().numpy(), vn)


@pytest.mark.parametrize("scheme,h", [("g-KC16VT32", 2), ("g-T24", 3), ("g-KT16VC8", 1), ("uniform", 2)])
@pytest.mark.parametrize("bits", [2, 3])
def test_torch_chunked_kernels_stream_like_numpy(scheme, h, bits, monkeypatch):
    from kvtool.quant_ops import kernels

    monkeypatch.setattr(kernels, "CPU_CHUNK", 256)  # many chunks, tiles split across appends
    k, v = outlier_kv(b=2, h=h, n=61, d=16, seed=12, dtype=np.float16)
    st_t, st_n = QuantizedKVStore(scheme, bits, 4, stream_block=8), QuantizedKVStore(scheme, bits, 4, stream_block=8)
    kb, vb = torch.zeros(2, h, 64, 16, dtype=torch.float16), torch.zeros(2, h, 64, 16, dtype=torch.float16)
    for a, b in [(0, 27)] + [(t, t + 1) for t in range(27, 45)] + [(45, 61)]:
        st_t.append(torch.from_numpy(k[:, :, a:b]), torch.from_numpy(v[:, :, a:b]))
        st_n.append(k[:, :, a:b], v[:, :, a:b])
        kt, vt = st_t.dequantize(out=(kb, vb))
        kn, vn = st_n.dequantize()
        np.testing.assert_array_equal(kt.numpy(), kn)
        np.testing.assert_array_equal(vt.numpy(), vn)
    assert st_t.nbytes == st_n.nbytes


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_first_append_adopts_only_fresh_quantized_arrays(lib):
    """The first append keeps the quantizer's fresh codes/params without copying them, but never the
    caller's tensors: changing the input afterwards changes nothing, and growth after adoption is exact."""
    k, v = outlier_kv(b=1, h=2, n=37, d=16, seed=21, dtype=np.float16)
    conv = torch.from_numpy if lib == "torch" else np.array
    kk, vv = conv(k.copy()), conv(v.copy())
    st = QuantizedKVStore("g-KC16VT16", 2, 2)
    st.append(kk, vv)
    before = [_np(a).copy() for a in st.dequantize()]
    kk[...] = 0
    vv[...] = 0  # the residual and every stored array are the store's own
    for a, b in zip(st.dequantize(), before, strict=True):
        np.testing.assert_array_equal(_np(a), b)
    step_k, step_v = outlier_kv(b=1, h=2, n=40, d=16, seed=22, dtype=np.float16)
    ref = QuantizedKVStore("g-KC16VT16", 2, 2)
    ref.append(k, v)
    for t in range(40):  # grow past the adopted buffers
        st.append(conv(step_k[:, :, t:t + 1].copy()), conv(step_v[:, :, t:t + 1].copy()))
        ref.append(step_k[:, :, t:t + 1], step_v[:, :, t:t + 1])
    for a, b in zip(st.dequantize(), ref.dequantize(), strict=True):
        np.testing.assert_array_equal(_np(a), b)
    assert st.nbytes == ref.nbytes
