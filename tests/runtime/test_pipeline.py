"""VLMPipeline end to end on the tiny LLaVA: parity with transformers' generate, quantized parity between the
torch and OpenVINO engines, where quantization acts (first token), bytes held, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.errors import InputError
from kvtool.runtime import VLMPipeline
from kvtool.runtime.engines import Engine
from tests.runtime.helpers import QUESTION, hf_greedy, random_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def llava(tiny_model):
    return tiny_model("tiny-llava")


@pytest.fixture(scope="module")
def llava_ov(exported):
    return exported("tiny-llava", "openvino", 16, "fp32", stateful=False)


@pytest.fixture(scope="module")
def reference(llava):
    return hf_greedy(llava, random_image(), QUESTION, max_new_tokens=8)


def test_torch_engine_matches_hf_generate(llava, reference):
    pipe = VLMPipeline.load(llava, backend="torch")
    assert type(pipe.engine).__name__ == "TorchEngine" and isinstance(pipe.engine, Engine)
    out = pipe.generate(random_image(), QUESTION, max_new_tokens=8)
    assert out.token_ids == reference[0]
    np.testing.assert_allclose(pipe.last_first_logits, reference[1], atol=1e-4)
    st = out.stats
    assert st["prompt_tokens"] > 144 and st["new_tokens"] == 8 and st["kv_bytes"] == 2 * st["kv_fp16_bytes"] > 0
    assert st["decode_ms_per_token"] > 0 and st["peak_rss_bytes"] > 0


def test_openvino_engine_matches_hf_generate(llava_ov, reference):
    pipe = VLMPipeline.load(llava_ov, kv_precision="f32")  # exact parity: the cache in fp32 like the reference
    out = pipe.generate(random_image(), QUESTION, max_new_tokens=8, keep_logits=True)
    assert type(pipe.engine).__name__ == "OpenVINOEngine" and isinstance(pipe.engine, Engine)
    assert pipe.engine.backend == "openvino" and out.token_ids == reference[0]
    np.testing.assert_allclose(pipe.last_first_logits, reference[1], atol=1e-4)
    for mine, ref in zip(out.logits, reference[2], strict=True):
        np.testing.assert_allclose(mine, ref, atol=1e-4)
    info = pipe.info()
    assert info["backend"] == "openvino" and info["manifest"]["architecture"] == "llava"
    assert info["kv"] == "fp16" and info["first_token"] == "compressed" and info["conversation"] == "chat_template"


@pytest.mark.parametrize("scheme,bits", [("g-KC128VT128", 2), ("uniform", 4), ("or2", 3)])
def test_torch_and_openvino_agree_on_quantized_kv(llava, llava_ov, scheme, bits):
    kw = dict(kv=scheme, k_bits=bits, v_bits=bits, kv_mode="packed")
    t = VLMPipeline.load(llava, backend="torch", **kw)
    o = VLMPipeline.load(llava_ov, **kw)
    a = t.generate(random_image(), QUESTION, max_new_tokens=6)
    b = o.generate(random_image(), QUESTION, max_new_tokens=6)
    assert a.token_ids == b.token_ids
    # 1e-7 differences between the engines' fp K/V can move a value across a rounding boundary (one code
    # step); the compression itself moves these logits by ~1e-1
    np.testing.assert_allclose(t.last_first_logits, o.last_first_logits, atol=1e-3)
    assert a.stats["kv_bytes"] == b.stats["kv_bytes"] < b.stats["kv_fp16_bytes"]


def test_kv_bytes_match_the_scheme_theory_within_the_residual(llava_ov):
    from kvtool.quant_ops import parse_scheme

    o = VLMPipeline.load(llava_ov, kv="g-KC128VT128", k_bits=2, v_bits=2)
    st = o.generate(random_image(), QUESTION, max_new_tokens=4).stats
    lm = o.manifest.lm
    n = st["prompt_tokens"] + st["new_tokens"] - 1  # the last token is never fed back
    d_model = lm.num_kv_heads * lm.head_dim
    values = 2 * lm.num_layers * n * d_model
    theory = parse_scheme("g-KC128VT128").bits_per_value(2, 2, n_tokens=n, d_model=d_model) * values / 8
    itemsize = np.dtype(o.engine.kv_dtype).itemsize
    residual = lm.num_layers * (n % 128) * d_model * itemsize  # K tokens not yet in a full 128-token group
    # the theory counts 16-bit scale and min; held in the KV dtype here (f32)
    params = lm.num_layers * 2 * ((n // 128) * d_model + n * (d_model // 128))
    assert st["kv_fp16_bytes"] == values * 2
    assert theory <= st["kv_bytes"] <= theory + residual + params * (itemsize - 2)
    assert st["kv_bytes"] < 0.4 * st["kv_fp16_bytes"]


def test_first_token_sees_compressed_context_only_in_compressed_mode(llava_ov):
    img = random_image()
    fp = VLMPipeline.load(llava_ov)
    fp.generate(img, QUESTION, max_new_tokens=1)
    packed = VLMPipeline.load(llava_ov, kv="uniform", k_bits=2, v_bits=2, kv_mode="packed")
    packed.generate(img, QUESTION, max_new_tokens=1)
    kivi = VLMPipeline.load(llava_ov, kv="uniform", k_bits=2, v_bits=2, kv_mode="packed", first_token="fp")
    kivi.generate(img, QUESTION, max_new_tokens=1)
    assert np.abs(packed.last_first_logits - fp.last_first_logits).max() > 1e-2
    np.testing.assert_allclose(kivi.last_first_logits, fp.last_first_logits, atol=1e-5)
    assert packed.info()["first_token"] == "compressed" and kivi.info()["first_token"] == "fp"


@pytest.mark.parametrize("scheme", ["g-T128", "g-KC128VT128"])
def test_simulate_equals_packed_where_streaming_is_exact(llava_ov, scheme):
    # per-token groups and full per-channel groups are quantized once in packed mode; simulate re-quantizes
    # them every step, which gives the same values (a quantized group maps to itself)
    img = random_image()
    kw = dict(kv=scheme, k_bits=4, v_bits=4)
    p = VLMPipeline.load(llava_ov, kv_mode="packed", **kw)
    s = VLMPipeline.load(llava_ov, kv_mode="simulate", **kw)
    a, b = p.generate(img, QUESTION, max_new_tokens=6), s.generate(img, QUESTION, max_new_tokens=6)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(p.last_first_logits, s.last_first_logits, atol=1e-4)


def test_torch_simulate_quantizes_inside_the_prefill(llava):
    # the study's semantics: even the first token's logits move, and differently from packed mode
    img = random_image()
    fp = VLMPipeline.load(llava, backend="torch")
    fp.generate(img, QUESTION, max_new_tokens=1)
    sim = VLMPipeline.load(llava, backend="torch", kv="g-T128", k_bits=2, v_bits=2, kv_mode="simulate")
    sim.generate(img, QUESTION, max_new_tokens=1)
    pk = VLMPipeline.load(llava, backend="torch", kv="g-T128", k_bits=2, v_bits=2, kv_mode="packed")
    pk.generate(img, QUESTION, max_new_tokens=1)
    assert np.abs(sim.last_first_logits - fp.last_first_logits).max() > 1e-2
    assert np.abs(sim.last_first_logits - pk.last_first_logits).max() > 1e-4


def test_sampling_is_seeded_and_text_only_works(llava_ov):
    pipe = VLMPipeline.load(llava_ov)
    img = random_image()
    a = pipe.generate(img, QUESTION, max_new_tokens=6, do_sample=True, temperature=5.0, seed=1)
    b = pipe.generate(img, QUESTION, max_new_tokens=6, do_sample=True, temperature=5.0, seed=1)
    c = pipe.generate(img, QUESTION, max_new_tokens=6, do_sample=True, temperature=5.0, seed=2)
    assert a.token_ids == b.token_ids != c.token_ids
    t = pipe.generate(None, "Say something.", max_new_tokens=3, text_only=True)
    assert len(t.token_ids) >= 1 and t.stats["prompt_tokens"] < 40


def test_vicuna_v1_conversation_prompt(llava_ov):
    pipe = VLMPipeline.load(llava_ov, conversation="vicuna_v1")
    from kvtool.runtime.preprocess import build_prompt

    p = build_prompt(pipe.processor, "Is there a cat?", 1, "vicuna_v1")
    assert p.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert p.endswith("USER: <image>\nIs there a cat? ASSISTANT:")
    assert len(pipe.generate(random_image(), "Is there a cat?", max_new_tokens=2).token_ids) >= 1
    # LLaVA's convention: a question holding <image> keeps the image where it is (here: after the question)
    inline = build_prompt(pipe.processor, "Is there a cat?\n<image>\nAnswer yes or no.", 1, "vicuna_v1")
    assert inline.endswith("USER: Is there a cat?\n<image>\nAnswer yes or no. ASSISTANT:")
    chat = build_prompt(pipe.processor, "Is there a cat?\n<image>\nAnswer yes or no.", 1, "chat_template")
    assert chat.count("<image>") == 1 and chat.index("Is there a cat?") < chat.index("<image>")
    assert len(pipe.generate(random_image(), "Is there a cat?\n<image>", max_new_tokens=2).token_ids) >= 1
    with pytest.raises(InputError, match="placeholder"):
        build_prompt(pipe.processor, "<image> and <image>", 1, "vicuna_v1")


def test_bad_input_is_one_line_input_error(llava_ov, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    pipe = VLMPipeline.load(llava_ov)
    cases = [
        lambda: pipe.generate(bad, QUESTION),
        lambda: pipe.generate(tmp_path / "missing.png", QUESTION),
        lambda: pipe.generate(None, QUESTION),
        lambda: VLMPipeline.load(tmp_path),  # a directory without manifest
        lambda: VLMPipeline.load(llava_ov, kv="g-T96", k_bits=2, v_bits=2),  # 96 does not divide D_model 128
        lambda: VLMPipeline.load(llava_ov, kv="nonsense"),
        lambda: VLMPipeline.load(llava_ov, kv="g-T128", k_bits=5),
        lambda: VLMPipeline.load(llava_ov, kv_mode="fast"),
        lambda: VLMPipeline.load(llava_ov, backend="onnxruntime"),
        lambda: pipe.generate(random_image(), QUESTION, max_new_tokens=0),
        lambda: pipe.generate(random_image(), QUESTION, do_sample=True, temperature=0.0),
    ]
    for case in cases:
        with pytest.raises(InputError) as e:
            case()
        assert "\n" not in str(e.value) and len(str(e.value)) < 300
