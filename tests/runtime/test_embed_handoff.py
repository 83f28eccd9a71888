"""The graph engines' embedding stage (``GraphEngine.start``, ``_OpenVINOGraphs._text_embeddings``): the prompt's
``inputs_embeds`` is the text-embeddings array itself with the image features written into it in place (no
second ``[T, hidden]`` array), and freeing the text-embeddings graph's prompt-sized output memory (``_shrink``:
a new request, one 1-token call) changes no value: the rows equal a plain run of the graph."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.runtime import VLMPipeline
from kvtool.runtime.preprocess import load_images, prepare_inputs
from tests.runtime.helpers import QUESTION, random_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def pipe(exported):
    return VLMPipeline.load(exported("tiny-llava", "openvino", 16, "fp32", stateful=True),
                            kv="g-KC128VT128", k_bits=2, v_bits=2)


def _plain_rows(eng, ids):
    """The text-embeddings graph on ``ids`` through a request of its own (no shrink): [1, T, hidden]."""
    g = eng.manifest.graphs["text_embeddings"]
    req = eng.requests["text_embeddings"].get_compiled_model().create_infer_request()
    return req.infer({g.inputs[0]: ids}, share_outputs=False)[0]


def test_start_writes_features_into_the_text_embeddings(pipe):
    eng = pipe.engine
    prepared = prepare_inputs(pipe.processor, load_images(random_image(3)), QUESTION, pipe.conversation)
    ids = prepared.input_ids
    seen = []
    orig = eng._text_embeddings

    def record(x):
        seen.append(orig(x))
        return seen[-1]

    eng._text_embeddings = record
    try:
        eng.start(prepared, 4)
    finally:
        del eng._text_embeddings
    assert len(seen) == 1 and eng.embeds is seen[0]  # the one array: features written in place, no copy
    mask = ids[0] == eng.image_token_id
    assert mask.any() and (~mask).any()
    feats = eng._image_features(prepared)
    np.testing.assert_array_equal(eng.embeds[0, mask], feats.astype(eng.embeds.dtype))
    np.testing.assert_array_equal(eng.embeds[0, ~mask], _plain_rows(eng, ids)[0, ~mask])


def test_shrink_changes_no_value(pipe):
    """After a prompt's call the request is a new one (the old one's [1, T, hidden] output memory dropped); the
    prompt's rows and a later single token's row are what the graph gives on its own."""
    eng = pipe.engine
    ids = np.array([[1, 5, 9, 300, 7, 5]], dtype=np.int64)
    before = eng.requests["text_embeddings"]
    rows = eng._text_embeddings(ids)
    assert eng.requests["text_embeddings"] is not before
    np.testing.assert_array_equal(rows, _plain_rows(eng, ids))
    one = eng._text_embeddings(ids[:, 3:4])
    np.testing.assert_array_equal(one[0, 0], rows[0, 3])
    assert eng.requests["text_embeddings"] is not before


def test_drop_rows_frees_only_whole_pages_inside_the_rows():
    """``ov_layers.drop_rows``: the pages wholly inside the rows read as zeros afterwards; every byte outside the
    rows, and inside them on a page shared with an outside row, is unchanged."""
    import mmap

    from kvtool.runtime.engines.ov_layers import drop_rows

    rng = np.random.default_rng(0)
    a = rng.standard_normal((600, 1000)).astype(np.float32) + 10  # no zeros; rows of 4000 bytes
    before = a.copy()
    got = drop_rows(a, 37, 420)
    assert got > 0 and got % mmap.PAGESIZE == 0
    flat, flat0 = a.reshape(-1), before.reshape(-1)
    zero = flat == 0
    assert zero.sum() * 4 == got  # exactly the dropped bytes read as zeros
    idx = np.flatnonzero(zero)
    assert idx[0] >= 37 * 1000 and idx[-1] < 420 * 1000  # all inside the rows
    np.testing.assert_array_equal(flat[~zero], flat0[~zero])
    assert drop_rows(a, 5, 5) == 0 and drop_rows(a[:, :10], 0, 100) == 0  # empty range, not contiguous
