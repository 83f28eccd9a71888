"""Every OpenVINO engine on a stateful export says what its ``kv_work_bytes`` counts (``pipeline.engine.kv_work``
in ``kvtool run --json``), as the paged and stateless engines did: the packed engine (0 on the native path, one
layer's dequantized K/V on the portable one), the state-owned engine (OpenVINO's states as a working copy) and the
stateful engine (0: the states are the cache). The figure and the sentence agree with the run's stats."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvtool.runtime import VLMPipeline
from tests.runtime.helpers import random_image


def _run_json(out, tmp_path, *kv: str) -> dict:
    from kvtool.cli import main

    img = tmp_path / "img.png"
    random_image().save(img)
    res = CliRunner().invoke(main, ["run", str(out), "--image", str(img), "--prompt", "What is this?",
                                    "--max-new-tokens", "4", "--json", *kv])
    assert res.exit_code == 0, res.output
    return json.loads(res.output[res.output.index("{"):])


def test_packed_engine_says_what_kv_work_counts(exported, tmp_path):
    out = exported("tiny-llava", "openvino", 16, "fp32")
    d = _run_json(out, tmp_path, "--kv", "g-KC128VT128", "--kv-bits", "2")
    eng, st = d["pipeline"]["engine"], d["stats"]
    assert eng["name"] == "OpenVINOPackedEngine"
    assert eng["kv_work"].startswith("0 on the native path") and "portable path one layer's K/V" in eng["kv_work"]
    # the figure it describes: 0 where every layer ran natively, else at most one layer's K and V (f32 here)
    per_layer = 2 * eng_geometry(out) * st["prompt_tokens"] * 4 * 2
    assert (st["kv_work_bytes"] == 0) == (eng["attention_path"] == "native")
    assert 0 <= st["kv_work_bytes"] <= per_layer


def eng_geometry(out) -> int:
    """kv heads x head_dim of the export's LM (manifest)."""
    from kvtool.manifest import Manifest

    lm = Manifest.load(out).lm
    return lm.num_kv_heads * lm.head_dim


@pytest.mark.parametrize(("kv", "owner", "start"), [
    ("fp16", "kvtool", "OpenVINO's states"),
    ("g-KC128VT128", "kvtool", "kvtool's dequantization buffers plus OpenVINO's states"),
    ("ov-u8", None, "0: the cache is OpenVINO's own states"),
])
def test_stateful_engines_say_what_kv_work_counts(exported, kv, owner, start):
    out = exported("tiny-llava", "openvino", 16, "fp32")
    kw = {"kv_owner": owner} if owner else {}
    bits = {"k_bits": 2, "v_bits": 2} if kv.startswith("g-") else {}
    pipe = VLMPipeline.load(out, kv=kv, **bits, **kw)
    st = pipe.generate(random_image(), "What is this?", max_new_tokens=4, ignore_eos=True).stats
    what = pipe.info()["engine"]["kv_work"]
    assert what.startswith(start), what
    assert (st["kv_work_bytes"] == 0) == what.startswith("0")
