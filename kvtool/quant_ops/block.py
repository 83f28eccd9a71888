"""``QuantizedBlock``: one quantized ``[B, H, T, D]`` block of K or V — the named container of quant_ops.

Fields (``b`` = bits; the "view" is the tensor itself, or ``[B, 1, T, H*D]`` when ``flat``):

    qdata      uint8 token tiles of the view: [B, H', rows, L] with rows = ceil(T / P) * R (see ``packing``)
    delta, mn  per-block step and min, shape view_shape // block_size, float16 for float16 input
    block_size per-dim block of the view (see ``granularity.block_size``)
    idx, vals  or<s> only: flat int32 outlier positions (into the [B, H*T*D] rows) and their exact values
    shape      the original [B, H, T, D]; dtype the input dtype

``from_float`` quantizes every token it is given (residual handling belongs to the caller), ``dequantize``
returns or fills a ``[B, H, T, D]`` array. Kernel dispatch: the native C++ kernels (``native``) for numpy
arrays and CPU torch tensors in float16/float32 when built, else the torch fast path (``kernels``) or the
numpy path (``affine`` + ``packing``); all three give the same bytes. It knows nothing about streams, residuals or K versus V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvtool.quant_ops import kernels, native
from kvtool.quant_ops.affine import (
    Array,
    _contig,
    choose_qparams_affine,
    empty,
    from_flat,
    is_torch,
    nbytes,
    param_dtype,
    qparams_from_minmax,
    quantize_affine,
    to_flat,
    view_as,
)
from kvtool.quant_ops.granularity import Granularity
from kvtool.quant_ops.granularity import block_size as block_size_for
from kvtool.quant_ops.outliers import scatter_outliers, split_outliers
from kvtool.quant_ops.packing import dequantize_packed, pack_tokens


@dataclass
class QuantizedBlock:
    qdata: Array
    delta: Array
    mn: Array
    block_size: tuple[int, ...]
    bits: int
    shape: tuple[int, ...]
    dtype: Any
    flat: bool = False
    idx: Array | None = None
    vals: Array | None = None

    @classmethod
    def from_float(cls, x: Array, gran: Granularity, bits: int, outlier_pct: float = 0.0,
                   offset: int = 0) -> QuantizedBlock:
        """Quantize all of ``x`` [B, H, T, D] with granularity ``gran`` (``granularity.PerTensor`` /
        ``PerChannel`` / ``PerToken``; or<s>: ``PerTensor()`` and ``outlier_pct`` > 0) at ``bits`` in 2, 3, 4,
        8. ``offset`` starts the first token at that position of its packing tile (for OR-ing into a partly
        filled tile; see ``packing``)."""
        shape = tuple(x.shape)
        block, flat = block_size_for(gran, shape)
        v = to_flat(x) if flat else x
        torch_path = is_torch(v)
        idx = vals = None
        if outlier_pct > 0:
            b = shape[0]
            rows = view_as(v, (b, -1)) if _contig(v) else v.reshape(b, -1)
            idx, vals, lo, hi = split_outliers(rows, outlier_pct)
            if rows.shape[0] * rows.shape[1] < 2**31:  # stored as int32 (the cost model's 32 bits)
                idx = idx.to(torch_int32()) if torch_path else idx.astype("int32")
            delta, mn = qparams_from_minmax(lo, hi, bits, param_dtype(x))
            delta, mn = delta.reshape(b, 1, 1, 1), mn.reshape(b, 1, 1, 1)
        elif native.supports(v):  # the C++ kernels (bit-identical; see ``native``)
            qdata, delta, mn = native.quantize_block(v, block, bits, offset)
            return cls(qdata, delta, mn, block, bits, shape, x.dtype, flat, idx, vals)
        elif torch_path and not offset:
            qdata, delta, mn = kernels.quantize_block(v, block, bits)
            return cls(qdata, delta, mn, block, bits, shape, x.dtype, flat, idx, vals)
        elif torch_path:
            delta, mn = kernels.choose_qparams(v, block, bits)
        else:
            delta, mn = choose_qparams_affine(v, block, bits)
        if torch_path:
            qdata = kernels.quantize_pack(v, block, delta, mn, bits, offset)
        else:
            qdata = pack_tokens(quantize_affine(v, block, delta, mn, bits), bits, offset)
        return cls(qdata, delta, mn, block, bits, shape, x.dtype, flat, idx, vals)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes + delta + min (+ outlier indices and values)."""
        return sum(nbytes(a) for a in (self.qdata, self.delta, self.mn, self.idx, self.vals))

    def dequantize(self, out: Array | None = None) -> Array:
        """The block as ``[B, H, T, D]`` in the input dtype; written into ``out`` when given (any strided
        view of that shape and dtype). The block's tokens must start its first tile (offset 0)."""
        b, h, t, d = self.shape
        vshape = (b, 1, t, h * d) if self.flat else self.shape
        direct = out is not None and not self.flat and self.idx is None
        target = out if direct else empty(vshape, self.dtype, self.qdata)
        if native.supports(target) and self.delta.dtype == self.mn.dtype:
            native.dequantize_packed(self.qdata, self.bits, self.block_size, self.delta, self.mn, target)
        elif is_torch(self.qdata):
            kernels.dequantize_packed(self.qdata, self.bits, self.block_size, self.delta, self.mn, target)
        else:
            dequantize_packed(self.qdata, self.bits, self.block_size, self.delta, self.mn, target)
        if self.idx is not None:
            scatter_outliers(view_as(target, (b, -1)), self.idx, self.vals)
        res = from_flat(target, h) if self.flat else target
        if out is None:
            return res
        if not direct:
            out[...] = res
        return out


def torch_int32():
    import torch

    return torch.int32
