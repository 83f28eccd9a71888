"""KV quantization scheme names: the grammar of DESIGN.md, parsed into a frozen ``KVQuantSpec``.

Grammar (case-insensitive)::

    fp16                          no quantization
    uniform                       per-tensor asymmetric min/max (K and V)
    or<s>        e.g. or2         s/2 % largest + s/2 % smallest values kept fp16, rest uniform per-tensor
    g-C<g> | g-CN                 per-channel groups of g tokens / of all N tokens (K and V)
    g-T<g>                        per-token groups of g channels of D_model (K and V)
    g-K<C|T><g|N>V<C|T><g|N>      K and V grouped apart, e.g. g-KC128VT128, g-KCNVT128, g-KT128VC128
    ov-u8 | ov-u4                 OpenVINO's own KV compression inside a stateful graph (runtime only)

``parse_scheme`` reads a name once into a frozen ``KVQuantSpec`` whose sides carry typed granularities
(``granularity``: ``PerTensor``, ``PerChannel``, ``PerToken``); everything downstream (``fake``, ``store``, the
runtime's ``KVSpec``) takes the parsed spec. ``str(spec)`` is the canonical name (``g-KC128VC128`` becomes
``g-C128``). The spec also states the storage cost in bits per value. The scheme constants are defined here
once: ``QUANT_BITS`` / ``VALID_BITS``, ``KV_MODES``, ``SCHEMES``, ``OV_SCHEMES``. This module only names and
describes schemes; it does not quantize anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from kvtool.errors import InputError
from kvtool.quant_ops.granularity import Granularity, PerChannel, PerTensor, PerToken, granularity

GRAMMAR = ("fp16 | uniform | or<s> (e.g. or2) | g-C<g> | g-CN | g-T<g> | g-KC<g|N>VT<g> | g-KT<g>VC<g|N> "
           "(any g-K<C|T><g>V<C|T><g>) | ov-u8 | ov-u4")

#: bits a quantizing scheme stores per value; ``VALID_BITS`` adds 16 (= leave that side unquantized)
QUANT_BITS = (2, 3, 4, 8)
VALID_BITS = (*QUANT_BITS, 16)
#: the store's (and the runtime's) KV modes: deployment storage, or the study's in-place re-quantization
KV_MODES = ("packed", "simulate")
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


class SchemeKind(StrEnum):
    """What a scheme does; compares equal to its string (``SchemeKind.OV == "ov"``)."""

    FP16 = "fp16"  # nothing quantized
    UNIFORM = "uniform"  # per-tensor min/max
    OUTLIER = "outlier"  # or<s>: per-tensor with the extremes kept exact
    GROUP = "group"  # per-channel / per-token groups (g-*)
    OV = "ov"  # OpenVINO's own compression inside a stateful graph (not quant_ops')


@dataclass(frozen=True)
class KVQuantSpec:
    """One parsed scheme: ``kind``; per side the granularity ``k`` / ``v`` (``granularity.PerTensor``,
    ``PerChannel(tokens)``, ``PerToken(channels)``; None where nothing is quantized: fp16, ov-*);
    ``outlier_pct`` the s of or<s>; ``ov_bits`` 8 or 4 for ov-u8 / ov-u4. Built by ``parse_scheme``."""

    kind: SchemeKind
    k: Granularity | None = None
    v: Granularity | None = None
    outlier_pct: float = 0.0
    ov_bits: int | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", SchemeKind(self.kind))
        except ValueError:
            raise InputError(f"scheme kind {self.kind!r}: expected fp16, uniform, outlier, group or ov") from None
        quantizes = self.kind in (SchemeKind.UNIFORM, SchemeKind.OUTLIER, SchemeKind.GROUP)
        for side in ("k", "v"):
            g = getattr(self, side)
            if quantizes and not isinstance(g, Granularity):
                raise InputError(f"{side} granularity {g!r}: a {self.kind} scheme needs PerTensor, PerChannel "
                                 f"or PerToken")
            if not quantizes and g is not None:
                raise InputError(f"{side} granularity {g!r}: a {self.kind} scheme quantizes nothing")
            if self.kind in (SchemeKind.UNIFORM, SchemeKind.OUTLIER) and not isinstance(g, PerTensor):
                raise InputError(f"{side} granularity {g!r}: {self.kind} is per-tensor")
        if self.kind == SchemeKind.OUTLIER and not 0 < self.outlier_pct < 100:
            raise InputError(f"outlier percentage {self.outlier_pct}: expected 0 < s < 100")
        if self.kind != SchemeKind.OUTLIER and self.outlier_pct:
            raise InputError(f"outlier percentage {self.outlier_pct}: only or<s> keeps outliers")
        if self.kind == SchemeKind.OV and self.ov_bits not in (4, 8):
            raise InputError(f"ov_bits {self.ov_bits!r}: expected 8 or 4")

    # -- names -------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        if self.kind in (SchemeKind.FP16, SchemeKind.UNIFORM):
            return str(self.kind)
        if self.kind == SchemeKind.OV:
            return f"ov-u{self.ov_bits}"
        if self.kind == SchemeKind.OUTLIER:
            return f"or{self.outlier_pct:g}"

        def part(g: Granularity) -> str:
            return ("C" if isinstance(g, PerChannel) else "T") + ("N" if g.group is None else str(g.group))

        k, v = part(self.k), part(self.v)
        return f"g-{k}" if k == v else f"g-K{k}V{v}"

    @property
    def name(self) -> str:
        return str(self)

    @property
    def is_quantized(self) -> bool:
        """True when quant_ops quantizes something (not fp16, not an OpenVINO-internal scheme)."""
        return self.kind in (SchemeKind.UNIFORM, SchemeKind.OUTLIER, SchemeKind.GROUP)

    @property
    def is_fp(self) -> bool:
        return self.kind == SchemeKind.FP16

    @property
    def is_ov(self) -> bool:
        return self.kind == SchemeKind.OV

    def granularity(self, which: str) -> Granularity | None:
        """The granularity of side ``which`` = "k" or "v" (None: nothing quantized)."""
        if which not in ("k", "v"):
            raise InputError(f"side {which!r}: expected 'k' or 'v'")
        return getattr(self, which)

    def side(self, which: str) -> tuple[str, int | None]:
        """``(axis, group)`` of ``which`` = "k" or "v" as strings: axis none | tensor | channel | token,
        group the size (tokens for channel, D_model channels for token; None = all N tokens / none)."""
        g = self.granularity(which)
        return ("none", None) if g is None else (str(g.axis), g.group)

    # -- JSON --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """``{"scheme", "kind", "k_axis", "k_group", "v_axis", "v_group", "outlier_pct", "ov_bits"}``."""
        (ka, kg), (va, vg) = self.side("k"), self.side("v")
        return {"scheme": str(self), "kind": str(self.kind), "k_axis": ka, "k_group": kg, "v_axis": va,
                "v_group": vg, "outlier_pct": self.outlier_pct, "ov_bits": self.ov_bits}

    @classmethod
    def from_dict(cls, d: dict) -> KVQuantSpec:
        """The inverse of ``to_dict``; ``{"scheme": name}`` alone is enough. A name that disagrees with the
        fields raises ``InputError``."""
        if "kind" not in d and "scheme" in d:  # the name alone is enough
            return parse_scheme(d["scheme"])

        def gran(side: str) -> Granularity | None:
            axis = d.get(f"{side}_axis", "none")
            if axis not in AXES:
                raise InputError(f"{side}_axis {axis!r}: expected one of {AXES}")
            return None if axis == "none" else granularity(axis, d.get(f"{side}_group"))

        spec = cls(kind=d["kind"], k=gran("k"), v=gran("v"), outlier_pct=d.get("outlier_pct", 0.0),
                   ov_bits=d.get("ov_bits"))
        if "scheme" in d and parse_scheme(d["scheme"]) != spec:
            raise InputError(f"scheme dict: name {d['scheme']!r} disagrees with its fields {spec}")
        return spec

    # -- cost --------------------------------------------------------------------------------------------
    def side_bits_per_value(self, which: str, bits: int, n_tokens: int = 4096, d_model: int = 4096) -> float:
        """Storage cost of one side in bits per value for a cache of ``n_tokens`` x ``d_model`` (per batch
        row): codes + fp16 scale and min per group (+ 48 bits per outlier for or<s>). Per-channel residual
        tokens (N mod g) are ignored here: they are transient (at most g-1 tokens in fp16)."""
        if self.kind == SchemeKind.OV:
            return float(self.ov_bits)  # OpenVINO's own scale/zero-point overhead is not modelled here
        check_bits(bits, f"{which}_bits")
        if bits == 16 or self.kind == SchemeKind.FP16:
            return 16.0
        per_tensor = PARAM_BITS / (n_tokens * d_model)
        if self.kind == SchemeKind.UNIFORM:
            return bits + per_tensor
        if self.kind == SchemeKind.OUTLIER:
            f = 2 * int(n_tokens * d_model * self.outlier_pct / 200) / (n_tokens * d_model)
            return bits + f * OUTLIER_BITS + per_tensor
        group = self.granularity(which).group
        group = n_tokens if group is None else group
        return bits + PARAM_BITS / group

    def bits_per_value(self, k_bits: int, v_bits: int, n_tokens: int = 4096, d_model: int = 4096) -> float:
        """Mean storage cost over K and V in bits per value (theory; see ``side_bits_per_value``)."""
        return 0.5 * (self.side_bits_per_value("k", k_bits, n_tokens, d_model)
                      + self.side_bits_per_value("v", v_bits, n_tokens, d_model))


def check_bits(bits: object, what: str = "bits") -> int:
    """Return ``bits`` if it is one of ``VALID_BITS`` (2, 3, 4, 8, 16); else raise ``InputError``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise InputError(f"{what}={bits!r}: expected one of 2, 3, 4, 8 (or 16 = not quantized)")
    return bits


def check_mode(mode: object, what: str = "mode") -> str:
    """Return ``mode`` if it is one of ``KV_MODES``; else raise ``InputError`` naming ``what``."""
    if mode not in KV_MODES:
        raise InputError(f"{what}: expected one of {', '.join(KV_MODES)}, got {mode!r}")
    return mode


_GROUP = r"(\d+|n)"
_RE_OR = re.compile(r"or(\d+(?:\.\d+)?)")
_RE_SAME = re.compile(r"g-([ct])" + _GROUP)
_RE_HYB = re.compile(r"g-k([ct])" + _GROUP + r"v([ct])" + _GROUP)
_RE_OV = re.compile(r"ov-u(8|4)")


def _side(axis_letter: str, group: str, name: str) -> Granularity:
    if group == "n":
        if axis_letter == "t":
            raise InputError(f"unknown KV scheme {name!r}: per-token groups need a size (T<g>); "
                             f"grammar: {GRAMMAR}")
        return PerChannel(None)
    g = int(group)
    if g < 1:
        raise InputError(f"KV scheme {name!r}: group size must be >= 1")
    return PerChannel(g) if axis_letter == "c" else PerToken(g)


def parse_scheme(name: str | KVQuantSpec) -> KVQuantSpec:
    """Parse a scheme name (case-insensitive) into a ``KVQuantSpec``; a spec passes through unchanged (no
    parse). Unknown names raise ``InputError`` (a ``ValueError``) listing the grammar."""
    if isinstance(name, KVQuantSpec):
        return name
    return _parse_name(name)


def _parse_name(name: object) -> KVQuantSpec:
    """The one place a scheme name is read (tests count its calls: one per load)."""
    if not isinstance(name, str):
        raise InputError(f"KV scheme {name!r}: expected a name string; grammar: {GRAMMAR}")
    s = name.strip().lower()
    if s == "fp16":
        return KVQuantSpec(SchemeKind.FP16)
    if s == "uniform":
        return KVQuantSpec(SchemeKind.UNIFORM, PerTensor(), PerTensor())
    if m := _RE_OV.fullmatch(s):
        return KVQuantSpec(SchemeKind.OV, ov_bits=int(m.group(1)))
    if m := _RE_OR.fullmatch(s):
        pct = float(m.group(1))
        if not 0 < pct < 100:
            raise InputError(f"KV scheme {name!r}: outlier percentage must be in (0, 100)")
        return KVQuantSpec(SchemeKind.OUTLIER, PerTensor(), PerTensor(), outlier_pct=pct)
    if m := _RE_SAME.fullmatch(s):
        g = _side(m.group(1), m.group(2), name)
        return KVQuantSpec(SchemeKind.GROUP, g, g)
    if m := _RE_HYB.fullmatch(s):
        return KVQuantSpec(SchemeKind.GROUP, _side(m.group(1), m.group(2), name),
                           _side(m.group(3), m.group(4), name))
    raise InputError(f"unknown KV scheme {name!r}; grammar: {GRAMMAR}")
