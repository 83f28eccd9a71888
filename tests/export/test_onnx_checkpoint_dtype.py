"""ONNX export of a 16-bit checkpoint: the same graphs, byte for byte, as exporting the same weights in fp32.

The exporter keeps an fp16/bf16 checkpoint in its own dtype and up-casts weights one tensor at a time as it
writes them (``kvtool/export/onnx_weights.py``); before, it loaded the whole model in fp32. Both must give
the same export: here an fp16 tiny LLaVA and an fp32 copy of exactly its values (what the fp32 load made)
are exported to int4 with fp16 storage, and every graph's initializers (packed MatMulNBits weights, scales,
zero points, the rest) and operators must be equal, and kvtool's greedy answer the same tokens.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from kvtool.manifest import Manifest


def _fp32_copy(src, dst):
    """The fp16 checkpoint ``src`` with every floating-point tensor stored as fp32 (the same values)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    for c in (cfg, cfg.get("text_config") or {}, cfg.get("vision_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if key in c:
                c[key] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _graph(path):
    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return inits, [n.op_type for n in m.graph.node]


@pytest.mark.slow
def test_fp16_checkpoint_exports_the_same_int4_graphs_as_its_fp32_copy(tmp_path):
    from PIL import Image

    from kvtool.export import ExportConfig, export_model
    from kvtool.models import make_tiny_model
    from kvtool.runtime.pipeline import VLMPipeline

    ck16 = make_tiny_model("tiny-llava", tmp_path / "ck16", dtype="float16")
    ck32 = _fp32_copy(ck16, tmp_path / "ck32")
    outs = {}
    for name, ck in (("fp16", ck16), ("fp32", ck32)):
        outs[name] = tmp_path / f"out-{name}"
        export_model(ExportConfig(model=str(ck), output=str(outs[name]), backend="onnx", wbits=4, dtype="fp16"))
    m16, m32 = Manifest.load(outs["fp16"]), Manifest.load(outs["fp32"])
    assert set(m16.graphs) == set(m32.graphs) and m16.lm == m32.lm
    for role, g in m16.graphs.items():
        assert g.inputs == m32.graphs[role].inputs and g.outputs == m32.graphs[role].outputs, role
        (i16, ops16), (i32, ops32) = _graph(outs["fp16"] / g.file), _graph(outs["fp32"] / g.file)
        assert ops16 == ops32, role
        assert sorted(i16) == sorted(i32), role
        for k, v in i16.items():
            assert v.dtype == i32[k].dtype and np.array_equal(v, i32[k]), (role, k)
    nbits = sum(op == "MatMulNBits" for op in _graph(outs["fp16"] / m16.graphs["language_model"].file)[1])
    assert nbits >= 7 * m16.lm.num_layers
    image = Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype("uint8"))
    question = "What is the color of the shape?"
    answers = [VLMPipeline.load(outs[n], backend="onnxruntime").generate(image, question, max_new_tokens=8,
                                                                          ignore_eos=True).token_ids
               for n in ("fp16", "fp32")]
    assert answers[0] == answers[1] and len(answers[0]) == 8
