"""The packed engine's op-side exact-prefix attention (``prefix_attention="op"``, ``engines.packed_prefix``): in a
chunked prefill the graph's past is fed empty and each layer's op computes the chunk's attention from its
layer's exact buffer with ``quant_ops.prefix`` — against the graph-side prefix (the buffer as the graph's past)
and one call (no chunks): the same greedy tokens, the same stores (``kv_bytes``), and logits within:

- ATOL = 1e-4 where nothing is quantized (``kv="fp16"`` on the packed engine: the stores hold the tokens
  unquantized). The ways differ only in the float32 summation order of each chunk's attention (relative ~1e-7
  on an attention output, tests/quant_ops/test_prefix_attention.py; ~1e-6 on the logits of these gain < 1
  models), test_packed_prefill.py's bound;
- ATOL_FLIP = 1e-3 for a 2-bit scheme: the stores quantize K/V that agree to that rounding, so a code can flip
  where a value sits within ~1e-7 of a rounding boundary; one flipped 2-bit code moves a dequantized value by
  a whole step (a third of its group's range) and a score of the last prompt token by up to |q_d| times that,
  measured at 1.5e-4 on the first-step logits of tiny-qwen2-vl (max |logit| 1.04; tiny-llava: 3e-7, no flip).

The power test: a kernel that ignores the buffer (attends only to the chunk) moves the logits by > 1e-2.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.errors import InputError
from kvtool.quant_ops import native, prefix
from kvtool.runtime import VLMPipeline
from tests.runtime.helpers import QUESTION, random_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ATOL = 1e-4
ATOL_FLIP = 1e-3
KV = dict(kv="g-KC128VT128", k_bits=2, v_bits=2)
FP16 = dict(kv="fp16", k_bits=None, v_bits=None)


def _run(path, chunk, new=3, **kw):
    pipe = VLMPipeline.load(path, kv_owner="packed", prefill_chunk=chunk, **{**KV, **kw})
    out = pipe.generate(random_image(), QUESTION, max_new_tokens=new, keep_logits=True, ignore_eos=True)
    return pipe, out


def _same(pipe, out, ref_pipe, ref, atol=ATOL):
    assert out.token_ids == ref.token_ids
    assert out.stats["kv_bytes"] == ref.stats["kv_bytes"]
    err = float(np.abs(pipe.last_first_logits - ref_pipe.last_first_logits).max())
    assert err <= atol, f"first-step logits differ by {err:.2e}"
    for mine, theirs in zip(out.logits, ref.logits, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=atol)


def _three_ways(path, chunk=7):
    for kw, atol in ((FP16, ATOL), (KV, ATOL_FLIP)):
        one_pipe, one = _run(path, 0, **kw)
        graph_pipe, graph = _run(path, chunk, prefix_attention="graph", **kw)
        op_pipe, op = _run(path, chunk, prefix_attention="op", prefill_order="layer", **kw)
        _same(op_pipe, op, one_pipe, one, atol)
        _same(op_pipe, op, graph_pipe, graph, atol)
        info, ginfo = op_pipe.info()["engine"], graph_pipe.info()["engine"]
        eng = op_pipe.engine
        prefilled = one.stats["prompt_tokens"] - (kw["kv"] != "fp16")  # compressed last token: not prefilled
        assert info["prefill_chunked"] and info["prefix_attention"] == "op"
        assert info["prefix_attention_kernel"] == prefix.path()[0]
        # the kernel runs on every chunk but the first (no past: the graph's SDPA output is already exact)
        assert info["prefix_attention_op_calls"] == eng.num_layers * (-(-prefilled // chunk) - 1)
        assert ginfo["prefix_attention"] == "graph" and ginfo["prefix_attention_op_calls"] == 0
        assert ginfo["prefix_attention_kernel"].startswith("openvino")
        # the op prefix's layer-major order (one layer's buffer at a time; given: the default's packed_order
        # runs chunk-major on prompts this small), the graph prefix's default chunk-major
        assert info["prefill_order"] == "layer" and ginfo["prefill_order"] == "chunk"
        assert info["prefill_buffer_bytes"] * eng.num_layers == ginfo["prefill_buffer_bytes"] > 0


def test_op_side_prefix_answers_as_graph_side_and_one_call(exported):
    _three_ways(exported("tiny-llava", "openvino", 16, "fp32", stateful=True))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny-llava-next", "tiny-qwen2-vl"])
def test_op_side_prefix_other_architectures(exported, arch):
    _three_ways(exported(arch, "openvino", 16, "fp32", stateful=True))


def test_op_side_prefix_with_first_token_fp(exported):
    path = exported("tiny-llava", "openvino", 16, "fp32", stateful=True)
    kw = dict(kv="uniform", k_bits=4, v_bits=2, first_token="fp")
    _same(*_run(path, 13, prefix_attention="op", **kw), *_run(path, 0, **kw), ATOL_FLIP)


def test_a_kernel_that_ignores_the_buffer_fails(exported, monkeypatch):
    """The power of the comparison above: the op attending only to the chunk (past dropped) moves the logits
    by more than 10 x ATOL_FLIP."""
    path = exported("tiny-llava", "openvino", 16, "fp32", stateful=True)
    ref_pipe, ref = _run(path, 0, new=1)
    real = prefix.prefix_attention
    monkeypatch.setattr(prefix, "prefix_attention", lambda q, kp, vp, kn, vn, *a, **k: real(q, kp[:0], vp[:0], kn,
                                                                                              vn, *a, **k))
    pipe, out = _run(path, 16, new=1, prefix_attention="op")
    assert out.stats["prompt_tokens"] > 17
    assert np.abs(pipe.last_first_logits - ref_pipe.last_first_logits).max() > 10 * ATOL_FLIP


def test_default_and_fallback_are_named(exported):
    """Default: "op" where the native kernel is built; with the extension off, the default is "graph" (the
    numpy path costs ~3x the prefill's CPU) and an explicit "op" runs (and names) the portable kernel."""
    path = exported("tiny-llava", "openvino", 16, "fp32", stateful=True)
    ref_pipe, ref = _run(path, 0)
    if prefix.path()[0] == "native":
        pipe = VLMPipeline.load(path, kv_owner="packed", **KV)
        assert pipe.info()["engine"]["prefix_attention"] == "op"
        assert "native" in pipe.info()["engine"]["prefix_attention_reason"]
    with native.disabled("off for the test"):
        pipe = VLMPipeline.load(path, kv_owner="packed", **KV)
        info = pipe.info()["engine"]
        assert info["prefix_attention"] == "graph" and "off for the test" in info["prefix_attention_reason"]
        pipe, out = _run(path, 7, prefix_attention="op")
        info = pipe.info()["engine"]
        assert info["prefix_attention_kernel"] == "portable" and info["prefix_attention_op_calls"] > 0
        _same(pipe, out, ref_pipe, ref, ATOL_FLIP)


def test_bad_value(exported):
    path = exported("tiny-llava", "openvino", 16, "fp32", stateful=True)
    for bad in ("sdpa", 1, ""):
        with pytest.raises(InputError, match=r"^prefix_attention: expected graph or op, got") as e:
            VLMPipeline.load(path, kv_owner="packed", prefix_attention=bad, **KV)
        assert "\n" not in str(e.value)
