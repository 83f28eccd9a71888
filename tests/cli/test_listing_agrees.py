"""What the listing commands offer is what ``run`` / ``eval`` accept: the bits of ``ls schemes`` and
``kv-roundtrip`` are ``quant_ops.schemes.QUANT_BITS`` (the bits ``--kv-bits`` takes), every listed scheme builds a
KV spec as ``run --kv`` does, every listed task is one ``eval`` knows."""

import json

import pytest
from click.testing import CliRunner

from kvtool.cli import main
from kvtool.cli.kv_options import build_kv_spec
from kvtool.cli.quant_cmds import BITS_TEXT
from kvtool.errors import InputError
from kvtool.quant_ops.schemes import QUANT_BITS, VALID_BITS


@pytest.mark.parametrize("bits", sorted(set(VALID_BITS) | {1, 5}))
def test_ls_schemes_takes_the_bits_run_takes(bits):
    listed = CliRunner().invoke(main, ["ls", "schemes", "--bits", str(bits), "--json"])
    try:
        build_kv_spec("g-KC128VT128", kv_bits=bits)
        runs = True
    except InputError:
        runs = False
    assert (listed.exit_code == 0) == runs == (bits in QUANT_BITS), listed.output
    if not runs:
        assert listed.exit_code == 2 and listed.output.count("\n") == 1 and "--bits" in listed.output


@pytest.mark.parametrize("opt", ["--bits", "--k-bits", "--v-bits"])
def test_kv_roundtrip_refuses_what_run_refuses(opt):
    r = CliRunner().invoke(main, ["kv-roundtrip", "--scheme", "g-T128", opt, "16", "--tokens", "8", "--heads", "2"])
    assert r.exit_code == 2 and f"{opt} 16" in r.output and "Traceback" not in r.output


def test_bits_help_names_quant_bits():
    assert BITS_TEXT == ", ".join(map(str, QUANT_BITS[:-1])) + f" or {QUANT_BITS[-1]}"
    r = CliRunner().invoke(main, ["ls", "schemes", "--help"])
    assert BITS_TEXT in r.output


def test_every_listed_scheme_and_bit_width_runs():
    for bits in QUANT_BITS:
        r = CliRunner().invoke(main, ["ls", "schemes", "--bits", str(bits), "--json"])
        assert r.exit_code == 0, r.output
        for row in json.loads(r.output):
            quantizes = row["runs_in"] == "quant_ops" and row["scheme"] != "fp16"
            spec = build_kv_spec(row["scheme"], kv_bits=bits if quantizes else None)
            assert (spec.k_bits, spec.v_bits) == ((row["k_bits"], row["v_bits"]) if quantizes or
                                                  row["scheme"].startswith("ov-") else (None, None))


def test_every_listed_task_is_one_eval_knows():
    from kvtool.evals.tasks import get_task

    r = CliRunner().invoke(main, ["ls", "tasks", "--json"])
    assert r.exit_code == 0
    names = [row["task"] for row in json.loads(r.output)]
    assert names and all(get_task(n).name == n for n in names)
