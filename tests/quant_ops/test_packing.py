"""Bit packing along token tiles: exact round trip for 2/3/4/8 bits at any offset, the documented sizes,
numpy == torch byte for byte, OR-ing a tile filled in two steps, fused torch dequantize == numpy."""

import numpy as np
import pytest
import torch

from kvtool.quant_ops import kernels
from kvtool.quant_ops.affine import block_for, choose_qparams_affine, dequantize_affine, quantize_affine
from kvtool.quant_ops.packing import pack_tokens, packed_rows, tile_tokens, unpack_tokens


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("tokens", [1, 7, 8, 19])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_pack_roundtrip_exact(bits, tokens, offset):
    offset %= tile_tokens(bits)
    rng = np.random.default_rng(bits * 1000 + tokens)
    codes = rng.integers(0, 2**bits, size=(2, 3, tokens, 5), dtype=np.uint8)
    packed = pack_tokens(codes, bits, offset)
    rows = packed_rows(tokens, bits, offset)
    assert packed.dtype == np.uint8 and packed.shape == (2, 3, rows, 5)
    assert rows * 8 >= (tokens + offset) * bits and (rows - 1) * 8 < (tokens + offset + 8) * bits
    np.testing.assert_array_equal(unpack_tokens(packed, bits, tokens, offset), codes)
    tp = pack_tokens(torch.from_numpy(codes), bits, offset)
    np.testing.assert_array_equal(tp.numpy(), packed)
    np.testing.assert_array_equal(unpack_tokens(tp, bits, tokens, offset).numpy(), codes)


def test_sizes_and_three_bit_density():
    assert [packed_rows(64, b) for b in (2, 3, 4, 8)] == [16, 24, 32, 64]  # bits/8 bytes per code
    codes = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # one column, codes 0..7 over 8 tokens
    packed = pack_tokens(codes, 3)
    assert packed.shape == (1, 3, 1)
    word = int(packed[0, 0, 0]) | int(packed[0, 1, 0]) << 8 | int(packed[0, 2, 0]) << 16
    assert [(word >> (3 * i)) & 7 for i in range(8)] == list(range(8))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tile_filled_in_two_steps_by_or(bits):
    rng = np.random.default_rng(bits)
    p = tile_tokens(bits)
    codes = rng.integers(0, 2**bits, size=(1, 2, p, 4), dtype=np.uint8)
    first = pack_tokens(codes[:, :, :1], bits, 0)
    second = pack_tokens(codes[:, :, 1:], bits, 1)
    np.testing.assert_array_equal(first | second, pack_tokens(codes, bits))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis,group", [("channel", 4), ("token", 8), ("token", 32), ("tensor", None)])
@pytest.mark.parametrize("tokens", [8, 13])
def test_torch_kernels_equal_numpy_path(bits, axis, group, tokens, monkeypatch):
    monkeypatch.setattr(kernels, "CPU_CHUNK", 64)  # force many chunks, including blocks spanning chunks
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, tokens if axis != "channel" else 12, 16)).astype(np.float16)
    for h in (4, 1):
        xs = np.ascontiguousarray(x[:, :h])
        block, flat = block_for(axis, group if h * 16 % (group or 1) == 0 else 16, tuple(xs.shape))
        d, m = choose_qparams_affine(xs, block, bits)
        codes = quantize_affine(xs, block, d, m, bits)
        ref = dequantize_affine(codes, block, d, m)
        xt = torch.from_numpy(xs)
        dt, mt = kernels.choose_qparams(xt, block, bits)
        np.testing.assert_array_equal(dt.numpy(), d)
        np.testing.assert_array_equal(mt.numpy(), m)
        packed = kernels.quantize_pack(xt, block, dt, mt, bits)
        np.testing.assert_array_equal(packed.numpy(), pack_tokens(codes, bits))
        pb, db, mb = kernels.quantize_block(xt, block, bits)
        np.testing.assert_array_equal(pb.numpy(), packed.numpy())
        np.testing.assert_array_equal(db.numpy(), d)
        np.testing.assert_array_equal(mb.numpy(), m)
        out = torch.empty_like(xt)
        kernels.dequantize_packed(packed, bits, block, dt, mt, out)
        np.testing.assert_array_equal(out.numpy(), ref)
