"""The transformers-free path of an OpenVINO / ONNX run (issue 13's load overhead): ``lean_processor`` gives the
token ids, pixels, chat-template text and decoded text transformers' processor gives on LLaVA-1.5, and declines
what it does not reproduce; ``hfconfig.read_config`` answers the fields the graph engines read as
``AutoConfig`` does, falling back to it where config.json leaves one out; loading and running an OpenVINO
LLaVA-1.5 export imports neither torch nor transformers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.runtime.helpers import (
    assert_declines_tokenizer_edits,
    assert_lean_run_matches_transformers,
    random_image,
)


def test_lean_llava_processor_equals_transformers(tiny_model):
    from PIL import Image

    from kvtool.runtime.lean_processor import LeanLlavaProcessor, load_lean_processor
    from kvtool.runtime.preprocess import build_prompt, prepare_inputs
    from kvtool.runtime.processing import load_processor

    path = tiny_model("tiny-llava")
    lean, ref = load_lean_processor(path), load_processor(path)
    assert isinstance(lean, LeanLlavaProcessor)
    assert lean.tokenizer.eos_token_id == ref.tokenizer.eos_token_id
    gray = Image.fromarray((np.random.default_rng(9).random((77, 41)) * 255).astype("uint8"), mode="L")
    images = [random_image(0, (70, 110)), random_image(1, (130, 40)), random_image(2, (48, 48)),
              random_image(3, (31, 200)), gray, random_image(4, (7, 5))]
    questions = ["What is this?", "Is </s> a token? <s> USER: ASSISTANT:", "<image> first, then the question"]
    for conv in ("chat_template", "vicuna_v1"):
        for i, img in enumerate(images):
            q = questions[i % len(questions)]
            a = prepare_inputs(lean, [img.convert("RGB")], q, conv)
            b = prepare_inputs(ref, [img.convert("RGB")], q, conv)
            assert a.prompt == b.prompt
            np.testing.assert_array_equal(a.input_ids, b.input_ids)
            assert sorted(a.vision) == sorted(b.vision) == ["pixel_values"]
            pa, pb = a.vision["pixel_values"], b.vision["pixel_values"]
            assert pa.dtype == pb.dtype == np.float32 and pa.shape == pb.shape
            np.testing.assert_array_equal(pa, pb)  # bit-identical: the same PIL resize and arithmetic
            ids = a.input_ids[0].tolist()
            for skip in (True, False):
                assert lean.tokenizer.decode(ids, skip_special_tokens=skip) == ref.tokenizer.decode(
                    ids, skip_special_tokens=skip)
    # two images, and a text-only prompt
    two = [random_image(5, (60, 90)), random_image(6, (90, 60))]
    a, b = (prepare_inputs(p, two, "Compare <image> with <image>.", "chat_template") for p in (lean, ref))
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.vision["pixel_values"], b.vision["pixel_values"])
    a, b = (prepare_inputs(p, [], "Say hi.", "chat_template") for p in (lean, ref))
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    # a multi-turn conversation with a system turn renders as transformers renders it
    conv = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "text", "text": "Sure?"}]}]
    for gen in (True, False):
        assert lean.apply_chat_template(conv, add_generation_prompt=gen) == ref.apply_chat_template(
            conv, add_generation_prompt=gen, tokenize=False)
    assert build_prompt(lean, "Q", 1) == build_prompt(ref, "Q", 1)


def test_lean_processor_declines_what_it_does_not_reproduce(tiny_model, tmp_path):
    from kvtool.runtime.lean_processor import load_lean_processor

    assert load_lean_processor(tiny_model("tiny-llava-next")) is None
    assert load_lean_processor(tiny_model("tiny-qwen2-vl")) is None
    src = tiny_model("tiny-llava")
    assert_declines_tokenizer_edits(load_lean_processor, src, tmp_path, "LlamaTokenizer")
    d = tmp_path / "pad"  # a crop larger than the resized image: transformers pads, not reproduced
    shutil.copytree(src, d)
    cfg = json.loads((d / "processor_config.json").read_text())
    cfg["image_processor"]["crop_size"] = {"height": 400, "width": 400}
    (d / "processor_config.json").write_text(json.dumps(cfg))
    (d / "preprocessor_config.json").unlink(missing_ok=True)
    assert load_lean_processor(d) is None


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"])
def test_read_config_answers_as_autoconfig(tiny_model, name, tmp_path):
    from transformers import AutoConfig

    from kvtool.errors import InputError
    from kvtool.runtime.hfconfig import REQUIRED, JsonConfig, read_config

    path = tiny_model(name)
    arch = json.loads((path / "config.json").read_text())["model_type"]
    cfg, ref = read_config(path, arch), AutoConfig.from_pretrained(path)
    assert isinstance(cfg, JsonConfig)
    for dotted in REQUIRED[arch]:
        for alt in dotted.split("|"):
            obj, want = cfg, ref
            for part in alt.split("."):
                obj, want = getattr(obj, part, None), getattr(want, part, None)
            if obj is not None:
                assert obj == want, alt
    assert getattr(cfg, "no_such_field", "default") == "default"
    # a field config.json leaves out: AutoConfig's class default answers
    d = tmp_path / "partial"
    shutil.copytree(path, d)
    data = json.loads((d / "config.json").read_text())
    data.pop("image_token_id", None)
    data.pop("image_token_index", None)
    (d / "config.json").write_text(json.dumps(data))
    assert not isinstance(read_config(d, arch), JsonConfig)
    (d / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="config.json"):
        read_config(d, arch)


def test_openvino_run_imports_neither_torch_nor_transformers(exported):
    # and the answer equals the one with transformers' processor
    out = exported("tiny-llava", "openvino", 4, "fp16")
    assert_lean_run_matches_transformers(out, "LeanLlavaProcessor", None, 3)
