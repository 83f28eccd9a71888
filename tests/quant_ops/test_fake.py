"""fake_quant_kv against the naive reference, both backends side by side, edge cases and bad input."""

import numpy as np
import pytest
import torch

from kvtool.errors import InputError
from kvtool.quant_ops import SCHEMES, fake_quant_kv, parse_scheme
from tests.quant_ops.reference import outlier_kv, ref_side

QUANT_SCHEMES = [s for s in SCHEMES if s != "fp16"]


def _scheme(name, g):
    return name.replace("128", str(g))


def _check_vs_ref(k, v, scheme, kb, vb):
    spec = parse_scheme(scheme)
    kh, vh = fake_quant_kv(k, v, scheme, k_bits=kb, v_bits=vb)
    for x, xh, which, bits in ((k, kh, "k", kb), (v, vh, "v", vb)):
        axis, group = spec.side(which)
        ref = ref_side(x, axis, group, bits, spec.outlier_pct) if bits != 16 else x
        assert xh.dtype == x.dtype and xh.shape == x.shape
        if x.dtype == np.float16:
            np.testing.assert_array_equal(xh, ref)
        else:  # float32: torch/numpy may fuse q*delta+min (1 ulp)
            np.testing.assert_allclose(xh, ref, rtol=2e-6, atol=2e-6 * float(np.abs(x).max()))
    return kh, vh


@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_naive_reference_fp16(scheme, bits):
    k, v = outlier_kv(b=2, h=4, n=37, d=16, seed=bits, dtype=np.float16)
    # g = 16 channels (< D_model 64) / 16 tokens (37 = 2 groups + 5 residual tokens)
    _check_vs_ref(k, v, _scheme(scheme, 16), bits, bits)


@pytest.mark.parametrize("scheme", ["g-KC8VT24", "g-T48", "g-KT8VC8", "g-T8", "or5", "uniform", "g-CN"])
def test_matches_naive_reference_fp32_and_mixed_bits(scheme):
    k, v = outlier_kv(b=1, h=3, n=20, d=16, seed=1, dtype=np.float32)  # g-T24 spans 1.5 heads, g-T48 = 3 heads
    _check_vs_ref(k, v, scheme, 3, 2)
    _check_vs_ref(k, v, scheme, 16, 4)


def test_error_bounded_by_half_step():
    k, v = outlier_kv(b=1, h=2, n=64, d=32, seed=3, dtype=np.float32)
    for bits in (2, 4, 8):
        kh, _ = fake_quant_kv(k, v, "g-C16", bits, bits)
        groups = k.reshape(1, 2, 4, 16, 32)
        step = (groups.max(axis=3, keepdims=True) - groups.min(axis=3, keepdims=True)) / (2**bits - 1)
        err = np.abs(kh - k).reshape(groups.shape)
        assert np.all(err <= step / 2 * (1 + 1e-4) + 1e-6)


@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_numpy_and_torch_agree(scheme, dtype):
    k, v = outlier_kv(b=2, h=2, n=40, d=32, seed=5)
    kt, vt = torch.from_numpy(k).to(dtype), torch.from_numpy(v).to(dtype)
    khat_t, vhat_t = fake_quant_kv(kt, vt, _scheme(scheme, 16), 2, 4)
    assert isinstance(khat_t, torch.Tensor) and khat_t.dtype == dtype and khat_t.shape == kt.shape
    if dtype == torch.bfloat16:  # numpy has no bfloat16: compare against the float32 path of the same values
        kn, vn = kt.float().numpy(), vt.float().numpy()
        khat_n, vhat_n = fake_quant_kv(kn, vn, _scheme(scheme, 16), 2, 4)
        np.testing.assert_allclose(khat_t.float().numpy(), khat_n, rtol=1e-2, atol=1e-2 * np.abs(kn).max())
        return
    kn, vn = kt.numpy(), vt.numpy()
    khat_n, vhat_n = fake_quant_kv(kn, vn, _scheme(scheme, 16), 2, 4)
    if dtype == torch.float16:
        np.testing.assert_array_equal(khat_t.numpy(), khat_n)
        np.testing.assert_array_equal(vhat_t.numpy(), vhat_n)
    else:
        np.testing.assert_allclose(khat_t.numpy(), khat_n, rtol=1e-6, atol=1e-6 * np.abs(kn).max())
        np.testing.assert_allclose(vhat_t.numpy(), vhat_n, rtol=1e-6, atol=1e-6 * np.abs(vn).max())


def test_outliers_kept_exactly():
    k, v = outlier_kv(b=2, h=2, n=50, d=16, seed=2, dtype=np.float32)
    kh, _ = fake_quant_kv(k, v, "or2", 2, 2)
    for b in range(2):
        flat, hat = k[b].ravel(), kh[b].ravel()
        n_side = int(flat.size * 2 / 200)
        order = np.argsort(flat)
        extremes = np.concatenate([order[:n_side], order[-n_side:]])
        np.testing.assert_array_equal(hat[extremes], flat[extremes])


def test_constant_groups_dequantize_to_themselves():
    k = np.full((1, 2, 32, 16), 0.3, np.float32)
    v = np.full((1, 2, 32, 16), -1.7, np.float16)
    for scheme in QUANT_SCHEMES:
        scheme = _scheme(scheme, 16)
        for bits in (2, 3, 4, 8):
            kh, _ = fake_quant_kv(k, k, scheme, bits, bits)
            _, vh = fake_quant_kv(v, v, scheme, bits, bits)
            np.testing.assert_array_equal(kh, k)
            np.testing.assert_array_equal(vh, v)
    # one constant channel inside otherwise random data
    k2 = np.random.default_rng(0).standard_normal((1, 2, 32, 16)).astype(np.float32)
    k2[:, :, :, 3] = 2.5
    kh, _ = fake_quant_kv(k2, k2, "g-C16", 2, 2)
    np.testing.assert_array_equal(kh[..., 3], k2[..., 3])


def test_per_channel_residual_is_untouched():
    k, v = outlier_kv(b=1, h=2, n=45, d=16, seed=4, dtype=np.float16)
    kh, vh = fake_quant_kv(k, v, "g-KC16VT32", 2, 2)
    np.testing.assert_array_equal(kh[:, :, 32:], k[:, :, 32:])  # 45 mod 16 = 13 newest tokens
    assert not np.array_equal(kh[:, :, :32], k[:, :, :32])
    assert not np.array_equal(vh[:, :, 32:], v[:, :, 32:])  # per-token V quantizes every token


@pytest.mark.parametrize("n", [0, 1, 5])
def test_short_and_empty_blocks(n):
    k, v = outlier_kv(b=2, h=2, n=max(n, 1), d=16, seed=0, dtype=np.float16)
    k, v = k[:, :, :n], v[:, :, :n]
    kh, vh = fake_quant_kv(k, v, "g-KC128VT32", 2, 2)
    assert kh.shape == k.shape and vh.shape == v.shape
    np.testing.assert_array_equal(kh, k)  # N < g: all residual
    if n:
        assert not np.array_equal(vh, v)
    for scheme in QUANT_SCHEMES:
        fake_quant_kv(k, v, scheme.replace("128", "32"), 4, 4)


@pytest.mark.parametrize("heads", [1, 3, 8])
def test_head_counts_and_batch(heads):
    k, v = outlier_kv(b=3, h=heads, n=17, d=8, seed=heads, dtype=np.float16)
    _check_vs_ref(k, v, "g-KC8VT8", 2, 3)
    _check_vs_ref(k, v, f"g-T{8 * heads}", 4, 4)


def test_fp16_scheme_and_16_bits_leave_data_alone():
    k, v = outlier_kv(dtype=np.float16)
    kh, vh = fake_quant_kv(k, v, "fp16", 2, 2)
    np.testing.assert_array_equal(kh, k)
    kh, vh = fake_quant_kv(k, v, "g-T16", 16, 2)
    np.testing.assert_array_equal(kh, k)
    assert not np.array_equal(vh, v)


@pytest.mark.parametrize("args,match", [
    (("g-XX", 2, 2), "unknown KV scheme"),
    (("g-T128", 5, 2), "k_bits=5"),
    (("g-T128", 2, 1), "v_bits=1"),
    (("ov-u8", 2, 2), "OpenVINO"),
    (("g-T48", 2, 2), "not a multiple"),
])
def test_bad_input(args, match):
    k, v = outlier_kv(h=4, d=16, dtype=np.float16)
    with pytest.raises(InputError, match=match):
        fake_quant_kv(k, v, *args)


def test_bad_shapes_and_types():
    k, v = outlier_kv(dtype=np.float16)
    with pytest.raises(ValueError, match="rank 4"):
        fake_quant_kv(k[0], v[0], "g-T16", 2, 2)
    with pytest.raises(ValueError, match="same B, H, N"):
        fake_quant_kv(k, v[:, :, :3], "g-T16", 2, 2)
    with pytest.raises(ValueError, match="dtype"):
        fake_quant_kv(k.astype(np.int32), v, "g-T16", 2, 2)
    with pytest.raises(ValueError, match="dtype"):
        fake_quant_kv(k.astype(np.float64), v.astype(np.float64), "g-T16", 2, 2)
    with pytest.raises(ValueError, match="numpy array or torch tensor"):
        fake_quant_kv(k.tolist(), v, "g-T16", 2, 2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    k, v = outlier_kv(b=1, h=4, n=300, d=64, seed=9, dtype=np.float16)
    for scheme in QUANT_SCHEMES:
        kc, vc = fake_quant_kv(torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda(), scheme, 2, 2)
        assert kc.device.type == "cuda"
        kn, vn = fake_quant_kv(k, v, scheme, 2, 2)
        np.testing.assert_array_equal(kc.cpu().numpy(), kn)
        np.testing.assert_array_equal(vc.cpu().numpy(), vn)


def test_outlier_threshold_fast_path_is_exact():
    from kvtool.quant_ops.outliers import _kth_smallest

    rng = np.random.default_rng(11)
    for dist in ("normal", "heavy", "ties"):
        x = rng.standard_normal(300_000).astype(np.float32)
        if dist == "heavy":
            x = x ** 3
        if dist == "ties":
            x = np.round(x, 1)
        for kth in (1, 17, 3000):
            assert _kth_smallest(torch.from_numpy(x), kth).item() == np.partition(x, kth - 1)[kth - 1]
            assert _kth_smallest(-torch.from_numpy(x), kth).item() == np.partition(-x, kth - 1)[kth - 1]
