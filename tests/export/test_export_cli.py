"""`kvtool export` bad input: one-line errors, exit code 2, before any heavy work."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvtool.cli import main


def run(*args):
    res = CliRunner().invoke(main, ["export", *args], env={"HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    return res.exit_code, lines


@pytest.fixture(scope="module")
def fake_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert_ckpt")
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    return d


@pytest.mark.parametrize("args,needle", [
    (["{missing}", "-o", "{out}"], "no such directory"),
    (["some-org/some-model", "-o", "{out}"], "hub is offline"),
    (["{bert}", "-o", "{out}"], "supported model types: llava, llava_next, qwen2_vl"),
    (["{bert}", "-o", "{out}", "--wbits", "5"], "--wbits 5: expected one of 16, 8, 4, 3"),
    (["{bert}", "-o", "{out}", "--backend", "tflite"], "--backend 'tflite'"),
    (["{bert}", "-o", "{out}", "--wbits", "3", "--awq"], "needs --calibration"),
    (["{bert}", "-o", "{out}", "--backend", "onnx", "--wbits", "4", "--awq"], "needs --calibration"),
    (["{bert}", "-o", "{out}", "--wbits", "4", "--group-size", "96"], "--group-size 96"),
    (["{bert}", "-o", "{out}", "--wbits", "4", "--awq", "--calibration", "{missing}.jsonl"], "no such file"),
    (["{bert}", "-o", "{out}", "--scale-estimation"], "needs --awq"),
    (["{bert}", "-o", "{out}", "--stateful", "--backend", "onnx"], "only the openvino backend"),
])
def test_bad_input_is_one_line_exit_2(args, needle, fake_ckpt, tmp_path):
    subst = {"missing": str(tmp_path / "nope"), "out": str(tmp_path / "out"), "bert": str(fake_ckpt)}
    code, lines = run(*[a.format(**subst) for a in args])
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_bad_calibration_rows(fake_ckpt, tmp_path):
    bad = tmp_path / "cal.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    from kvtool.errors import InputError
    from kvtool.export.calibration import load_calibration

    with pytest.raises(InputError, match="line 1 needs"):
        load_calibration(str(bad), 4)
    bad.write_text("not json\n")
    with pytest.raises(InputError, match="line 1 is not JSON"):
        load_calibration(str(bad), 4)


def test_group_size_not_dividing_the_model_is_refused(tiny_model, tmp_path):
    # tiny-llava's layers are 128 / 256 wide: 256 does not divide 128
    code, lines = run(str(tiny_model("tiny-llava")), "-o", str(tmp_path / "o"), "--wbits", "4", "--group-size", "256")
    assert code == 2 and "does not divide" in lines[-1] and lines[-1].startswith("error: "), lines


@pytest.mark.slow
def test_json_output_is_pure_json(tiny_model, tmp_path):
    """Libraries' progress output (NNCF's rich bars) must not leak into stdout under --json."""
    res = CliRunner().invoke(main, ["export", str(tiny_model("tiny-llava")), "-o", str(tmp_path / "o"), "--wbits", "4",
                                    "--json"], env={"HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["manifest"]["weights"]["bits"] == 4 and {g["role"] for g in d["graphs"]} >= {"language_model"}
