"""What KV compression a pipeline applies, checked once at load time: ``KVSpec``.

``KVSpec`` names the scheme (a quant_ops scheme, ``fp16`` for none, or OpenVINO's own ``ov-u8`` / ``ov-u4``),
K and V bits (None for fp16: nothing is quantized), the mode (``packed`` deployment storage or the study's
``simulate``), where the first generated token comes from (``compressed`` context, as in the study, or KIVI's
``fp`` prefill) and KIVI's full-precision window of the newest ``residual`` tokens. It validates
these against the model's KV geometry (a group must divide D_model for per-token schemes), and computes the
theoretical bytes of OpenVINO's KV compression. It holds no tensors and runs nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvtool.errors import InputError

KV_MODES = ("packed", "simulate")
FIRST_TOKEN = ("compressed", "fp")
OV_SCHEMES = ("ov-u8", "ov-u4")
BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class KVSpec:
    scheme: str = "fp16"
    k_bits: int | None = None  # None for fp16 (no quantization); 8 / 4 for ov-u8 / ov-u4
    v_bits: int | None = None
    mode: str = "packed"
    first_token: str = "compressed"
    ov_group_size: int | None = None  # OpenVINO KV compression: group size along head_dim (None = its default)
    ov_key_by_channel: bool = False
    residual: int | None = None  # KIVI's window: the newest tokens held exact (quant_ops.fake.residual_window)

    @property
    def is_fp(self) -> bool:
        return self.scheme == "fp16"

    @property
    def is_ov(self) -> bool:
        return self.scheme in OV_SCHEMES

    @property
    def quantizes(self) -> bool:
        """True when kvtool's own runtime quantizes the KV (a quant_ops scheme)."""
        return not (self.is_fp or self.is_ov)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_bits(kv: str, kv_bits: int | None = None, k_bits: int | None = None,
                 v_bits: int | None = None) -> tuple[int | None, int | None]:
    """K and V bits from the three bit options as the CLI takes them (``k_bits`` / ``v_bits`` override
    ``kv_bits``; default 4). fp16 quantizes nothing and ov-u8 / ov-u4 fix their own bits, so for them any bit
    option is refused (``InputError`` naming the options) and ``(None, None)`` returned."""
    scheme = kv.strip().lower() if isinstance(kv, str) else kv
    given = [(f, b) for f, b in (("kv_bits", kv_bits), ("k_bits", k_bits), ("v_bits", v_bits)) if b is not None]
    if scheme == "fp16" or scheme in OV_SCHEMES:
        if given:
            what = "keeps K and V unquantized" if scheme == "fp16" else "sets its own bits"
            opts = ", ".join(f"{f}={b}" for f, b in given)
            raise InputError(f"kv={scheme} {what}: {opts} does not apply (bits are for kvtool's quantizing "
                             f"schemes)")
        return None, None
    for f, b in given:  # named as given (kv_bits when the user set --kv-bits)
        if b not in BITS:
            raise InputError(f"{f}: expected one of {', '.join(map(str, BITS))}, got {b!r}")
    base = 4 if kv_bits is None else kv_bits
    return (base if k_bits is None else k_bits), (base if v_bits is None else v_bits)


def make_kv_spec(kv: str = "fp16", k_bits: int | None = None, v_bits: int | None = None, kv_mode: str = "packed",
                 first_token: str = "compressed", ov_group_size: int | None = None,
                 ov_key_by_channel: bool = False, residual: int | None = None) -> KVSpec:
    """Normalise and check the KV options; raise ``InputError`` naming the bad one. ``k_bits`` / ``v_bits``:
    2, 3, 4, 8 for a quantizing scheme (None: 4); they must be None for fp16 and ov-u8 / ov-u4 (fp16 holds
    K and V unquantized; OpenVINO's schemes set their own bits). ``residual``: KIVI's full-precision window
    of the newest R tokens, quantizing schemes only (R a multiple of any per-channel group)."""
    if not isinstance(kv, str) or not kv.strip():
        raise InputError(f"kv: expected a scheme name such as fp16, g-KC128VT128 or ov-u8, got {kv!r}")
    scheme = kv.strip().lower()
    if kv_mode not in KV_MODES:
        raise InputError(f"kv_mode: expected one of {', '.join(KV_MODES)}, got {kv_mode!r}")
    if first_token not in FIRST_TOKEN:
        raise InputError(f"first_token: expected one of {', '.join(FIRST_TOKEN)}, got {first_token!r}")
    if scheme in OV_SCHEMES:
        if ov_group_size is not None and ov_group_size <= 0:
            raise InputError(f"ov_group_size: expected a positive integer, got {ov_group_size}")
        resolve_bits(scheme, None, k_bits, v_bits)
        if residual is not None:
            raise InputError(f"kv_residual={residual}: a full-precision window applies to kvtool's quantizing "
                             f"schemes, not {scheme}")
        bits = 8 if scheme == "ov-u8" else 4
        return KVSpec(scheme, bits, bits, "packed", first_token, ov_group_size, ov_key_by_channel)
    if scheme == "fp16":
        resolve_bits(scheme, None, k_bits, v_bits)
        if residual is not None:
            raise InputError(f"kv_residual={residual}: kv=fp16 keeps every token exact; a full-precision window "
                             f"applies to quantizing schemes")
        return KVSpec("fp16", None, None, kv_mode, first_token)
    k_bits, v_bits = resolve_bits(scheme, None, k_bits, v_bits)
    for name, b in (("k_bits", k_bits), ("v_bits", v_bits)):
        if b not in BITS:
            raise InputError(f"{name}: expected one of {', '.join(map(str, BITS))}, got {b!r}")
    from kvtool.quant_ops import parse_scheme
    from kvtool.quant_ops.fake import check_residual

    try:
        qspec = parse_scheme(scheme)
    except ValueError as exc:
        raise InputError(f"kv: {str(exc).splitlines()[0]}") from None
    try:
        check_residual(qspec, residual)
    except InputError as exc:
        raise InputError(f"kv_{exc}") from None  # the option is kv_residual (--kv-residual)
    return KVSpec(str(qspec), int(k_bits), int(v_bits), kv_mode, first_token, residual=residual)


def check_scheme_fits(spec: KVSpec, num_kv_heads: int, head_dim: int) -> None:
    """Refuse a per-token scheme whose channel group does not divide D_model = kv_heads * head_dim."""
    if not spec.quantizes:
        return
    from kvtool.quant_ops import parse_scheme
    from kvtool.quant_ops.fake import side_groups

    d_model = num_kv_heads * head_dim
    qspec = parse_scheme(spec.scheme)
    for which in ("k", "v"):
        axis, group, _ = side_groups(qspec, which)
        if axis == "token" and group and d_model % group:
            raise InputError(f"kv: scheme {spec.scheme} groups {group} channels per token, which does not divide "
                             f"the model's D_model = {num_kv_heads} kv heads x {head_dim} = {d_model}")


def ov_kv_nbytes(spec: KVSpec, num_layers: int, num_kv_heads: int, head_dim: int, n_tokens: int) -> int:
    """Bytes OpenVINO's compressed KV cache holds: codes plus an f32 scale and zero point per group
    (groups along head_dim, or along tokens for by-channel keys). Computed from the precision, as OpenVINO
    does not report it."""
    bits = 8 if spec.scheme == "ov-u8" else 4
    g = spec.ov_group_size or head_dim
    codes = n_tokens * num_kv_heads * head_dim * bits / 8
    v_params = n_tokens * num_kv_heads * -(-head_dim // g) * 2 * 4
    if spec.ov_key_by_channel:
        k_params = -(-n_tokens // g) * num_kv_heads * head_dim * 2 * 4
    else:
        k_params = v_params
    return int(num_layers * (2 * codes + k_params + v_params))
