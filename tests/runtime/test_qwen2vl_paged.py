"""Qwen2-VL on the paged engine (PagedAttention, caller-owned blocks; fp16's default on CPU): OpenVINO's
PagedAttention pass gives the graph a ``[3, T]`` position input, which the engine feeds from the M-RoPE
``[3, 1, T]`` positions. Against transformers' greedy ``generate`` on the same checkpoint: the same tokens and
first-step logits within 2^-10 x max(1, max |logit|), in one call and in chunks (one boundary inside the image
tokens); the same run fed 1-D positions misses that bound (so the positions are what is tested); a kvtool
scheme in simulate mode answers as the state-owned engine does."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.runtime import VLMPipeline
from tests.runtime.helpers import QUESTION, hf_greedy, random_image


def _tol(ref_logits: np.ndarray) -> float:
    """The paged blocks hold f16 (kv="fp16"): each attention reads K/V rounded to f16 (relative error <=
    2^-11); through the tiny model's 2 layers that moved the first-step logits by ~7e-5 of max |logit| ~1.1. The
    bound is ~15x that; 1-D positions move them ~4e-2 (the last assertion of the first test)."""
    return 2.0 ** -10 * max(1.0, float(np.abs(ref_logits).max()))


@pytest.mark.parametrize("chunk", [0, 7, 150])
def test_qwen2vl_paged_fp16_answers_as_transformers(exported, tiny_model, chunk):
    from kvtool.runtime.preprocess import prepare_inputs

    out = exported("tiny-qwen2-vl", "openvino", 16, "fp32")
    img = random_image(0, (60, 90))
    want_ids, want_logits, _ = hf_greedy(tiny_model("tiny-qwen2-vl"), img, QUESTION, max_new_tokens=8)
    pipe = VLMPipeline.load(out, kv="fp16", prefill_chunk=chunk)
    assert type(pipe.engine).__name__ == "OpenVINOPagedEngine"  # the default on CPU
    got = pipe.generate(img, QUESTION, max_new_tokens=8)
    ids = prepare_inputs(pipe.processor, [img], QUESTION, pipe.conversation).input_ids[0]
    image_at = np.flatnonzero(ids == pipe.engine.image_token_id)
    if chunk == 7:  # a boundary falls inside the image's run of tokens
        assert any(image_at[0] < b <= image_at[-1] for b in range(chunk, len(ids), chunk))
    assert got.token_ids == want_ids
    np.testing.assert_allclose(pipe.last_first_logits, want_logits, atol=_tol(want_logits))
    if chunk == 0:  # the same run with the image's M-RoPE axes lost: outside the bound
        start = pipe.engine.start

        def flat(prepared, n=64):
            start(prepared, n)
            T = pipe.engine.positions.shape[-1]
            pipe.engine.positions = np.broadcast_to(np.arange(T), (3, 1, T)).copy()
            pipe.engine.delta = 0

        pipe.engine.start = flat
        pipe.generate(img, QUESTION, max_new_tokens=2)
        assert np.abs(pipe.last_first_logits - want_logits).max() > _tol(want_logits)


def test_qwen2vl_paged_simulate_answers_as_state_owned(exported):
    out = exported("tiny-qwen2-vl", "openvino", 16, "fp32")
    img = random_image(4, (80, 64))
    kw = dict(kv="g-KC128VT128", k_bits=4, v_bits=2, kv_mode="simulate")
    paged = VLMPipeline.load(out, **kw)
    assert type(paged.engine).__name__ == "OpenVINOPagedEngine"  # simulate mode's default on CPU
    owned = VLMPipeline.load(out, kv_owner="kvtool", **kw)
    a = paged.generate(img, QUESTION, max_new_tokens=8, ignore_eos=True)
    b = owned.generate(img, QUESTION, max_new_tokens=8, ignore_eos=True)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(paged.last_first_logits, owned.last_first_logits,
                               atol=_tol(owned.last_first_logits))
