"""The typed KV spec: parsed once per load, recorded by name as before, read by the caches as parsed."""

from __future__ import annotations

import pytest

from kvtool.errors import InputError
from kvtool.quant_ops import schemes
from kvtool.quant_ops.granularity import PerChannel, PerToken
from kvtool.runtime.kvspec import check_scheme_fits, make_kv_spec, resolve_bits
from tests.runtime.helpers import QUESTION, random_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def parses(monkeypatch):
    """Counts the reads of a scheme *name* (``schemes._parse_name``: a parsed spec passes through unread)."""
    calls: list[object] = []
    real = schemes._parse_name

    def counting(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(schemes, "_parse_name", counting)
    return calls


def test_make_kv_spec_parses_once_and_keeps_the_record(parses):
    spec = make_kv_spec("G-kc128vt64", 2, 3, "simulate", residual=128)
    assert len(parses) == 1
    assert spec.quant.k == PerChannel(128) and spec.quant.v == PerToken(64) and spec.scheme == "g-KC128VT64"
    # what results.json and settings files record, unchanged: the scheme by its canonical name
    assert spec.to_dict() == {"scheme": "g-KC128VT64", "k_bits": 2, "v_bits": 3, "mode": "simulate",
                              "first_token": "compressed", "ov_group_size": None, "ov_key_by_channel": False,
                              "residual": 128}
    assert make_kv_spec(spec.quant, 2, 3).quant is spec.quant and len(parses) == 1  # a parsed spec: no parse
    ov = make_kv_spec("OV-U4", ov_group_size=32)
    assert (ov.scheme, ov.k_bits, ov.is_ov, ov.quantizes) == ("ov-u4", 4, True, False)
    assert ov.to_dict()["scheme"] == "ov-u4" and make_kv_spec().is_fp


def test_bits_and_fits_read_the_parsed_spec():
    assert resolve_bits("ov-u8") == (None, None) and resolve_bits(make_kv_spec("fp16").quant) == (None, None)
    assert resolve_bits("g-T64", kv_bits=2, v_bits=8) == (2, 8)
    with pytest.raises(InputError, match="kv=fp16 keeps K and V unquantized: k_bits=2"):
        resolve_bits(make_kv_spec("fp16").quant, k_bits=2)
    with pytest.raises(InputError, match="groups 96 channels per token.*D_model = 2 kv heads x 64 = 128"):
        check_scheme_fits(make_kv_spec("g-KC128VT96"), 2, 64)
    check_scheme_fits(make_kv_spec("g-KT64VC128"), 2, 64)
    with pytest.raises(InputError, match="^kv: unknown KV scheme 'kivi'"):
        make_kv_spec("kivi")


@pytest.mark.parametrize("backend,mode", [("torch", "simulate"), ("torch", "packed"), ("openvino", "packed"),
                                          ("openvino", "simulate")])
def test_a_load_parses_the_scheme_once(tiny_model, exported, parses, backend, mode):
    """From the load's options to the caches the engines build and the byte counts of a generation, the
    scheme name is read once; everything downstream takes the parsed spec."""
    from kvtool.runtime import VLMPipeline

    path = tiny_model("tiny-llava") if backend == "torch" else exported("tiny-llava", "openvino", 16, "fp32",
                                                                          stateful=False)
    pipe = VLMPipeline.load(path, backend=backend, kv="g-KC16VT16", k_bits=2, v_bits=2, kv_mode=mode)
    out = pipe.generate(random_image(), QUESTION, max_new_tokens=3)
    assert parses == ["g-KC16VT16"]
    assert out.stats["kv_bytes"] > 0 and pipe.spec.scheme == "g-KC16VT16"


@pytest.mark.parametrize("layout", ["token_major", "head_major"])
def test_graph_cache_simulate_holds_one_dense_copy(layout):
    """Simulate mode delegates to the store, whose dense cache lives in the graph's own buffers (one copy)."""
    import numpy as np

    from kvtool.runtime.kv_cache import GraphKVCache

    kv = GraphKVCache(make_kv_spec("g-KC16VT16", 2, 2, "simulate"), 1, 2, 32, token_major=layout == "token_major",
                      head_major=layout == "head_major")
    rng = np.random.default_rng(0)
    for t in (20, 1, 1):
        x = rng.standard_normal((1, 2, t, 32)).astype(np.float32)
        kv.append(0, x, x)
        kv.advance(t)
        kv.past(0)
    dense = kv._stores[0].side_layout("k").dense
    assert dense.shape == (1, 2, 22, 32) and np.shares_memory(dense, kv._kbuf[0])
