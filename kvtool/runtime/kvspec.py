"""What KV compression a pipeline applies, checked once at load time: ``KVSpec``.

``KVSpec`` holds the scheme (a quant_ops scheme, ``fp16`` for none, or OpenVINO's own ``ov-u8`` / ``ov-u4``) as
the ``KVQuantSpec`` ``make_kv_spec`` parsed from its name — the one parse of a load; downstream code reads
``spec.quant`` and ``spec.scheme`` is only its display name —, K and V bits (None for fp16: nothing is quantized), the mode (``packed`` deployment storage or the study's
``simulate``), where the first generated token comes from (``compressed`` context, as in the study, or KIVI's
``fp`` prefill) and KIVI's full-precision window of the newest ``residual`` tokens. It validates
these against the model's KV geometry (a group must divide D_model for per-token schemes), and computes the
theoretical bytes of OpenVINO's KV compression. It holds no tensors and runs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtool.errors import InputError
from kvtool.quant_ops.granularity import PerToken
from kvtool.quant_ops.schemes import OV_SCHEMES, QUANT_BITS, KVQuantSpec, check_mode, parse_scheme

FIRST_TOKEN = ("compressed", "fp")


@dataclass(frozen=True)
class KVSpec:
    """The KV compression a pipeline applies. ``quant``: the scheme, parsed once (``make_kv_spec``) into a
    ``quant_ops`` ``KVQuantSpec``; ``scheme`` is its canonical name (what reports and settings files show).
    ``k_bits`` / ``v_bits``: 2, 3, 4, 8 for a quantizing scheme, 8 / 4 for ov-u8 / ov-u4, None for fp16.
    ``mode``: ``quant_ops.schemes.KV_MODES``; ``first_token``: ``FIRST_TOKEN``; ``ov_group_size`` /
    ``ov_key_by_channel``: OpenVINO's KV compression options; ``residual``: KIVI's window of the newest
    tokens held exact (``quant_ops.fake.residual_window``)."""

    quant: KVQuantSpec
    k_bits: int | None = None
    v_bits: int | None = None
    mode: str = "packed"
    first_token: str = "compressed"
    ov_group_size: int | None = None  # OpenVINO KV compression: group size along head_dim (None = its default)
    ov_key_by_channel: bool = False
    residual: int | None = None

    @property
    def scheme(self) -> str:
        """The scheme's canonical name (``fp16``, ``g-KC128VT128``, ``ov-u8`` ...)."""
        return str(self.quant)

    @property
    def is_fp(self) -> bool:
        return self.quant.is_fp

    @property
    def is_ov(self) -> bool:
        return self.quant.is_ov

    @property
    def quantizes(self) -> bool:
        """True when kvtool's own runtime quantizes the KV (a quant_ops scheme)."""
        return self.quant.is_quantized

    def to_dict(self) -> dict:
        """The spec as results and settings files record it: the scheme by name, then the options."""
        return {"scheme": self.scheme, "k_bits": self.k_bits, "v_bits": self.v_bits, "mode": self.mode,
                "first_token": self.first_token, "ov_group_size": self.ov_group_size,
                "ov_key_by_channel": self.ov_key_by_channel, "residual": self.residual}


def _unquantized(kv: str | KVQuantSpec) -> str | None:
    """The name of a scheme that quantizes nothing in kvtool (fp16, ov-*), else None. Names are compared, not
    parsed (a bad name is left to ``make_kv_spec``'s one parse)."""
    if isinstance(kv, KVQuantSpec):
        return None if kv.is_quantized else str(kv)
    name = kv.strip().lower() if isinstance(kv, str) else kv
    return name if (name == "fp16" or name in OV_SCHEMES) else None


def resolve_bits(kv: str | KVQuantSpec, kv_bits: int | None = None, k_bits: int | None = None,
                 v_bits: int | None = None) -> tuple[int | None, int | None]:
    """K and V bits from the three bit options as the CLI takes them (``k_bits`` / ``v_bits`` override
    ``kv_bits``; default 4). fp16 quantizes nothing and ov-u8 / ov-u4 fix their own bits, so for them any bit
    option is refused (``InputError`` naming the options) and ``(None, None)`` returned."""
    given = [(f, b) for f, b in (("kv_bits", kv_bits), ("k_bits", k_bits), ("v_bits", v_bits)) if b is not None]
    scheme = _unquantized(kv)
    if scheme is not None:
        if given:
            what = "keeps K and V unquantized" if scheme == "fp16" else "sets its own bits"
            opts = ", ".join(f"{f}={b}" for f, b in given)
            raise InputError(f"kv={scheme} {what}: {opts} does not apply (bits are for kvtool's quantizing "
                             f"schemes)")
        return None, None
    for f, b in given:  # named as given (kv_bits when the user set --kv-bits)
        if b not in QUANT_BITS:
            raise InputError(f"{f}: expected one of {', '.join(map(str, QUANT_BITS))}, got {b!r}")
    base = 4 if kv_bits is None else kv_bits
    return (base if k_bits is None else k_bits), (base if v_bits is None else v_bits)


def make_kv_spec(kv: str | KVQuantSpec = "fp16", k_bits: int | None = None, v_bits: int | None = None,
                 kv_mode: str = "packed", first_token: str = "compressed", ov_group_size: int | None = None,
                 ov_key_by_channel: bool = False, residual: int | None = None) -> KVSpec:
    """Normalise and check the KV options; raise ``InputError`` naming the bad one. ``kv``: a scheme name,
    parsed here (the one parse of a load), or an already parsed ``KVQuantSpec``. ``k_bits`` / ``v_bits``:
    2, 3, 4, 8 for a quantizing scheme (None: 4); they must be None for fp16 and ov-u8 / ov-u4 (fp16 holds
    K and V unquantized; OpenVINO's schemes set their own bits). ``residual``: KIVI's full-precision window
    of the newest R tokens, quantizing schemes only (R a multiple of any per-channel group)."""
    if not isinstance(kv, KVQuantSpec) and (not isinstance(kv, str) or not kv.strip()):
        raise InputError(f"kv: expected a scheme name such as fp16, g-KC128VT128 or ov-u8, got {kv!r}")
    check_mode(kv_mode, "kv_mode")
    if first_token not in FIRST_TOKEN:
        raise InputError(f"first_token: expected one of {', '.join(FIRST_TOKEN)}, got {first_token!r}")
    try:
        quant = parse_scheme(kv)
    except ValueError as exc:
        raise InputError(f"kv: {str(exc).splitlines()[0]}") from None
    if quant.is_ov:
        if ov_group_size is not None and ov_group_size <= 0:
            raise InputError(f"ov_group_size: expected a positive integer, got {ov_group_size}")
        resolve_bits(quant, None, k_bits, v_bits)
        if residual is not None:
            raise InputError(f"kv_residual={residual}: a full-precision window applies to kvtool's quantizing "
                             f"schemes, not {quant}")
        return KVSpec(quant, quant.ov_bits, quant.ov_bits, "packed", first_token, ov_group_size, ov_key_by_channel)
    if quant.is_fp:
        resolve_bits(quant, None, k_bits, v_bits)
        if residual is not None:
            raise InputError(f"kv_residual={residual}: kv=fp16 keeps every token exact; a full-precision window "
                             f"applies to quantizing schemes")
        return KVSpec(quant, None, None, kv_mode, first_token)
    k_bits, v_bits = resolve_bits(quant, None, k_bits, v_bits)
    from kvtool.quant_ops.fake import check_residual

    try:
        check_residual(quant, residual)
    except InputError as exc:
        raise InputError(f"kv_{exc}") from None  # the option is kv_residual (--kv-residual)
    return KVSpec(quant, int(k_bits), int(v_bits), kv_mode, first_token, residual=residual)


def check_scheme_fits(spec: KVSpec, num_kv_heads: int, head_dim: int) -> None:
    """Refuse a per-token scheme whose channel group does not divide D_model = kv_heads * head_dim."""
    if not spec.quantizes:
        return
    d_model = num_kv_heads * head_dim
    for which in ("k", "v"):
        gran = spec.quant.granularity(which)
        if isinstance(gran, PerToken) and d_model % gran.channels:
            raise InputError(f"kv: scheme {spec.scheme} groups {gran.channels} channels per token, which does not "
                             f"divide the model's D_model = {num_kv_heads} kv heads x {head_dim} = {d_model}")


def ov_kv_nbytes(spec: KVSpec, num_layers: int, num_kv_heads: int, head_dim: int, n_tokens: int) -> int:
    """Bytes OpenVINO's compressed KV cache holds: codes plus an f32 scale and zero point per group
    (groups along head_dim, or along tokens for by-channel keys). Computed from the precision, as OpenVINO
    does not report it."""
    bits = spec.quant.ov_bits
    g = spec.ov_group_size or head_dim
    codes = n_tokens * num_kv_heads * head_dim * bits / 8
    v_params = n_tokens * num_kv_heads * -(-head_dim // g) * 2 * 4
    if spec.ov_key_by_channel:
        k_params = -(-n_tokens // g) * num_kv_heads * head_dim * 2 * 4
    else:
        k_params = v_params
    return int(num_layers * (2 * codes + k_params + v_params))
