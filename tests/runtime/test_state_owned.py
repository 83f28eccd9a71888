"""The OpenVINO engines where kvtool owns a stateful export's cache — state-owned (kvtool rewrites the states)
and paged (PagedAttention, caller-owned blocks written in place): parity with transformers for fp16, with the
torch engine and the stateless OpenVINO engine for quantized KV, and the graph really attends to kvtool's
dequantized cache; bf16 block conversion against torch. The stateful export takes ~25 s to build: the fp16 and the g-KC128VT128 checks run
by default, the other schemes, first-token and simulate checks are marked slow."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.runtime import VLMPipeline
from kvtool.runtime.engines import Engine
from tests.runtime.helpers import QUESTION, hf_greedy, random_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def llava(tiny_model):
    return tiny_model("tiny-llava")


@pytest.fixture(scope="module")
def stateful(exported):
    return exported("tiny-llava", "openvino", 16, "fp32", stateful=True)


@pytest.mark.parametrize("owner", ["kvtool", "paged"])
def test_fp16_owned_by_kvtool_matches_hf_generate(llava, stateful, owner):
    ids, _, logits = hf_greedy(llava, random_image(), QUESTION, max_new_tokens=6)
    pipe = VLMPipeline.load(stateful, kv_owner=owner, kv_precision="f32")  # exact parity: fp32 like the reference
    out = pipe.generate(random_image(), QUESTION, max_new_tokens=6, keep_logits=True)
    info = pipe.info()["engine"]
    assert isinstance(pipe.engine, Engine)
    assert info["kv_owner"] == owner and info.get("state_writes", 0) == info.get("token_writes", 0) == 0
    assert out.token_ids == ids
    for mine, ref in zip(out.logits, logits, strict=True):
        np.testing.assert_allclose(mine, ref, atol=1e-4)
    eng = pipe.engine
    if owner == "paged":  # fp16: the blocks are the cache, held once (no kvtool mirror, no working copy)
        assert not hasattr(eng.kv, "_kbuf") and out.stats["kv_work_bytes"] == 0
        assert out.stats["kv_bytes"] == 2 * out.stats["kv_fp16_bytes"]  # f32 blocks (kv_precision="f32")
        assert np.abs(eng._read((0, 0), 0, eng.kv.n_tokens)).max() > 0
        return
    # kvtool's mirror holds exactly what the graph appended to its states
    for i in (0, eng.num_layers - 1):
        k, v = eng.kv.dequantized(i)
        np.testing.assert_array_equal(eng._states[i, 0].state.data, k)
        np.testing.assert_array_equal(eng._states[i, 1].state.data, v)


@pytest.mark.parametrize("owner", ["kvtool", "paged"])
@pytest.mark.parametrize("scheme,bits", [("g-KC128VT128", 2), pytest.param("uniform", 4, marks=slow),
                                         pytest.param("or2", 3, marks=slow)])
def test_quantized_state_owned_matches_torch_and_stateless(llava, stateful, exported, scheme, bits, owner):
    kw = dict(kv=scheme, k_bits=bits, v_bits=bits, kv_mode="packed")
    img = random_image()
    t = VLMPipeline.load(llava, backend="torch", **kw).generate(img, QUESTION, max_new_tokens=6)
    stateless = VLMPipeline.load(exported("tiny-llava", "openvino", 16, "fp32", stateful=False), **kw)
    s = stateless.generate(img, QUESTION, max_new_tokens=6, keep_logits=True)
    pipe = VLMPipeline.load(stateful, kv_owner=owner, **kw)  # (the default is the packed engine, its own tests)
    o = pipe.generate(img, QUESTION, max_new_tokens=6, keep_logits=True)
    info = pipe.info()["engine"]
    assert info["kv_owner"] == owner
    assert info.get("state_writes", 0) + info.get("token_writes", 0) > 0
    assert o.token_ids == t.token_ids == s.token_ids
    assert o.stats["kv_bytes"] == t.stats["kv_bytes"] == s.stats["kv_bytes"]
    for mine, ref in zip(o.logits, s.logits, strict=True):  # same cache contents, another attention kernel
        np.testing.assert_allclose(mine, ref, atol=1e-4)
    # what the graph attends to is kvtool's dequantized cache, not the exact K/V it appended
    eng = pipe.engine
    k, v = eng.kv.dequantized(0)
    n = eng.kv.n_tokens
    if owner == "paged":
        st_k, st_v = eng._read((0, 0), 0, n), eng._read((0, 1), 0, n)
    else:
        st_k, st_v = eng._states[0, 0].state.data, eng._states[0, 1].state.data
    last = eng.kv.quantized_counts(0)
    # the newest token is appended exact by the graph; every token quantized before it was written back
    np.testing.assert_array_equal(st_k[:, :, :min(last[0], n - 1)], k[:, :, :min(last[0], n - 1)])
    np.testing.assert_array_equal(st_v[:, :, :min(last[1], n - 1)], v[:, :, :min(last[1], n - 1)])


@slow
@pytest.mark.parametrize("owner", ["kvtool", "paged", "packed"])
def test_first_token_sees_the_compressed_cache(stateful, owner):
    img = random_image()
    ref = VLMPipeline.load(stateful, kv_owner=owner if owner != "packed" else "paged")  # packed holds no fp16
    ref.generate(img, QUESTION, max_new_tokens=1)
    diffs = {}
    for first in ("compressed", "fp"):
        p = VLMPipeline.load(stateful, kv="uniform", k_bits=2, v_bits=2, first_token=first, kv_owner=owner)
        p.generate(img, QUESTION, max_new_tokens=1)
        diffs[first] = np.abs(p.last_first_logits - ref.last_first_logits).max()
    assert diffs["fp"] < 1e-5 < diffs["compressed"]


@slow
@pytest.mark.parametrize("owner", ["kvtool", "paged"])
def test_simulate_matches_the_stateless_engine(stateful, exported, owner):
    kw = dict(kv="g-KC128VT128", k_bits=2, v_bits=2, kv_mode="simulate")
    img = random_image()
    s = VLMPipeline.load(exported("tiny-llava", "openvino", 16, "fp32", stateful=False), **kw)
    o = VLMPipeline.load(stateful, kv_owner=owner, **kw)
    a = s.generate(img, QUESTION, max_new_tokens=5, keep_logits=True)
    b = o.generate(img, QUESTION, max_new_tokens=5, keep_logits=True)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(np.stack(a.logits), np.stack(b.logits), atol=1e-4)


@slow
@pytest.mark.parametrize("scheme,bits", [("g-KC128VT128", 2), ("uniform", 4)])
def test_qwen2_vl_stateful_export_runs_kvtool_schemes_state_owned(exported, tiny_model, scheme, bits):
    """Qwen2-VL's 3-D positions do not fit PagedAttention's 1-D position input, so a kvtool scheme on its
    (default) stateful export runs the state-owned engine, on CPU too, and gives the stateless graph's tokens and
    logits and the torch engine's tokens and KV bytes."""
    kw = dict(kv=scheme, k_bits=bits, v_bits=bits)
    img = random_image(3, (70, 110))
    pipe = VLMPipeline.load(exported("tiny-qwen2-vl", "openvino", 16, "fp32"), **kw)
    assert type(pipe.engine).__name__ == "OpenVINOStateOwnedEngine" and pipe.engine.device == "CPU"
    o = pipe.generate(img, QUESTION, max_new_tokens=6, keep_logits=True)
    s = VLMPipeline.load(exported("tiny-qwen2-vl", "openvino", 16, "fp32", stateful=False), **kw).generate(
        img, QUESTION, max_new_tokens=6, keep_logits=True)
    t = VLMPipeline.load(tiny_model("tiny-qwen2-vl"), backend="torch", **kw).generate(img, QUESTION, max_new_tokens=6)
    assert pipe.info()["engine"]["state_writes"] > 0
    assert o.token_ids == s.token_ids == t.token_ids and o.stats["kv_bytes"] == t.stats["kv_bytes"]
    for mine, ref in zip(o.logits, s.logits, strict=True):
        np.testing.assert_allclose(mine, ref, atol=1e-4)


def test_bf16_block_conversion_matches_torch():
    """The paged engine holds bf16 blocks as raw bits: its conversions equal torch's bfloat16 (round to
    nearest even) on random values, ties, and values that round up across the exponent."""
    import torch

    from kvtool.runtime.engines.openvino_paged import _bf16_to_f32, _f32_to_bf16

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-6, 6, 10000),
                        np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 - 2 ** -9, 65504.0, -0.0, 0.0], np.float32)])
    bits = _f32_to_bf16(x)
    ref = torch.from_numpy(x).to(torch.bfloat16)
    np.testing.assert_array_equal(bits, ref.view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(_bf16_to_f32(bits), ref.float().numpy())
