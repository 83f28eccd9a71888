"""ONNX export: torch.onnx (dynamo) graphs match PyTorch in onnxruntime; int4 becomes MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from kvtool.manifest import Manifest
from tests.export.lm_parity import compare_lm, greedy_agreement


@pytest.mark.parametrize("name", ["tiny-llava", pytest.param("tiny-llava-next", marks=pytest.mark.slow),
                                  pytest.param("tiny-qwen2-vl", marks=pytest.mark.slow)])
def test_fp32_prefill_and_decode_match_pytorch(name, exported, tiny_model, torch_model):
    out = exported(name, "onnx", 16, "fp32")
    if name == "tiny-llava-next":  # the runtime packs tiles with the newline embedding from config.json
        import json

        nl = json.loads((out / "config.json").read_text())["image_newline"]
        assert np.allclose(nl, torch_model(name).model.image_newline.detach().numpy())
    d = compare_lm(out, torch_model(name), tiny_model(name), steps=3)
    assert d["steps"] == 4 and d["agree"] == 4
    assert d["logits"] <= 1e-4, d
    assert d["kv"] <= 1e-4, d


def test_same_graph_roles_and_names_as_openvino(exported):
    on = Manifest.load(exported("tiny-llava", "onnx", 16, "fp32"))
    ov = Manifest.load(exported("tiny-llava", "openvino", 16, "fp32", stateful=False))
    assert on.backend == "onnx" and set(on.graphs) == set(ov.graphs)
    for role in on.graphs:
        assert set(on.graphs[role].inputs) == set(ov.graphs[role].inputs), role
        assert set(on.graphs[role].outputs) == set(ov.graphs[role].outputs), role
    assert on.lm == ov.lm


@pytest.mark.slow
def test_int4_is_matmulnbits_and_3x_smaller(exported, torch_model, record_property, capsys):
    w16 = exported("tiny-llava", "onnx", 16, "fp16")
    w4 = exported("tiny-llava", "onnx", 4, "fp16")
    m = Manifest.load(w4)
    assert (m.weights.bits, m.weights.group_size, m.weights.method) == (4, 128, "rtn")
    g = onnx.load(str(w4 / m.graphs["language_model"].file), load_external_data=False)
    nbits = [n for n in g.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) >= 7 * m.lm.num_layers
    assert all({a.name: a.i for a in n.attribute}["bits"] == 4 and {a.name: a.i for a in n.attribute}["block_size"] == 128
               for n in nbits)
    assert not [n for n in g.graph.node if n.op_type == "MatMul" and n.input[1] in {i.name for i in g.graph.initializer}]
    data = m.graphs["language_model"].file + ".data"
    b16, b4 = (w16 / data).stat().st_size, (w4 / data).stat().st_size
    assert b16 / b4 >= 3.0, (b16, b4)
    agree = greedy_agreement(w4, torch_model("tiny-llava"), n_prompts=32)
    record_property("onnx_int4_greedy_agreement", agree)
    with capsys.disabled():
        print(f"\n[export] onnx int4 g128 (MatMulNBits rtn): LM weights {b16}->{b4} bytes ({b16 / b4:.2f}x); "
              f"greedy next-token agreement with PyTorch on 32 random prompts: {agree:.0%}")
    assert agree >= 0.5


@pytest.mark.slow
def test_int4_hqq(exported, torch_model):
    out = exported("tiny-llava", "onnx", 4, "fp16", onnx_quant="hqq")
    m = Manifest.load(out)
    assert m.weights.method == "hqq"
    g = onnx.load(str(out / m.graphs["language_model"].file), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in g.graph.node) >= 7 * m.lm.num_layers
    assert greedy_agreement(out, torch_model("tiny-llava"), n_prompts=16) >= 0.5
