"""Qwen2-VL fp16 on the stateful engine's chunked prefill (issue 13): the stateful engine (kv_owner="openvino";
Qwen2-VL fp16's default on CPU is now the paged engine, test_qwen2vl_paged.py) prefills in
chunks of ``PREFILL_CHUNK`` where ``stateful_chunking_saves_memory`` says so. A chunked prefill gives the same
greedy tokens as one call and first-step logits within f16 rounding, with chunks of 1 (slow), 7, one whose boundary
falls inside the image tokens, and one longer than the prompt; ``kvtool run --json`` names the chunk."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from kvtool.runtime import VLMPipeline
from kvtool.runtime.engines import engine_key, select_engine
from kvtool.runtime.kvspec import make_kv_spec
from tests.runtime.helpers import random_image

PROMPT = "Describe the picture in detail, please."


def _image_span(pipe, img) -> tuple[int, int]:
    """[first, last + 1) of the image tokens in the prompt ``pipe`` builds for ``img`` and ``PROMPT``."""
    from kvtool.runtime.preprocess import load_images, prepare_inputs

    ids = prepare_inputs(pipe.processor, load_images(img), PROMPT, pipe.conversation).input_ids[0]
    where = np.flatnonzero(ids == pipe.engine.image_token_id)
    assert where.size and np.all(np.diff(where) == 1)
    return int(where[0]), int(where[-1]) + 1


@pytest.mark.slow
def test_chunks_of_one_token_answer_as_one_call(exported):
    """Chunk 1: every prompt token its own call (~200 graph calls: slow)."""
    out = exported("tiny-qwen2-vl", "openvino", 16, "fp32")
    img = random_image(3, (70, 110))
    whole = VLMPipeline.load(out, kv="fp16", kv_owner="openvino", prefill_chunk=0)
    ref = whole.generate(img, PROMPT, max_new_tokens=8, ignore_eos=True)
    pipe = VLMPipeline.load(out, kv="fp16", kv_owner="openvino", prefill_chunk=1)
    got = pipe.generate(img, PROMPT, max_new_tokens=8, ignore_eos=True)
    assert got.token_ids == ref.token_ids and pipe.engine.info()["prefill_chunked"] is True
    np.testing.assert_allclose(pipe.last_first_logits, whole.last_first_logits, rtol=0,
                               atol=_tol(whole.last_first_logits))


def test_chunks_answer_as_one_call_with_mrope_positions(exported):
    out = exported("tiny-qwen2-vl", "openvino", 16, "fp32")
    img = random_image(3, (70, 110))
    whole = VLMPipeline.load(out, kv="fp16", kv_owner="openvino", prefill_chunk=0)
    assert type(whole.engine).__name__ == "OpenVINOStatefulEngine"
    ref = whole.generate(img, PROMPT, max_new_tokens=8, ignore_eos=True)
    ref_logits = whole.last_first_logits
    assert whole.engine.info()["prefill_chunked"] is False
    n = ref.stats["prompt_tokens"]
    a, b = _image_span(whole, img)
    inside = (a + b) // 2  # one chunk boundary in the middle of the image tokens
    assert a < inside < b and b - a > 8
    pipe = VLMPipeline.load(out, kv="fp16", kv_owner="openvino", prefill_chunk=7)
    for chunk in (7, inside, n + 5):  # chunk 1: the slow test above
        if chunk == 7:
            assert any(a < k < b for k in range(0, n, 7))  # boundaries inside the image span too
        pipe.engine.prefill_chunk = chunk  # what a load with prefill_chunk=chunk sets (one compile for all)
        got = pipe.generate(img, PROMPT, max_new_tokens=8, ignore_eos=True)
        info = pipe.engine.info()
        assert info["prefill_chunk"] == chunk and info["prefill_rule"] == "given"
        assert info["prefill_chunked"] is (chunk < n)
        assert got.token_ids == ref.token_ids, chunk
        assert got.stats["prompt_tokens"] == n and got.stats["kv_bytes"] == ref.stats["kv_bytes"]
        np.testing.assert_allclose(pipe.last_first_logits, ref_logits, rtol=0, atol=_tol(ref_logits))
    # the tolerance can fail: chunks fed the text axis as all three M-RoPE axes (the image's 2-D positions lost)
    pipe.engine.prefill_chunk = 7
    start = pipe.engine.start

    def flat_positions(prepared, max_new_tokens=64):
        start(prepared, max_new_tokens)
        pipe.engine.positions = np.broadcast_to(pipe.engine.positions[:1], pipe.engine.positions.shape).copy()

    pipe.engine.start = flat_positions
    pipe.generate(img, PROMPT, max_new_tokens=2, ignore_eos=True)
    assert np.abs(pipe.last_first_logits - ref_logits).max() > _tol(ref_logits)


def _tol(ref_logits: np.ndarray) -> float:
    """The states hold f16 (kv=fp16): a chunk reads the earlier chunks' K/V back rounded to f16 (relative error
    <= 2^-11 per element) where one call's SDPA may use them as computed, and nothing else differs. Through the
    tiny model's 2 layers that moved the first-step logits by <= 7e-5 of max |logit| 1.2 (chunks 1, 7, 80); the
    bound is 2^-10 x max(1, max |logit|), ~15x that; losing the image's M-RoPE axes moves them ~4x above it."""
    return 2.0 ** -10 * max(1.0, float(np.abs(ref_logits).max()))


def test_qwen2vl_fp16_defaults_to_the_chunk_rule(exported, monkeypatch):
    from kvtool.runtime.engines import openvino_engine
    from kvtool.runtime.engines.openvino_engine import PREFILL_CHUNK, stateful_chunking_saves_memory

    # the rule by hand: no buffer to weigh, so chunks hold less exactly when the prompt is longer than one
    assert stateful_chunking_saves_memory(8192, 512) and stateful_chunking_saves_memory(513, 512)
    assert not stateful_chunking_saves_memory(512, 512) and not stateful_chunking_saves_memory(8192, 0)
    # the registry: Qwen2-VL fp16 -> the paged engine on CPU (test_qwen2vl_paged.py), the stateful one elsewhere
    spec = make_kv_spec("fp16")

    class M:
        stateful, architecture = True, "qwen2_vl"

    assert select_engine(engine_key("openvino", spec, "CPU", M())).name == "OpenVINOPagedEngine"
    assert select_engine(engine_key("openvino", spec, "GPU.0", M())).name == "OpenVINOStatefulEngine"

    out = exported("tiny-qwen2-vl", "openvino", 16, "fp32")
    img = random_image(3, (70, 110))
    pipe = VLMPipeline.load(out, kv="fp16", kv_owner="openvino")
    info = pipe.engine.info()
    assert info["prefill_chunk"] == PREFILL_CHUNK > 0 and info["prefill_rule"].startswith("auto")
    ref = pipe.generate(img, PROMPT, max_new_tokens=6, ignore_eos=True)
    assert ref.stats["prompt_tokens"] <= PREFILL_CHUNK and pipe.engine.info()["prefill_chunked"] is False
    # a prompt longer than the chunk is chunked by default (the chunk made small for the tiny prompt)
    monkeypatch.setattr(openvino_engine, "PREFILL_CHUNK", 16)
    small = VLMPipeline.load(out, kv="fp16", kv_owner="openvino")
    got = small.generate(img, PROMPT, max_new_tokens=6, ignore_eos=True)
    assert small.engine.info()["prefill_chunk"] == 16 and small.engine.info()["prefill_chunked"] is True
    assert got.token_ids == ref.token_ids
    # OpenVINO's own compression keeps one call (a chunk would attend to the compressed earlier chunks)
    u8 = VLMPipeline.load(out, kv="ov-u8")
    assert u8.engine.info()["prefill_chunk"] == 0 and u8.engine.info()["prefill_rule"] == "given"


def test_run_json_shows_the_prefill_chunk(exported, tmp_path):
    from kvtool.cli import main
    from kvtool.runtime.engines.openvino_engine import PREFILL_CHUNK

    out = exported("tiny-qwen2-vl", "openvino", 16, "fp32")
    img = tmp_path / "img.png"
    random_image().save(img)
    res = CliRunner().invoke(main, ["run", str(out), "--image", str(img), "--prompt", "What is this?",
                                    "--max-new-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    eng = json.loads(res.output[res.output.index("{"):])["pipeline"]["engine"]
    # Qwen2-VL fp16 on CPU runs the paged engine by default (test_qwen2vl_paged.py), chunked as LLaVA's
    from kvtool.runtime.engines.openvino_paged import PREFILL_CHUNK as PAGED_CHUNK

    assert eng["name"] == "OpenVINOPagedEngine" and eng["prefill_chunk"] == PAGED_CHUNK == PREFILL_CHUNK
    assert eng["kv_work"].startswith("nothing: for fp16 the PagedAttention blocks are the cache")


@pytest.mark.parametrize("chunk", [0, 64])
def test_stateful_prefill_chunk_given_is_kept(exported, chunk):
    out = exported("tiny-qwen2-vl", "openvino", 16, "fp32")
    pipe = VLMPipeline.load(out, kv="fp16", kv_owner="openvino", prefill_chunk=chunk)
    assert pipe.engine.info()["prefill_chunk"] == chunk and pipe.engine.info()["prefill_rule"] == "given"
