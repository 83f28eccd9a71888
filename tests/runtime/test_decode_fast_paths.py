"""The decode step's fast paths (docs/BENCHMARKS.md, the decode-overhead subsection) against the paths they
replace, on a tiny stateful export: a generated token's kept text-embeddings row (``GraphEngine
._token_embedding``) vs the graph's call; the packed op writing the native kernel's output in place vs a copy;
the store's one-token native append vs the general path. The arithmetic is unchanged, so the greedy tokens and
every step's logits must be equal bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.runtime import VLMPipeline
from kvtool.runtime.engines import graph_base
from tests.runtime.helpers import QUESTION, random_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def stateful(exported):
    return exported("tiny-llava", "openvino", 16, "fp32", stateful=True)


def test_token_embedding_is_the_graphs_row(stateful, monkeypatch):
    eng = VLMPipeline.load(stateful, kv="fp16").engine
    calls = {"n": 0}
    run = eng._run

    def counting(role, inputs):
        calls["n"] += role == "text_embeddings"
        return run(role, inputs)

    monkeypatch.setattr(eng, "_run", counting)
    ids = np.random.default_rng(0).integers(0, eng.config.text_config.vocab_size, 12)
    for i in ids:
        row = eng._token_embedding(int(i))
        assert row.shape[:2] == (1, 1)
        assert np.array_equal(row, eng._text_embeddings(np.array([[int(i)]], dtype=np.int64)))
    n = calls["n"]
    for i in ids:  # kept: no further graph call, the same row
        assert eng._token_embedding(int(i)) is eng._embed_rows[int(i)]
    assert calls["n"] == n
    monkeypatch.setattr(graph_base, "EMBED_CACHE_ROWS", 0)  # full: computed, not kept
    eng._embed_rows.clear()
    eng._token_embedding(int(ids[0]))
    assert not eng._embed_rows


def _generate(pipe):
    return pipe.generate(random_image(), QUESTION, max_new_tokens=7, keep_logits=True, ignore_eos=True)


def _assert_same(a, b):
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logits, b.logits, strict=True):
        assert np.array_equal(x, y)


def test_stateful_fp16_same_tokens_and_logits_without_the_kept_rows(stateful, monkeypatch):
    pipe = VLMPipeline.load(stateful, kv="fp16")
    fast = _generate(pipe)
    assert pipe.engine._embed_rows  # the kept rows were used
    monkeypatch.setattr(graph_base, "EMBED_CACHE_ROWS", 0)
    pipe.engine._embed_rows.clear()
    slow = _generate(pipe)
    assert not pipe.engine._embed_rows
    _assert_same(fast, slow)


@pytest.mark.parametrize("scheme,kb,vb", [("g-KC128VT128", 2, 2), ("g-KC128VT128", 3, 4)])
def test_packed_same_tokens_and_logits_without_the_fast_paths(stateful, monkeypatch, scheme, kb, vb):
    from kvtool.quant_ops.store import _GridSide

    # the Python op's fast paths (in-place output, native append); the C++ op's route: tests/runtime/test_ov_packed_ext.py
    monkeypatch.setenv("KVTOOL_NO_OV_EXTENSION", "1")
    pipe = VLMPipeline.load(stateful, kv=scheme, k_bits=kb, v_bits=vb, kv_owner="packed")
    n_native = {"n": 0}
    orig = _GridSide._append_native

    def spy(self, x):
        ok = orig(self, x)
        n_native["n"] += ok
        return ok

    monkeypatch.setattr(_GridSide, "_append_native", spy)
    fast = _generate(pipe)
    layers = pipe.engine.layers
    assert all(la.f32_out for la in layers)  # the kernel wrote the op's output in place
    assert all(la.calls["native"] > 0 for la in layers)
    assert n_native["n"] >= len(layers) * 6  # one per layer per decode step (V's per-token side)
    # the old paths: graph call per token, kernel output copied into the op's output, general append
    monkeypatch.setattr(graph_base, "EMBED_CACHE_ROWS", 0)
    pipe.engine._embed_rows.clear()
    for la in layers:
        la.f32_out = False
    monkeypatch.setattr(_GridSide, "_append_native", lambda self, x: False)
    slow = _generate(pipe)
    _assert_same(fast, slow)
    assert fast.stats["kv_bytes"] == slow.stats["kv_bytes"]
