"""Bit packing: exact round trip for 2/3/4/8 bits, the documented sizes, numpy == torch byte for byte."""

import numpy as np
import pytest
import torch

from kvtool.quant_ops.affine import block_for, choose_qparams_affine, dequantize_affine, quantize_affine
from kvtool.quant_ops.packing import dequantize_packed, pack_codes, packed_len, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("length", [8, 16, 128])
def test_pack_roundtrip_exact(bits, length):
    rng = np.random.default_rng(bits * 1000 + length)
    codes = rng.integers(0, 2**bits, size=(2, 3, 5, length), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (2, 3, 5, length * bits // 8)
    assert packed_len(length, bits) == length * bits // 8
    np.testing.assert_array_equal(unpack_codes(packed, bits), codes)
    tp = pack_codes(torch.from_numpy(codes), bits)
    np.testing.assert_array_equal(tp.numpy(), packed)
    np.testing.assert_array_equal(unpack_codes(tp, bits).numpy(), codes)


def test_three_bit_is_dense():
    codes = np.arange(8, dtype=np.uint8)[None]  # one of each code: 8 codes -> 3 bytes
    packed = pack_codes(codes, 3)
    assert packed.shape == (1, 3)
    word = int(packed[0, 0]) | int(packed[0, 1]) << 8 | int(packed[0, 2]) << 16
    assert [(word >> (3 * i)) & 7 for i in range(8)] == list(range(8))


@pytest.mark.parametrize("bits", [2, 3])
def test_pack_rejects_bad_length(bits):
    with pytest.raises(ValueError, match="multiple of"):
        pack_codes(np.zeros((2, 6), np.uint8), bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis,group", [("channel", 4), ("token", 8), ("token", 32), ("token", 16),
                                        ("tensor", None)])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_fused_dequantize_equals_unpacked(bits, axis, group, lib):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 8, 16)).astype(np.float16)
    if lib == "torch":
        x = torch.from_numpy(x)
    block, flat = block_for(axis, group, tuple(x.shape))
    assert not flat
    d, m = choose_qparams_affine(x, block, bits)
    codes = quantize_affine(x, block, d, m, bits)
    ref = dequantize_affine(codes, block, d, m)
    out = x[..., :0].new_empty(x.shape) if lib == "torch" else np.empty_like(x)
    dequantize_packed(pack_codes(codes, bits), bits, block, d, m, out)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
