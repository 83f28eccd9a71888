"""Every engine against transformers' own greedy generate (tokens and every step's logits), per architecture;
OpenVINO's own KV compression on the stateful export. Exports of NeXT and the stateful graph are slow (marked).
Qwen2-VL runs on ONNX Runtime only (optimum-intel cannot export it with this transformers)."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.runtime import VLMPipeline
from kvtool.runtime.engines import Engine
from tests.runtime.helpers import QUESTION, hf_greedy, random_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# exact parity with transformers' fp32 generate needs the cache held in fp32 too (kv="fp16" is held in fp16 by
# default: tests/runtime/test_kv_options.py)
F32 = {"kv_precision": "f32"}


def _check(pipe, model_dir, image, steps=6):
    assert isinstance(pipe.engine, Engine)  # every member of the engine contract is there
    ids, _, logits = hf_greedy(model_dir, image, QUESTION, max_new_tokens=steps)
    out = pipe.generate(image, QUESTION, max_new_tokens=steps, keep_logits=True)
    assert out.token_ids == ids
    assert len(out.logits) == len(logits)
    for mine, ref in zip(out.logits, logits, strict=True):  # every step: positions and cache, not only the argmax
        np.testing.assert_allclose(mine, ref, atol=1e-4)
    return out


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", pytest.param("tiny-llava-next", marks=pytest.mark.slow)])
def test_torch_engine_matches_hf_generate(tiny_model, name):
    img = random_image(3, (70, 110))
    _check(VLMPipeline.load(tiny_model(name), backend="torch"), tiny_model(name), img)


def test_onnxruntime_engine_matches_hf_generate(exported, tiny_model):
    out_dir = exported("tiny-llava", "onnx", 16, "fp32")
    pipe = VLMPipeline.load(out_dir, **F32)
    assert pipe.engine.backend == "onnxruntime" and pipe.info()["engine"]["new_kv_outputs"]
    _check(pipe, tiny_model("tiny-llava"), random_image())
    # the same quantized cache as the OpenVINO / torch engines
    t = VLMPipeline.load(tiny_model("tiny-llava"), backend="torch", kv="g-KC128VT128", k_bits=2, v_bits=2)
    o = VLMPipeline.load(out_dir, kv="g-KC128VT128", k_bits=2, v_bits=2)
    a, b = t.generate(random_image(), QUESTION, max_new_tokens=5), o.generate(random_image(), QUESTION, max_new_tokens=5)
    assert a.token_ids == b.token_ids and a.stats["kv_bytes"] == b.stats["kv_bytes"]


def test_onnxruntime_engine_matches_hf_generate_on_qwen2_vl(exported, tiny_model):
    # vision graph + merger (rotary embedding and block mask built here), 3-D rope prompt positions, n + delta
    pipe = VLMPipeline.load(exported("tiny-qwen2-vl", "onnx", 16, "fp32"), **F32)
    _check(pipe, tiny_model("tiny-qwen2-vl"), random_image(3, (70, 110)))
    ref = VLMPipeline.load(tiny_model("tiny-qwen2-vl"), backend="torch")  # text-only (HallusionBench has some)
    a = ref.generate(None, "Say hi.", max_new_tokens=4, text_only=True, keep_logits=True)
    b = pipe.generate(None, "Say hi.", max_new_tokens=4, text_only=True, keep_logits=True)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(np.stack(a.logits), np.stack(b.logits), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_graph_engines_match_hf_generate_on_llava_next(exported, tiny_model, backend):
    pipe = VLMPipeline.load(exported("tiny-llava-next", backend, 16, "fp32"), **F32)
    out = _check(pipe, tiny_model("tiny-llava-next"), random_image(3, (70, 110)))
    assert out.stats["prompt_tokens"] > 300  # anyres tiles + newlines really went through


@pytest.mark.slow
def test_openvino_kv_compression_on_the_stateful_export(exported, tiny_model):
    out_dir = exported("tiny-llava", "openvino", 16, "fp32", stateful=True)
    img = random_image()
    ref = VLMPipeline.load(out_dir, **F32)  # stateful, fp KV
    _check(ref, tiny_model("tiny-llava"), img)
    diffs = {}
    for kv in ("ov-u8", "ov-u4"):
        for first in ("compressed", "fp"):
            p = VLMPipeline.load(out_dir, kv=kv, first_token=first)
            st = p.generate(img, QUESTION, max_new_tokens=2).stats
            diffs[kv, first] = np.abs(p.last_first_logits - ref.last_first_logits).max()
            assert p.info()["engine"]["stateful"]
            bits = 8 if kv == "ov-u8" else 4
            # codes + an f32 scale and zero point per head_dim group
            expect = st["kv_fp16_bytes"] / 2 * (bits / 8 + 8 / p.manifest.lm.head_dim)
            assert st["kv_bytes"] == pytest.approx(expect, rel=1e-6)
    assert diffs["ov-u4", "fp"] == 0 and diffs["ov-u8", "fp"] == 0
    assert diffs["ov-u4", "compressed"] > diffs["ov-u8", "compressed"] > 0  # OpenVINO really compressed


def test_openvino_engine_matches_hf_generate_on_qwen2_vl(exported, tiny_model):
    # the stateful engine asked for (Qwen2-VL fp16's default on CPU is the paged one: test_qwen2vl_paged.py)
    pipe = VLMPipeline.load(exported("tiny-qwen2-vl", "openvino", 16, "fp32"), kv_owner="openvino", **F32)
    assert type(pipe.engine).__name__ == "OpenVINOStatefulEngine"
    _check(pipe, tiny_model("tiny-qwen2-vl"), random_image(3, (70, 110)))
