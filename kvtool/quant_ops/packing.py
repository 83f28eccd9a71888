"""Bit packing of quantization codes along the last axis, and a fused unpack + dequantize.

Layout ("planar"): a row of L codes is cut into P planes of M consecutive codes (P = 8 // bits codes per byte,
M = L / P); byte j of the packed row holds code j of every plane. 2-bit: 4 codes per byte, 4-bit: 2, 8-bit: 1.
3-bit is dense: 8 planes of M = L/8 codes in 3 byte-planes (8 codes in 3 bytes). Planes make unpacking a few
whole-array shifts and masks whose results are contiguous slices of the output row, so ``dequantize_packed``
writes each plane straight into its slice of the output (one ``addcmul`` per plane, no full-size code array).
Hand-written: none of numpy, torch or torchao offers 3-bit packing or this fused numpy/torch path.

Requires L % 4 (2-bit), L % 2 (4-bit), L % 8 (3-bit) == 0. Does not choose parameters (``affine``).
"""

from __future__ import annotations

from kvtool.errors import InputError
from kvtool.quant_ops.affine import Array, concat, dequantize_affine, empty, u8_dtype

_PLANES = {2: 4, 3: 8, 4: 2, 8: 1}


def planes(bits: int) -> int:
    return _PLANES[bits]


def packed_len(length: int, bits: int) -> int:
    """Bytes per row of ``length`` codes."""
    check_packable(length, bits)
    return length * bits // 8


def check_packable(length: int, bits: int) -> None:
    if bits not in _PLANES:
        raise InputError(f"bits={bits}: packing supports 2, 3, 4, 8")
    if length % _PLANES[bits]:
        raise InputError(f"row length {length}: {bits}-bit packing needs a multiple of {_PLANES[bits]} "
                         f"(the head dim D, or H*D for per-token groups spanning heads)")


def pack_codes(codes: Array, bits: int) -> Array:
    """uint8 codes [..., L] (values < 2^bits) -> packed uint8 [..., L*bits/8]."""
    length = codes.shape[-1]
    check_packable(length, bits)
    if bits == 8:
        return codes.clone() if hasattr(codes, "clone") else codes.copy()
    p = _PLANES[bits]
    m = length // p
    pl = [codes[..., i * m:(i + 1) * m] for i in range(p)]
    if bits == 2:
        return pl[0] | (pl[1] << 2) | (pl[2] << 4) | (pl[3] << 6)
    if bits == 4:
        return pl[0] | (pl[1] << 4)
    # 3-bit: 24-bit little-endian word per 8 codes, split in 3 byte-planes
    b0 = pl[0] | (pl[1] << 3) | ((pl[2] & 3) << 6)
    b1 = (pl[2] >> 2) | (pl[3] << 1) | (pl[4] << 4) | ((pl[5] & 1) << 7)
    b2 = (pl[5] >> 1) | (pl[6] << 2) | (pl[7] << 5)
    return concat([b0, b1, b2], axis=codes.ndim - 1)


def unpack_plane(packed: Array, bits: int, i: int) -> Array:
    """Codes of plane ``i`` ([..., M]) from packed rows."""
    if bits == 8:
        return packed
    if bits == 2:
        if i == 0:
            return packed & 3
        return packed >> 6 if i == 3 else (packed >> (2 * i)) & 3
    if bits == 4:
        return packed & 15 if i == 0 else packed >> 4
    m = packed.shape[-1] // 3
    b0, b1, b2 = packed[..., :m], packed[..., m:2 * m], packed[..., 2 * m:]
    if i == 0:
        return b0 & 7
    if i == 1:
        return (b0 >> 3) & 7
    if i == 2:
        return (b0 >> 6) | ((b1 & 1) << 2)
    if i == 3:
        return (b1 >> 1) & 7
    if i == 4:
        return (b1 >> 4) & 7
    if i == 5:
        return (b1 >> 7) | ((b2 & 3) << 1)
    if i == 6:
        return (b2 >> 2) & 7
    return b2 >> 5


def unpack_codes(packed: Array, bits: int) -> Array:
    """Inverse of ``pack_codes``: packed [..., L*bits/8] -> uint8 codes [..., L]."""
    if bits == 8:
        return packed
    return concat([unpack_plane(packed, bits, i) for i in range(_PLANES[bits])], axis=packed.ndim - 1)


def dequantize_packed(packed: Array, bits: int, block_size: tuple[int, ...], delta: Array, mn: Array,
                      out: Array) -> Array:
    """Unpack + dequantize into ``out`` ([..., L], may be a strided view) plane by plane.

    Same arithmetic per element as ``dequantize_affine`` on the unpacked codes, so the results are equal."""
    p = _PLANES[bits]
    length = out.shape[-1]
    m = length // p
    b = block_size[-1]
    if p == 1 or not (b == 1 or b % m == 0 or m % b == 0):
        return dequantize_affine(unpack_codes(packed, bits), block_size, delta, mn, out=out)
    for i in range(p):
        q = unpack_plane(packed, bits, i)
        if b == 1:  # params per column
            sl = slice(i * m, (i + 1) * m)
            blk = block_size
        elif b % m == 0:  # the whole plane inside one block column
            c = (i * m) // b
            sl = slice(c, c + 1)
            blk = tuple(block_size[:-1]) + (m,)
        else:  # several blocks per plane
            sl = slice(i * m // b, (i + 1) * m // b)
            blk = block_size
        dequantize_affine(q, blk, delta[..., sl], mn[..., sl], out=out[..., i * m:(i + 1) * m])
    return out


def zeros_u8(shape: tuple[int, ...], like: Array) -> Array:
    x = empty(shape, u8_dtype(like), like)
    x[...] = 0
    return x
