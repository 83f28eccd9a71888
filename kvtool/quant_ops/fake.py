"""``fake_quant_kv``: quantize-dequantize one block of K and V under a scheme (DESIGN.md's contract).

numpy in -> numpy out, torch in -> torch out on the same device and dtype. Per-channel groups of g tokens
leave the last ``N mod g`` tokens untouched (they would wait in fp16 in a real cache); ``g-CN`` groups all N
tokens. Bits 16 on a side leaves it untouched. The returned arrays are new, except for an untouched side
(fp16 scheme, bits 16, N = 0), which is returned as given.

It does not keep state across calls (``QuantizedKVStore`` does) and refuses OpenVINO-internal schemes
(``ov-u8`` / ``ov-u4``), which only exist inside a stateful OpenVINO graph.

``residual=R`` (KIVI's full-precision window, see ``residual_window``) leaves each side's newest window
tokens exact and quantizes only the tokens before them.
"""

from __future__ import annotations

from kvtool.errors import InputError
from kvtool.quant_ops.affine import Array, empty, is_torch
from kvtool.quant_ops.block import QuantizedBlock
from kvtool.quant_ops.granularity import Granularity, PerChannel, PerToken, block_size
from kvtool.quant_ops.schemes import KVQuantSpec, check_bits, parse_scheme

_FLOAT_DTYPES = ("float16", "bfloat16", "float32")


def check_kv(x: Array, what: str) -> None:
    """Raise ``InputError`` unless x is a float numpy array / torch tensor of rank 4 [B, H, N, D]."""
    mod = type(x).__module__
    if not (mod.startswith("numpy") or mod.startswith("torch")) or not hasattr(x, "shape"):
        raise InputError(f"{what}: expected a numpy array or torch tensor [B, H, N, D], got {type(x).__name__}")
    if len(x.shape) != 4:
        raise InputError(f"{what} shape {tuple(x.shape)}: expected rank 4 [B, H, N, D]")
    if str(x.dtype).replace("torch.", "") not in _FLOAT_DTYPES:
        raise InputError(f"{what} dtype {x.dtype}: expected one of {', '.join(_FLOAT_DTYPES)}")


def check_residual(spec: KVQuantSpec, residual: int | None) -> int | None:
    """Validate a residual window ``R`` against ``spec``: None (no window) or a positive integer, a multiple of
    every per-channel token group of the scheme (KIVI asserts ``residual_length % group_size == 0``: the window
    is quantized in whole groups). Raises ``InputError`` naming ``residual``."""
    if residual is None:
        return None
    if isinstance(residual, bool) or not isinstance(residual, int) or residual < 1:
        raise InputError(f"residual={residual!r}: expected a positive number of tokens (or none)")
    if not spec.is_quantized:
        raise InputError(f"residual={residual}: scheme {str(spec)} keeps every token exact; a full-precision "
                         f"window applies to quantizing schemes only")
    for which in ("k", "v"):
        g = spec.granularity(which)
        if isinstance(g, PerChannel) and g.tokens is not None and residual % g.tokens:
            raise InputError(f"residual={residual}: expected a multiple of {str(spec)}'s per-channel group of "
                             f"{g.tokens} tokens (the window is quantized in whole groups, as in KIVI)")
    return residual


def residual_window(spec: KVQuantSpec, which: str, n: int, residual: int | None) -> int:
    """How many of the newest of ``n`` tokens one side holds at full precision under a window of
    ``residual`` = R tokens — KIVI's rule (jy-yuan/KIVI ``models/llama_kivi.py``), extended to every family:

    - per-token groups (g-T, the V of g-KC·VT·): ``min(n, R)`` — the newest R tokens are never quantized; a
      token is quantized when it leaves the window (KIVI's V);
    - groups or statistics spanning tokens (per-channel g-C<g> / g-CN, uniform per-tensor, or<s>):
      ``n mod R`` — tokens gather at full precision until R have, then the R are quantized as one block
      (KIVI's K; per-channel groups of g inside the block, per-tensor statistics over the block).

    0 without a window (per-channel groups of g still wait for g tokens, see ``quantized_tokens``)."""
    if not residual or not spec.is_quantized:
        return 0
    return min(n, residual) if isinstance(spec.granularity(which), PerToken) else n % residual


def quantized_tokens(gran: Granularity, n: int) -> int:
    """How many of n tokens a block quantizes now (per-channel groups of g tokens: whole groups only)."""
    if isinstance(gran, PerChannel) and gran.tokens is not None:
        return (n // gran.tokens) * gran.tokens
    return n


def fake_quant_side(x: Array, spec: KVQuantSpec, which: str, bits: int, residual: int | None = None) -> Array:
    """Quantize-dequantize one side ([B, H, N, D]) as ``fake_quant_kv`` does (a new array, or ``x`` itself
    where nothing is quantized: bits 16, an unquantized scheme, N = 0)."""
    n = x.shape[2]
    if bits == 16 or not spec.is_quantized or n == 0:
        return x
    gran = spec.granularity(which)
    nq = quantized_tokens(gran, n - residual_window(spec, which, n, residual))
    if nq == 0:
        return _copy(x)
    out = empty(tuple(x.shape), x.dtype, x)
    QuantizedBlock.from_float(x[:, :, :nq], gran, bits, spec.outlier_pct).dequantize(out[:, :, :nq])
    if nq < n:
        out[:, :, nq:] = x[:, :, nq:]
    return out


def fake_quant_kv(k: Array, v: Array, scheme: str | KVQuantSpec, k_bits: int = 4,
                  v_bits: int = 4, residual: int | None = None) -> tuple[Array, Array]:
    """Quantize-dequantize K and V ([B, H, N, D], numpy or torch) under ``scheme`` (a parsed ``KVQuantSpec``,
    or a name, parsed here) at ``k_bits`` / ``v_bits``
    (2, 3, 4, 8; 16 = leave the side alone). ``residual=R`` leaves each side's newest
    ``residual_window(spec, side, N, R)`` tokens exact (KIVI's window) and quantizes the tokens before them as
    one block. Returns ``(k_hat, v_hat)`` of the same shape, type, device and dtype. Raises ``InputError`` (a
    ``ValueError``) for a bad scheme, bits, shape or window."""
    spec = check_args(k, v, scheme, k_bits, v_bits)
    check_residual(spec, residual)
    return fake_quant_side(k, spec, "k", k_bits, residual), fake_quant_side(v, spec, "v", v_bits, residual)


def check_args(k: Array, v: Array, scheme: str | KVQuantSpec, k_bits: int, v_bits: int) -> KVQuantSpec:
    spec = parse_scheme(scheme)
    if spec.is_ov:
        raise InputError(f"KV scheme {str(spec)!r} is OpenVINO's in-graph KV compression, not a quant_ops "
                         f"scheme; use it as a runtime option")
    check_bits(k_bits, "k_bits")
    check_bits(v_bits, "v_bits")
    check_kv(k, "k")
    check_kv(v, "v")
    if is_torch(k) != is_torch(v):
        raise InputError("k and v: expected both numpy arrays or both torch tensors")
    if tuple(k.shape[:3]) != tuple(v.shape[:3]):
        raise InputError(f"k {tuple(k.shape)} and v {tuple(v.shape)}: expected the same B, H, N")
    for which, x, bits in (("k", k, k_bits), ("v", v, v_bits)):
        if bits != 16 and spec.is_quantized:
            check_side_shape(spec, which, tuple(x.shape))
    return spec


def check_side_shape(spec: KVQuantSpec, which: str, shape: tuple[int, ...]) -> None:
    """Raise ``InputError`` when a side's grouping cannot tile ``shape`` (e.g. D_model % g != 0)."""
    gran = spec.granularity(which)
    b, h, n, d = shape
    tokens = gran.token_block if isinstance(gran, PerChannel) and gran.token_block else max(n, 1)
    block_size(gran, (b, h, tokens, d))


def _copy(x: Array) -> Array:
    return x.clone() if is_torch(x) else x.copy()

