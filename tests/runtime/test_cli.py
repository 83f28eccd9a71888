"""``kvtool run`` and ``kvtool devices``: streamed answer + stats, JSON, one-line errors with exit code 2."""

from __future__ import annotations

import json

from click.testing import CliRunner

from kvtool.cli import main
from tests.runtime.helpers import random_image


def test_devices_lists_and_picks():
    res = CliRunner().invoke(main, ["devices", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert any(x["device"] == "CPU" for x in d["openvino"]) and "CPUExecutionProvider" in d["onnxruntime"]
    assert d["auto"]["torch"] in {x["device"] for x in d["torch"]}
    res = CliRunner().invoke(main, ["devices"])
    assert res.exit_code == 0 and "auto picks" in res.output


def test_run_streams_answer_and_stats(exported, tmp_path):
    out = exported("tiny-llava", "openvino", 16, "fp32")
    img = tmp_path / "img.png"
    random_image().save(img)
    args = ["run", str(out), "--image", str(img), "--prompt", "What is this?", "--kv", "g-KC128VT128",
            "--kv-bits", "2", "--k-bits", "3", "--max-new-tokens", "4"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "ms/token" in res.output and "K3V2" in res.output and "g-KC128VT128" in res.output
    res = CliRunner().invoke(main, args + ["--json"])
    d = json.loads(res.output)
    assert d["pipeline"]["k_bits"] == 3 and d["pipeline"]["v_bits"] == 2 and len(d["token_ids"]) <= 4
    assert 0 < d["stats"]["kv_bytes"] < d["stats"]["kv_fp16_bytes"]


def test_run_bad_input_exits_2_with_one_line(exported, tmp_path):
    out = exported("tiny-llava", "openvino", 16, "fp32")
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    cases = [
        ["run", str(out), "--image", str(bad), "--prompt", "q"],
        ["run", str(tmp_path), "--image", str(bad), "--prompt", "q"],
        ["run", str(out), "--prompt", "q"],
        ["run", str(out), "--image", str(bad), "--prompt", "q", "--kv", "g-T96", "--kv-bits", "2"],
    ]
    for args in cases:
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, (args, res.output)
        assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
