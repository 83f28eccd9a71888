"""fp16 on the PagedAttention engine (issue 13's fp16 targets): the default for kv="fp16" on a CPU stateful
LLaVA / LLaVA-NeXT export, with the prompt prefilled in chunks. Against the stateful engine (the anchor
deployment's graph): the same greedy tokens and first-step logits within a stated tolerance, for chunks that do
not divide the prompt, chunk 1, a chunk as long as the prompt or longer, and one call; the blocks hold the cache
once (no kvtool mirror, kv_work_bytes 0, kv_bytes = the tokens in f16); bad chunk sizes and chunks for a
quantizing scheme are one-line InputErrors; ``info()`` names the engine and its chunk."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from kvtool.cli import main
from kvtool.errors import InputError
from kvtool.runtime import VLMPipeline
from kvtool.runtime.engines.openvino_paged import PREFILL_CHUNK
from tests.runtime.helpers import QUESTION, random_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
NEW = 6


@pytest.fixture(scope="module")
def stateful_ref(exported):
    """name -> (export path, the stateful engine's output and first-step logits), computed once per model."""
    done = {}

    def get(name):
        if name not in done:
            out = exported(name, "openvino", 16, "fp32", stateful=True)
            pipe = VLMPipeline.load(out, kv="fp16", kv_owner="openvino")
            ref = pipe.generate(random_image(3, (70, 110)), QUESTION, max_new_tokens=NEW, ignore_eos=True,
                                keep_logits=True)
            done[name] = out, ref
        return done[name]

    return get


def _close(got, ref) -> None:
    # Both engines hold K/V in f16 and compute in f32 (an fp32 export); they differ in the attention kernel
    # (PagedAttention over blocks vs the stateful SDPA) and, with chunks, in which past K/V are read back
    # rounded to f16 rather than as computed (relative error 2^-11 per value). Through 2 layers of a tiny
    # model that moves logits by well under 1e-2 of their largest magnitude; a wrong cache (a chunk attending
    # to the wrong positions or to zeros) moves them by O(1).
    for mine, want in zip(got.logits, ref.logits, strict=True):
        np.testing.assert_allclose(mine, want, atol=1e-2 * max(1.0, float(np.abs(want).max())))


# tiny-llava-next: its own export (~25 s quiet) on top of tiny-llava's, so slow
@pytest.mark.parametrize("name", ["tiny-llava", pytest.param("tiny-llava-next", marks=pytest.mark.slow)])
def test_paged_fp16_is_the_default_and_matches_the_stateful_engine(stateful_ref, name):
    out, ref = stateful_ref(name)
    n = ref.stats["prompt_tokens"]
    assert n > 20
    for chunk in (None, 7, 1, n, n + 5, 0):  # default, ragged (7 does not divide n), 1, = prompt, > prompt, one call
        kw = {} if chunk is None else {"prefill_chunk": chunk}
        pipe = VLMPipeline.load(out, kv="fp16", **kw)
        info = pipe.info()["engine"]
        assert info["name"] == "OpenVINOPagedEngine" and info["kv_owner"] == "paged"
        assert info["prefill_chunk"] == (PREFILL_CHUNK if chunk is None else chunk)
        got = pipe.generate(random_image(3, (70, 110)), QUESTION, max_new_tokens=NEW, ignore_eos=True,
                            keep_logits=True)
        assert got.token_ids == ref.token_ids, chunk
        _close(got, ref)
        st = got.stats
        # the blocks are the cache: held once, in f16, counted as kv_bytes; no working copy beside them
        assert st["kv_dtype"] == "float16" and st["kv_work_bytes"] == 0
        assert st["kv_bytes"] == st["kv_fp16_bytes"] == ref.stats["kv_bytes"] > 0
        assert not hasattr(pipe.engine.kv, "_kbuf")  # no GraphKVCache mirror of the blocks


def test_chunks_write_every_token_once_into_the_blocks(stateful_ref):
    """The blocks after a chunked prefill hold the same K/V as after one call (each chunk appended at its own
    positions): a chunk written at the wrong offset, or twice, shows here even where logits might not."""
    out, _ = stateful_ref("tiny-llava")
    blocks = {}
    for chunk in (0, 5):
        pipe = VLMPipeline.load(out, kv="fp16", prefill_chunk=chunk)
        pipe.generate(random_image(3, (70, 110)), QUESTION, max_new_tokens=1, ignore_eos=True)
        eng = pipe.engine
        n = eng.kv.n_tokens
        blocks[chunk] = [eng._read((i, s), 0, n).astype(np.float32) for i in range(eng.num_layers) for s in (0, 1)]
    for a, b in zip(blocks[0], blocks[5], strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-2 * max(1.0, float(np.abs(a).max())))
        assert np.abs(a).max() > 0


def test_prefill_chunk_bad_values_and_quantizing_schemes(stateful_ref):
    out, _ = stateful_ref("tiny-llava")
    for bad in (-1, 2.5, "64", True):
        with pytest.raises(InputError, match=r"^prefill_chunk: expected a token count >= 0") as exc:
            VLMPipeline.load(out, kv="fp16", prefill_chunk=bad)
        assert "\n" not in str(exc.value)
    with pytest.raises(InputError, match=r"^prefill_chunk: kv=g-KC128VT128 prefills in one call"):
        VLMPipeline.load(out, kv="g-KC128VT128", k_bits=2, v_bits=2, kv_mode="simulate", prefill_chunk=64)
    # a quantizing scheme on the paged engine prefills in one call (DESIGN.md's full-precision prompt)
    pipe = VLMPipeline.load(out, kv="g-KC128VT128", k_bits=2, v_bits=2, kv_mode="simulate")
    assert pipe.info()["engine"]["name"] == "OpenVINOPagedEngine" and pipe.info()["engine"]["prefill_chunk"] == 0


def test_run_json_names_the_paged_engine_for_fp16(stateful_ref, tmp_path):
    out, _ = stateful_ref("tiny-llava")
    img = tmp_path / "img.png"
    random_image().save(img)
    res = CliRunner().invoke(main, ["run", str(out), "--image", str(img), "--prompt", "What is this?",
                                    "--max-new-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output[res.output.index("{"):])
    eng = d["pipeline"]["engine"]
    assert eng["name"] == "OpenVINOPagedEngine" and eng["kv_owner"] == "paged"
    assert eng["prefill_chunk"] == PREFILL_CHUNK and d["pipeline"]["kv"] == "fp16"
    assert d["stats"]["kv_work_bytes"] == 0 and d["stats"]["kv_bytes"] == d["stats"]["kv_fp16_bytes"] > 0


def test_decode_inputs_bound_once_change_nothing(stateful_ref):
    """One-token calls write into input tensors bound to the request once (``bind_step_inputs``, openvino.genai's
    ModelRunner way): the same greedy tokens and bit-identical logits as ``infer(dict)`` at every step, across a
    block boundary (block_indices re-bound) and with chunk 1 (the prompt through the bound path too); after a
    generate the request's inputs are the bound tensors, holding the last step's values."""
    out, _ = stateful_ref("tiny-llava")
    new = 40  # > one 32-token block of decode: block_indices grows during decode
    res = {}
    for bind in (True, False):
        for chunk in (None, 1):
            pipe = VLMPipeline.load(out, kv="fp16", **({} if chunk is None else {"prefill_chunk": chunk}))
            eng = pipe.engine
            eng.bind_step_inputs = bind
            got = pipe.generate(random_image(3, (70, 110)), QUESTION, max_new_tokens=new, ignore_eos=True,
                                keep_logits=True)
            assert eng.info()["bind_step_inputs"] is bind
            n = eng.kv.n_tokens
            assert n == got.stats["prompt_tokens"] + new - 1  # the last token is sampled, not fed
            req = eng.lm_req
            if bind:
                assert eng._bound is not None
                for name in ("inputs_embeds", "position_ids", "past_lens", "max_context_len"):
                    assert np.shares_memory(req.get_tensor(name).data, eng._bound[name]), name
                assert int(req.get_tensor("past_lens").data[0]) == n - 1
                assert int(req.get_tensor("max_context_len").data) == n
                assert list(req.get_tensor("block_indices").data) == list(range(-(-n // eng.block)))
            else:
                assert eng._bound is None
            res[bind, chunk] = got
    for chunk in (None, 1):
        a, b = res[True, chunk], res[False, chunk]
        assert a.token_ids == b.token_ids, chunk
        for x, y in zip(a.logits, b.logits, strict=True):
            np.testing.assert_array_equal(x, y)
