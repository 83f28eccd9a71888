"""The stateful OpenVINO engine's chunked prefill (issue 13: one graph call over a long prompt held ~800 MiB of
mask and activations; asked for with kv_owner="openvino", as fp16 on CPU LLaVA defaults to the paged engine, whose
chunks test_paged_fp16.py tests): the same greedy tokens and, within f16 rounding of the states, the same first-step
logits as one call; chunks that do not divide the prompt; bad chunk sizes refused; ov-u8 left in one call."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.errors import InputError
from kvtool.runtime import VLMPipeline
from tests.runtime.helpers import random_image


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_chunked_prefill_answers_as_one_call(exported, name):
    out = exported(name, "openvino", 16, "fp32")
    img = random_image(2, (70, 110))
    whole = VLMPipeline.load(out, kv="fp16", kv_owner="openvino", prefill_chunk=0)
    ref = whole.generate(img, "Describe the picture in detail, please.", max_new_tokens=8, ignore_eos=True)
    ref_logits = whole.last_first_logits
    n = ref.stats["prompt_tokens"]
    for chunk in (7, 64, n - 1, n + 5):  # ragged, several, one short of the prompt, more than the prompt
        pipe = VLMPipeline.load(out, kv="fp16", kv_owner="openvino", prefill_chunk=chunk)
        assert pipe.engine.info()["prefill_chunk"] == chunk
        got = pipe.generate(img, "Describe the picture in detail, please.", max_new_tokens=8, ignore_eos=True)
        assert got.token_ids == ref.token_ids, chunk
        # both read the past from f16 states; a chunk boundary only moves which keys/values are read back
        # rounded to f16 (relative error 2^-11) instead of as computed: logits agree to well under 1e-2
        np.testing.assert_allclose(pipe.last_first_logits, ref_logits, atol=1e-2 * max(1.0, np.abs(ref_logits).max()))
        assert got.stats["prompt_tokens"] == n


def test_prefill_chunk_defaults_and_bad_values(exported):
    from kvtool.runtime.engines.openvino_engine import PREFILL_CHUNK

    out = exported("tiny-llava", "openvino", 16, "fp32")
    assert VLMPipeline.load(out, kv="fp16", kv_owner="openvino").engine.info()["prefill_chunk"] == PREFILL_CHUNK
    assert VLMPipeline.load(out, kv="ov-u8").engine.info()["prefill_chunk"] == 0
    for bad in (-1, 2.5, "64", True):  # a bool is not a token count (one check for every engine)
        with pytest.raises(InputError, match="prefill_chunk"):
            VLMPipeline.load(out, kv="fp16", kv_owner="openvino", prefill_chunk=bad)
