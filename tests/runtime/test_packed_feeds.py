"""The packed engine's chunk-major step (``OpenVINOPackedEngine._step``) sets the tensors that do not change
between calls (the empty past inputs, the mask of a call with as many tokens as the last, beam_idx) on the
request once instead of feeding them every decode step, and writes a decode token's embedding row and positions
into tensors bound once (``_feed_bound``). Reference: the same engine feeding every input on
every call (``_fixed`` cleared before each step): every step's logits, the tokens and the stores' bytes must be
identical, also across a chunked prefill (which feeds a non-empty past and a longer mask) and a second
``generate`` on the same engine."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.runtime import VLMPipeline
from tests.runtime.helpers import QUESTION, random_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def stateful(exported):
    return exported("tiny-llava", "openvino", 16, "fp32", stateful=True)


def _pipe(path, prefix, always_feed: bool):
    pipe = VLMPipeline.load(path, kv="g-KC32VT32", k_bits=2, v_bits=2, kv_owner="packed", prefill_chunk=16,
                            prefill_order="chunk", prefix_attention=prefix)
    eng = pipe.engine
    if always_feed:
        step = eng._step

        def every_input(embeds, pos):
            eng._fixed = None
            return step(embeds, pos)

        eng._step = every_input
    return pipe


def _assert_same_runs(outs):
    """``outs``: two (runs, dequantized stores, engine) of the same prompts -> the second engine, after checking
    that tokens, kv_bytes, every step's logits and every layer's stores are identical."""
    (ref, ref_st, _), (got, got_st, eng) = outs
    for r, g in zip(ref, got, strict=True):
        assert g.token_ids == r.token_ids and g.stats["kv_bytes"] == r.stats["kv_bytes"]
        for a, b in zip(r.logits, g.logits, strict=True):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(ref_st, got_st, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    return eng


@pytest.mark.parametrize("prefix", ["graph", "op"])
def test_fixed_feeds_change_nothing(stateful, prefix):
    outs = []
    for always in (True, False):
        pipe = _pipe(stateful, prefix, always)
        runs = [pipe.generate(random_image(seed), QUESTION, max_new_tokens=5, keep_logits=True, ignore_eos=True)
                for seed in (0, 1)]
        eng = pipe.engine
        assert eng.info()["prefill_chunked"] and eng.info()["prefill_order"] == "chunk"
        outs.append((runs, [la.store.dequantize() for la in eng.layers], eng))
    eng = _assert_same_runs(outs)
    # the decode steps left the one-token mask and empty pasts on the request, fed once
    assert eng._fixed is not None and eng._fixed[0] == 1
    req = eng.lm_req
    assert tuple(req.get_tensor("attention_mask").shape) == (1, 1)
    assert req.get_tensor("kvtool_past.0.key").shape[0] == 0
    # ... and the last token's embedding row and position written into the tensors bound to the request
    emb, pos = eng._bound["inputs_embeds"], eng._bound["position_ids"]
    assert np.shares_memory(req.get_tensor("inputs_embeds").data, emb)
    assert np.shares_memory(req.get_tensor("position_ids").data, pos)
    assert int(pos.reshape(-1)[0]) == eng.kv.n_tokens - 1


def test_a_failed_call_feeds_everything_next(stateful):
    pipe = _pipe(stateful, "graph", False)
    pipe.generate(random_image(0), QUESTION, max_new_tokens=3, ignore_eos=True)
    eng = pipe.engine
    assert eng._fixed is not None
    with pytest.raises(Exception):  # noqa: B017 (OpenVINO's own error for a wrong-width embedding)
        eng._step(np.zeros((1, 1, 3), np.float32), np.array([[0]], dtype=np.int64))
    assert eng._fixed is None


@pytest.mark.parametrize("chunk", [16, 0])
def test_layer_major_fixed_feeds_change_nothing(stateful, monkeypatch, chunk):
    """The layer-major decode (``ov_layers.LayerRunner._decode``: the sub-models run as a chain, every input set
    once, each layer's output tensor the next one's input) against the same engine feeding every input and
    copying each output (``DECODE_FIXED_FEEDS`` off): every step's logits, the tokens and the stores identical, across a
    chunked prefill (16) and one not chunked (0: the prompt's call releases each sub-model, new requests), and
    a second ``generate`` on the same engine."""
    from kvtool.runtime.engines import ov_layers

    outs, decode = [], ov_layers.LayerRunner._decode
    for fixed in (False, True):
        monkeypatch.setattr(ov_layers, "DECODE_FIXED_FEEDS", fixed)
        pipe = VLMPipeline.load(stateful, kv="g-KC32VT32", k_bits=2, v_bits=2, kv_owner="packed",
                                prefill_chunk=chunk, prefill_order="layer")
        calls = []
        monkeypatch.setattr(ov_layers.LayerRunner, "_decode", lambda *a, calls=calls: calls.append(1) or decode(*a))
        runs = [pipe.generate(random_image(seed), QUESTION, max_new_tokens=5, keep_logits=True, ignore_eos=True)
                for seed in (0, 1)]
        eng = pipe.engine
        assert eng.info()["decode_graph"] == "layer sub-models" and eng.info()["prefill_chunked"] == bool(chunk)
        assert len(calls) == (2 * 5 if fixed else 0)  # the last prompt token and 4 decode steps, twice
        outs.append((runs, [la.store.dequantize() for la in eng.layers], eng))
    eng = _assert_same_runs(outs)
    run = eng.layer_runner  # the chain left on the requests: set once, each layer reading its predecessor's output
    assert run.chain is not None
    assert all(tuple(r.get_tensor("attention_mask").shape) == (1, 1) for r in run.reqs if "attention_mask" in
               {i.get_any_name() for i in r.model_inputs})
    ptr = [r.get_output_tensor(0).data.ctypes.data for r in run.reqs]
    ins = [run.reqs[i].get_tensor(run.hidden_name[i]).data.ctypes.data for i in range(len(run.reqs))]
    assert ins[1:] == ptr[:-1] and run.head_req.get_tensor("kvtool_hidden").data.ctypes.data == ptr[-1]
    assert ins[0] == run.chain.x0.ctypes.data
    pos = {r.get_tensor("position_ids").data.ctypes.data for r in run.reqs
           if "position_ids" in {i.get_any_name() for i in r.model_inputs}}
    assert pos == {run.chain.pos.ctypes.data}  # one positions tensor shared by every layer
