"""The packed engine's chunked prefill (``openvino_packed``, ``prefill_chunk``): each chunk attends to the exact
earlier prompt tokens (a full-precision prefill buffer fed as the graph's past), and the stores receive the
whole prompt in one append at the end, so DESIGN.md's semantics are those of the one-call prefill.

Reference: the same engine with ``prefill_chunk=0`` (one graph call, today's path, parity-tested against the
paged and state-owned engines in test_packed_engine.py). Tolerance on first-step logits, atol 1e-4 (the
packed-engine tests' bound, derived there): on these fp32 exports the buffer is held in f32 (the stores'
dtype), so a chunked prefill differs from one call only in the SDPA's float32 summation order over the split
key range (relative ~N u, u = 2^-24, N <= 600: ~4e-5 relative on an attention output, ~1e-6 on the logits of
these gain < 1 models); quantization then sees inputs that agree to that rounding, so a code can flip only
where a value sits within ~1e-6 of a rounding boundary, which moves one dequantized value by one step and the
logits by far less than 1e-4 (observed max below, in the assertion's message). A missing prompt token or a
chunk attending to nothing earlier changes the logits by 1e-2 or more (``test_chunks_see_the_earlier_chunks``).
"""

from __future__ import annotations

import platform
import sys

import numpy as np
import pytest

from kvtool.errors import InputError
from kvtool.runtime import VLMPipeline
from tests.runtime.helpers import QUESTION, random_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ATOL = 1e-4


@pytest.fixture(scope="module")
def stateful(exported):
    return exported("tiny-llava", "openvino", 16, "fp32", stateful=True)


def _run(path, chunk, new=4, order=None, **kv):
    pipe = VLMPipeline.load(path, kv_owner="packed", prefill_chunk=chunk, prefill_order=order, **kv)
    out = pipe.generate(random_image(), QUESTION, max_new_tokens=new, keep_logits=True, ignore_eos=True)
    return pipe, out


def _stores(eng):
    return [la.store.dequantize() for la in eng.layers]


def _check_chunks(path, chunks, new=4, order="chunk", **kv):
    """``order``: the prefill order under test (``ov_layers``'s layer-major, or chunk-major); the reference is
    always main's one full-graph call (``prefill_order="chunk"``, ``prefill_chunk=0``)."""
    ref_pipe, ref = _run(path, 0, new, "chunk", **kv)
    n = ref.stats["prompt_tokens"]
    assert ref_pipe.info()["engine"]["prefill_buffer_bytes"] == 0  # one call: no buffer
    for chunk in chunks:
        c = chunk if chunk > 0 else n + chunk  # negative: relative to the prompt length
        pipe, out = _run(path, c, new, order, **kv)
        info = pipe.info()["engine"]
        assert info["prefill_order"] == order, info["prefill_order_reason"]
        assert out.token_ids == ref.token_ids, c
        assert out.stats["kv_bytes"] == ref.stats["kv_bytes"], c  # the same stores
        assert out.stats["kv_work_bytes"] == ref.stats["kv_work_bytes"], c
        err = np.abs(pipe.last_first_logits - ref_pipe.last_first_logits).max()
        assert err <= ATOL, f"chunk {c}: first-step logits differ by {err:.2e}"
        for mine, theirs in zip(out.logits, ref.logits, strict=True):
            np.testing.assert_allclose(mine, theirs, rtol=0, atol=ATOL)
        eng = pipe.engine
        assert all(la.prefill is None for la in eng.layers)  # the buffer is freed after the prefill
        # the part prefilled at full precision: the prompt minus its last token where that token sees the
        # compressed cache (a quantizing scheme, first_token="compressed"), else all of it
        prefilled = n - (kv.get("first_token", "compressed") == "compressed" and kv.get("kv") != "fp16")
        chunked = c < prefilled
        for (k, v), (rk, rv) in zip(_stores(eng), _stores(ref_pipe.engine), strict=True):  # the stores' contents
            _assert_codes_agree(k, rk, c)
            _assert_codes_agree(v, rv, c)
        held = eng.num_layers if order == "chunk" else 1  # layer-major: one layer's buffer at a time
        want = 2 * held * prefilled * eng.num_kv_heads * eng.head_dim * np.dtype(eng.kv_dtype).itemsize
        assert info["prefill_buffer_bytes"] == (want if chunked else 0), c
        calls = {la["calls"]["fp"] for la in info["layers"]}
        assert calls == {-(-prefilled // c) if chunked else 1}, c
    return n


def _assert_codes_agree(mine, ref, chunk):
    """Dequantized store contents: equal but for values whose code flipped at a rounding boundary (module
    docstring); at most 0.1% of them, and each by at most the values' range (one code step or less)."""
    assert mine.shape == ref.shape, chunk
    diff = np.abs(np.asarray(mine, np.float64) - np.asarray(ref, np.float64))
    flipped = float((diff > ATOL).mean())
    assert flipped <= 1e-3, f"chunk {chunk}: {flipped:.2%} of the stored values differ"


ORDERS = ["chunk", "layer"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kv", [dict(kv="g-KC128VT128", k_bits=2, v_bits=2),
                                dict(kv="uniform", k_bits=4, v_bits=2, first_token="fp")])
def test_chunked_prefill_answers_as_one_call(stateful, kv, order):
    """Chunks that do not divide the prompt (7), one token per call, the prompt minus one (-1: one full chunk
    and one token) and more than the prompt (one call), in either prefill order: the same tokens, stores and
    logits as one full-graph call."""
    _check_chunks(stateful, (7, 1, -1, 4096), order=order, **kv)


@pytest.mark.parametrize("order", ORDERS)
def test_fp16_on_the_packed_engine(stateful, order):
    _check_chunks(stateful, (13,), order=order, kv="fp16")


def test_chunks_see_the_earlier_chunks(stateful):
    """The test's power: the same prompt with the buffer fed as empty (each chunk attends only to itself)
    gives visibly different logits, so the comparison above would catch a chunk that misses its past. (The
    graph-side prefix, where the buffer is the graph's past; the op-side one: tests/runtime/test_prefix_op.py.)"""
    pipe, out = _run(stateful, 16, kv="g-KC128VT128", k_bits=2, v_bits=2, prefix_attention="graph")
    eng = pipe.engine
    real_past = type(eng.kv).past
    type(eng.kv).past = lambda self, i: (self._empty, self._empty, 0)
    try:
        blind = pipe.generate(random_image(), QUESTION, max_new_tokens=1, ignore_eos=True)
        blind_logits = pipe.last_first_logits
    finally:
        type(eng.kv).past = real_past
    assert blind.stats["prompt_tokens"] == out.stats["prompt_tokens"] > 16
    _, ref = _run(stateful, 0, new=1, kv="g-KC128VT128", k_bits=2, v_bits=2)
    assert np.abs(blind_logits - ref.logits[0]).max() > 100 * ATOL


def test_prefill_chunk_default_and_bad_values(stateful):
    from kvtool.runtime.engines.openvino_packed import MMAP_THRESHOLD, PREFILL_CHUNK

    pipe = VLMPipeline.load(stateful, kv="g-KC128VT128", k_bits=2, v_bits=2)
    assert pipe.engine.info()["prefill_chunk"] == PREFILL_CHUNK > 0
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":  # the allocator fix is glibc's mallopt
        assert pipe.engine.info()["malloc_mmap_threshold"] == MMAP_THRESHOLD
    for bad in (-1, 2.5, "64", True):
        with pytest.raises(InputError, match=r"^prefill_chunk: expected a token count >= 0") as e:
            VLMPipeline.load(stateful, kv="g-KC128VT128", k_bits=2, v_bits=2, prefill_chunk=bad)
        assert "\n" not in str(e.value)


ARCHS = ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", ["g-KC32VT32", "g-KT32VC32", "uniform"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("first_token", ["compressed", "fp"])
@pytest.mark.parametrize("order", ORDERS)
def test_matrix(exported, arch, scheme, bits, first_token, order):
    path = exported(arch, "openvino", 16, "fp32", stateful=True)
    _check_chunks(path, (7, 1, -1, 4096), order=order, kv=scheme, k_bits=bits, v_bits=bits, first_token=first_token)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("order", ORDERS)
def test_matrix_fp16(exported, arch, order):
    _check_chunks(exported(arch, "openvino", 16, "fp32", stateful=True), (7, 1, -1), order=order, kv="fp16")


def test_chunking_rule_on_the_measured_shapes():
    """``chunking_saves_memory`` by hand on the two shapes it was measured on (docs/BENCHMARKS.md): the issue-13
    model (buffer 2*8*8*128*2 = 32 KiB/token; one call 4*(3*2816 + 6*1024) + 4*T = 57 KiB + 4T) chunks; the
    llava-1.5-7b shape (buffer 2*32*32*128*2 = 512 KiB/token; one call 4*(3*11008 + 6*4096) = 225 KiB + 4T)
    does not, until 4T exceeds the difference (T > 73,472)."""
    from kvtool.runtime.engines.openvino_packed import chunking_saves_memory

    assert chunking_saves_memory(2048, 8, 8, 128, 1024, 2816) and chunking_saves_memory(8192, 8, 8, 128, 1024, 2816)
    for t in (2048, 8192, 73472):
        assert not chunking_saves_memory(t, 32, 32, 128, 4096, 11008)
    assert chunking_saves_memory(73473, 32, 32, 128, 4096, 11008)
    assert not chunking_saves_memory(2048, 8, 8, 128, 1024, 2816, itemsize=8)  # a wider buffer flips it


def test_default_chunks_only_where_it_saves(stateful, monkeypatch):
    """No ``prefill_chunk`` given: the tiny model (a buffer of a few hundred bytes per token) chunks; with the
    rule answering "no", the same load prefills in one call (no buffer) and gives the same tokens."""
    from kvtool.runtime.engines import openvino_packed

    kv = dict(kv="g-KC128VT128", k_bits=2, v_bits=2)
    monkeypatch.setattr(openvino_packed, "PREFILL_CHUNK", 16)
    kv["prefill_order"] = "chunk"  # the chunk-major rule (the layer-major one: test_packed_layers.py)
    pipe = VLMPipeline.load(stateful, kv_owner="packed", **kv)
    out = pipe.generate(random_image(), QUESTION, max_new_tokens=3, ignore_eos=True)
    info = pipe.info()["engine"]
    assert info["prefill_rule"].startswith("auto") and info["prefill_chunked"] is True
    assert info["prefill_buffer_bytes"] > 0
    monkeypatch.setattr(openvino_packed, "chunking_saves_memory", lambda *a, **k: False)
    pipe = VLMPipeline.load(stateful, kv_owner="packed", **kv)
    one = pipe.generate(random_image(), QUESTION, max_new_tokens=3, ignore_eos=True)
    info = pipe.info()["engine"]
    assert info["prefill_chunked"] is False and info["prefill_buffer_bytes"] == 0
    assert one.text == out.text
    given = VLMPipeline.load(stateful, kv_owner="packed", prefill_chunk=16, **kv)  # a given chunk is obeyed
    given.generate(random_image(), QUESTION, max_new_tokens=1, ignore_eos=True)
    assert given.info()["engine"]["prefill_rule"] == "given" and given.info()["engine"]["prefill_chunked"] is True
