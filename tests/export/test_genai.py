"""The deployable default: an int4 OpenVINO export (stateful by default, tokenizer IRs written) loads in
openvino.genai's ``VLMPipeline`` — the real client — and answers greedily what kvtool's fp16-KV runtime answers
on the same image and prompt (both apply the checkpoint's chat template); its LM returns last-position logits."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.manifest import Manifest

QUESTIONS = ["What color is it?", "How many shapes are there? Answer with a number."]


def _image(seed: int):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(60, 80, 3) * 255).astype("uint8"))


def test_int4_default_export_is_stateful_with_tokenizer_irs_and_last_logits(exported):
    import openvino as ov

    out = exported("tiny-llava", "openvino", 4, "fp16")
    m = Manifest.load(out)
    assert m.stateful and "beam_idx" in m.graphs["language_model"].inputs
    for name in ("openvino_tokenizer.xml", "openvino_detokenizer.xml"):
        assert (out / name).is_file(), name
    # the tokenizer IR encodes like the HF tokenizer it was converted from
    from transformers import AutoTokenizer

    text = "USER: <image>\nWhat color is it? ASSISTANT:"
    want = AutoTokenizer.from_pretrained(out)(text).input_ids
    got = ov.Core().compile_model(out / "openvino_tokenizer.xml", "CPU")([text])["input_ids"][0].tolist()
    assert got == want
    # prefill of 5 tokens returns the logits of the last position only
    core = ov.Core()
    req = core.compile_model(out / m.graphs["language_model"].file, "CPU").create_infer_request()
    T = 5
    res = req.infer({"inputs_embeds": np.random.default_rng(0).standard_normal((1, T, m.lm.hidden_size), np.float32),
                     "attention_mask": np.ones((1, T), np.int64), "position_ids": np.arange(T)[None],
                     "beam_idx": np.zeros((1,), np.int32)})
    assert res[req.model_outputs[0]].shape == (1, 1, m.lm.vocab_size)


def test_genai_vlm_pipeline_answers_like_kvtool(exported):
    og = pytest.importorskip("openvino_genai")  # in the test extra (openvino-genai == the openvino version)
    import openvino as ov

    from kvtool.runtime.pipeline import VLMPipeline

    out = exported("tiny-llava", "openvino", 4, "fp16")
    genai = og.VLMPipeline(str(out), "CPU", KV_CACHE_PRECISION="f16")
    cfg = og.GenerationConfig()
    cfg.max_new_tokens, cfg.do_sample = 8, False
    ours = VLMPipeline.load(out, kv="fp16")
    answers = []
    for seed, q in enumerate(QUESTIONS):
        img = _image(seed)
        theirs = genai.generate(q, images=[ov.Tensor(np.array(img)[None])], generation_config=cfg).texts[0]
        mine = ours.generate(img, q, max_new_tokens=8)
        assert theirs.strip() == mine.text, (q, theirs, mine.text)
        answers.append(mine.text)
    assert all(answers)
