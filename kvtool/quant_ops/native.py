"""The native (C++) quant_ops kernels, when built, and the report of which path runs.

``kvtool/quant_ops/_native.cpp`` (hand-written: no library packs 3-bit token tiles or quantizes bit-identically
to eq. (2) as ``affine`` defines it) is built by ``pip install`` as an optional extension (see ``setup.py``).
This module wraps it for numpy arrays and CPU torch tensors (through zero-copy ``.numpy()`` views; no torch
import here) and says why it is not used when it is not:

    available() -> bool            the extension imported and is not disabled
    reason() -> str                "native C++ kernels (avx2+fma+f16c)" or why the portable path runs
    info() -> dict                 {"native": bool, "path": "native" | "portable", "isa", "reason"}
    supports(x) -> bool            an array the native kernels take (numpy / CPU torch, float16 / float32)
    quantize_block(x, block, bits, offset) -> (packed, delta, mn)
    dequantize_packed(packed, bits, block, delta, mn, out) -> out

``KVTOOL_NATIVE=0`` in the environment (or ``with native.disabled():``) turns the native path off, and
``KVTOOL_NATIVE_ISA=baseline`` keeps the portable (non-AVX2) code of the binary, for
comparisons and tests of the fallback.
Results are bit-identical to the numpy path (``affine`` + ``packing``); tests check it. This module does not
decide groupings (``granularity.block_size``) or hold state (``store``); the fused attention is in ``attention``.
"""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np

from kvtool.quant_ops.affine import Array, is_torch
from kvtool.quant_ops.packing import packed_rows


@functools.lru_cache(maxsize=1)
def _load():
    """(module or None, reason)."""
    if os.environ.get("KVTOOL_NATIVE", "1") == "0":
        return None, "disabled by KVTOOL_NATIVE=0"
    try:
        from kvtool.quant_ops import _native
    except ImportError as e:  # not built (no compiler at install time) or built for another Python
        return None, f"native extension not built ({e}); reinstall with a C++ compiler (pip install -e .)"
    return _native, f"native C++ kernels ({_native.isa()})"


@contextlib.contextmanager
def disabled(why: str = "disabled by native.disabled()"):
    """Within the block, report the native kernels unavailable and run the portable path (comparisons)."""
    global _load
    saved = _load
    _load = lambda: (None, why)  # noqa: E731
    try:
        yield
    finally:
        _load = saved


def available() -> bool:
    return _load()[0] is not None


def reason() -> str:
    return _load()[1]


def info() -> dict:
    """What quant_ops runs here: ``path`` is "native" or "portable" (the numpy/torch code), with the reason."""
    mod, why = _load()
    return {"native": mod is not None, "path": "native" if mod is not None else "portable",
            "isa": mod.isa() if mod is not None else None, "reason": why}


def _np(x: Array) -> np.ndarray:
    return x.detach().numpy() if is_torch(x) else x


def supports(x: Array) -> bool:
    """Whether the native kernels take ``x`` (numpy or a CPU torch tensor, float16 or float32, last axis
    contiguous) and the extension is available."""
    if not available():
        return False
    if is_torch(x):
        import torch

        if x.device.type != "cpu" or x.dtype not in (torch.float16, torch.float32) or x.ndim != 4:
            return False
        return x.shape[-1] <= 1 or x.stride(-1) == 1
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float16, np.float32) or x.ndim != 4:
        return False
    return x.shape[-1] <= 1 or x.strides[-1] == x.itemsize


def quantize_block(x: Array, block: tuple[int, ...], bits: int, offset: int = 0) -> tuple[Array, Array, Array]:
    """``(packed, delta, mn)`` of ``x`` [B, H, T, L] under ``block`` (1, bh, bt, bl): the same bytes as
    ``packing.pack_tokens(affine.quantize_affine(...), bits, offset)`` with ``affine.choose_qparams_affine``'s
    params. Returns the type of ``x`` (torch tensors share memory with the numpy arrays made here)."""
    mod = _load()[0]
    xn = _np(x)
    b, h, t, length = xn.shape
    if block[0] != 1:
        raise ValueError(f"block_size {block}: the native kernels need 1 on the batch axis")
    pdt = np.float16 if xn.dtype == np.float16 else np.float32
    pshape = (b, h // block[1], t // block[2], length // block[3])
    packed = np.empty((b, h, packed_rows(t, bits, offset), length), np.uint8)
    delta, mn = np.empty(pshape, pdt), np.empty(pshape, pdt)
    mod.quantize_pack(xn, packed, delta, mn, block[1], block[2], block[3], bits, offset)
    if is_torch(x):
        import torch

        return torch.from_numpy(packed), torch.from_numpy(delta), torch.from_numpy(mn)
    return packed, delta, mn


def dequantize_packed(packed: Array, bits: int, block: tuple[int, ...], delta: Array, mn: Array,
                      out: Array) -> Array:
    """Unpack + ``q * delta + min`` (float32 multiply, float32 add, one conversion) into ``out`` [B, H, T, L]
    (any strides with a contiguous last axis; float16 or float32), as ``packing.dequantize_packed``."""
    _load()[0].dequantize(_np(packed), _np(delta), _np(mn), _np(out), block[1], block[2], block[3], bits)
    return out
