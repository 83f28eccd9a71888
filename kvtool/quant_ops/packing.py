"""Bit packing of quantization codes along the token axis ("token tiles").

Codes ``[..., T, L]`` (T tokens, L codes per token row) are cut into tiles of P consecutive tokens
(P = 8 // bits codes per byte: 4 for 2-bit, 2 for 4-bit, 1 for 8-bit; 8 for 3-bit). A tile is stored as R
byte rows of length L (R = 1; R = 3 for 3-bit): byte ``c`` of the tile's row holds the codes of column ``c``
of its P tokens, token ``i`` of the tile in bits ``[bits*i, bits*(i+1))``. 3-bit is dense: the 8 codes of a
column form a 24-bit little-endian word split over the tile's 3 rows (8 codes in 3 bytes).

Why along tokens: unpacking token ``i`` of every tile is one shift and one mask over whole rows, and its
result is a full output row, so dequantization moves rows of L values at a time; and a cache that grows
token by token fills a tile in place by OR-ing the new token's codes into the tile's rows (``offset``).
A trailing partial tile is padded with code 0 (held, and counted, as storage).

Hand-written: none of numpy, torch or torchao offers 3-bit packing. This module does not choose parameters.
"""

from __future__ import annotations

from kvtool.quant_ops.affine import Array, concat, dequantize_affine, empty, is_torch, u8_dtype

_TILE = {2: 4, 3: 8, 4: 2, 8: 1}
_ROWS = {2: 1, 3: 3, 4: 1, 8: 1}


def tile_tokens(bits: int) -> int:
    """Tokens per tile (P)."""
    return _TILE[bits]


def tile_rows(bits: int) -> int:
    """Byte rows per tile (R)."""
    return _ROWS[bits]


def packed_rows(n_tokens: int, bits: int, offset: int = 0) -> int:
    """Byte rows holding ``n_tokens`` codes that start at position ``offset`` of their first tile."""
    p = _TILE[bits]
    return -(-(n_tokens + offset) // p) * _ROWS[bits]


def _zeros(shape: tuple[int, ...], like: Array) -> Array:
    z = empty(shape, u8_dtype(like), like)
    z[...] = 0
    return z


def pack_tokens(codes: Array, bits: int, offset: int = 0) -> Array:
    """uint8 codes ``[..., T, L]`` (values < 2^bits) -> packed uint8 ``[..., packed_rows(T, bits, offset), L]``.

    ``offset`` (0 <= offset < P) places the first token at position ``offset`` of its tile; the earlier
    positions hold code 0, so the first tile's rows can be OR-ed into a partly filled tile."""
    if bits not in _TILE:
        raise ValueError(f"bits={bits}: packing supports 2, 3, 4, 8")
    p = _TILE[bits]
    lead, t, length = tuple(codes.shape[:-2]), codes.shape[-2], codes.shape[-1]
    pad_end = -(t + offset) % p
    if offset or pad_end:
        parts = ([_zeros(lead + (offset, length), codes)] if offset else []) + [codes]
        parts += [_zeros(lead + (pad_end, length), codes)] if pad_end else []
        codes = concat(parts, axis=codes.ndim - 2)
    if bits == 8:
        return codes.clone() if is_torch(codes) else codes.copy()
    tiles = codes.reshape(lead + (-1, p, length))
    pl = [tiles[..., i, :] for i in range(p)]
    if bits == 2:
        return pl[0] | (pl[1] << 2) | (pl[2] << 4) | (pl[3] << 6)
    if bits == 4:
        return pl[0] | (pl[1] << 4)
    b0 = pl[0] | (pl[1] << 3) | ((pl[2] & 3) << 6)
    b1 = (pl[2] >> 2) | (pl[3] << 1) | (pl[4] << 4) | ((pl[5] & 1) << 7)
    b2 = (pl[5] >> 1) | (pl[6] << 2) | (pl[7] << 5)
    stacked = concat([b0[..., None, :], b1[..., None, :], b2[..., None, :]], axis=codes.ndim - 1)  # [.., tiles, 3, L]
    return stacked.reshape(lead + (-1, length))


def token_plane(packed: Array, bits: int, i: int) -> Array:
    """Codes of token ``i`` of every tile: packed ``[..., tiles*R, L]`` -> ``[..., tiles, L]``."""
    if bits == 8:
        return packed
    if bits == 2:
        if i == 0:
            return packed & 3
        return packed >> 6 if i == 3 else (packed >> (2 * i)) & 3
    if bits == 4:
        return packed & 15 if i == 0 else packed >> 4
    lead, length = tuple(packed.shape[:-2]), packed.shape[-1]
    t3 = packed.reshape(lead + (-1, 3, length))
    b0, b1, b2 = t3[..., 0, :], t3[..., 1, :], t3[..., 2, :]
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


def unpack_tokens(packed: Array, bits: int, n_tokens: int, offset: int = 0) -> Array:
    """Inverse of ``pack_tokens``: the ``n_tokens`` codes ``[..., n_tokens, L]`` starting at ``offset``."""
    p = _TILE[bits]
    lead, length = tuple(packed.shape[:-2]), packed.shape[-1]
    tiles = packed.shape[-2] // _ROWS[bits]
    out = empty(lead + (tiles, p, length), u8_dtype(packed), packed)
    for i in range(p):
        out[..., i, :] = token_plane(packed, bits, i)
    return out.reshape(lead + (tiles * p, length))[..., offset:offset + n_tokens, :]


def dequantize_packed(packed: Array, bits: int, block_size: tuple[int, ...], delta: Array, mn: Array,
                      out: Array) -> Array:
    """Unpack + dequantize packed tokens into ``out`` ``[B, H, T, L]`` (T from out); the numpy path."""
    codes = unpack_tokens(packed, bits, out.shape[-2])
    return dequantize_affine(codes, block_size, delta, mn, out=out)
