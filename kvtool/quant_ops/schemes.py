"""KV quantization scheme names: the grammar of DESIGN.md, parsed into a frozen ``KVQuantSpec``.

Grammar (case-insensitive)::

    fp16                          no quantization
    uniform                       per-tensor asymmetric min/max (K and V)
    or<s>        e.g. or2         s/2 % largest + s/2 % smallest values kept fp16, rest uniform per-tensor
    g-C<g> | g-CN                 per-channel groups of g tokens / of all N tokens (K and V)
    g-T<g>                        per-token groups of g channels of D_model (K and V)
    g-K<C|T><g|N>V<C|T><g|N>      K and V grouped apart, e.g. g-KC128VT128, g-KCNVT128, g-KT128VC128
    ov-u8 | ov-u4                 OpenVINO's own KV compression inside a stateful graph (runtime only)

``str(spec)`` is the canonical name (``g-KC128VC128`` becomes ``g-C128``). The spec also states the storage
cost in bits per value. This module only names and describes schemes; it does not quantize anything.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from kvtool.errors import InputError

GRAMMAR = ("fp16 | uniform | or<s> (e.g. or2) | g-C<g> | g-CN | g-T<g> | g-KC<g|N>VT<g> | g-KT<g>VC<g|N> "
           "(any g-K<C|T><g>V<C|T><g>) | ov-u8 | ov-u4")

VALID_BITS = (2, 3, 4, 8, 16)
#: bytes per stored fp16 scale / min, and per outlier (int32 flat index + fp16 value)
PARAM_BITS = 32
OUTLIER_BITS = 48

# The study's schemes (its Table 1 with V group 128), canonical name -> one-line meaning.
SCHEMES: dict[str, str] = {
    "fp16": "no quantization (reference)",
    "uniform": "per-tensor asymmetric min/max over one layer's K (or V), all heads and tokens",
    "or2": "outlier-reduced: 1% largest + 1% smallest kept fp16 (sparse), rest uniform per-tensor",
    "g-CN": "per-channel groups over all N tokens, for K and V",
    "g-C128": "per-channel groups of 128 tokens (N mod 128 newest tokens kept fp16), for K and V",
    "g-T128": "per-token groups of 128 channels of D_model, for K and V",
    "g-KCNVT128": "K per-channel over all N tokens, V per-token groups of 128 channels",
    "g-KC128VT128": "K per-channel groups of 128 tokens, V per-token groups of 128 channels",
    "g-KT128VC128": "K per-token groups of 128 channels, V per-channel groups of 128 tokens",
}
#: schemes the runtime knows but quant_ops refuses (OpenVINO's in-graph KV compression)
OV_SCHEMES: dict[str, str] = {
    "ov-u8": "OpenVINO's own u8 KV cache compression inside a stateful graph (runtime only)",
    "ov-u4": "OpenVINO's own u4 KV cache compression inside a stateful graph (runtime only)",
}

AXES = ("none", "tensor", "channel", "token")


@dataclass(frozen=True)
class KVQuantSpec:
    """One parsed scheme. Per side (k_*, v_*): ``axis`` is none | tensor | channel | token and ``group``
    the group size (tokens for channel, D_model channels for token; ``None`` = all N tokens for channel).

    ``kind`` is fp16 | uniform | outlier | group | ov; ``outlier_pct`` the s of or<s>; ``ov_bits`` 8 or 4."""

    kind: str
    k_axis: str = "none"
    k_group: int | None = None
    v_axis: str = "none"
    v_group: int | None = None
    outlier_pct: float = 0.0
    ov_bits: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fp16", "uniform", "outlier", "group", "ov"):
            raise InputError(f"scheme kind {self.kind!r}: expected fp16, uniform, outlier, group or ov")
        for side in ("k", "v"):
            axis, group = getattr(self, f"{side}_axis"), getattr(self, f"{side}_group")
            if axis not in AXES:
                raise InputError(f"{side}_axis {axis!r}: expected one of {AXES}")
            if group is not None and (not isinstance(group, int) or group < 1):
                raise InputError(f"{side}_group {group!r}: expected a positive integer or None")
            if axis == "token" and group is None:
                raise InputError(f"{side}_group: per-token grouping needs a group size")
        if self.kind == "outlier" and not 0 < self.outlier_pct < 100:
            raise InputError(f"outlier percentage {self.outlier_pct}: expected 0 < s < 100")

    # -- names -------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        if self.kind in ("fp16", "uniform"):
            return self.kind
        if self.kind == "ov":
            return f"ov-u{self.ov_bits}"
        if self.kind == "outlier":
            return f"or{self.outlier_pct:g}"

        def part(axis: str, group: int | None) -> str:
            return ("C" if axis == "channel" else "T") + ("N" if group is None else str(group))

        k, v = part(self.k_axis, self.k_group), part(self.v_axis, self.v_group)
        return f"g-{k}" if k == v else f"g-K{k}V{v}"

    @property
    def name(self) -> str:
        return str(self)

    @property
    def is_quantized(self) -> bool:
        """True when quant_ops quantizes something (not fp16, not an OpenVINO-internal scheme)."""
        return self.kind in ("uniform", "outlier", "group")

    def side(self, which: str) -> tuple[str, int | None]:
        """``(axis, group)`` of ``which`` = "k" or "v"."""
        return getattr(self, f"{which}_axis"), getattr(self, f"{which}_group")

    # -- JSON --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"scheme": str(self), **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> KVQuantSpec:
        known = {f.name for f in fields(cls)}
        if "kind" not in d and "scheme" in d:  # the name alone is enough
            return parse_scheme(d["scheme"])
        spec = cls(**{k: v for k, v in d.items() if k in known})
        if "scheme" in d and parse_scheme(d["scheme"]) != spec:
            raise InputError(f"scheme dict: name {d['scheme']!r} disagrees with its fields {spec}")
        return spec

    # -- cost --------------------------------------------------------------------------------------------
    def side_bits_per_value(self, which: str, bits: int, n_tokens: int = 4096, d_model: int = 4096) -> float:
        """Storage cost of one side in bits per value for a cache of ``n_tokens`` x ``d_model`` (per batch
        row): codes + fp16 scale and min per group (+ 48 bits per outlier for or<s>). Per-channel residual
        tokens (N mod g) are ignored here: they are transient (at most g-1 tokens in fp16)."""
        if self.kind == "ov":
            return float(self.ov_bits)  # OpenVINO's own scale/zero-point overhead is not modelled here
        check_bits(bits, f"{which}_bits")
        if bits == 16 or self.kind == "fp16":
            return 16.0
        per_tensor = PARAM_BITS / (n_tokens * d_model)
        if self.kind == "uniform":
            return bits + per_tensor
        if self.kind == "outlier":
            f = 2 * int(n_tokens * d_model * self.outlier_pct / 200) / (n_tokens * d_model)
            return bits + f * OUTLIER_BITS + per_tensor
        axis, group = self.side(which)
        group = n_tokens if group is None else group
        return bits + PARAM_BITS / group

    def bits_per_value(self, k_bits: int, v_bits: int, n_tokens: int = 4096, d_model: int = 4096) -> float:
        """Mean storage cost over K and V in bits per value (theory; see ``side_bits_per_value``)."""
        return 0.5 * (self.side_bits_per_value("k", k_bits, n_tokens, d_model)
                      + self.side_bits_per_value("v", v_bits, n_tokens, d_model))


def check_bits(bits: object, what: str = "bits") -> int:
    """Return ``bits`` if it is one of 2, 3, 4, 8, 16; else raise ``InputError``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise InputError(f"{what}={bits!r}: expected one of 2, 3, 4, 8 (or 16 = not quantized)")
    return bits


_GROUP = r"(\d+|n)"
_RE_OR = re.compile(r"or(\d+(?:\.\d+)?)")
_RE_SAME = re.compile(r"g-([ct])" + _GROUP)
_RE_HYB = re.compile(r"g-k([ct])" + _GROUP + r"v([ct])" + _GROUP)
_RE_OV = re.compile(r"ov-u(8|4)")


def _side(axis_letter: str, group: str, name: str) -> tuple[str, int | None]:
    axis = "channel" if axis_letter == "c" else "token"
    if group == "n":
        if axis == "token":
            raise InputError(f"unknown KV scheme {name!r}: per-token groups need a size (T<g>); "
                             f"grammar: {GRAMMAR}")
        return axis, None
    g = int(group)
    if g < 1:
        raise InputError(f"KV scheme {name!r}: group size must be >= 1")
    return axis, g


def parse_scheme(name: str | KVQuantSpec) -> KVQuantSpec:
    """Parse a scheme name (case-insensitive) into a ``KVQuantSpec``; a spec passes through unchanged.

    Unknown names raise ``InputError`` (a ``ValueError``) listing the grammar."""
    if isinstance(name, KVQuantSpec):
        return name
    if not isinstance(name, str):
        raise InputError(f"KV scheme {name!r}: expected a name string; grammar: {GRAMMAR}")
    s = name.strip().lower()
    if s == "fp16":
        return KVQuantSpec(kind="fp16")
    if s == "uniform":
        return KVQuantSpec(kind="uniform", k_axis="tensor", v_axis="tensor")
    if m := _RE_OV.fullmatch(s):
        return KVQuantSpec(kind="ov", ov_bits=int(m.group(1)))
    if m := _RE_OR.fullmatch(s):
        pct = float(m.group(1))
        if not 0 < pct < 100:
            raise InputError(f"KV scheme {name!r}: outlier percentage must be in (0, 100)")
        return KVQuantSpec(kind="outlier", k_axis="tensor", v_axis="tensor", outlier_pct=pct)
    if m := _RE_SAME.fullmatch(s):
        axis, g = _side(m.group(1), m.group(2), name)
        return KVQuantSpec(kind="group", k_axis=axis, k_group=g, v_axis=axis, v_group=g)
    if m := _RE_HYB.fullmatch(s):
        ka, kg = _side(m.group(1), m.group(2), name)
        va, vg = _side(m.group(3), m.group(4), name)
        return KVQuantSpec(kind="group", k_axis=ka, k_group=kg, v_axis=va, v_group=vg)
    raise InputError(f"unknown KV scheme {name!r}; grammar: {GRAMMAR}")
