"""`kvtool ls schemes` and `kvtool kv-roundtrip`: tables, JSON, one-line errors with exit code 2."""

import json

from click.testing import CliRunner

from kvtool.cli import main
from kvtool.quant_ops import OV_SCHEMES, SCHEMES


def test_ls_schemes_table_and_json():
    r = CliRunner().invoke(main, ["ls", "schemes", "--bits", "2"])
    assert r.exit_code == 0, r.output
    for name in list(SCHEMES) + list(OV_SCHEMES):
        assert name in r.output
    r = CliRunner().invoke(main, ["ls", "schemes", "--k-bits", "4", "--v-bits", "2", "--json"])
    rows = {row["scheme"]: row for row in json.loads(r.output)}
    assert rows["g-KC128VT128"]["bits_per_value"] == 3.25
    assert rows["fp16"]["bits_per_value"] == 16
    assert rows["ov-u4"]["runs_in"] == "openvino-graph"


def test_kv_roundtrip_json():
    r = CliRunner().invoke(main, ["kv-roundtrip", "--scheme", "g-KC128VT128", "--scheme", "uniform",
                                  "--bits", "2", "--tokens", "256", "--heads", "2", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["scheme"]: row for row in json.loads(r.stdout)}  # kvtool's progress bar is on stderr
    g, u = rows["g-KC128VT128"], rows["uniform"]
    assert g["k_bits"] == 2 and g["held_vs_fp16"] <= (2 + 32 / 128) / 16 + 1e-9
    assert g["k_rel_err"] < u["k_rel_err"]  # the study's finding on outlier-channel keys
    assert 0 < g["k_rel_err"] < 0.5


def test_kv_roundtrip_table_and_k_v_bits():
    r = CliRunner().invoke(main, ["kv-roundtrip", "--scheme", "g-T128", "--k-bits", "3", "--v-bits", "2",
                                  "--tokens", "16", "--heads", "2"])
    assert r.exit_code == 0, r.output
    assert "g-T128" in r.output and "3/2" in r.output


def test_cli_bad_input_is_one_line_exit_2():
    for args in (["kv-roundtrip", "--scheme", "kivi"], ["kv-roundtrip", "--tokens", "0"],
                 ["kv-roundtrip", "--scheme", "g-T100", "--heads", "2"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1
