"""The packed OpenVINO engine (``engines.openvino_packed``): KV held only packed, attention reading the codes
through a Python custom op in the stateful LM graph.

Reference: today's packed path on the same stateful export — the paged engine (parity-tested against the
torch engine and the stateless graph in test_state_owned.py), or the state-owned engine for Qwen2-VL (whose
3-D positions the paged engine cannot take). Both hold the same packed stores (same codes: same inputs, same
quantizer), so ``kv_bytes`` must be equal and the only difference is the attention arithmetic.

First-step logits tolerance, atol 1e-4: per layer the fused kernel's output differs from an exact attention
over the same dequantized cache by at most max|v| (2.2 delta_s + 2.4e-6 + 3 (N + D + 16) u), u = 2^-24
(derived in tests/quant_ops/test_attention.py); at N <= 600 tokens and D <= 64 that is <= 1.5e-4 max|v|
in the worst case (every rounding the same sign), ~1e-6 typical (observed max 4e-6 on these models). The
reference's own attention (OpenVINO's f32 PagedAttention / SDPA) has an error of the same order. The tiny
models' residual stream adds, never amplifies, each layer's attention output after an output projection of
gain < 1 (init std 0.02), so 1e-4 on logits of magnitude ~0.1-1 bounds the worst case; a wrong cache (a token
missing, the exact instead of the quantized past) changes the logits by 1e-3 or more (see
test_new_token_exact_past_quantized). The tiny stateful exports take ~25-60 s to build (shared per session):
tiny-llava runs by default, the matrix over architectures, schemes and bits is marked slow.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.errors import InputError
from kvtool.runtime import VLMPipeline
from tests.runtime.helpers import QUESTION, random_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
slow = pytest.mark.slow
ATOL = 1e-4


@pytest.fixture(scope="module")
def stateful(exported):
    return exported("tiny-llava", "openvino", 16, "fp32", stateful=True)


def _reference_owner(path) -> str:
    return "kvtool" if "qwen2" in str(path) else "paged"


def _compare(path, scheme, kb, vb, new=6, **kw):
    args = dict(kv=scheme, k_bits=kb, v_bits=vb, **kw)
    img = random_image()
    pipe = VLMPipeline.load(path, kv_owner="packed", **args)
    o = pipe.generate(img, QUESTION, max_new_tokens=new, keep_logits=True, ignore_eos=True)
    ref = VLMPipeline.load(path, kv_owner=_reference_owner(path), **args)
    r = ref.generate(img, QUESTION, max_new_tokens=new, keep_logits=True, ignore_eos=True)
    assert o.token_ids == r.token_ids
    assert o.stats["kv_bytes"] == r.stats["kv_bytes"]  # the same packed stores
    np.testing.assert_allclose(pipe.last_first_logits, ref.last_first_logits, rtol=0, atol=ATOL)
    for mine, theirs in zip(o.logits, r.logits, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=ATOL)
    return pipe, o


def _routes_agree(path, scheme, kb, vb, monkeypatch, new=6, **kw):
    """The C++ extension op's route against the Python op's (``KVTOOL_NO_OV_EXTENSION=1``) on the same export:
    the same greedy tokens, ``kv_bytes`` and logits bit for bit (the same kernel with the same inputs on the
    decode fast path, the same Python ``_evaluate`` on every other call); the C++ route ran its decode steps
    without Python (the op's fast-path count) where the kernel reads the scheme."""
    from kvtool.runtime.engines import ov_packed_ext as ext

    if ext.route()[0] != ext.CPP_ROUTE:
        pytest.skip(f"OpenVINO extension op: {ext.route()[1]}")
    args = dict(kv=scheme, k_bits=kb, v_bits=vb, kv_owner="packed", **kw)
    img = random_image()
    got = []
    for off in (False, True):
        if off:
            monkeypatch.setenv(ext.ENV_OFF, "1")
        pipe = VLMPipeline.load(path, **args)
        o = pipe.generate(img, QUESTION, max_new_tokens=new, keep_logits=True, ignore_eos=True)
        got.append((pipe, o))
    monkeypatch.delenv(ext.ENV_OFF)
    (cp, co), (pp, po) = got
    assert (cp.info()["engine"]["route"], pp.info()["engine"]["route"]) == (ext.CPP_ROUTE, ext.PY_ROUTE)
    assert pp.info()["engine"]["route_reason"] == f"{ext.ENV_OFF}=1"
    assert co.token_ids == po.token_ids and co.stats["kv_bytes"] == po.stats["kv_bytes"]
    np.testing.assert_array_equal(cp.last_first_logits, pp.last_first_logits)
    for mine, theirs in zip(co.logits, po.logits, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    ci, pi = cp.info()["engine"], pp.info()["engine"]
    assert [la["calls"] for la in ci["layers"]] == [la["calls"] for la in pi["layers"]]
    assert ci["attention_path"] == pi["attention_path"]
    native = ci["attention_path"] == "native"
    for layer in cp.engine.layers:  # decode steps: the op's fast path (no Python) where the kernel reads the store
        assert layer.slot.c.fast_calls == (layer.calls["native"] if native else 0) and (layer.calls["native"] > 0) \
            == native
    return cp, co


def _one_layer(pipe, itemsize: int) -> int:
    e = pipe.engine
    return 2 * e.num_kv_heads * e.head_dim * e.kv.n_tokens * itemsize


def test_fp16_on_request_matches_the_stateful_engine(stateful):
    """fp16 with ``kv_owner="packed"`` (opt-in): the stores hold every
    token unquantized and the native kernel reads them; same greedy tokens as OpenVINO's own stateful cache, and
    logits within ATOL (the stateful graph's SDPA and the kernel differ only in float32 summation order)."""
    img = random_image()
    pipe = VLMPipeline.load(stateful, kv="fp16", kv_owner="packed")
    o = pipe.generate(img, QUESTION, max_new_tokens=6, keep_logits=True, ignore_eos=True)
    ref = VLMPipeline.load(stateful, kv="fp16", kv_owner="openvino")  # (fp16's CPU default is the paged engine)
    assert type(ref.engine).__name__ == "OpenVINOStatefulEngine"
    r = ref.generate(img, QUESTION, max_new_tokens=6, keep_logits=True, ignore_eos=True)
    assert o.token_ids == r.token_ids
    for mine, theirs in zip(o.logits, r.logits, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=ATOL)
    info = pipe.info()["engine"]
    assert info["attention_path"] == "native" and info["ov_states"] == 0 and o.stats["kv_work_bytes"] == 0


@pytest.mark.parametrize("scheme,kb,vb,path", [("g-KC128VT128", 2, 2, "native"), ("g-KT32VC32", 3, 8, "native"),
                                               ("uniform", 4, 2, "portable")])
def test_matches_the_paged_engine(stateful, scheme, kb, vb, path):
    pipe, out = _compare(stateful, scheme, kb, vb)
    info = pipe.info()["engine"]
    assert info["name"] == "OpenVINOPackedEngine"  # run --json names the engine that ran, by class
    from kvtool.runtime.engines.ov_packed_ext import route

    assert info["kv_owner"] == "packed" and (info["route"], info["route_reason"]) == route()
    assert info["attention_path"] == path and info["ov_states"] == 0
    assert all(la["calls"]["fp"] == 1 and la["calls"][path] == 6 for la in info["layers"])
    if path == "portable":
        assert "uniform" in info["attention_reason"]
        # one layer dequantized at a time, in the held dtype (f32 here: an fp32 export)
        assert 0 < out.stats["kv_work_bytes"] <= _one_layer(pipe, 4)
    else:
        assert out.stats["kv_work_bytes"] == 0  # the kernel reads the codes


@pytest.mark.parametrize("scheme,kb,vb", [("g-KC128VT128", 2, 2), pytest.param("g-KT32VC32", 3, 8, marks=slow),
                                          pytest.param("uniform", 4, 2, marks=slow)])
def test_cpp_op_matches_the_python_op(stateful, scheme, kb, vb, monkeypatch):
    _routes_agree(stateful, scheme, kb, vb, monkeypatch)


def test_cpp_op_chunked_prefill(stateful, monkeypatch):
    """The C++ route through a chunked prefill (case p, its buffer's flush into the store before the first
    decode step)."""
    cp, _ = _routes_agree(stateful, "g-KC32VT32", 2, 2, monkeypatch, new=3, prefill_chunk=64)
    assert cp.info()["engine"]["prefill_chunked"]


@slow
def test_cpp_op_first_token_fp(stateful, monkeypatch):
    _routes_agree(stateful, "g-KC32VT32", 2, 4, monkeypatch, new=3, first_token="fp")


def test_default_engine_and_no_openvino_state(stateful):
    """A kvtool scheme in packed mode on a stateful CPU export runs the packed engine; the compiled graph holds
    no KV state (no ReadValue/Assign, no variables); simulate mode keeps the paged engine."""
    pipe = VLMPipeline.load(stateful, kv="g-KC128VT128", k_bits=2, v_bits=2)
    eng = pipe.engine
    assert type(eng).__name__ == "OpenVINOPackedEngine"
    run = eng.prefill_runner  # layer-major (the default where the op prefix runs): the sub-models, no full LM
    compiled = [eng.lm] if run is None else [*run.compiled, run.head_compiled]
    reqs = [eng.lm_req] if run is None else [*run.reqs, run.head_req]
    assert all(len(r.query_state()) == 0 for r in reqs) and eng.n_states == 0
    kinds = {op.get_type_name() for c in compiled for op in c.get_runtime_model().get_ops()}
    assert not kinds & {"ReadValue", "Assign", "ReadValueWithSubgraph"}
    sim = VLMPipeline.load(stateful, kv="g-KC128VT128", k_bits=2, v_bits=2, kv_mode="simulate")
    assert type(sim.engine).__name__ == "OpenVINOPagedEngine"


def test_f16_store_work_within_one_layer(stateful):
    """Held in f16 (the default for non-fp32 exports): the portable path's working copy is at most one
    layer's fp16 cache, the native path has none; what is held is far below the fp16 cache."""
    for scheme, path in (("g-CN", "portable"), ("g-KC128VT128", "native")):
        pipe = VLMPipeline.load(stateful, kv=scheme, k_bits=2, v_bits=2, kv_precision="f16")
        out = pipe.generate(random_image(), QUESTION, max_new_tokens=4, ignore_eos=True)
        assert pipe.info()["engine"]["attention_path"] == path
        assert out.stats["kv_work_bytes"] <= _one_layer(pipe, 2)
        assert (out.stats["kv_work_bytes"] > 0) == (path == "portable")
        assert out.stats["kv_bytes"] < 0.35 * out.stats["kv_fp16_bytes"]
        assert pipe.info()["engine"]["kv_dtype"] == "float16"


def test_new_token_exact_past_quantized(stateful):
    """Several tokens on a non-empty store (case c, portable, causal inside the call) and one token (case b)
    give the reference's logits; attending to the exact instead of the quantized past would not."""
    kw = dict(kv="g-KC128VT128", k_bits=2, v_bits=2)
    pipe = VLMPipeline.load(stateful, kv_owner="packed", **kw)
    ref = VLMPipeline.load(stateful, kv_owner="paged", **kw)
    fp = VLMPipeline.load(stateful, kv="fp16")
    from kvtool.runtime.preprocess import prepare_inputs

    prepared = prepare_inputs(pipe.processor, [random_image()], QUESTION, pipe.conversation)
    n = prepared.n_tokens
    got = []
    for p in (pipe, ref, fp):
        p.engine.start(prepared, 4)
        p.engine.run_prompt(0, n - 5)
        got.append(p.engine.run_prompt(n - 5, n))
    np.testing.assert_allclose(got[0], got[1], rtol=0, atol=ATOL)
    assert np.abs(got[0] - got[2]).max() > 10 * ATOL  # 2-bit past: visibly not the fp16 answer
    layers = pipe.info()["engine"]["layers"]
    assert all(la["calls"] == {"fp": 1, "native": 0, "portable": 1} for la in layers)
    assert "5 new tokens" in layers[0]["reason"]


def test_first_token_fp_matches(stateful):
    _compare(stateful, "g-KC128VT128", 4, 2, new=3, first_token="fp")


def test_bad_input(stateful):
    from kvtool.manifest import Manifest
    from kvtool.runtime.engines.openvino_packed import OpenVINOPackedEngine
    from kvtool.runtime.kvspec import make_kv_spec

    m = Manifest.load(stateful)
    spec = make_kv_spec("g-KC128VT128", 2, 2, "packed", "compressed", None, False)
    with pytest.raises(InputError, match=r"^kv=g-KC128VT128 with the packed engine .*CPU only.*GPU"):
        OpenVINOPackedEngine(stateful, spec, "GPU", m)
    for kv, bits, mode in (("ov-u4", None, "packed"), ("uniform", 4, "simulate")):
        # the registry refuses the schemes the engine does not take; the engine refuses simulate mode itself
        with pytest.raises(InputError, match=f"^kv={kv} with (the packed engine|kv_owner=packed: .*packed takes)"):
            VLMPipeline.load(stateful, kv=kv, k_bits=bits, v_bits=bits, kv_mode=mode, kv_owner="packed")


ARCHS = ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"]
FAMILIES = ["g-KC32VT32", "g-KT32VC32", "g-C32", "g-CN", "g-T32", "uniform", "or2"]
BITS = [(2, 2), (3, 3), (4, 8), (8, 2)]  # 2, 3, 4 and 8 bits; K and V apart


@slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", FAMILIES)
@pytest.mark.parametrize("kb,vb", BITS)
def test_matrix(exported, arch, scheme, kb, vb, monkeypatch):
    """Every scheme family at 2, 3, 4 and 8 bits, K and V bits apart, on the three architectures; the C++
    extension op's route (the default where built) gives the Python op's results bit for bit."""
    path = exported(arch, "openvino", 16, "fp32", stateful=True)
    pipe, _ = _compare(path, scheme, kb, vb, new=4)
    _routes_agree(path, scheme, kb, vb, monkeypatch, new=4)
    native = scheme.startswith("g-") and scheme != "g-CN"
    assert pipe.info()["engine"]["attention_path"] == ("native" if native else "portable")
