"""Torch fast path of quantize+pack and unpack+dequantize: the same arithmetic as ``affine`` + ``packing``,
arranged for speed. Results are bit-identical to the numpy path (tests check it).

Eager torch on CPU pays for every full-size pass through memory and ~3-10 us per op call, and some of its
kernels are slow: integer -> float16 and float32 -> uint8 conversions run several times slower than a copy,
float16 arithmetic ~2-3x slower than float32, mixed-dtype arithmetic leaves the vectorised path, and
``aminmax`` / gathers (``take``, ``index``, a 256-entry byte lookup table) are 10-30x slower than a pass.
So here:

- the tensor is processed in chunks of about ``CPU_CHUNK`` elements along heads (or tile-aligned tokens,
  at least one head: smaller chunks lost more to per-op overhead than they gained in cache), with scratch
  allocated once per call; on CUDA the whole tensor is one chunk (same code);
- quantize (``quantize_block``) converts each chunk to float32 once, takes min and max there, computes the
  params in place on the small per-chunk arrays, runs ``sub_ / div_ / round_`` in place (``clamp_`` only
  where a subnormal delta could push a code past the top, see there), sums the token planes of each tile in
  place in float32 (``q0 + 4 q1 + 16 q2 + 64 q3`` is exact) and converts through int32;
- dequantize (``dequantize_packed``) of float16 data unpacks every token plane with one broadcast shift and
  one mask on int32 words, widens the codes to int16 once, and reads them as float16 *subnormals* so one
  float16 ``addcmul`` computes ``min + q * delta`` in float32 and writes float16 directly (exact: see
  ``_dequantize_half``). float32 data, and short (decode-step) outputs, take the float32 path.

Hand-written because neither torch nor torchao offers 3-bit packing or a fused packed dequantize for eager
CPU. It does not decide groupings (``granularity.block_size``) or hold state (``store``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

from kvtool.quant_ops.affine import Array, _split, params_shape
from kvtool.quant_ops.packing import packed_rows, tile_rows, tile_tokens, token_plane

CPU_CHUNK = 1 << 18  # elements per chunk on CPU (1 MiB of float32 temporaries)
HALF_MIN_TOKENS = 16  # below this (decode steps re-reading a partial tile) the float32 path has less overhead


def _chunks(shape: tuple[int, ...], block: tuple[int, ...], device_type: str, tile: int) -> Iterator[tuple]:
    """Yield ``(axis, start, stop, pstart, pstop, chunk_block)`` covering ``shape`` [B, H, N, L].

    Chunks run along heads (axis 1) or, with one head, along tokens (axis 2, in multiples of the tile and
    the token block); a chunk never splits a block unless one block spans the whole axis (then its params
    index is 0 and the chunk block is the chunk)."""
    axis = 1 if shape[1] > 1 else 2
    size, b = shape[axis], block[axis]
    per = math.prod(s for i, s in enumerate(shape) if i != axis)
    step = b if b < size else 1
    if axis == 2:
        step = math.lcm(step, tile)
    c = size if device_type != "cpu" else max(step, (CPU_CHUNK // max(per, 1)) // step * step)
    for s in range(0, size, c):
        e = min(size, s + c)
        if b >= size:  # one block along this axis
            yield axis, s, e, 0, 1, tuple(e - s if i == axis else bb for i, bb in enumerate(block))
        else:
            yield axis, s, e, s // b, e // b, block


def _sl(axis: int, a: int, b: int) -> tuple:
    return (slice(None),) * axis + (slice(a, b),)


def choose_qparams(x: Array, block: tuple[int, ...], bits: int) -> tuple[Array, Array]:
    """``affine.choose_qparams_affine`` for a torch tensor, reduced chunk by chunk in float32."""
    import torch

    from kvtool.quant_ops.affine import param_dtype, qparams_from_minmax

    pshape = params_shape(tuple(x.shape), block)
    mn = torch.full(pshape, float("inf"), dtype=torch.float32, device=x.device)
    mx = torch.full(pshape, float("-inf"), dtype=torch.float32, device=x.device)
    for axis, s, e, ps, pe, blk in _chunks(tuple(x.shape), block, x.device.type, 1):
        xc = x[_sl(axis, s, e)]
        inter, _ = _split(tuple(xc.shape), blk)
        t = xc.to(torch.float32).reshape(inter)
        dims = (1, 3, 5, 7)
        tmn, tmx = mn[_sl(axis, ps, pe)], mx[_sl(axis, ps, pe)]
        torch.minimum(tmn, t.amin(dim=dims).reshape(tmn.shape), out=tmn)
        torch.maximum(tmx, t.amax(dim=dims).reshape(tmx.shape), out=tmx)
    return qparams_from_minmax(mn, mx, bits, param_dtype(x))


def _pack_float(t: Array, bits: int, out: Array) -> None:
    """Pack float32 codes ``t`` [..., T, L] (T a multiple of the tile) into uint8 rows ``out``."""
    import torch

    p = tile_tokens(bits)
    lead, length = tuple(t.shape[:-2]), t.shape[-1]
    if bits == 8:
        out.copy_(t.to(torch.int16))
        return
    tiles = t.view(lead + (-1, p, length))
    acc = tiles[..., 0, :].clone()
    step = 3 if bits == 3 else bits
    for i in range(1, p):
        acc.add_(tiles[..., i, :], alpha=float(1 << (step * i)))
    if bits != 3:
        out.copy_(acc.to(torch.int16))
        return
    w = acc.to(torch.int32)  # a 24-bit word per column of 8 tokens, exact in float32
    o3 = out.view(lead + (-1, 3, length))
    o3[..., 0, :].copy_(w & 255)
    o3[..., 1, :].copy_((w >> 8) & 255)
    o3[..., 2, :].copy_(w >> 16)


def quantize_pack(x: Array, block: tuple[int, ...], delta: Array, mn: Array, bits: int,
                  offset: int = 0) -> Array:
    """``packing.pack_tokens(affine.quantize_affine(...), bits, offset)`` for a torch tensor."""
    import torch

    shape = tuple(x.shape)
    p = tile_tokens(bits)
    t, b2 = shape[2], block[2]
    if not offset and t % p and t > p and b2 in (1, t):  # fast path for the whole tiles, then the tail
        t0 = t // p * p
        parts = []
        for a, e in ((0, t0), (t0, t)):
            blk = block if b2 == 1 else block[:2] + (e - a,) + block[3:]
            d, m = (delta[:, :, a:e], mn[:, :, a:e]) if b2 == 1 else (delta, mn)
            parts.append(quantize_pack(x[:, :, a:e], blk, d, m, bits))
        return torch.cat(parts, dim=2)
    if offset or t % p:  # pad the codes with zero tokens around (decode steps, rare groupings)
        from kvtool.quant_ops.affine import quantize_affine
        from kvtool.quant_ops.packing import pack_tokens

        return pack_tokens(quantize_affine(x, block, delta, mn, bits), bits, offset)
    out = torch.empty(shape[:2] + (packed_rows(shape[2], bits), shape[3]), dtype=torch.uint8, device=x.device)
    qmax = float(2**bits - 1)
    d32, m32 = delta.to(torch.float32), mn.to(torch.float32)
    d32 = torch.where(d32 == 0, torch.ones_like(d32), d32)
    r = tile_rows(bits)
    for axis, s, e, ps, pe, blk in _chunks(shape, block, x.device.type, p):
        xc = x[_sl(axis, s, e)]
        inter, bshape = _split(tuple(xc.shape), blk)
        t = xc.to(torch.float32, copy=True)
        ti = t.view(inter)
        ti.sub_(m32[_sl(axis, ps, pe)].reshape(bshape)).div_(d32[_sl(axis, ps, pe)].reshape(bshape))
        ti.round_().clamp_(0.0, qmax)
        oc = out[_sl(axis, s, e)] if axis == 1 else out[:, :, s // p * r:e // p * r]
        _pack_float(t, bits, oc)
    return out


def _reduce_dims(blk: tuple[int, ...]) -> tuple[int, ...]:
    """Dims of the interleaved view that a block reduces over (only those with a block extent > 1)."""
    dims = tuple(2 * i + 1 for i, b in enumerate(blk) if b > 1)
    return dims or (1,)


def _pack_scratch(t: Array, bits: int, out: Array, acc32: Array) -> None:
    """``_pack_float`` for 2/4 bits: accumulate the token planes in place into plane 0 of ``t`` (float32,
    exact: < 256), convert through int32 scratch ``acc32`` [..., T/P, L] (float32 -> int32 -> uint8 is
    ~3x faster than float32 -> uint8 here and ~25% faster than through int16)."""
    p = tile_tokens(bits)
    tiles = t.view(tuple(t.shape[:-2]) + (-1, p, t.shape[-1]))
    acc = tiles[..., 0, :]
    for i in range(1, p):
        acc.add_(tiles[..., i, :], alpha=float(1 << (bits * i)))
    acc32.copy_(acc)
    out.copy_(acc32)


def quantize_block(x: Array, block: tuple[int, ...], bits: int) -> tuple[Array, Array, Array]:
    """``(packed, delta, min)`` = ``choose_qparams`` + ``quantize_pack`` in one pass over x when every chunk
    holds whole blocks (per-token, per-channel g); otherwise the two calls.

    Per chunk: one float32 conversion into reused scratch, min and max, then ``sub_ / div_ / round_`` in
    place. The clamp to [0, 2^b - 1] is skipped where it cannot act: the parameters come from this very
    block (so x >= min and x = max maps to at most (2^b - 1)(1 + 2^-11) < 2^b - 1/2) and every nonzero
    delta is a normal number of its dtype (a subnormal float16 delta can be rounded far enough down to
    push codes past the top, so chunks holding one are clamped)."""
    import torch

    from kvtool.quant_ops.affine import param_dtype

    shape = tuple(x.shape)
    p = tile_tokens(bits)
    chunks = list(_chunks(shape, block, x.device.type, p))
    if shape[2] % p or any(blk != tuple(block) for *_, blk in chunks):
        delta, mn = choose_qparams(x, block, bits)
        return quantize_pack(x, block, delta, mn, bits), delta, mn
    pdt = param_dtype(x)
    pshape = params_shape(shape, block)
    delta = torch.empty(pshape, dtype=pdt, device=x.device)
    mn = torch.empty(pshape, dtype=pdt, device=x.device)
    out = torch.empty(shape[:2] + (packed_rows(shape[2], bits), shape[3]), dtype=torch.uint8, device=x.device)
    qmax, r = float(2**bits - 1), tile_rows(bits)
    tiny = torch.finfo(pdt).tiny  # smallest normal number of the params' dtype
    big = max(math.prod(x[_sl(axis, s, e)].shape) for axis, s, e, *_ in chunks)
    scratch = torch.empty(big, dtype=torch.float32, device=x.device)
    acc32 = torch.empty(big // p, dtype=torch.int32, device=x.device)
    dims = _reduce_dims(tuple(block))
    for axis, s, e, ps, pe, blk in chunks:
        xc = x[_sl(axis, s, e)]
        t = scratch[:xc.numel()].view(xc.shape)
        t.copy_(xc)
        inter, bshape = _split(tuple(t.shape), blk)
        ti = t.view(inter)
        m32, d32 = ti.amin(dim=dims), ti.amax(dim=dims)
        d32.sub_(m32).div_(qmax)  # = affine.qparams_from_minmax, in place on the small per-chunk arrays
        dslot, mslot = delta[_sl(axis, ps, pe)], mn[_sl(axis, ps, pe)]
        dslot.copy_(d32.view(dslot.shape))
        mslot.copy_(m32.view(mslot.shape))
        if pdt != torch.float32:
            d32.copy_(dslot.view(d32.shape))  # the stored (rounded) delta; min is an element, so m32 is exact
        dmin = float(d32.amin())
        if dmin == 0:
            d32.masked_fill_(d32 == 0, 1.0)
        ti.sub_(m32.view(bshape)).div_(d32.view(bshape)).round_()
        if dmin < tiny:
            ti.clamp_(0.0, qmax)
        oc = out[_sl(axis, s, e)] if axis == 1 else out[:, :, s // p * r:e // p * r]
        if bits in (3, 8):
            _pack_float(t, bits, oc)
        else:
            _pack_scratch(t, bits, oc, acc32[:oc.numel()].view(oc.shape))
    return out, delta, mn


@functools.lru_cache(maxsize=1)
def _subnormal_half_ok() -> bool:
    """Whether float16 subnormals survive the conversion to float32 here (the codes-as-half trick of
    ``_dequantize_half`` needs them; a flush-to-zero CPU mode would break it)."""
    import torch

    probe = torch.arange(1, 4, dtype=torch.int16).view(torch.float16)
    return bool(torch.equal(probe.to(torch.float32) * 2.0**24, torch.tensor([1.0, 2.0, 3.0])))


def _unpack_codes16(pk: Array, bits: int, codes: Array, c8: Array) -> None:
    """Codes of whole token tiles ``pk`` [..., tiles*R, L] -> int16 ``codes`` [..., tiles*P, L] (token order);
    ``c8`` is uint8 scratch shaped like ``codes``. Integer ops only (no float conversion).

    2/4-bit: token ``i`` of every tile is ``(byte >> bits*i) & mask``, computed for all tokens in one
    broadcast shift and one mask over int32 views (4 columns per word, the mask repeated per byte), then
    widened once to int16. Measured alternatives (int64 words over pre-widened int16, per-plane shifts,
    plane-major scratch, uint8 ops) were 10-60% slower; torch's shifts run at ~10 GB/s here."""
    import torch

    p = tile_tokens(bits)
    if bits == 8:
        codes.copy_(pk)
        return
    tiles = codes.view(tuple(codes.shape[:-2]) + (-1, p, codes.shape[-1]))
    if bits == 3:
        lead, length = tuple(pk.shape[:-2]), pk.shape[-1]
        w3 = pk.view(lead + (-1, 3, length)).to(torch.int32)
        w = w3[..., 0, :] | (w3[..., 1, :] << 8) | (w3[..., 2, :] << 16)  # the 24-bit word of 8 codes
        for i in range(p):
            tiles[..., i, :].copy_(w >> (3 * i) if i else w)
        codes.bitwise_and_(7)
        return
    mask = 2**bits - 1
    src, dst = pk, c8.view(tiles.shape)
    if pk.shape[-1] % 4 == 0 and pk.stride(-1) == 1 and pk.storage_offset() % 4 == 0:
        src, dst, mask = pk.view(torch.int32), dst.view(torch.int32), mask * 0x01010101
    shifts = torch.arange(0, bits * p, bits, dtype=src.dtype, device=src.device).view(p, 1)
    torch.bitwise_right_shift(src.unsqueeze(-2), shifts, out=dst)  # every token plane in one op
    dst.bitwise_and_(mask)
    codes.copy_(c8)


def _dequantize_half(pk: Array, bits: int, blk: tuple[int, ...], d: Array, m: Array, oc: Array,
                     codes: Array, c8: Array) -> None:
    """float16 ``oc`` = q * delta + min for float16 params, in one arithmetic pass that writes float16.

    The int16 codes q (< 2^10) are reinterpreted as float16 *subnormals* (bits q = the value q * 2^-24), so
    ``addcmul(min, q16, delta, value=2^24)`` computes, in float32 inside torch's float16 kernel,
    ``min + (2^24 * q * 2^-24) * delta`` = ``min + q * delta`` and rounds once to float16. Every product is
    exact in float32 (q has <= 8 significant bits, delta 11), so the association and a fused multiply-add
    give the same float32 result as eq. (2)'s multiply then add, and so the same float16."""
    import torch

    _unpack_codes16(pk, bits, codes, c8)
    inter, bshape = _split(tuple(oc.shape), blk)
    q = codes.view(torch.float16).view(inter)
    dd, mm = d.reshape(bshape), m.reshape(bshape)
    o = oc.view(inter)
    if blk[-1] == 1:  # params vary along the contiguous axis: one op
        torch.addcmul(mm, q, dd, value=float(2**24), out=o)
    else:  # params constant along the contiguous axis: torch's kernel is fast with one such operand only
        o.copy_(mm.expand(inter))
        o.addcmul_(q, dd, value=float(2**24))


def dequantize_packed(packed: Array, bits: int, block: tuple[int, ...], delta: Array, mn: Array,
                      out: Array) -> Array:
    """``packing.dequantize_packed`` for torch tensors (``out`` [B, H, T, L], packed from token 0).

    float16 params and output on CPU take ``_dequantize_half`` over the whole token tiles (a per-token
    trailing partial tile goes the float32 way); everything else, and outputs shorter than
    ``HALF_MIN_TOKENS`` tokens, the float32 way (``_dequantize_f32``)."""
    import torch

    half = torch.float16
    p, r = tile_tokens(bits), tile_rows(bits)
    n = out.shape[2]
    n0 = n // p * p
    fast = (out.device.type == "cpu" and out.dtype == half and delta.dtype == half and mn.dtype == half
            and n0 >= HALF_MIN_TOKENS and (n0 == n or block[2] == 1) and _subnormal_half_ok())
    if not fast:
        return _dequantize_f32(packed, bits, block, delta, mn, out)
    if n0 < n:  # per-token groups: the whole tiles fast, the last partial tile the float32 way
        _dequantize_f32(packed[:, :, n0 // p * r:], bits, block, delta[:, :, n0:], mn[:, :, n0:], out[:, :, n0:])
        out, delta, mn = out[:, :, :n0], delta[:, :, :n0], mn[:, :, :n0]
        packed = packed[:, :, :n0 // p * r]
    shape = tuple(out.shape)
    chunks = list(_chunks(shape, block, out.device.type, p))
    big = max(math.prod(out[_sl(axis, s, e)].shape) for axis, s, e, *_ in chunks)
    codes = torch.empty(big, dtype=torch.int16, device=out.device)
    c8 = torch.empty(big, dtype=torch.uint8, device=out.device)
    for axis, s, e, ps, pe, blk in chunks:
        if axis == 1:
            pk, oc = packed[_sl(axis, s, e)], out[_sl(axis, s, e)]
        else:
            pk, oc = packed[:, :, s // p * r:(e - s) // p * r + s // p * r], out[:, :, s:e]
        _dequantize_half(pk, bits, blk, delta[_sl(axis, ps, pe)], mn[_sl(axis, ps, pe)], oc,
                         codes[:oc.numel()].view(oc.shape), c8[:oc.numel()].view(oc.shape))
    return out


def _dequantize_f32(packed: Array, bits: int, block: tuple[int, ...], delta: Array, mn: Array,
                    out: Array) -> Array:
    """Unpack token planes into float32, ``mul_`` / ``add_`` in float32, convert once into ``out``."""
    import torch

    shape = tuple(out.shape)
    p, r = tile_tokens(bits), tile_rows(bits)
    d32, m32 = delta.to(torch.float32), mn.to(torch.float32)
    for axis, s, e, ps, pe, blk in _chunks(shape, block, out.device.type, p):
        if axis == 1:
            pk, oc = packed[_sl(axis, s, e)], out[_sl(axis, s, e)]
        else:
            pk, oc = packed[:, :, s // p * r:packed_rows(e - s, bits) + s // p * r], out[:, :, s:e]
        n = oc.shape[2]
        t = torch.empty(oc.shape[:2] + (-(-n // p) * p, oc.shape[3]), dtype=torch.float32, device=out.device)
        tiles = t.view(oc.shape[:2] + (-1, p, oc.shape[3]))
        for i in range(p):
            tiles[..., i, :].copy_(pk if bits == 8 else token_plane(pk, bits, i))
        if t.shape[2] != n:  # a partial last tile (rare: prefill tails, decode steps)
            t = t[:, :, :n].contiguous()
        inter, bshape = _split(tuple(oc.shape), blk)
        t.view(inter).mul_(d32[_sl(axis, ps, pe)].reshape(bshape)).add_(m32[_sl(axis, ps, pe)].reshape(bshape))
        oc.copy_(t)
    return out
