"""OpenVINO export: stateless graphs (--stateless) match PyTorch (fp32) with last-position logits, manifest is
exact, int4/int8 weights are real."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.manifest import Manifest
from tests.export.lm_parity import compare_lm, graph_runner, greedy_agreement, sample_prompt


@pytest.mark.parametrize("name", ["tiny-llava", pytest.param("tiny-llava-next", marks=pytest.mark.slow), "tiny-qwen2-vl"])
def test_fp32_prefill_and_decode_match_pytorch(name, exported, tiny_model, torch_model):
    out = exported(name, "openvino", 16, "fp32", stateful=False)
    m = Manifest.load(out)
    if name == "tiny-qwen2-vl":  # 3-D mRoPE positions and the vision merger graph
        assert "vision_embeddings_merger" in m.graphs and m.architecture == "qwen2_vl"
    d = compare_lm(out, torch_model(name), tiny_model(name), steps=3)
    assert d["steps"] == 4 and d["agree"] == 4
    assert d["logits"] <= 1e-4, d
    assert d["kv"] <= 1e-4, d


def test_manifest_records_graph_names_and_kv_geometry(exported, torch_model):
    import openvino as ov

    out = exported("tiny-llava", "openvino", 16, "fp32", stateful=False)
    m = Manifest.load(out)
    tc = torch_model("tiny-llava").config.get_text_config()
    assert m.architecture == "llava" and m.backend == "openvino" and m.dtype == "fp32" and not m.stateful
    assert set(m.graphs) == {"language_model", "text_embeddings", "vision_embeddings"}
    assert m.lm.num_layers == tc.num_hidden_layers and m.lm.num_kv_heads == tc.num_key_value_heads
    assert m.weights.bits == 16 and m.weights.method == "none" and len(m.source["sha256"]) == 64
    lm = m.graphs["language_model"]
    expect_in = {"inputs_embeds", "attention_mask", "position_ids"} | {
        f"past_key_values.{i}.{k}" for i in range(m.lm.num_layers) for k in ("key", "value")}
    assert set(lm.inputs) == expect_in
    assert set(lm.outputs) == {"logits"} | {f"present.{i}.{k}" for i in range(m.lm.num_layers) for k in ("key", "value")}
    ir = ov.Core().read_model(out / lm.file)
    shape = ir.input("past_key_values.0.key").get_partial_shape()
    assert shape[1].get_length() == m.lm.num_kv_heads and shape[3].get_length() == m.lm.head_dim
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(out)  # the runtime builds its processor from the export dir


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_vision_and_text_embedding_graphs_match_pytorch(backend, exported, tiny_model, torch_model):
    import torch

    name = "tiny-llava"
    out, model = exported(name, backend, 16, "fp32", stateful=False), torch_model(name)
    m = Manifest.load(out)
    inputs = sample_prompt(tiny_model(name))
    vis = graph_runner(out, "vision_embeddings")({"pixel_values": inputs["pixel_values"].numpy()})
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=inputs["pixel_values"])
        ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
        ref = torch.cat(list(ref)) if isinstance(ref, (list, tuple)) else ref
        emb_ref = model.get_input_embeddings()(inputs["input_ids"]).numpy()
    got = vis[m.graphs["vision_embeddings"].outputs[0]]
    assert np.abs(got.reshape(ref.shape) - ref.numpy()).max() <= 1e-4
    te = graph_runner(out, "text_embeddings")({m.graphs["text_embeddings"].inputs[0]: inputs["input_ids"].numpy()})
    assert np.abs(te[m.graphs["text_embeddings"].outputs[0]] - emb_ref).max() <= 1e-5


def _lm_constants(path, min_elements: int = 4096):
    """Element type -> number of weight-sized constants (>= min_elements values) in an IR."""
    import openvino as ov

    counts: dict[str, int] = {}
    for op in ov.Core().read_model(path).get_ops():
        if op.get_type_name() == "Constant" and int(np.prod(op.get_output_shape(0))) >= min_elements:
            et = op.get_element_type().get_type_name()
            counts[et] = counts.get(et, 0) + 1
    return counts


def test_int4_weights_are_u4_and_3x_smaller(exported, torch_model, record_property, capsys):
    w16 = exported("tiny-llava", "openvino", 16, "fp16")
    w4 = exported("tiny-llava", "openvino", 4, "fp16")
    m = Manifest.load(w4)
    assert (m.weights.bits, m.weights.group_size, m.weights.method, m.weights.storage) == (4, 128, "rtn", "packed")
    lm_file = m.graphs["language_model"].file
    counts = _lm_constants(w4 / lm_file)
    # one int4 weight per LM linear layer (7 per decoder layer); lm_head stays int8 (NNCF's backup mode)
    assert counts.get("u4", 0) >= 7 * m.lm.num_layers, counts
    assert not {"f32", "f16"} & set(counts), counts  # no weight left in float
    b16 = (w16 / lm_file).with_suffix(".bin").stat().st_size
    b4 = (w4 / lm_file).with_suffix(".bin").stat().st_size
    assert b16 / b4 >= 3.0, (b16, b4)
    for role in ("text_embeddings", "vision_embeddings"):
        assert _lm_constants(w4 / m.graphs[role].file).get("u8", 0) > 0, role
    agree = greedy_agreement(w4, torch_model("tiny-llava"), n_prompts=32)
    record_property("int4_greedy_agreement", agree)
    with capsys.disabled():
        print(f"\n[export] openvino int4 g128: LM weights {b16}->{b4} bytes ({b16 / b4:.2f}x); "
              f"greedy next-token agreement with PyTorch on 32 random prompts: {agree:.0%}")
    assert agree >= 0.5


@pytest.mark.slow
def test_int8_weights_are_8bit_per_channel(exported):
    w8 = exported("tiny-llava", "openvino", 8, "fp16")
    m = Manifest.load(w8)
    assert (m.weights.bits, m.weights.group_size, m.weights.method) == (8, None, "rtn")
    counts = _lm_constants(w8 / m.graphs["language_model"].file)
    assert counts.get("u8", 0) >= 7 * m.lm.num_layers + 1 and "u4" not in counts, counts


@pytest.mark.parametrize("backend", ["openvino", pytest.param("onnx", marks=pytest.mark.slow)])
def test_qwen2_vl_vision_graphs_match_pytorch(backend, exported, tiny_model, torch_model):
    """Patch embedding + merger graphs, fed the rotary table and block-diagonal mask the runtime builds."""
    import torch

    name = "tiny-qwen2-vl"
    out, model = exported(name, backend, 16, "fp32", stateful=False), torch_model(name)
    m = Manifest.load(out)
    inputs = sample_prompt(tiny_model(name))
    pv, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    visual = model.model.visual
    with torch.no_grad():
        ref = visual(pv, grid_thw=grid).pooler_output.numpy()
        rot = visual.rot_pos_emb(grid).numpy()
    hidden = graph_runner(out, "vision_embeddings")({m.graphs["vision_embeddings"].inputs[0]: pv.numpy()})
    hidden = hidden[m.graphs["vision_embeddings"].outputs[0]]
    n = hidden.shape[0]
    mask = np.full((1, n, n), -np.inf, np.float32)
    sizes = (grid[:, 0] * grid[:, 1] * grid[:, 2]).tolist()
    for a, b in zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes), strict=True):
        mask[0, a:b, a:b] = 0.0
    merged = graph_runner(out, "vision_embeddings_merger")(
        {"hidden_states": hidden, "attention_mask": mask, "rotary_pos_emb": rot.astype(np.float32)})
    got = merged[m.graphs["vision_embeddings_merger"].outputs[0]]
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4
