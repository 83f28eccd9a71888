"""What ``kv_work_bytes`` counts in simulate mode, on the engines that run it (the paged OpenVINO engine, the
torch engine): the dense re-quantized cache the run really holds (plus the paged engine's blocks), while
``kv_bytes`` is what packed storage would hold — the same figure on both engines. ``run --json`` says so."""

import numpy as np
from PIL import Image

from kvtool.runtime.kv_cache import simulated_nbytes
from kvtool.runtime.pipeline import VLMPipeline

IMG = Image.fromarray((np.random.default_rng(0).random((48, 48, 3)) * 255).astype("uint8"))


def _run(path, backend):
    pipe = VLMPipeline.load(path, backend=backend, kv="g-KC128VT128", k_bits=2, v_bits=2, kv_mode="simulate")
    out = pipe.generate(IMG, "What shape?", max_new_tokens=4, ignore_eos=True)
    return pipe, out.stats


def _held_tokens(pipe, st):
    return st["prompt_tokens"] + st["new_tokens"] - 1  # the last token is chosen, never appended


def test_torch_simulate_work_is_the_dense_cache(tiny_model):
    pipe, st = _run(tiny_model("tiny-llava"), "torch")
    e, n = pipe.engine, _held_tokens(pipe, st)
    assert st["kv_bytes"] == simulated_nbytes(pipe.spec, e.num_layers, e.num_kv_heads, e.head_dim, n)
    dense = 2 * e.num_layers * e.num_kv_heads * e.head_dim * n * 4  # K and V, float32 (the model's dtype)
    assert dense <= st["kv_work_bytes"] <= 2 * dense + 2 * e.num_layers * e.num_kv_heads * e.head_dim * 4 * 256
    assert "dense re-quantized cache" in pipe.info()["engine"]["kv_work"]


def test_paged_simulate_work_is_blocks_plus_dense_buffers(exported, tiny_model):
    out = exported("tiny-llava", "openvino", 16, "fp32")
    pipe, st = _run(out, "openvino")
    e, n = pipe.engine, _held_tokens(pipe, st)
    assert type(e).__name__ == "OpenVINOPagedEngine"
    # kv_bytes: the packed figure, as on the torch engine (it was the dense cache before)
    assert st["kv_bytes"] == simulated_nbytes(pipe.spec, e.num_layers, e.num_kv_heads, e.head_dim, n)
    assert st["kv_bytes"] < st["kv_fp16_bytes"]
    item = np.dtype(e.kv_dtype).itemsize
    buffers = 2 * e.num_layers * e.kv._cap * e.num_kv_heads * e.head_dim * item  # hand count: K, V per layer
    assert e.kv._cap >= n
    blocks = st["kv_work_bytes"] - buffers
    blocks_per_layer_side = -(-n // e.block)  # ceil(n / block) blocks at least
    assert blocks >= 2 * e.num_layers * blocks_per_layer_side * e.block * e.num_kv_heads * e.head_dim * 2
    what = pipe.info()["engine"]["kv_work"]
    assert "PagedAttention's cache blocks" in what and "dense re-quantized cache" in what


def test_torch_and_graph_agree_on_simulate_kv_bytes(exported, tiny_model):
    mode = "simulate"
    figures = []
    for path, backend in ((tiny_model("tiny-llava"), "torch"), (exported("tiny-llava", "openvino", 16, "fp32"),
                                                                 "openvino")):
        pipe = VLMPipeline.load(path, backend=backend, kv="g-KC128VT128", k_bits=2, v_bits=2, kv_mode=mode)
        st = pipe.generate(IMG, "What shape?", max_new_tokens=4, ignore_eos=True).stats
        figures.append((_held_tokens(pipe, st), st["kv_bytes"]))
    assert figures[0] == figures[1]


def test_run_text_says_simulate_bytes_are_theory(exported, tmp_path):
    from click.testing import CliRunner

    from kvtool.cli import main

    IMG.save(tmp_path / "i.png")
    r = CliRunner().invoke(main, ["run", str(exported("tiny-llava", "openvino", 16, "fp32")), "--image",
                                  str(tmp_path / "i.png"), "--prompt", "What?", "--kv", "g-KC128VT128", "--kv-bits",
                                  "2", "--kv-mode", "simulate", "--max-new-tokens", "2"])
    assert r.exit_code == 0, r.output
    assert "as packed storage would hold it (simulate holds K/V dense: kv_work" in r.stdout
    assert "codes + group params" not in r.stdout
