"""The transformers-free Qwen2-VL processor (``kvtool.runtime.lean_qwen2vl``): token ids, pixel patches,
``image_grid_thw``, ``mm_token_type_ids`` and chat-template text equal transformers' ``Qwen2VLProcessor`` (PIL
backend, as the runtime builds it) on random images of several sizes and aspect ratios, on the tiny model's
preprocessing settings and on the long-context bench's (4 px patches, a fixed pixel budget) and with
``min_pixels`` / ``max_pixels`` keys; it declines what it does not reproduce; an OpenVINO Qwen2-VL run loads it
and imports neither torch nor transformers, with the same answer as with transformers' processor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.helpers import (
    assert_declines_tokenizer_edits,
    assert_lean_run_matches_transformers,
    random_image,
)


def _with_image_cfg(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint ``src`` whose image-processor settings have ``changes`` (None deletes a key)."""
    shutil.copytree(src, dst)
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = dst / name
        if not f.is_file():
            continue
        data = json.loads(f.read_text())
        cfg = data.get("image_processor", data) if name == "processor_config.json" else data
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        f.write_text(json.dumps(data))
    return dst


def _images():
    from PIL import Image

    gray = Image.fromarray((np.random.default_rng(9).random((77, 41)) * 255).astype("uint8"), mode="L")
    sizes = [(70, 110), (130, 40), (48, 48), (31, 200), (7, 5), (300, 260), (56, 57), (500, 90)]
    return [random_image(i, s) for i, s in enumerate(sizes)] + [gray]


def _check_equal(lean, ref, images, questions):
    from kvtool.runtime.preprocess import prepare_inputs

    for i, img in enumerate(images):
        q = questions[i % len(questions)]
        a = prepare_inputs(lean, [img.convert("RGB")], q, "chat_template")
        b = prepare_inputs(ref, [img.convert("RGB")], q, "chat_template")
        assert a.prompt == b.prompt
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert sorted(a.vision) == sorted(b.vision) == ["image_grid_thw", "mm_token_type_ids", "pixel_values"]
        for key in a.vision:
            va, vb = a.vision[key], b.vision[key]
            assert va.dtype == vb.dtype and va.shape == vb.shape, (key, img.size, va.shape, vb.shape)
            np.testing.assert_array_equal(va, vb)  # bit-identical: the same PIL resize and arithmetic
        ids = a.input_ids[0].tolist()
        for skip in (True, False):
            assert lean.tokenizer.decode(ids, skip_special_tokens=skip) == ref.tokenizer.decode(
                ids, skip_special_tokens=skip)


QUESTIONS = ["What is this?", "Is <|image_pad|> a token? <|im_end|><|vision_start|>", "<image> first, then text"]


def test_lean_qwen2vl_processor_equals_transformers(tiny_model):
    from kvtool.runtime.lean_qwen2vl import LeanQwen2VLProcessor, load_lean_qwen2vl_processor
    from kvtool.runtime.preprocess import build_prompt, prepare_inputs
    from kvtool.runtime.processing import load_processor

    path = tiny_model("tiny-qwen2-vl")
    lean, ref = load_lean_qwen2vl_processor(path), load_processor(path)
    assert isinstance(lean, LeanQwen2VLProcessor) and ref.kind == "Qwen2VLProcessor"
    assert lean.tokenizer.eos_token_id == ref.tokenizer.eos_token_id
    _check_equal(lean, ref, _images(), QUESTIONS)
    # two images (inline and in front), and a text-only prompt
    two = [random_image(5, (60, 90)), random_image(6, (90, 60))]
    for q in ("Compare <image> with <image>.", "Compare them."):
        a, b = (prepare_inputs(p, two, q, "chat_template") for p in (lean, ref))
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        for key in b.vision:
            np.testing.assert_array_equal(a.vision[key], b.vision[key])
    a, b = (prepare_inputs(p, [], "Say hi.", "chat_template") for p in (lean, ref))
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.vision["mm_token_type_ids"], b.vision["mm_token_type_ids"])
    conv = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "text", "text": "Sure?"}]}]
    for gen in (True, False):
        assert lean.apply_chat_template(conv, add_generation_prompt=gen) == ref.apply_chat_template(
            conv, add_generation_prompt=gen, tokenize=False)
    assert build_prompt(lean, "Q", 1) == build_prompt(ref, "Q", 1)
    with pytest.raises(ValueError, match="2 image tokens for 1 image"):
        lean(images=[two[0]], text="<|image_pad|><|image_pad|>", return_tensors="np")


@pytest.mark.parametrize("changes", [
    # the long-context bench's settings: 4 px patches, min = max = 36864 px (every image to 192 x 192)
    dict(patch_size=4, size={"shortest_edge": 36864, "longest_edge": 36864}),
    # min_pixels / max_pixels keys override size (transformers' __init__), a bilinear filter
    dict(min_pixels=3136, max_pixels=20000, resample=2),
    dict(do_normalize=False, rescale_factor=0.5),
])
def test_lean_qwen2vl_settings_equal_transformers(tiny_model, tmp_path, changes):
    from kvtool.runtime.lean_qwen2vl import load_lean_qwen2vl_processor
    from kvtool.runtime.processing import load_processor

    d = _with_image_cfg(tiny_model("tiny-qwen2-vl"), tmp_path / "m", **changes)
    lean, ref = load_lean_qwen2vl_processor(d), load_processor(d)
    assert lean is not None
    _check_equal(lean, ref, _images()[:6], QUESTIONS)


def test_smart_resize_equals_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    from kvtool.runtime.lean_qwen2vl import smart_resize

    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(x) for x in rng.integers(1, 3000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        factor = int(rng.choice([8, 28, 56]))
        lo = int(rng.integers(1, 200_000))
        hi = lo + int(rng.integers(0, 2_000_000))
        assert smart_resize(h, w, factor, lo, hi) == ref(h, w, factor, lo, hi), (h, w, factor, lo, hi)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 300, 28, 3136, 100000)


def test_lean_qwen2vl_declines_what_it_does_not_reproduce(tiny_model, tmp_path):
    from kvtool.runtime.lean_qwen2vl import load_lean_qwen2vl_processor

    assert load_lean_qwen2vl_processor(tiny_model("tiny-llava")) is None
    assert load_lean_qwen2vl_processor(tiny_model("tiny-llava-next")) is None
    src = tiny_model("tiny-qwen2-vl")
    assert_declines_tokenizer_edits(load_lean_qwen2vl_processor, src, tmp_path, "Qwen2Tokenizer")
    d = _with_image_cfg(src, tmp_path / "other", image_processor_type="SomeOtherImageProcessor")
    assert load_lean_qwen2vl_processor(d) is None


def test_openvino_qwen2vl_run_imports_neither_torch_nor_transformers(exported):
    # and the answer equals the one with transformers' processor
    out = exported("tiny-qwen2-vl", "openvino", 16, "fp32")
    assert_lean_run_matches_transformers(out, "LeanQwen2VLProcessor", "Qwen2VLProcessor", 4)
