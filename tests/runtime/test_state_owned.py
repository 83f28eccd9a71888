"""The OpenVINO state-owned engine (stateful export, kvtool writes the states): parity with transformers for
fp16, with the torch engine and the stateless OpenVINO engine for quantized KV, and the states really hold
kvtool's dequantized cache. The stateful export is slow to build, so this module is marked slow."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.runtime import VLMPipeline
from tests.runtime.helpers import QUESTION, hf_greedy, random_image

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.slow]


@pytest.fixture(scope="module")
def llava(tiny_model):
    return tiny_model("tiny-llava")


@pytest.fixture(scope="module")
def stateful(exported):
    return exported("tiny-llava", "openvino", 16, "fp32", stateful=True)


def test_fp16_owned_by_kvtool_matches_hf_generate(llava, stateful):
    ids, _, logits = hf_greedy(llava, random_image(), QUESTION, max_new_tokens=6)
    pipe = VLMPipeline.load(stateful, kv_owner="kvtool")
    out = pipe.generate(random_image(), QUESTION, max_new_tokens=6, keep_logits=True)
    info = pipe.info()["engine"]
    assert info["kv_owner"] == "kvtool" and info["state_writes"] == 0  # fp16: the states already hold it
    assert out.token_ids == ids
    for mine, ref in zip(out.logits, logits, strict=True):
        np.testing.assert_allclose(mine, ref, atol=1e-4)
    # kvtool's mirror holds exactly what the graph appended to its states
    eng = pipe.engine
    for i in (0, eng.num_layers - 1):
        k, v = eng.kv.dequantized(i)
        np.testing.assert_array_equal(eng._states[i, 0].state.data, k)
        np.testing.assert_array_equal(eng._states[i, 1].state.data, v)


@pytest.mark.parametrize("scheme,bits", [("g-KC128VT128", 2), ("uniform", 4), ("or2", 3)])
def test_quantized_state_owned_matches_torch_and_stateless(llava, stateful, exported, scheme, bits):
    kw = dict(kv=scheme, k_bits=bits, v_bits=bits, kv_mode="packed")
    img = random_image()
    t = VLMPipeline.load(llava, backend="torch", **kw).generate(img, QUESTION, max_new_tokens=6)
    stateless = VLMPipeline.load(exported("tiny-llava", "openvino", 16, "fp32"), **kw)
    s = stateless.generate(img, QUESTION, max_new_tokens=6, keep_logits=True)
    pipe = VLMPipeline.load(stateful, **kw)
    o = pipe.generate(img, QUESTION, max_new_tokens=6, keep_logits=True)
    assert pipe.info()["engine"]["kv_owner"] == "kvtool" and pipe.info()["engine"]["state_writes"] > 0
    assert o.token_ids == t.token_ids == s.token_ids
    assert o.stats["kv_bytes"] == t.stats["kv_bytes"] == s.stats["kv_bytes"]
    for mine, ref in zip(o.logits, s.logits, strict=True):  # same cache contents, another attention kernel
        np.testing.assert_allclose(mine, ref, atol=1e-4)
    # what the graph attends to is kvtool's dequantized cache, not the exact K/V it appended
    eng = pipe.engine
    eng.kv.dequantized(0)
    k, v = eng.kv.dequantized(0)
    st_k, st_v = eng._states[0, 0].state.data, eng._states[0, 1].state.data
    n = eng.kv.n_tokens
    last = eng.kv.quantized_counts(0)
    # the newest token is appended exact by the graph; every token quantized before it was written back
    np.testing.assert_array_equal(st_k[:, :, :min(last[0], n - 1)], k[:, :, :min(last[0], n - 1)])
    np.testing.assert_array_equal(st_v[:, :, :min(last[1], n - 1)], v[:, :, :min(last[1], n - 1)])


def test_first_token_sees_the_compressed_cache(stateful):
    img = random_image()
    ref = VLMPipeline.load(stateful, kv_owner="kvtool")
    ref.generate(img, QUESTION, max_new_tokens=1)
    diffs = {}
    for first in ("compressed", "fp"):
        p = VLMPipeline.load(stateful, kv="uniform", k_bits=2, v_bits=2, first_token=first)
        p.generate(img, QUESTION, max_new_tokens=1)
        diffs[first] = np.abs(p.last_first_logits - ref.last_first_logits).max()
    assert diffs["fp"] < 1e-5 < diffs["compressed"]


def test_simulate_matches_the_stateless_engine(stateful, exported):
    kw = dict(kv="g-KC128VT128", k_bits=2, v_bits=2, kv_mode="simulate")
    img = random_image()
    s = VLMPipeline.load(exported("tiny-llava", "openvino", 16, "fp32"), **kw)
    o = VLMPipeline.load(stateful, **kw)
    a = s.generate(img, QUESTION, max_new_tokens=5, keep_logits=True)
    b = o.generate(img, QUESTION, max_new_tokens=5, keep_logits=True)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(np.stack(a.logits), np.stack(b.logits), atol=1e-4)
