"""``QuantizedKVStore``: the streaming K/V store a runtime holds per layer (DESIGN.md, "Where and when").

``mode="packed"`` (deployment) holds bit-packed codes + float16/32 ``delta``/``min`` (+ outliers) + a
full-precision residual; each group is quantized once:

- per-token groups (g-T, the V of g-KC·VT·): every token is quantized when it arrives;
- per-channel groups of g tokens: new tokens wait in the residual until g have gathered, then the group is
  quantized (so appending token by token gives bit for bit what ``fake_quant_kv`` gives on the whole block);
- statistics spanning the growing axis (uniform, or<s>, g-CN): the first append (the prefill) is one block;
  later tokens wait in the residual and are quantized in blocks of ``stream_block`` tokens (default 128),
  each with its own statistics.

``residual=R`` adds KIVI's full-precision window of the newest tokens (``fake.residual_window`` states the
rule): per-token sides keep the newest R tokens exact and quantize each token as it leaves the window (KIVI's
V); per-channel and statistics-spanning sides keep ``N mod R`` tokens exact and quantize R at a time (KIVI's
K; the prefill's first ``N - N mod R`` tokens as one block). Without it, per-token sides quantize a token on
arrival and the others wait for g / ``stream_block`` tokens as above. A per-token window slides by one token
per decode step, so such a step copies (and an incremental ``dequantize`` rewrites) the R window tokens: O(R),
as in KIVI, instead of O(1).

``mode="simulate"`` (the study's semantics; the one implementation of it, which both runtime caches use)
holds the cache densely in the input dtype and, after each append, replaces every token but the newest
``keep_newest`` (1, or 0 for a graph's cache, see ``QuantizedKVStore``) by its quantize-dequantize over those
tokens (statistics re-taken each time, so error accumulates); with ``residual=R`` the window of those tokens
stays exact. Its ``nbytes`` is the dense cache; ``bits_per_value`` gives the theory. Given ``out`` buffers,
a simulate store moves its dense cache into them (one copy of the cache, not two).

Cost model of ``dequantize``. Without ``out`` it allocates and fills the whole ``[B, H, N, D]`` pair:
O(N) work (for torch: chunk by chunk, a few in-cache passes per chunk, see ``kernels``; about 3-4x the time
of copying the fp16 cache on this project's CPU, see docs/BENCHMARKS.md). With ``out=(k_buf, v_buf)``
(caller-owned arrays ``[B, H, >=N, D]``, e.g. the runtime's graph-input buffers) the store remembers the
pair it last filled and, when called again with the *same* objects, rewrites only tokens whose values changed
since: the new tokens and any group just flushed from the residual — O(1) tokens per decode step amortised
(a per-channel-g flush rewrites g tokens once every g steps). The codes stay the only long-lived storage of
the store; the dequantized copy lives in the caller's buffers and is counted there, not in ``nbytes``. The
caller must not write into those buffers between calls. Simulate mode rewrites everything every time.

``nbytes`` is what the store holds for the tokens it has (codes — including the unused slots of the last,
partly filled packing tile, at most 7 tokens — + params + outliers + residual);
``capacity_nbytes`` adds the pre-allocated slack of the growable buffers (none if ``max_tokens`` is given).
This module does not run attention or know about models; it holds one layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtool.errors import InputError
from kvtool.quant_ops import native
from kvtool.quant_ops.affine import Array, concat, empty, is_torch, nbytes
from kvtool.quant_ops.block import QuantizedBlock
from kvtool.quant_ops.fake import check_kv, check_residual, check_side_shape, fake_quant_side
from kvtool.quant_ops.granularity import Granularity, PerToken
from kvtool.quant_ops.packing import packed_rows, tile_rows, tile_tokens
from kvtool.quant_ops.schemes import KV_MODES, KVQuantSpec, check_bits, check_mode, parse_scheme

MODES = KV_MODES  # the one definition is ``schemes.KV_MODES``


@dataclass(frozen=True)
class StoreFormat:
    """What the first append fixed: array library, dtype, device, and ``(B, H, D)`` of K and of V."""

    torch: bool
    dtype: Any
    device: str
    k: tuple[int, int, int]
    v: tuple[int, int, int]


@dataclass(frozen=True)
class SideLayout:
    """One side's storage as a kernel reads it (``QuantizedKVStore.side_layout``); arrays are views of the
    store's buffers (valid until the next ``append`` / ``reset``; do not write into them).

    ``kind``: ``"dense"`` (every token held unquantized in the input dtype: an unquantized side, or simulate
    mode, ``simulate`` True), ``"grid"`` (per-token groups or per-channel groups of g tokens, ``token_block``
    = 1 or g: codes in token tiles + per-group params, then the exact residual) or ``"spanning"`` (statistics
    over a block of tokens: uniform, or<s>, g-CN; a list of ``QuantizedBlock`` s, not described further here).

    - ``n_tokens``: tokens held; ``n_quantized``: the first of them held as codes (the rest in ``residual``)
    - ``codes``: uint8 ``[B, H', rows, L]`` token tiles (``packing``) of the quantized tokens (grid), else None
    - ``delta`` / ``mn``: the per-group params of the quantized tokens, ``[B, ., n_quantized/token_block or
      n_quantized, .]`` (grid), else None; ``block_size`` / ``flat`` as ``granularity.block_size`` gave them
    - ``residual``: ``[B, H, n_tokens - n_quantized, D]`` exact tokens (None when there are none)
    - ``dense``: ``[B, H, n_tokens, D]`` (dense sides), else None
    """

    kind: str
    bits: int
    granularity: Granularity | None
    n_tokens: int
    n_quantized: int = 0
    token_block: int = 1
    head_shape: tuple[int, int, int] | None = None  # (B, H, D) of the quantized part
    codes: Array | None = None
    delta: Array | None = None
    mn: Array | None = None
    block_size: tuple[int, ...] | None = None
    flat: bool = False
    residual: Array | None = None
    dense: Array | None = None
    simulate: bool = False


def _contig_owned(x: Array) -> bool:
    """A contiguous array that is not a view into a larger one (so adopting it holds no hidden bytes)."""
    if is_torch(x):
        return x.is_contiguous() and x.untyped_storage().nbytes() == x.numel() * x.element_size()
    return x.flags.c_contiguous and x.flags.owndata


class _Grow:
    """An array growing along axis 2 with amortised O(1) appends."""

    def __init__(self, max_tokens: int | None = None) -> None:
        self.buf: Array | None = None
        self.n = 0
        self.max_tokens = max_tokens
        self.hint: int | None = None  # capacity of the next allocation it covers (store_chunked: the final size)

    def append(self, x: Array, owned: bool = False) -> None:
        """Append ``x`` along axis 2. ``owned``: x is a fresh array nobody else holds, so a first append
        without ``max_tokens`` adopts it as the buffer instead of copying it (the next append grows it
        exactly as it would have grown a copy)."""
        t = x.shape[2]
        if owned and self.buf is None and self.max_tokens is None and self.hint is None and _contig_owned(x):
            self.buf, self.n = x, t
            return
        self.extend(t, x)[...] = x

    def extend(self, t: int, like: Array) -> Array:
        """Grow by ``t`` slots (as ``append`` would, the buffer shaped and typed as ``like`` when there is none
        yet) and return them, a writable view ``[B, H, t, ...]`` whose contents the caller writes."""
        if self.buf is None or self.n + t > self.buf.shape[2]:
            if self.max_tokens is not None and self.n + t <= self.max_tokens:
                cap = self.max_tokens  # preallocated exactly: no slack
            elif self.hint is not None and self.n + t <= self.hint:
                cap = self.hint
            else:
                cap = max(self.n + t, int(1.5 * self.n), 16)
            shape = tuple(like.shape[:2]) + (cap,) + tuple(like.shape[3:])
            new = empty(shape, like.dtype, like)
            if self.n:
                new[:, :, :self.n] = self.buf[:, :, :self.n]
            self.buf = new
        self.n += t
        return self.buf[:, :, self.n - t:self.n]

    def view(self) -> Array | None:
        return None if self.buf is None else self.buf[:, :, :self.n]

    def adopt(self, buf: Array) -> None:
        """Hold the tokens in ``buf`` (``[B, H, >=n, ...]``, a caller's array or a view of one) from now on:
        the tokens held so far are copied into it unless it already is the buffer."""
        if buf is self.buf:
            return
        if self.n:
            buf[:, :, :self.n] = self.buf[:, :, :self.n]
        self.buf = buf

    def take_all(self) -> None:
        self.n = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.buf is None else nbytes(self.buf) * self.n // max(self.buf.shape[2], 1)

    @property
    def capacity_nbytes(self) -> int:
        return nbytes(self.buf)


class _DenseSide:
    """Every token held unquantized in the input dtype: an unquantized side (fp16 scheme, bits 16), and the
    simulate mode's cache (``simulate``), re-quantized in place by ``requantize``."""

    kind = "dense"

    def __init__(self, spec: KVQuantSpec, which: str, bits: int, simulate: bool, max_tokens: int | None,
                 residual: int | None = None):
        self.spec, self.which, self.bits, self.simulate, self.residual = spec, which, bits, simulate, residual
        self.data = _Grow(max_tokens)
        self.dirty_from = 0
        self.nq = 0  # tokens held as codes: none

    @property
    def n(self) -> int:
        return self.data.n

    def append(self, x: Array) -> None:
        self.dirty_from = min(self.dirty_from, self.n)
        self.data.append(x)

    def requantize(self, keep_newest: int) -> None:
        """Simulate mode: replace every token but the newest ``keep_newest`` by its quantize-dequantize over
        those tokens (``fake.fake_quant_side``: statistics re-taken, the residual window kept exact)."""
        m = self.n - keep_newest
        if not self.simulate or m < 1:
            return
        past = self.data.buf[:, :, :m]
        q = fake_quant_side(past, self.spec, self.which, self.bits, self.residual)
        if q is not past:
            past[...] = q
        self.dirty_from = 0

    def write(self, out: Array, start: int) -> None:
        if out is not self.data.buf:
            out[:, :, start:self.n] = self.data.buf[:, :, start:self.n]

    def inplace_target(self, dtype) -> tuple | None:
        """``QuantizedKVStore.inplace_targets`` for this side: ``(1, n, capacity, buf)`` (a token is written at
        ``buf[:, :, n]``), or None (simulate, no numpy buffer yet)."""
        buf = self.data.buf
        if self.simulate or not isinstance(buf, np.ndarray) or buf.dtype != dtype:
            return None
        return 1, self.data.n, buf.shape[2], buf

    def appended_in_place(self, t: int) -> None:
        self.dirty_from = min(self.dirty_from, self.n)
        self.data.n += t

    def layout(self) -> SideLayout:
        return SideLayout("dense", self.bits, self.spec.granularity(self.which) if self.simulate else None,
                          self.n, dense=self.data.view(), simulate=self.simulate)

    nbytes = property(lambda self: self.data.nbytes)
    capacity_nbytes = property(lambda self: self.data.capacity_nbytes)


class _GridSide:
    """Per-token groups or per-channel groups of g tokens: fixed token granularity ``tb`` (1 or g), so
    codes and params live in growable buffers; up to tb-1 tokens wait in the residual. Codes are token
    tiles (``packing``): a new token is OR-ed into a partly filled tile. With a window of ``residual`` = R
    tokens, a per-token side keeps the newest R in the residual (``slide``) and a per-channel side flushes R
    tokens (R/g groups) at a time."""

    kind = "grid"

    def __init__(self, spec: KVQuantSpec, which: str, bits: int, max_tokens: int | None,
                 residual: int | None = None):
        self.gran = spec.granularity(which)
        self.bits = bits
        self.tb = self.gran.token_block  # 1 (per-token) or g (per-channel groups of g tokens)
        per_token = isinstance(self.gran, PerToken)
        self.slide = residual if (residual and per_token) else 0
        self.flush = residual if (residual and not per_token) else self.tb
        self.p, self.r = tile_tokens(bits), tile_rows(bits)
        self.align = math.lcm(self.tb, self.p)  # dequantize restarts at a token both tile and group start
        grid_max = None if max_tokens is None else -(-max_tokens // self.tb)
        rows_max = None if max_tokens is None else packed_rows(max_tokens, bits)
        self.codes, self.delta, self.mn = _Grow(rows_max), _Grow(grid_max), _Grow(grid_max)
        self.resid = _Grow(self.slide or self.flush)
        self.nq = 0
        self.dirty_from = 0
        self.meta: tuple | None = None  # (block_size, flat, (B, H, D), dtype)

    @property
    def n(self) -> int:
        return self.nq + self.resid.n

    def _append_native(self, x: Array) -> bool:
        """A decode step's one token on a per-token side that quantizes every token as it comes (no residual
        window, nothing waiting): quantize + pack + OR into the last tile (or a new one) + params, in one
        native call writing straight into the held buffers (``_native.quantize_pack(..., accumulate)``), the
        same bytes as the general path below (tests/quant_ops/test_store_append_native.py). False: not this
        case (the caller takes the general path)."""
        if (x.shape[2] != 1 or self.tb != 1 or self.slide or self.resid.n or self.meta is None
                or not isinstance(x, np.ndarray) or not native.supports(x)):
            return False
        block_size, flat, _, dtype = self.meta
        pdt = np.float16 if x.dtype == np.float16 else np.float32
        if flat or x.dtype != dtype or self.delta.buf.dtype != pdt or self.mn.buf.dtype != pdt:
            return False
        off = self.nq % self.p
        if off:  # the partly filled last tile: its free slots are zero, OR the new codes in
            rows = self.codes.buf[:, :, self.codes.n - self.r:self.codes.n]
        else:
            rows = self.codes.extend(self.r, self.codes.buf)
        delta, mn = self.delta.extend(1, self.delta.buf), self.mn.extend(1, self.mn.buf)
        native._load()[0].quantize_pack(x, rows, delta, mn, block_size[1], block_size[2], block_size[3],
                                        self.bits, off, 1 if off else 0)
        self.dirty_from = min(self.dirty_from, self.nq)
        self.nq += 1
        return True

    def append(self, x: Array) -> None:
        if self._append_native(x):
            return
        n0 = self.nq
        if self.resid.n and not self.slide and self.resid.n + x.shape[2] < self.flush:
            self.resid.append(x)  # waits with the residual, no group completes: no re-copy of the residual
            self.dirty_from = min(self.dirty_from, n0)
            return
        whole = x
        if self.resid.n:
            whole = concat([self.resid.view(), x], axis=2)
            self.resid.take_all()
        if self.slide:  # the newest `slide` tokens stay exact; older ones are quantized as they leave
            nq = max(whole.shape[2] - self.slide, 0)
        else:
            nq = (whole.shape[2] // self.flush) * self.flush
        if nq:
            off = self.nq % self.p
            blk = QuantizedBlock.from_float(whole[:, :, :nq], self.gran, self.bits, offset=off)
            rows = blk.qdata
            if off:  # complete the partly filled last tile in place
                last = self.codes.buf[:, :, self.codes.n - self.r:self.codes.n]
                last[...] = last | rows[:, :, :self.r]
                rows = rows[:, :, self.r:]
            if rows.shape[2]:
                self.codes.append(rows, owned=True)
            self.delta.append(blk.delta, owned=True)
            self.mn.append(blk.mn, owned=True)
            b, h, _, d = blk.shape
            self.meta = (blk.block_size, blk.flat, (b, h, d), blk.dtype)
            self.nq += nq
        if nq < whole.shape[2]:
            self.resid.append(whole[:, :, nq:])
        self.dirty_from = min(self.dirty_from, n0)

    def inplace_target(self, dtype) -> tuple | None:
        """``QuantizedKVStore.inplace_targets`` for this side, or None (a sliding window, no numpy buffers yet,
        another dtype, flat params). Per-token groups quantized as they come: ``(2, nq, capacity, codes, delta,
        mn, bh, bl, bits)`` (the token is quantized + packed as ``_append_native`` does, token ``nq`` of the codes'
        tiles, its params at ``nq``). Per-channel groups: ``(1, resid_n, flush - 1, resid_buf)`` (the token waits
        in the residual; the token that completes a group is left to ``append``, which quantizes it)."""
        if self.slide:
            return None
        if self.tb != 1:
            buf = self.resid.buf
            if not isinstance(buf, np.ndarray) or buf.dtype != dtype:
                return None
            return 1, self.resid.n, min(self.flush - 1, buf.shape[2]), buf
        if self.resid.n or self.meta is None or not isinstance(self.codes.buf, np.ndarray):
            return None
        block_size, flat, _, mdt = self.meta
        pdt = np.float16 if dtype == np.float16 else np.float32
        d, m = self.delta.buf, self.mn.buf
        if flat or mdt != dtype or d.dtype != pdt or m.dtype != pdt or d.strides != m.strides:
            return None
        cap = min(d.shape[2], self.codes.buf.shape[2] // self.r * self.p)
        return 2, self.nq, cap, self.codes.buf, d, m, block_size[1], block_size[3], self.bits

    def appended_in_place(self, t: int) -> None:
        self.dirty_from = min(self.dirty_from, self.nq)
        if self.tb != 1:
            self.resid.n += t
            return
        self.nq += t
        self.delta.n += t
        self.mn.n += t
        self.codes.n = packed_rows(self.nq, self.bits)

    def write(self, out: Array, start: int) -> None:
        a = (start // self.align) * self.align
        if a < self.nq:
            block_size, flat, (b, h, d), dtype = self.meta
            r0 = a // self.p * self.r
            blk = QuantizedBlock(self.codes.buf[:, :, r0:self.codes.n],
                                 self.delta.buf[:, :, a // self.tb:self.nq // self.tb],
                                 self.mn.buf[:, :, a // self.tb:self.nq // self.tb], block_size, self.bits,
                                 (b, h, self.nq - a, d), dtype, flat)
            blk.dequantize(out[:, :, a:self.nq])
        if self.resid.n:
            s = max(start, self.nq)
            out[:, :, s:self.n] = self.resid.buf[:, :, s - self.nq:self.resid.n]

    def layout(self) -> SideLayout:
        resid = self.resid.view() if self.resid.n else None
        if self.nq == 0:
            return SideLayout("grid", self.bits, self.gran, self.n, 0, self.tb, residual=resid)
        block_size, flat, head_shape, _ = self.meta
        ng = self.nq // self.tb
        return SideLayout("grid", self.bits, self.gran, self.n, self.nq, self.tb, head_shape, self.codes.view(),
                          self.delta.buf[:, :, :ng], self.mn.buf[:, :, :ng], tuple(block_size), bool(flat), resid)

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in (self.codes, self.delta, self.mn, self.resid))

    @property
    def capacity_nbytes(self) -> int:
        return sum(g.capacity_nbytes for g in (self.codes, self.delta, self.mn, self.resid))


class _BlockSide:
    """Statistics spanning the token axis (uniform, or<s>, g-CN): the first append is one block, later
    tokens are quantized in blocks of ``stream_block`` tokens. With a window of ``residual`` = R tokens the
    first append quantizes its first ``T - T mod R`` tokens and later blocks are R tokens."""

    kind = "spanning"

    def __init__(self, spec: KVQuantSpec, which: str, bits: int, stream_block: int, residual: int | None = None):
        self.gran, self.pct = spec.granularity(which), spec.outlier_pct
        self.bits, self.stream_block, self.residual = bits, residual or stream_block, residual
        self.blocks: list[tuple[int, QuantizedBlock]] = []
        self.resid = _Grow(self.stream_block)
        self.nq = 0
        self.dirty_from = 0

    @property
    def n(self) -> int:
        return self.nq + self.resid.n

    def _quantize(self, x: Array) -> None:
        self.blocks.append((self.nq, QuantizedBlock.from_float(x, self.gran, self.bits, self.pct)))
        self.dirty_from = min(self.dirty_from, self.nq)
        self.nq += x.shape[2]

    def append(self, x: Array) -> None:
        self.dirty_from = min(self.dirty_from, self.n)
        t, i = x.shape[2], 0
        if not self.blocks and not self.resid.n:
            i = t - t % self.residual if self.residual else t
            if i:
                self._quantize(x[:, :, :i])
        while i < t:  # fill the residual; flush each full stream block
            take = min(t - i, self.stream_block - self.resid.n)
            self.resid.append(x[:, :, i:i + take])
            i += take
            if self.resid.n == self.stream_block:
                self._quantize(self.resid.view())
                self.resid.take_all()

    def write(self, out: Array, start: int) -> None:
        for s, blk in self.blocks:
            e = s + blk.shape[2]
            if e > start:
                blk.dequantize(out[:, :, s:e])
        if self.resid.n:
            s = max(start, self.nq)
            out[:, :, s:self.n] = self.resid.buf[:, :, s - self.nq:self.resid.n]

    def layout(self) -> SideLayout:
        return SideLayout("spanning", self.bits, self.gran, self.n, self.nq,
                          residual=self.resid.view() if self.resid.n else None)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for _, b in self.blocks) + self.resid.nbytes

    @property
    def capacity_nbytes(self) -> int:
        return sum(b.nbytes for _, b in self.blocks) + self.resid.capacity_nbytes


class QuantizedKVStore:
    """One layer's K/V cache, quantized under ``scheme`` at ``k_bits`` / ``v_bits`` (16 = keep that side).

    ``scheme``: a parsed ``KVQuantSpec`` (what the runtime passes) or a name (parsed here). ``append(k, v)``
    takes ``[B, H, T, D]`` numpy arrays or torch tensors (CPU or CUDA); ``dequantize()`` returns the full
    ``(k, v)`` ``[B, H, N, D]`` of the same type, device and dtype. ``residual``: KIVI's full-precision window of
    the newest R tokens (None: none). ``keep_newest`` (simulate mode): how many of the newest tokens an append
    leaves exact — 1, the study's code, whose cache is handed to the attention of the same forward pass (the
    newest token is the query's own); 0 for a cache read only as the next step's past (a graph attends to its
    new tokens itself). See the module docstring for the modes, the window and the cost model.

    What callers read (public; nothing else of the store is): ``spec``, ``k_bits``, ``v_bits``, ``mode``,
    ``residual``, ``n_tokens``, ``format`` (``StoreFormat`` or None while empty), ``quantized_counts``,
    ``side_layout(which)`` (the kernel's view of a side), ``nbytes``, ``capacity_nbytes``, ``fp16_nbytes``,
    ``bits_per_value``, ``kernel_info()``."""

    def __init__(self, scheme: str | KVQuantSpec, k_bits: int = 4, v_bits: int = 4, mode: str = "packed",
                 stream_block: int = 128, max_tokens: int | None = None, residual: int | None = None,
                 keep_newest: int = 1) -> None:
        self.spec = parse_scheme(scheme)
        if self.spec.is_ov:
            raise InputError(f"KV scheme {str(self.spec)!r} is OpenVINO's in-graph KV compression; "
                             f"QuantizedKVStore holds quant_ops schemes only")
        self.k_bits, self.v_bits = check_bits(k_bits, "k_bits"), check_bits(v_bits, "v_bits")
        self.mode = check_mode(mode, "store mode")
        if not isinstance(stream_block, int) or stream_block < 1:
            raise InputError(f"stream_block={stream_block!r}: expected a positive integer")
        if keep_newest not in (0, 1):
            raise InputError(f"keep_newest={keep_newest!r}: expected 0 or 1")
        self.stream_block, self.max_tokens, self.keep_newest = stream_block, max_tokens, keep_newest
        self.residual = check_residual(self.spec, residual)
        self.reset()

    def _make_side(self, which: str, bits: int):
        quant = bits != 16 and self.spec.is_quantized
        if self.mode == "simulate" or not quant:
            return _DenseSide(self.spec, which, bits, self.mode == "simulate" and quant, self.max_tokens,
                              self.residual)
        if self.spec.granularity(which).token_block is not None:  # per-token, per-channel groups of g tokens
            return _GridSide(self.spec, which, bits, self.max_tokens, self.residual)
        return _BlockSide(self.spec, which, bits, self.stream_block, self.residual)

    def reset(self) -> None:
        """Forget every token (and the remembered ``out`` buffers)."""
        self._k = self._make_side("k", self.k_bits)
        self._v = self._make_side("v", self.v_bits)
        self.format: StoreFormat | None = None
        self._last_out: tuple | None = None

    # -- input checks -------------------------------------------------------------------------------------
    def _check(self, k: Array, v: Array) -> None:
        f = self.format
        if (f is not None and type(k) is np.ndarray and type(v) is np.ndarray and not f.torch
                and k.dtype == f.dtype and v.dtype == f.dtype and k.ndim == 4 and v.ndim == 4
                and k.shape[2] == v.shape[2] and (k.shape[0], k.shape[1], k.shape[3]) == f.k
                and (v.shape[0], v.shape[1], v.shape[3]) == f.v):
            return  # numpy k / v of the first append's format: every check below would pass (decode steps)
        check_kv(k, "k")
        check_kv(v, "v")
        if is_torch(k) != is_torch(v) or k.dtype != v.dtype or tuple(k.shape[:3]) != tuple(v.shape[:3]):
            raise InputError(f"k {tuple(k.shape)} {k.dtype} and v {tuple(v.shape)} {v.dtype}: expected the "
                             f"same array type, dtype and B, H, T")
        fmt = StoreFormat(is_torch(k), k.dtype, str(getattr(k, "device", "cpu")),
                          (k.shape[0], k.shape[1], k.shape[3]), (v.shape[0], v.shape[1], v.shape[3]))
        if self.format is None:
            if self.mode == "packed":
                for which, x, bits in (("k", k, self.k_bits), ("v", v, self.v_bits)):
                    if bits != 16 and self.spec.is_quantized:
                        check_side_shape(self.spec, which, tuple(x.shape))
            self.format = fmt
        elif fmt != self.format:
            raise InputError(f"appended k/v {fmt}: expected the same type, dtype, device, B, H and D as "
                             f"the first append {self.format}")

    # -- API ----------------------------------------------------------------------------------------------
    def append(self, k: Array, v: Array, *, requantize: bool = True) -> None:
        """Add ``T`` new tokens: k, v ``[B, H, T, D]`` (T = prefill length or 1). Simulate mode then replaces
        every held token but the newest ``keep_newest`` by its quantize-dequantize over them (the study's
        semantics: statistics re-taken each time, error accumulates; the ``residual`` window of those tokens
        stays exact); ``requantize=False`` skips that for this append (a full-precision prefill, the runtime's
        ``first_token="fp"``). Packed mode quantizes each group once, and refuses ``requantize=False``."""
        if not requantize and self.mode != "simulate":
            raise InputError("append requantize=False: applies to simulate mode only (packed mode quantizes "
                             "each group once, as it arrives)")
        self._check(k, v)
        if k.shape[2] == 0:
            return
        self._k.append(k)
        self._v.append(v)
        if self.mode == "simulate" and requantize:
            self._k.requantize(self.keep_newest)
            self._v.requantize(self.keep_newest)

    def dequantize(self, out: tuple[Array, Array] | None = None, *,
                   incremental: bool = True) -> tuple[Array, Array]:
        """The full cache ``(k, v)``, ``[B, H, N, D]`` each. With ``out=(k_buf, v_buf)`` (``[B, H, >=N, D]``,
        same type/dtype/device) fills them — only the changed tokens when they are the pair filled last time
        and ``incremental`` — and returns views of their first N tokens. In simulate mode the store then
        keeps its dense cache in ``out`` itself (no second copy; the caller must not write into them)."""
        fmt = self.format
        if fmt is None:
            raise InputError("dequantize: the store is empty; append tokens first")
        n = self.n_tokens
        if out is None:
            bufs = tuple(empty((shape[0], shape[1], n, shape[2]), fmt.dtype, self._like())
                         for shape in (fmt.k, fmt.v))
            starts = (0, 0)
        else:
            bufs = tuple(out)
            if len(bufs) != 2:
                raise InputError(f"dequantize out: expected a pair (k_buf, v_buf), got {len(bufs)} items")
            for w, shape, buf in zip(("k", "v"), (fmt.k, fmt.v), bufs, strict=True):
                ok = (len(buf.shape) == 4 and (buf.shape[0], buf.shape[1], buf.shape[3]) == shape
                      and buf.shape[2] >= n and buf.dtype == fmt.dtype and is_torch(buf) == fmt.torch)
                if not ok:
                    raise InputError(f"dequantize out {w} buffer {tuple(buf.shape)} {buf.dtype}: expected "
                                     f"[{shape[0]}, {shape[1]}, >={n}, {shape[2]}] {fmt.dtype}")
            same = incremental and self._last_out is not None and all(
                a is b for a, b in zip(self._last_out, bufs, strict=True))
            starts = (self._k.dirty_from, self._v.dirty_from) if same else (0, 0)
            if self.mode == "simulate":
                for side, buf in zip((self._k, self._v), bufs, strict=True):
                    side.data.adopt(buf)  # the dense cache lives in the caller's buffers from now on
        for side, buf, start in zip((self._k, self._v), bufs, starts, strict=True):
            if start < n:
                side.write(buf, start)
        if out is not None:
            self._last_out = bufs
            self._k.dirty_from = self._v.dirty_from = n
        return bufs[0][:, :, :n], bufs[1][:, :, :n]

    def inplace_targets(self) -> tuple[tuple, tuple] | None:
        """Where a native kernel may append the next decode tokens itself, one at a time, writing straight into
        the store's buffers (the packed engine's OpenVINO op: ``_ov_packed_op.cpp``): a ``(k, v)`` pair of tuples
        (``_GridSide.inplace_target`` / ``_DenseSide.inplace_target``: the buffer, the count written so far and
        the capacity up to which the kernel may write without this store reallocating or quantizing a group), or
        None where either side cannot take such an append (simulate mode, torch arrays, statistics spanning the
        token axis, a sliding residual window, an empty store). The kernel writes exactly the bytes ``append``
        would; ``appended_in_place(t)`` then accounts for its t tokens. Valid until the next ``append`` /
        ``reset`` (which may reallocate): ask again after one."""
        f = self.format
        if self.mode != "packed" or f is None or f.torch or self.n_tokens == 0:
            return None
        target = getattr(self._k, "inplace_target", None), getattr(self._v, "inplace_target", None)
        if target[0] is None or target[1] is None:
            return None
        k, v = target[0](f.dtype), target[1](f.dtype)
        return None if k is None or v is None else (k, v)

    def appended_in_place(self, t: int) -> None:
        """Account for ``t`` tokens a kernel appended to both sides where ``inplace_targets`` said (within its
        capacity): the counts and the incremental-``dequantize`` marks move as ``append`` would move them."""
        self._k.appended_in_place(t)
        self._v.appended_in_place(t)

    @property
    def quantized_counts(self) -> tuple[int, int]:
        """Tokens of K and of V held as codes (packed mode); 0 for an unquantized side and in simulate mode,
        which holds every token dense. A count that grew across an ``append`` means tokens last seen exact
        are now held as their quantization."""
        return int(self._k.nq), int(self._v.nq)

    def side_layout(self, which: str) -> SideLayout:
        """How side ``which`` ("k" or "v") is held now, for a kernel that reads the storage directly (the
        fused decode attention); see ``SideLayout``."""
        if which not in ("k", "v"):
            raise InputError(f"side {which!r}: expected 'k' or 'v'")
        return (self._k if which == "k" else self._v).layout()

    def _like(self) -> Array:
        for side in (self._k, self._v):
            for attr in ("data", "codes", "resid"):
                g = getattr(side, attr, None)
                if g is not None and g.buf is not None:
                    return g.buf
            if getattr(side, "blocks", None):
                return side.blocks[0][1].qdata
        raise AssertionError("store has tokens but no buffers")

    @property
    def n_tokens(self) -> int:
        return self._k.n

    @property
    def nbytes(self) -> int:
        """Bytes held for the stored tokens: codes + delta/min + outliers + residual (dense in simulate)."""
        return self._k.nbytes + self._v.nbytes

    @property
    def capacity_nbytes(self) -> int:
        """``nbytes`` plus the unused capacity of the growable buffers."""
        return self._k.capacity_nbytes + self._v.capacity_nbytes

    @property
    def fp16_nbytes(self) -> int:
        """What an fp16 cache of the same tokens takes (2 bytes per value, K and V)."""
        if self.format is None:
            return 0
        (bk, hk, dk), (bv, hv, dv) = self.format.k, self.format.v
        return 2 * self.n_tokens * (bk * hk * dk + bv * hv * dv)

    @property
    def bits_per_value(self) -> float:
        """Theoretical storage cost (mean of K and V) for the current cache size; see ``KVQuantSpec``."""
        n = max(self.n_tokens, 1)
        d_model = 4096 if self.format is None else self.format.k[1] * self.format.k[2]
        return self.spec.bits_per_value(self.k_bits, self.v_bits, n_tokens=n, d_model=d_model)

    def kernel_info(self) -> dict:
        """Which quant_ops kernels this store runs: ``{"path": "native" | "portable", "reason", "isa",
        "native"}`` (``quant_ops.native.info()``); "portable" also for CUDA tensors and dtypes the
        native kernels do not take (the torch / numpy code runs then)."""
        from kvtool.quant_ops import native

        info = native.info()
        p = self.format
        if info["native"] and p is not None and (p.device != "cpu" or str(p.dtype).split(".")[-1]
                                                 not in ("float16", "float32")):
            info = {**info, "path": "portable", "reason": f"{p.dtype} on {p.device}: not a native dtype/device"}
        return info

    def __repr__(self) -> str:
        return (f"QuantizedKVStore({str(self.spec)!r}, k_bits={self.k_bits}, v_bits={self.v_bits}, "
                f"mode={self.mode!r}, residual={self.residual}, n_tokens={self.n_tokens}, nbytes={self.nbytes})")
