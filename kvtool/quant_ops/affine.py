"""One affine quantization primitive family, parameterised by grouping (the torchao shape).

``choose_qparams_affine`` / ``quantize_affine`` / ``dequantize_affine`` take an array and a ``block_size``
(one entry per dimension; each block shares one ``delta`` and one ``min``). Which block size a KV grouping
means is decided in one place, ``granularity.block_size`` (``PerTensor``, ``PerChannel``, ``PerToken`` on
``[B, H, N, D]``, with its table); ``block_for`` is its form for an ``(axis, group)`` pair.

Eq. (2) of the study: ``delta = (max - min) / (2^b - 1)``, ``q = round((x - min) / delta)`` (round half to
even, clipped to [0, 2^b - 1]), ``x_hat = q * delta + min``; a constant block (delta = 0) gives q = 0 and
dequantizes to its own value. Statistics and arithmetic are float32 (dequantization: a float32 multiply
then a float32 add, as written); ``delta`` and ``min`` are stored in
float16 for float16 input (``min`` is an element, so exact) and float32 otherwise, and quantization uses the
stored values, so a packed store and ``fake_quant_kv`` agree bit for bit.

Numpy and torch (CPU or CUDA, device taken from the input) run the same code through a few shim functions;
the same IEEE operations in the same order give identical codes. This module does not pack bits
(``packing``), split outliers (``outliers``) or know about K/V streams (``store``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvtool.errors import InputError
from kvtool.quant_ops.granularity import block_size, granularity

Array = Any  # numpy.ndarray | torch.Tensor


# ---- array-namespace shim (numpy / torch) -------------------------------------------------------------
def is_torch(x: Array) -> bool:
    return type(x).__module__.startswith("torch")


def view_as(x: Array, shape: tuple[int, ...]) -> Array:
    """Reshape without copying (raises if a copy would be needed), so writes through the view land in x."""
    if is_torch(x):
        return x.view(shape)
    return np.reshape(x, shape, copy=False)


def param_dtype(x: Array):
    """Storage dtype of delta/min for input x: float16 for float16 input, float32 otherwise."""
    if is_torch(x):
        import torch

        return torch.float16 if x.dtype == torch.float16 else torch.float32
    return np.float16 if x.dtype == np.float16 else np.float32


def to_f32(x: Array) -> Array:
    if is_torch(x):
        import torch

        return x.to(torch.float32)
    return x.astype(np.float32, copy=False)


def cast(x: Array, dtype) -> Array:
    return x.to(dtype) if is_torch(x) else x.astype(dtype, copy=False)


def empty(shape: tuple[int, ...], dtype, like: Array) -> Array:
    if is_torch(like):
        import torch

        return torch.empty(shape, dtype=dtype, device=like.device)
    return np.empty(shape, dtype=dtype)


def u8_dtype(like: Array):
    if is_torch(like):
        import torch

        return torch.uint8
    return np.uint8


def concat(parts: list, axis: int) -> Array:
    if is_torch(parts[0]):
        import torch

        return torch.cat(parts, dim=axis)
    return np.concatenate(parts, axis=axis)


def nbytes(x: Array | None) -> int:
    if x is None:
        return 0
    return x.numel() * x.element_size() if is_torch(x) else int(x.nbytes)


# ---- groupings -> block sizes -------------------------------------------------------------------------
def block_for(axis: str, group: int | None, shape: tuple[int, ...]) -> tuple[tuple[int, ...], bool]:
    """``(block_size, flat)`` for a ``[B, H, N, D]`` tensor grouped by the ``(axis, group)`` pair
    (``"tensor" | "channel" | "token"``): ``granularity.block_size(granularity.granularity(axis, group), shape)``,
    the one mapping (see ``granularity``). ``flat`` = True: the block applies to the view ``[B, 1, N, H*D]``."""
    return block_size(granularity(axis, group), shape)


def to_flat(x: Array) -> Array:
    """[B, H, N, D] -> [B, 1, N, H*D] (head-major channel index c = h*D + d); a copy."""
    b, h, n, d = x.shape
    if is_torch(x):
        return x.permute(0, 2, 1, 3).reshape(b, 1, n, h * d)
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(b, 1, n, h * d)


def from_flat(x: Array, h: int) -> Array:
    """[B, 1, N, H*D] -> [B, H, N, D] (a copy)."""
    b, _, n, hd = x.shape
    y = x.reshape(b, n, h, hd // h)
    if is_torch(x):
        return y.permute(0, 2, 1, 3).contiguous()
    return np.ascontiguousarray(y.transpose(0, 2, 1, 3))


def _split(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Interleaved shape (n0, b0, n1, b1, ...) and the params shape broadcastable against it."""
    if len(block) != len(shape):
        raise InputError(f"block_size {block}: expected {len(shape)} entries")
    inter, bshape = [], []
    for s, b in zip(shape, block, strict=True):
        if b < 1 or s % b:
            raise InputError(f"block_size {block} does not tile shape {tuple(shape)}")
        inter += [s // b, b]
        bshape += [s // b, 1]
    return tuple(inter), tuple(bshape)


def params_shape(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s // b for s, b in zip(shape, block, strict=True))


# ---- the primitive family -----------------------------------------------------------------------------
def qparams_from_minmax(mn: Array, mx: Array, bits: int, pdtype) -> tuple[Array, Array]:
    """``(delta, min)`` in storage dtype ``pdtype`` from per-block float min/max arrays."""
    mn32, mx32 = to_f32(mn), to_f32(mx)
    delta = (mx32 - mn32) / float(2**bits - 1)
    return cast(delta, pdtype), cast(mn32, pdtype)


def choose_qparams_affine(x: Array, block_size: tuple[int, ...], bits: int) -> tuple[Array, Array]:
    """Per-block ``(delta, min)``, shape ``x.shape // block_size``, dtype ``param_dtype(x)``."""
    inter, _ = _split(tuple(x.shape), tuple(block_size))
    xi = view_as(x, inter) if _contig(x) else x.reshape(inter)
    axes = tuple(range(1, 2 * x.ndim, 2))
    pshape = params_shape(tuple(x.shape), tuple(block_size))
    if is_torch(x):
        mn, mx = xi.amin(dim=axes), xi.amax(dim=axes)
    else:
        mn, mx = xi.min(axis=axes), xi.max(axis=axes)
    delta, mn = qparams_from_minmax(mn, mx, bits, param_dtype(x))
    return view_as(delta, pshape), view_as(mn, pshape)


def _contig(x: Array) -> bool:
    return x.is_contiguous() if is_torch(x) else x.flags.c_contiguous


def quantize_affine(x: Array, block_size: tuple[int, ...], delta: Array, mn: Array, bits: int) -> Array:
    """uint8 codes ``round((x - min) / delta)`` clipped to [0, 2^b - 1]; shape of x. Where delta = 0 the
    code is 0 (the block is constant, or its range is below what delta's dtype can hold)."""
    inter, bshape = _split(tuple(x.shape), tuple(block_size))
    xi = x.reshape(inter)
    d32 = to_f32(delta).reshape(bshape)
    m32 = to_f32(mn).reshape(bshape)
    qmax = float(2**bits - 1)
    if is_torch(x):
        import torch

        d32 = torch.where(d32 == 0, torch.ones_like(d32), d32)
        # same-dtype in-place float32 ops: torch's mixed-dtype kernels are several times slower on CPU
        t = xi.to(torch.float32, copy=True)
        t.sub_(m32).div_(d32).round_().clamp_(0.0, qmax)
        return t.to(torch.uint8).reshape(x.shape)
    d32 = np.where(d32 == 0, np.float32(1.0), d32)
    t = np.subtract(xi, m32, dtype=np.float32)
    np.divide(t, d32, out=t)
    np.rint(t, out=t)
    np.clip(t, 0.0, qmax, out=t)
    return t.astype(np.uint8).reshape(x.shape)


def dequantize_affine(codes: Array, block_size: tuple[int, ...], delta: Array, mn: Array,
                      out_dtype=None, out: Array | None = None) -> Array:
    """``codes * delta + min``: a float32 multiply, a float32 add, then one conversion to ``out_dtype``
    (default: delta's dtype) — the same operations in the same order on both backends, so the results are
    identical. ``out`` (shape of codes) may be a strided view of a larger array."""
    inter, bshape = _split(tuple(codes.shape), tuple(block_size))
    if out is None:
        out = empty(tuple(codes.shape), out_dtype if out_dtype is not None else delta.dtype, codes)
    qi = codes.reshape(inter)
    oi = view_as(out, inter)
    if is_torch(codes):
        import torch

        t = qi.to(torch.float32)
        t.mul_(delta.to(torch.float32).reshape(bshape)).add_(mn.to(torch.float32).reshape(bshape))
        oi.copy_(t)
        return out
    d32 = delta.astype(np.float32, copy=False).reshape(bshape)
    m32 = mn.astype(np.float32, copy=False).reshape(bshape)
    t = np.multiply(qi, d32, dtype=np.float32)
    np.add(t, m32, out=t)
    np.copyto(oi, t, casting="same_kind")
    return out
