"""Scheme grammar: canonical names, JSON round trip, errors that list the grammar, storage costs."""

import json

import pytest

from kvtool.errors import InputError
from kvtool.quant_ops import SCHEMES, KVQuantSpec, parse_scheme


@pytest.mark.parametrize("name,canon,k,v", [
    ("fp16", "fp16", ("none", None), ("none", None)),
    ("UNIFORM", "uniform", ("tensor", None), ("tensor", None)),
    ("or2", "or2", ("tensor", None), ("tensor", None)),
    ("OR0.5", "or0.5", ("tensor", None), ("tensor", None)),
    ("g-C128", "g-C128", ("channel", 128), ("channel", 128)),
    ("g-cn", "g-CN", ("channel", None), ("channel", None)),
    ("g-T128", "g-T128", ("token", 128), ("token", 128)),
    ("g-KC128VT128", "g-KC128VT128", ("channel", 128), ("token", 128)),
    ("g-kcnvt128", "g-KCNVT128", ("channel", None), ("token", 128)),
    ("g-KT128VC64", "g-KT128VC64", ("token", 128), ("channel", 64)),
    ("g-KC64VC64", "g-C64", ("channel", 64), ("channel", 64)),
])
def test_parse_canonical(name, canon, k, v):
    spec = parse_scheme(name)
    assert str(spec) == canon
    assert spec.side("k") == k and spec.side("v") == v
    assert parse_scheme(str(spec)) == spec
    d = json.loads(json.dumps(spec.to_dict()))
    assert KVQuantSpec.from_dict(d) == spec
    assert d["scheme"] == canon


def test_every_study_scheme_parses_to_itself():
    for name in SCHEMES:
        assert str(parse_scheme(name)) == name


def test_ov_schemes_are_recognised():
    spec = parse_scheme("OV-U4")
    assert spec.kind == "ov" and spec.ov_bits == 4 and str(spec) == "ov-u4" and not spec.is_quantized


@pytest.mark.parametrize("bad", ["g-TN", "int4", "g-C", "or", "or100", "g-KC128", "ov-u2", "", "g-C0"])
def test_unknown_names_raise_with_grammar(bad):
    with pytest.raises(ValueError) as e:
        parse_scheme(bad)
    assert isinstance(e.value, InputError)
    assert repr(bad) in str(e.value) or "outlier" in str(e.value) or "group" in str(e.value)


def test_unknown_name_lists_grammar():
    with pytest.raises(ValueError, match="grammar: fp16 | uniform"):
        parse_scheme("kivi")


def test_from_dict_accepts_the_name_alone():
    assert KVQuantSpec.from_dict({"scheme": "g-kcnvt128"}) == parse_scheme("g-KCNVT128")


def test_from_dict_rejects_inconsistent_name():
    d = parse_scheme("g-C128").to_dict()
    d["scheme"] = "g-T128"
    with pytest.raises(ValueError):
        KVQuantSpec.from_dict(d)


def test_bits_per_value():
    assert parse_scheme("g-KC128VT128").bits_per_value(2, 2) == pytest.approx(2 + 32 / 128)
    assert parse_scheme("g-KC128VT128").bits_per_value(4, 2) == pytest.approx(3 + 32 / 128)
    assert parse_scheme("g-CN").bits_per_value(2, 2, n_tokens=1024) == pytest.approx(2 + 32 / 1024)
    assert parse_scheme("or2").bits_per_value(4, 4, n_tokens=1000, d_model=1000) == pytest.approx(
        4 + 0.02 * 48 + 32 / 1e6)
    assert parse_scheme("fp16").bits_per_value(16, 16) == 16
    assert parse_scheme("g-T128").bits_per_value(16, 2) == pytest.approx((16 + 2.25) / 2)
    with pytest.raises(ValueError, match="k_bits=5"):
        parse_scheme("g-T128").bits_per_value(5, 2)
