"""The packed engine without the graph's own SDPA (``prefix_attention="op"``, ``packed_prefix.removes_sdpa``): the
op, fed the SDPA's inputs (q, k_new, v_new), computes a prefill's causal attention itself.

- the edited LM graph holds no ``ScaledDotProductAttention`` with "op" and one per layer with "graph" (and with
  "op" under ``KVTOOL_KEEP_SDPA=1``); the compiled decode graph then has no SDPA subgraph; the layer split still
  finds its layers (each sub-model holds its own op, reads no past);
- the op alone, on an empty store (case a: a prefill's first call): the causal attention of its T tokens against
  a naive float64 reference (softmax(q k^T * scale) v, query t over keys 0..t, GQA), on both routes (the C++
  extension op and the Python op), its output in q's element type, the tokens then in the store;
- the engine: the same greedy tokens as the graph form (which keeps the SDPA) on the three tiny architectures,
  one-call and chunked prefill, ``first_token="fp"``; first-step logits within test_prefix_op's tolerances:
  ATOL = 1e-4 where nothing is quantized (kv=fp16: the kernel and the SDPA differ only in float32 summation
  order, ~T u relative on an attention output, u = 2^-24, T <= 600), ATOL_FLIP = 1e-3 at 2 bits (a code may flip
  where a value sits within that rounding of a boundary; derivation in test_prefix_op.py).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from kvtool.quant_ops import QuantizedKVStore, native
from kvtool.runtime import VLMPipeline
from kvtool.runtime.engines import ov_packed_ext as ext
from tests.runtime.test_prefix_op import ATOL, ATOL_FLIP, FP16, KV, _run, _same

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.skipif(not native.available(), reason=f"native: {native.reason()}")]


@pytest.fixture(scope="module")
def llava(exported):
    return exported("tiny-llava", "openvino", 16, "fp32", stateful=True)


def _edited(path, prefix):
    import openvino as ov

    from kvtool.runtime.engines.openvino_packed import _packed_lm

    model = ov.Core().read_model(str(path / "openvino_language_model.xml"))
    layers = _packed_lm(model, 2, np.float32, prefix)
    return model, layers


def _sdpas(model) -> int:
    return sum(op.get_type_name() == "ScaledDotProductAttention" for op in model.get_ordered_ops())


def test_sdpa_removed_with_op_kept_with_graph(llava, monkeypatch):
    from kvtool.runtime.engines.ov_layers import split_layers

    for prefix, keep, want in (("op", None, 0), ("graph", None, 2), ("op", "1", 2)):
        if keep:
            monkeypatch.setenv("KVTOOL_KEEP_SDPA", keep)
        model, layers = _edited(llava, prefix)
        monkeypatch.delenv("KVTOOL_KEEP_SDPA", raising=False)
        assert _sdpas(model) == want and all(la.sdpa == bool(want) for la in layers)
        ops = [op for op in model.get_ordered_ops() if op.get_friendly_name().startswith("kvtool_attention.")]
        assert [op.get_input_size() for op in ops] == [3 if not want else 4] * 2
        subs, head = split_layers(model, 2)
        for i, sub in enumerate(subs):
            names = {x.get_any_name() for x in sub.inputs}
            held = [op.get_friendly_name() for op in sub.get_ordered_ops()
                    if op.get_friendly_name().startswith("kvtool_attention.")]
            assert held == [f"kvtool_attention.{i}"]
            pasts = {x for x in names if x.startswith("kvtool_past.")}
            assert pasts == (set() if not want else {f"kvtool_past.{i}.key", f"kvtool_past.{i}.value"})
    # the compiled decode graph (chunk-major: one full LM): the SDPA's fused subgraph is gone with "op"
    for prefix, want in (("op", 0), ("graph", 2)):
        pipe = VLMPipeline.load(llava, kv_owner="packed", prefix_attention=prefix, prefill_order="chunk", **KV)
        kinds = collections.Counter(o.get_rt_info()["layerType"].astype(str)
                                    for o in pipe.engine.lm.get_runtime_model().get_ordered_ops())
        assert kinds["Subgraph"] == want, kinds
        assert pipe.info()["engine"]["graph_sdpa"] == ("removed" if prefix == "op" else "kept")


def _causal_reference(q, k, v, scale, causal=True):
    """float64 softmax(q k^T * scale) v, query t over keys 0..t (``causal``, else all keys); q [1, Hq, T, D],
    k / v [1, H, T, D] (query head i reads kv head i // (Hq / H))."""
    _, hq, t, _ = q.shape
    rep = hq // k.shape[1]
    kk, vv = np.repeat(k[0], rep, 0).astype(np.float64), np.repeat(v[0], rep, 0).astype(np.float64)
    s = np.einsum("htd,hsd->hts", q[0].astype(np.float64), kk) * scale
    if causal:
        s[:, np.triu(np.ones((t, t), bool), 1)] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ vv


@pytest.mark.parametrize("route", ["cpp", "python"])
def test_op_alone_computes_the_causal_attention(route, monkeypatch):
    """Case (a) without an SDPA: a 3-input op on an empty store, T = 6 tokens, GQA (4 query heads over 2 kv heads),
    head_dim 80. The kernel's float32 sums over <= 6 terms: |err| <= ~1e-6 here (1e-5 asserted); a kernel that
    is not causal (or attends to nothing) misses by > 1e-2 on these inputs (checked on the reference)."""
    import openvino as ov
    import openvino.opset13 as ops

    from kvtool.runtime.engines.openvino_packed import _evaluate, _Layer
    from kvtool.runtime.engines.packed_pyop import op_class

    if route == "python":
        monkeypatch.setenv(ext.ENV_OFF, "1")
    elif ext.route()[0] != ext.CPP_ROUTE:
        pytest.skip(f"OpenVINO extension op: {ext.route()[1]}")
    hq, h, t, d = 4, 2, 6, 80
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, hq, t, d)).astype(np.float32)
    k = rng.standard_normal((1, h, t, d)).astype(np.float32)
    v = rng.standard_normal((1, h, t, d)).astype(np.float32)
    scale = 1 / np.sqrt(d)
    layer = _Layer(0, scale, np.float16)
    layer.store = QuantizedKVStore("g-KC32VT32", 2, 2)
    params = [ops.parameter(ov.PartialShape([1, n, -1, d]), ov.Type.f32) for n in (hq, h, h)]
    node = ext.make_node([p.output(0) for p in params], layer, _evaluate, op_class())
    assert layer.route[0] == (ext.PY_ROUTE if route == "python" else ext.CPP_ROUTE)
    assert node.get_output_element_type(0) == ov.Type.f32 and node.get_friendly_name() == "kvtool_attention.0"
    req = ov.Core().compile_model(ov.Model([node.output(0)], params), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    ext.infer([layer], req, {0: q, 1: k, 2: v})
    out = req.get_output_tensor(0).data
    ref = _causal_reference(q, k, v, scale)
    assert out.shape == (1, hq, t, d)
    np.testing.assert_allclose(out[0], ref, rtol=0, atol=1e-5)
    assert np.abs(_causal_reference(q, k, v, scale, causal=False) - ref).max() > 1e-2  # the check's power
    assert layer.store.n_tokens == t and layer.causal_calls == 1 and layer.calls["fp"] == 1


def test_python_op_route_without_sdpa(llava, monkeypatch):
    """The Python op (no C++ extension) without the SDPA answers as the C++ op does."""
    ref_pipe, ref = _run(llava, 7)
    monkeypatch.setenv(ext.ENV_OFF, "1")
    pipe, out = _run(llava, 7)
    info = pipe.info()["engine"]
    assert info["route"] == ext.PY_ROUTE and info["graph_sdpa"] == "removed"
    _same(pipe, out, ref_pipe, ref, ATOL_FLIP)


def _both_forms(path):
    """op (SDPA removed) vs graph (SDPA kept): one call, chunked, first_token=fp; fp16 and 2-bit."""
    for kw, atol in ((FP16, ATOL), (KV, ATOL_FLIP)):
        for chunk in (0, 7):
            g_pipe, g = _run(path, chunk, prefix_attention="graph", **kw)
            o_pipe, o = _run(path, chunk, prefix_attention="op", **kw)
            _same(o_pipe, o, g_pipe, g, atol)
            info = o_pipe.info()["engine"]
            assert info["graph_sdpa"] == "removed" and info["graph_sdpa_op_calls"] > 0
            assert g_pipe.info()["engine"]["graph_sdpa"] == "kept"
            assert g_pipe.info()["engine"]["graph_sdpa_op_calls"] == 0
    fp = dict(kv="uniform", k_bits=4, v_bits=2, first_token="fp")
    _same(*_run(path, 0, prefix_attention="op", **fp), *_run(path, 0, prefix_attention="graph", **fp), ATOL_FLIP)


def test_both_forms_same_tokens_llava(llava):
    _both_forms(llava)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny-llava-next", "tiny-qwen2-vl"])
def test_both_forms_same_tokens_other_architectures(exported, arch):
    _both_forms(exported(arch, "openvino", 16, "fp32", stateful=True))


def test_keep_switch_gives_the_same_tokens(llava, monkeypatch):
    """``KVTOOL_KEEP_SDPA=1`` (the A/B switch of bench/graph_sdpa.py) keeps the SDPA under "op" and answers the
    same (the first chunk from the SDPA instead of the kernel: summation order)."""
    pipe, out = _run(llava, 7, prefix_attention="op")
    monkeypatch.setenv("KVTOOL_KEEP_SDPA", "1")
    kept_pipe, kept = _run(llava, 7, prefix_attention="op")
    assert kept_pipe.info()["engine"]["graph_sdpa"] == "kept" and pipe.info()["engine"]["graph_sdpa"] == "removed"
    assert kept_pipe.info()["engine"]["graph_sdpa_op_calls"] == 0
    _same(pipe, out, kept_pipe, kept, ATOL_FLIP)


@pytest.mark.parametrize("kernel", ["native", "portable"])
def test_causal_attention_query_blocks(kernel, monkeypatch):
    """``packed_prefix.causal_attention`` alone, native and numpy (in query blocks of 4 over T = 10: each block
    over the tokens before it plus itself), f16 new K/V, written into ``dst``: the naive causal reference."""
    from kvtool.runtime.engines import packed_prefix
    from kvtool.runtime.engines.openvino_packed import _Layer

    rng = np.random.default_rng(5)
    hq, h, t, d = 6, 2, 10, 64
    q = rng.standard_normal((1, hq, t, d)).astype(np.float32)
    k = rng.standard_normal((1, h, t, d)).astype(np.float16)
    v = rng.standard_normal((1, h, t, d)).astype(np.float16)
    layer = _Layer(0, 1 / 8, np.float16)
    monkeypatch.setattr(packed_prefix, "PORTABLE_QUERY_BLOCK", 4)
    dst = np.full((1, hq, t, d), np.nan, np.float32)
    if kernel == "portable":
        with native.disabled("off for the test"):
            out = packed_prefix.causal_attention(layer, q, k, v, dst)
    else:
        out = packed_prefix.causal_attention(layer, q, k, v, dst)
    assert np.shares_memory(out, dst) and layer.causal_calls == 1
    np.testing.assert_allclose(dst[0], _causal_reference(q, k, v, 1 / 8), rtol=0, atol=1e-5)
