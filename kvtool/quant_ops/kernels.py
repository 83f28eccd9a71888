"""Torch fast path of quantize+pack and unpack+dequantize: the same arithmetic as ``affine`` + ``packing``,
arranged for speed. Results are bit-identical to the numpy path (tests check it).

Eager torch on CPU pays for every full-size pass through memory, and some of its kernels are slow: integer
-> float16 and float32 -> uint8 conversions run several times slower than a copy, mixed-dtype arithmetic
leaves the vectorised path, and short inner loops (strided slices) cost per loop. So here:

- the tensor is processed in chunks of about ``CPU_CHUNK`` elements along heads (or tile-aligned tokens),
  so the float32 temporaries stay in cache; on CUDA the whole tensor is one chunk (same code);
- quantize converts to float32 once, reduces min/max there, runs ``sub_/div_/round_/clamp_`` in place, and
  packs the token tiles *in float32* (``q0 + 4 q1 + 16 q2 + 64 q3`` is exact), converting the packed bytes
  through int16 (float32 -> int16 -> uint8 is fast where float32 -> uint8 is not);
- dequantize unpacks token ``i`` of every tile with one shift and one mask, converts it uint8 -> float32
  into its rows of a float32 temporary (whole rows: long inner loops), scales it with ``mul_`` / ``add_``
  and converts once into the output.

Hand-written because neither torch nor torchao offers 3-bit packing or a fused packed dequantize for eager
CPU. It does not decide groupings (``affine.block_for``) or hold state (``store``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from kvtool.quant_ops.affine import Array, _split, params_shape
from kvtool.quant_ops.packing import packed_rows, tile_rows, tile_tokens, token_plane

CPU_CHUNK = 1 << 18  # elements per chunk on CPU (1 MiB of float32 temporaries)


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


def quantize_block(x: Array, block: tuple[int, ...], bits: int) -> tuple[Array, Array, Array]:
    """``(packed, delta, min)`` = ``choose_qparams`` + ``quantize_pack`` in one pass over x when every chunk
    holds whole blocks (per-token, per-channel g); otherwise the two calls."""
    import torch

    from kvtool.quant_ops.affine import param_dtype, qparams_from_minmax

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
    for axis, s, e, ps, pe, blk in chunks:
        t = x[_sl(axis, s, e)].to(torch.float32, copy=True)
        inter, bshape = _split(tuple(t.shape), blk)
        ti = t.view(inter)
        dims = (1, 3, 5, 7)
        dc, mc = qparams_from_minmax(ti.amin(dim=dims), ti.amax(dim=dims), bits, pdt)
        delta[_sl(axis, ps, pe)] = dc.reshape(delta[_sl(axis, ps, pe)].shape)
        mn[_sl(axis, ps, pe)] = mc.reshape(mn[_sl(axis, ps, pe)].shape)
        d32 = dc.to(torch.float32)
        d32 = torch.where(d32 == 0, torch.ones_like(d32), d32)
        ti.sub_(mc.to(torch.float32).reshape(bshape)).div_(d32.reshape(bshape))
        ti.round_().clamp_(0.0, qmax)
        _pack_float(t, bits, out[_sl(axis, s, e)] if axis == 1 else out[:, :, s // p * r:e // p * r])
    return out, delta, mn


def dequantize_packed(packed: Array, bits: int, block: tuple[int, ...], delta: Array, mn: Array,
                      out: Array) -> Array:
    """``packing.dequantize_packed`` for torch tensors (``out`` [B, H, T, L], packed from token 0)."""
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
