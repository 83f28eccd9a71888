"""Typed granularities: the block size each one means on hand-worked shapes, the typed sides of parsed schemes,
and one definition of each scheme constant."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvtool.errors import InputError
from kvtool.quant_ops import parse_scheme
from kvtool.quant_ops.affine import block_for
from kvtool.quant_ops.granularity import PerChannel, PerTensor, PerToken, block_size, granularity
from kvtool.quant_ops.schemes import KV_MODES, QUANT_BITS, VALID_BITS, SchemeKind

KVTOOL = Path(__file__).resolve().parents[2] / "kvtool"


# [B, H, N, D] = [2, 4, 12, 8]: D_model = 32
@pytest.mark.parametrize("gran,block,flat", [
    (PerTensor(), (1, 4, 12, 8), False),  # one (delta, min) per batch row
    (PerChannel(4), (1, 1, 4, 1), False),  # a channel over 4 tokens
    (PerChannel(None), (1, 1, 12, 1), False),  # a channel over all 12 tokens (g-CN)
    (PerToken(8), (1, 1, 1, 8), False),  # a token's head: g = D
    (PerToken(4), (1, 1, 1, 4), False),  # half a head: g divides D
    (PerToken(16), (1, 2, 1, 8), False),  # two heads of a token: D divides g
    (PerToken(32), (1, 4, 1, 8), False),  # the whole D_model of a token
])
def test_block_size_on_hand_cases(gran, block, flat):
    assert block_size(gran, (2, 4, 12, 8)) == (block, flat)
    assert block_for(str(gran.axis), gran.group, (2, 4, 12, 8)) == (block, flat)  # the pair form agrees


def test_per_token_groups_across_heads_use_the_flat_view():
    # D = 6, D_model = 24: a group of 8 channels neither divides a head nor is a whole number of heads
    assert block_size(PerToken(8), (1, 4, 5, 6)) == ((1, 1, 1, 8), True)
    assert block_size(PerToken(12), (1, 4, 5, 6)) == ((1, 2, 1, 6), False)


@pytest.mark.parametrize("gran,shape,match", [
    (PerChannel(5), (1, 4, 12, 8), "12 tokens is not a multiple"),
    (PerToken(24), (1, 4, 12, 8), "D_model = H\\*D = 4\\*8 = 32"),
    (PerTensor(), (4, 12, 8), "rank 4"),
])
def test_block_size_refuses_what_does_not_tile(gran, shape, match):
    with pytest.raises(InputError, match=match):
        block_size(gran, shape)


def test_granularities_are_checked_and_named():
    assert granularity("channel", None) == PerChannel(None) and granularity("token", 64) == PerToken(64)
    assert granularity("tensor", None) == PerTensor()
    assert (PerToken(64).token_block, PerChannel(128).token_block, PerChannel(None).token_block,
            PerTensor().token_block) == (1, 128, None, None)
    for bad in (lambda: PerToken(0), lambda: PerChannel(-2), lambda: granularity("token", None),
                lambda: granularity("row", 4)):
        with pytest.raises(InputError):
            bad()


def test_parsed_sides_are_typed():
    s = parse_scheme("g-KC128VT64")
    assert s.kind is SchemeKind.GROUP and s.k == PerChannel(128) and s.v == PerToken(64)
    assert parse_scheme("g-CN").k == PerChannel(None)
    assert parse_scheme("or2").k == PerTensor() and parse_scheme("or2").outlier_pct == 2.0
    assert parse_scheme("fp16").k is None and parse_scheme("ov-u8").v is None
    assert parse_scheme("ov-u8").is_ov and parse_scheme("fp16").is_fp and not parse_scheme("fp16").is_quantized
    assert parse_scheme(s) is s  # a parsed spec passes through
    with pytest.raises(InputError, match="per-tensor"):
        type(s)(SchemeKind.UNIFORM, PerChannel(4), PerTensor())


def test_bits_and_modes_have_one_value():
    assert QUANT_BITS == (2, 3, 4, 8) and VALID_BITS == (2, 3, 4, 8, 16) and KV_MODES == ("packed", "simulate")


CONSTANTS = {"BITS", "QUANT_BITS", "VALID_BITS", "OV_SCHEMES", "KV_MODES", "MODES"}


def test_scheme_constants_are_defined_once():
    """Only ``quant_ops/schemes.py`` spells out the bits, the modes and the OpenVINO scheme names as literals;
    elsewhere such a name is imported (or aliased), never re-written."""
    defined: dict[str, list[str]] = {}
    for path in sorted(KVTOOL.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List, ast.Dict, ast.Set)):
                for t in node.targets:
                    if isinstance(t, ast.Name) and t.id in CONSTANTS:
                        defined.setdefault(t.id, []).append(str(path.relative_to(KVTOOL)))
    assert defined, "the scan found nothing: it would pass vacuously"
    for name, where in defined.items():
        assert where == ["quant_ops/schemes.py"], f"{name} written in {where}"
