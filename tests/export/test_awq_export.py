"""AWQ and simulated 3-bit exports on small local calibration sets; the stateful export in optimum-intel."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvtool.manifest import Manifest
from tests.export.lm_parity import sample_prompt


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    with open(d / "text.jsonl", "w") as fh:
        for i in range(6):
            fh.write(json.dumps({"text": f"Describe the image in detail. There are {i} red circles and a blue square."}) + "\n")
    with open(d / "iq.jsonl", "w") as fh:
        for i in range(3):
            Image.fromarray((rng.random((40, 52, 3)) * 255).astype("uint8")).save(d / f"im{i}.png")
            fh.write(json.dumps({"image": f"im{i}.png", "question": "What shape is it?"}) + "\n")
    return d


def _float_weights(path, min_elements=4096):
    import openvino as ov

    out = []
    for op in ov.Core().read_model(path).get_ops():
        if op.get_type_name() == "Constant" and int(np.prod(op.get_output_shape(0))) >= min_elements:
            out.append((op.get_element_type().get_type_name(), op.get_data()))
    return out


def test_awq_3bit_simulated_export(exported, tiny_model, calib):
    out = exported("tiny-llava", "openvino", 3, "fp16", awq=True, calibration=str(calib / "text.jsonl"),
                   num_samples=4, group_size=32)
    m = Manifest.load(out)
    w = m.weights
    assert (w.bits, w.group_size, w.method, w.storage) == (3, 32, "awq", "simulated")
    assert w.calibration == {"source": str(calib / "text.jsonl"), "kind": "text", "num_samples": 4}
    weights = _float_weights(out / m.graphs["language_model"].file)
    assert {t for t, _ in weights} == {"f16"}  # stored dequantized: no integer weights in the LM
    # decoder linears: every group of 32 input channels holds at most 2^3 distinct values
    # (7 per layer; the lm_head, not quantized, is the one with more)
    three_bit = 0
    for _, data in weights:
        if data.ndim == 2 and data.shape[1] % 32 == 0:
            groups = data.reshape(data.shape[0], -1, 32)
            if max(len(np.unique(groups[r, g])) for r in range(0, groups.shape[0], 7) for g in range(groups.shape[1])) <= 8:
                three_bit += 1
    assert three_bit >= 7 * m.lm.num_layers, three_bit


@pytest.mark.slow
def test_awq_scale_estimation_on_image_questions(exported, calib):
    out = exported("tiny-llava", "openvino", 4, "fp16", awq=True, scale_estimation=True,
                   calibration=str(calib / "iq.jsonl"))
    w = Manifest.load(out).weights
    assert (w.method, w.calibration["kind"], w.calibration["num_samples"]) == ("awq+se", "image-question", 3)


@pytest.mark.slow
def test_onnx_awq_export(exported, calib):
    out = exported("tiny-llava", "onnx", 4, "fp16", awq=True, calibration=str(calib / "iq.jsonl"))
    w = Manifest.load(out).weights
    assert (w.method, w.storage, w.calibration["kind"]) == ("awq", "packed", "image-question")


def test_image_question_calibration_puts_image_tokens_in_lm_inputs(tiny_model, calib):
    from transformers import AutoProcessor

    from kvtool.export.calibration import lm_inputs, load_calibration
    from kvtool.export.source import load_torch_model

    path = tiny_model("tiny-llava")
    model = load_torch_model(path)
    cal = load_calibration(str(calib / "iq.jsonl"), 2)
    samples = lm_inputs(model, AutoProcessor.from_pretrained(path), cal)
    assert cal.kind == "image-question" and len(samples) == 2
    emb = samples[0]["inputs_embeds"]
    assert emb.shape[1] > 128 and samples[0]["position_ids"].shape == (1, emb.shape[1])
    # image rows carry the projector's features, not the image token's embedding
    img_id = model.config.image_token_id
    tok = model.get_input_embeddings().weight[img_id].detach().numpy()
    assert np.abs(emb[0] - tok).max(axis=-1).min() > 1e-3


def test_stateful_export_generates_in_optimum_intel(exported, tiny_model):
    import torch
    from optimum.intel import OVModelForVisualCausalLM

    from kvtool.export.source import load_torch_model

    out = exported("tiny-llava", "openvino", 16, "fp32", stateful=True)
    m = Manifest.load(out)
    assert m.stateful and not any(n.startswith("past_key_values") for n in m.graphs["language_model"].inputs)
    inputs = sample_prompt(tiny_model("tiny-llava"))
    # optimum-intel picks its "new processing" path only when config.image_seq_length equals the prompt's
    # image tokens; the tiny checkpoint leaves LLaVA's default (576), so set the real count here.
    cfg = json.loads((out / "config.json").read_text())
    cfg["image_seq_length"] = int((inputs["input_ids"] == cfg["image_token_index"]).sum())
    (out / "config.json").write_text(json.dumps(cfg))
    ov_model = OVModelForVisualCausalLM.from_pretrained(out, device="CPU", ov_config={"INFERENCE_PRECISION_HINT": "f32"})
    got = ov_model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        ref = load_torch_model(tiny_model("tiny-llava")).generate(**inputs, max_new_tokens=4, do_sample=False)
    assert got.shape == ref.shape
    assert torch.equal(got[0, -4:], ref[0, -4:])


def test_eval_task_calibration_offline(tiny_model):
    from transformers import AutoProcessor

    from kvtool.errors import InputError
    from kvtool.export.calibration import lm_inputs, load_calibration
    from kvtool.export.source import load_torch_model

    cal = load_calibration("shapes", 2)
    assert cal.kind == "image-question" and len(cal.rows) == 2 and cal.source.startswith("task:shapes")
    path = tiny_model("tiny-llava")
    samples = lm_inputs(load_torch_model(path), AutoProcessor.from_pretrained(path), cal)
    assert len(samples) == 2 and samples[0]["inputs_embeds"].shape[1] > 128
    with pytest.raises(InputError, match="local copy"):
        load_calibration("pope", 2)  # a hub task without a local copy is refused, never downloaded


@pytest.mark.slow
def test_openvino_data_free_awq(exported):
    w = Manifest.load(exported("tiny-llava", "openvino", 4, "fp16", awq=True)).weights
    assert (w.method, w.calibration) == ("awq", None)
