"""The config.json ``kvtool models make`` writes carries the transformers-4 RoPE keys beside transformers 5's
``rope_parameters`` (kvtool.models.legacy_config): Qwen2-VL's ``rope_scaling = {type: mrope, mrope_section}`` and
``rope_theta`` (the keys transformers 4.57's Qwen2VLTextConfig reads; without them it took rope_scaling = None and
theta 1e6, and optimum-cli's trace died on ``rope_scaling["mrope_section"]``), and the current transformers reads
the same values back."""

from __future__ import annotations

import json

import pytest

from kvtool.models.legacy_config import add_transformers4_rope_keys, transformers4_rope_keys


def _old_reader(text: dict) -> dict:
    """What transformers 4.x's Qwen2VLTextConfig makes of a text config dict's RoPE (its __init__: rope_theta
    default 1e6, rope_scaling default None; a ``type`` of ``mrope`` becomes ``rope_type`` ``default``)."""
    scaling = dict(text["rope_scaling"]) if text.get("rope_scaling") is not None else None
    if scaling is not None and "type" in scaling:
        scaling["rope_type"] = "default" if scaling["type"] == "mrope" else scaling["type"]
    return {"rope_theta": text.get("rope_theta", 1000000.0), "rope_scaling": scaling}


def test_tiny_qwen2_vl_config_reads_the_same_in_both(tmp_path):
    from transformers import AutoConfig

    from kvtool.models import make_tiny_model

    out = make_tiny_model("tiny-qwen2-vl", tmp_path / "m", layers=1, vision_layers=1)
    cfg = json.loads((out / "config.json").read_text())
    text = cfg["text_config"]
    want = text["rope_parameters"]
    assert want["rope_theta"] == 10000.0 and len(want["mrope_section"]) == 3  # what transformers 5 wrote
    old = _old_reader(text)
    assert old["rope_theta"] == 10000.0  # not the old default 1e6
    assert old["rope_scaling"]["mrope_section"] == want["mrope_section"] and old["rope_scaling"]["rope_type"] == "default"
    assert cfg["rope_scaling"] == text["rope_scaling"] and cfg["rope_theta"] == 10000.0  # the published file's place
    # the current transformers reads the same RoPE back (its Qwen2-VL config takes rope_scaling + rope_theta)
    back = AutoConfig.from_pretrained(out).text_config.rope_parameters
    assert back["rope_type"] == "default" and back["rope_theta"] == want["rope_theta"]
    assert list(back["mrope_section"]) == want["mrope_section"]


def test_real_shape_qwen2_vl_keys(tmp_path):
    from transformers import AutoConfig

    from kvtool.models.real_shapes import real_shape_config

    real_shape_config("qwen2-vl-2b", layers=2).save_pretrained(tmp_path)
    added = add_transformers4_rope_keys(tmp_path)
    assert added == {"rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
    text = json.loads((tmp_path / "config.json").read_text())["text_config"]
    assert _old_reader(text)["rope_scaling"]["mrope_section"] == [16, 24, 24]
    back = AutoConfig.from_pretrained(tmp_path).text_config
    assert back.rope_parameters["rope_theta"] == 1000000.0 and list(back.rope_parameters["mrope_section"]) == [16, 24, 24]
    assert back.num_hidden_layers == 2
    assert add_transformers4_rope_keys(tmp_path) == {}  # already there: nothing added, file unchanged


def test_llava_gets_theta_only_and_scaled_rope_is_left():
    assert transformers4_rope_keys({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}) == \
        {"rope_theta": 10000.0}
    assert transformers4_rope_keys({"rope_parameters": {"rope_type": "linear", "rope_theta": 1.0, "factor": 2.0}}) == {}
    assert transformers4_rope_keys({}) == {}


@pytest.mark.parametrize("name", ["tiny-llava"])
def test_tiny_llava_config_still_loads(tmp_path, name):
    from transformers import AutoConfig

    from kvtool.models import make_tiny_model

    out = make_tiny_model(name, tmp_path / "m", layers=1, vision_layers=1)
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert text["rope_theta"] == text["rope_parameters"]["rope_theta"] and "rope_scaling" not in text
    assert AutoConfig.from_pretrained(out).text_config.rope_parameters["rope_theta"] == text["rope_theta"]
