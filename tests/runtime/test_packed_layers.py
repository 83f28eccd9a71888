"""The packed engine's layer-major exact prefill (``ov_layers``): the LM graph split into per-layer sub-models at
the residual stream, one layer's exact buffer at a time, decode through the sub-models.

Reference: main's one full-graph call (``prefill_order="chunk"``, ``prefill_chunk=0``), parity-tested against
the paged and state-owned engines in test_packed_engine.py. Tolerance on logits, atol 1e-4, derived as in
test_packed_prefill.py (fp32 exports, stores in f32): a layer-major prefill differs from one call only in the
SDPA's float32 summation order over the split key range (~N u relative, u = 2^-24, N <= 600) and in the CPU
plugin's kernels for a sub-model against the same ops inside the full graph (float32 either way: the hidden
state crosses a layer boundary as the same float32 values the full graph passes on; a different blocking of the
same MatMul reorders its float32 sums, again ~K u relative with K <= 256 here), so ~1e-6 on the logits of these
gain < 1 models; a code can flip only where a value sits within that of a rounding boundary (at most 0.1% of
the stored values, checked). A layer that skips a step (no write-back of the hidden states, no earlier chunks)
moves the logits by 1e-2 or more (the power tests below).
"""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.errors import InputError
from kvtool.runtime import VLMPipeline
from tests.runtime.helpers import QUESTION, random_image
from tests.runtime.test_packed_prefill import ATOL, _check_chunks, _run

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
KV2 = dict(kv="g-KC128VT128", k_bits=2, v_bits=2)


@pytest.fixture(scope="module")
def stateful(exported):
    return exported("tiny-llava", "openvino", 16, "fp32", stateful=True)


def _edited(path, num_layers):
    import openvino as ov

    from kvtool.runtime.engines.openvino_packed import _packed_lm

    model = ov.Core().read_model(str(path / "openvino_language_model.xml"))
    _packed_lm(model, num_layers, np.float32)
    return model


def test_split_finds_the_layers(stateful):
    """One sub-model per layer reading only its own past, a head reading no past; the stream's input is
    inputs_embeds for layer 0, kvtool_hidden after it; the edited model itself is left as it was."""
    from kvtool.runtime.engines.ov_layers import split_layers

    pipe = VLMPipeline.load(stateful, kv_owner="packed", prefill_order="layer", **KV2)
    n = pipe.engine.num_layers
    model = _edited(stateful, n)
    before = {i.get_any_name() for i in model.inputs}
    layers, head = split_layers(model, n)
    assert len(layers) == n and {i.get_any_name() for i in model.inputs} == before
    for i, sub in enumerate(layers):
        names = {x.get_any_name() for x in sub.inputs}
        assert {f"kvtool_past.{i}.key", f"kvtool_past.{i}.value"} <= names
        assert not {x for x in names if x.startswith("kvtool_past.") and not x.startswith(f"kvtool_past.{i}.")}
        assert ("inputs_embeds" in names) == (i == 0) and ("kvtool_hidden" in names) == (i > 0)
        assert len(sub.outputs) == 1 and sub.output(0).get_partial_shape()[2].get_length() == pipe.engine.manifest.lm.hidden_size
    assert {x.get_any_name() for x in head.inputs} == {"kvtool_hidden"}
    assert pipe.info()["engine"]["prefill_order"] == "layer" and pipe.engine.lm is None  # no full LM compiled


def _toy(links: int, fork: bool = False):
    """inputs_embeds -> ``links`` residual links x + x @ W (a fork: two links on the same stream value)."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter(ov.PartialShape([1, -1, 4]), ov.Type.f32, "inputs_embeds")
    x.output(0).get_tensor().set_names({"inputs_embeds"})
    h = x.output(0)
    w = ops.constant(np.eye(4, dtype=np.float32))
    for _ in range(links):
        h = ops.add(h, ops.matmul(h, w, False, False)).output(0)
    if fork:
        h = ops.multiply(ops.add(h, ops.matmul(h, w, False, False)), ops.add(h, ops.relu(h))).output(0)
    return ov.Model([ops.result(h)], [x], "toy")


def test_split_refuses_what_it_cannot_follow():
    from kvtool.runtime.engines.ov_layers import LayerSplitError, residual_chain, split_layers

    assert len(residual_chain(_toy(4))) == 5
    with pytest.raises(LayerSplitError, match="3 Add links for 2 layers"):
        split_layers(_toy(3), 2)
    with pytest.raises(LayerSplitError, match="forks"):
        residual_chain(_toy(2, fork=True))
    with pytest.raises(LayerSplitError, match="layer 0 reads the past inputs"):  # a stream with no attention
        split_layers(_toy(4), 2)


def test_fallback_is_named(stateful, monkeypatch):
    """A graph whose residual stream cannot be followed: ``prefill_order="layer"`` falls back to the chunk-major
    prefill and says why (the same answers); the default order is chunk-major and says so; a bad value is
    refused in one line."""
    from kvtool.runtime.engines import ov_layers

    real = ov_layers.residual_chain
    monkeypatch.setattr(ov_layers, "residual_chain", lambda m: real(m)[:-1])  # one link lost
    pipe, out = _run(stateful, 7, new=2, order="layer", **KV2)
    info = pipe.info()["engine"]
    assert info["prefill_order"] == "chunk" and pipe.engine.lm is not None
    assert info["prefill_order_reason"].startswith("chunk-major: the LM graph cannot be split by layer (")
    assert "Add links" in info["prefill_order_reason"]
    with pytest.raises(InputError, match=r"^prefill_order: expected layer or chunk, got 'rows'"):
        VLMPipeline.load(stateful, kv_owner="packed", prefill_order="rows", **KV2)
    monkeypatch.setattr(ov_layers, "residual_chain", real)
    _, ref = _run(stateful, 0, new=2, order="chunk", **KV2)
    assert out.token_ids == ref.token_ids


def test_a_layer_that_skips_its_output_fails(stateful, monkeypatch):
    """The comparison's power: a layer-major prefill whose layers hand on their *input* (the write-back of the
    hidden states lost) stores K/V computed from the wrong hidden states; the check must catch it."""
    from kvtool.runtime.engines import ov_layers

    real = ov_layers.LayerRunner.layer

    def skip(self, i, x, pos, k, v):
        real(self, i, x, pos, k, v)  # the op still fills the layer's buffer
        return x

    monkeypatch.setattr(ov_layers.LayerRunner, "layer", skip)
    pipe, out = _run(stateful, 16, new=1, order="layer", **KV2)
    _, ref = _run(stateful, 0, new=1, order="chunk", **KV2)
    assert np.abs(pipe.last_first_logits - ref.logits[0]).max() > 100 * ATOL
    with pytest.raises(AssertionError):
        _check_chunks(stateful, (16,), new=1, order="layer", **KV2)


def test_layer_major_on_qwen2_vl(exported):
    """M-RoPE positions [3, 1, T] sliced per chunk, through the sub-models: as one full-graph call."""
    path = exported("tiny-qwen2-vl", "openvino", 16, "fp32", stateful=True)
    _check_chunks(path, (7,), new=3, order="layer", kv="g-KC32VT32", k_bits=2, v_bits=2)


@pytest.mark.slow
def test_layer_major_on_llava_next(exported):
    path = exported("tiny-llava-next", "openvino", 16, "fp32", stateful=True)
    _check_chunks(path, (7, 1, -1, 4096), order="layer", kv="g-KT32VC32", k_bits=4, v_bits=4, first_token="fp")


def test_layer_order_rule_and_buffer(stateful, monkeypatch):
    """Layer-major with no chunk given: its own chunking rule; one layer's buffer reported."""
    from kvtool.runtime.engines import openvino_packed

    monkeypatch.setattr(openvino_packed, "PREFILL_CHUNK", 16)
    pipe = VLMPipeline.load(stateful, kv_owner="packed", prefill_order="layer", **KV2)
    out = pipe.generate(random_image(), QUESTION, max_new_tokens=2, ignore_eos=True)
    info, eng = pipe.info()["engine"], pipe.engine
    assert info["prefill_order"] == "layer" and info["prefill_order_reason"].startswith("layer-major")
    assert info["prefill_rule"] == "auto (layer_chunking_saves_memory)" and info["prefill_chunked"] is True
    prefilled = out.stats["prompt_tokens"] - 1  # the last prompt token sees the compressed cache
    one_layer = 2 * eng.num_kv_heads * eng.head_dim * np.dtype(eng.kv_dtype).itemsize
    assert info["prefill_buffer_bytes"] == prefilled * one_layer


def test_layer_chunking_rule_by_hand():
    """``layer_chunking_saves_memory``: one layer's buffer 2*8*128*2 = 4 KiB/token vs 4*(3*2816 + 6*1024) =
    57 KiB on the bench model; 2*32*128*2 = 16 KiB vs 4*(3*11008 + 6*4096) = 225 KiB on llava-1.5-7b; a shape
    with a wide KV and narrow MLP (64 x 128 KV, hidden = intermediate = 256: 32 KiB vs 9 KiB) does not chunk."""
    from kvtool.runtime.engines.ov_layers import layer_chunking_saves_memory as rule

    assert rule(8192, 8, 8, 128, 1024, 2816) and rule(2048, 32, 32, 128, 4096, 11008)
    assert not rule(2048, 2, 64, 128, 256, 256)


def test_default_order_is_what_info_says(stateful):
    """The default (no ``prefill_order``): picked per prompt where the native prefix kernel runs the exact-prefix
    attention (``prefix_attention="op"``; ``packed_order``), chunk-major, named, where the graph attends to the
    exact past."""
    from kvtool.runtime.engines import ov_layers, packed_prefix

    pipe = VLMPipeline.load(stateful, kv_owner="packed", **KV2)
    info = pipe.info()["engine"]
    assert ov_layers.DEFAULT_ORDER == "auto"
    if packed_prefix.resolve(None)[0] == "op":
        assert info["prefill_order_rule"] == "auto" and info["prefill_order"] == "chunk"
        assert info["prefill_order_reason"].startswith("chunk-major until the first prompt")
    graph = VLMPipeline.load(stateful, kv_owner="packed", prefix_attention="graph", **KV2).info()["engine"]
    assert graph["prefill_order"] == "chunk" and graph["decode_graph"] == "full LM"
    assert graph["prefill_order_rule"] == "default" and graph["order_switches"] == 0
    assert graph["prefill_order_reason"].startswith("chunk-major: the default where the exact-prefix attention")


def test_order_policy_by_hand():
    """``auto_order``'s edge: chunk-major up to the budget inclusive; the bench model's 2k / 8k prompts."""
    from kvtool.runtime.engines.packed_order import BUFFER_BUDGET, auto_order, buffer_bytes

    assert buffer_bytes(2048, 8, 8, 128, 2) == 64 * 2**20 and buffer_bytes(3, 2, 4, 16, 4) == 2 * 2 * 3 * 4 * 16 * 4
    assert BUFFER_BUDGET == 96 * 2**20
    assert auto_order(3072, 8, 8, 128, 2)[0] == "chunk" and auto_order(3073, 8, 8, 128, 2)[0] == "layer"
    assert auto_order(2048, 8, 8, 128, 2)[0] == "chunk" and auto_order(8190, 8, 8, 128, 2)[0] == "layer"
    assert auto_order(10, 2, 4, 16, 4, budget=buffer_bytes(10, 2, 4, 16, 4))[0] == "chunk"
    order, why = auto_order(10, 2, 4, 16, 4, budget=buffer_bytes(10, 2, 4, 16, 4) - 1)
    assert order == "layer" and why.startswith("layer-major: all layers' exact prefill buffers over") and "10 prompt" in why


@pytest.mark.skipif("not __import__('kvtool.runtime.engines.packed_prefix', fromlist=['x']).resolve(None)[0] == 'op'")
def test_order_policy_switches_and_answers_as_each_order(stateful, monkeypatch):
    """The default order per prompt: within the budget chunk-major, over it layer-major (the graph set rebuilt,
    counted, the other dropped), and layer-major kept after that (one switch, not one per crossing); each run
    answers bit for bit as an engine given that order."""
    from kvtool.runtime.engines import openvino_packed, packed_order

    monkeypatch.setattr(openvino_packed, "PREFILL_CHUNK", 16)
    refs = {}
    for order in ("chunk", "layer"):
        p = VLMPipeline.load(stateful, kv_owner="packed", prefill_order=order, **KV2)
        refs[order] = p.generate(random_image(), QUESTION, max_new_tokens=3, keep_logits=True, ignore_eos=True)
    pipe = VLMPipeline.load(stateful, kv_owner="packed", **KV2)
    eng = pipe.engine
    n = refs["chunk"].stats["prompt_tokens"]
    edge = packed_order.buffer_bytes(n, eng.num_layers, eng.num_kv_heads, eng.head_dim, np.dtype(eng.kv_dtype).itemsize)
    for budget, order, switches in ((edge, "chunk", 0), (edge - 1, "layer", 1), (edge, "layer", 1), (0, "layer", 1)):
        monkeypatch.setattr(packed_order, "BUFFER_BUDGET", budget)
        out = pipe.generate(random_image(), QUESTION, max_new_tokens=3, keep_logits=True, ignore_eos=True)
        info = eng.info()
        assert info["prefill_order"] == order and info["order_switches"] == switches, info["prefill_order_reason"]
        kept = budget == edge and order == "layer"
        assert info["prefill_order_reason"].startswith(
            "layer-major: kept for a prompt within" if kept else f"{order}-major: all layers' exact prefill buffers")
        assert f"{n} prompt tokens" in info["prefill_order_reason"] and info["prefill_chunked"] is True
        assert info["decode_graph"] == ("layer sub-models" if order == "layer" else "full LM")
        assert (eng.lm is None) == (order == "layer") and (eng.prefill_runner is None) == (order == "chunk")
        assert eng.kv.layers is eng.layers and all(la.store is not None for la in eng.layers)
        ref = refs[order]
        assert out.token_ids == ref.token_ids and out.stats["kv_bytes"] == ref.stats["kv_bytes"]
        for a, b in zip(ref.logits, out.logits, strict=True):
            np.testing.assert_array_equal(a, b)


_RELEASE_CHILD = r"""
import json, sys
import numpy as np
from kvtool.runtime import VLMPipeline
from kvtool.runtime.engines import ov_layers
from tests.runtime.helpers import QUESTION, random_image

released = []
real = ov_layers.LayerRunner.release
def release(self, i):
    real(self, i)
    released.append(self.released[i])
ov_layers.LayerRunner.release = release
out = {}
for chunk in map(int, sys.argv[2].split(",")):
    released.clear()
    pipe = VLMPipeline.load(sys.argv[1], kv_owner="packed", prefill_chunk=chunk, prefill_order="layer",
                            kv="g-KC128VT128", k_bits=2, v_bits=2)
    o = pipe.generate(random_image(), QUESTION, max_new_tokens=3, ignore_eos=True)
    out[chunk] = [o.token_ids, o.stats["prompt_tokens"], released[:]]
run = pipe.engine.prefill_runner  # the guard: a same-shape call right after release_memory is refused
h = pipe.engine.manifest.lm.hidden_size
x, pos = np.zeros((1, 3, h), np.float32), np.arange(3, dtype=np.int64)[None]
k, v, _ = pipe.engine.kv.past(0)
run.layer(0, x, pos, k, v)
run.release(0)
try:
    run.layer(0, x, pos, k, v)
    out["guard"] = "ran"
except RuntimeError as exc:
    out["guard"] = str(exc)
print(json.dumps(out))
"""


def test_release_memory_does_not_crash(stateful):
    """``RELEASE_MEMORY`` on prefills whose last chunk has 1 token (chunks of 1 and 2 on this odd prefill:
    release skipped, the next call being a one-token step of the same shape), and of more (released, then the
    one-token steps run): no abort (in a subprocess, so that an abort fails this test instead of pytest), the
    tokens of one call. Before the fix the CPU plugin ran the one-token step on freed memory ("Memory has not
    been allocated", then glibc's "corrupted double-linked list" abort)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from kvtool.runtime.engines import ov_layers

    assert ov_layers.RELEASE_MEMORY
    _, ref = _run(stateful, 0, new=3, order="chunk", **KV2)
    n = ref.stats["prompt_tokens"]
    prefilled = n - 1
    assert prefilled % 2 == 1, n  # the 1-token tail for chunks of 2 (the tiny model's prompt)
    big = next(c for c in range(prefilled // 2, prefilled) if prefilled % c > 1)
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", _RELEASE_CHILD, str(stateful), f"1,2,{big}"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for chunk in ("1", "2", str(big)):
        assert out[chunk][0] == ref.token_ids, chunk
    layers = len(out["1"][2])  # one release() per layer and prefill
    assert layers > 1 and out["1"][2] == out["2"][2] == [None] * layers  # last call of 1 token: not released
    assert out[str(big)][2] == [prefilled % big] * layers  # released after its last chunk
    assert out["guard"] == ov_layers.RELEASE_GUARD.format(i=0, t=3)


@pytest.mark.skipif("not __import__('kvtool.runtime.engines.packed_prefix', fromlist=['x']).resolve(None)[0] == 'op'")
def test_order_policy_on_a_graph_that_will_not_split(stateful, monkeypatch):
    """The default rule wants layer-major (budget 0) on a graph that cannot be split: chunk-major runs, the reason
    names the failed split and the rule; the split is tried once, not again on the next prompt."""
    from kvtool.runtime.engines import ov_layers, packed_order

    real = ov_layers.residual_chain
    monkeypatch.setattr(ov_layers, "residual_chain", lambda m: real(m)[:-1])  # one link lost
    monkeypatch.setattr(packed_order, "BUFFER_BUDGET", 0)
    pipe = VLMPipeline.load(stateful, kv_owner="packed", **KV2)
    tried = []
    build = packed_order.build
    monkeypatch.setattr(packed_order, "build", lambda e, o: tried.append(o) or build(e, o))
    for _ in range(2):
        pipe.generate(random_image(), QUESTION, max_new_tokens=2, ignore_eos=True)
        info = pipe.info()["engine"]
        assert info["prefill_order"] == "chunk" and info["decode_graph"] == "full LM" and pipe.engine.lm is not None
        assert info["prefill_order_reason"].startswith("chunk-major: the LM graph cannot be split by layer (")
        assert "(the rule: layer-major: all layers' exact prefill buffers over" in info["prefill_order_reason"]
    assert tried == ["layer"] and info["order_switches"] == 1
