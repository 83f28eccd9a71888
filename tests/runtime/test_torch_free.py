"""The runtime-only install: ``kvtool run`` / ``kvtool eval`` of an exported dir with torch unimportable give the
answers they give with torch; the runtime's processor equals transformers' processor call on every tiny
architecture; the numpy ports of transformers' vision-layout rules (LLaVA-NeXT packing, Qwen2-VL vision rotary
and mRoPE positions) equal transformers' functions on random inputs; nothing on the run/eval path imports torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.helpers import random_image

REPO = Path(__file__).resolve().parents[2]
ARCHS = ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"]

# torch, torchvision absent as on a runtime-only install: the path finder no longer finds them, so
# ``importlib.util.find_spec("torch")`` is None (transformers sees no torch) and ``import torch`` fails.
NO_TORCH = """
import importlib.util, sys
from importlib.machinery import PathFinder
class _NoTorch(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "torchaudio"):
            return None
        return PathFinder.find_spec(name, path, target)
sys.meta_path[:] = [_NoTorch if f is PathFinder else f for f in sys.meta_path]
assert importlib.util.find_spec("torch") is None
"""
RUN_CLI = NO_TORCH + """
from kvtool.cli import main
try:
    main()
finally:
    assert "torch" not in sys.modules, "torch was imported"
"""
RUNTIME_MODULES = ["kvtool.cli", "kvtool.runtime", "kvtool.runtime.pipeline", "kvtool.runtime.run",
                   "kvtool.runtime.preprocess", "kvtool.runtime.processing", "kvtool.runtime.vision_layout",
                   "kvtool.runtime.positions", "kvtool.runtime.kv_cache", "kvtool.runtime.engines",
                   "kvtool.runtime.engines.graph_base", "kvtool.runtime.engines.openvino_engine",
                   "kvtool.runtime.engines.openvino_state", "kvtool.runtime.engines.openvino_paged",
                   "kvtool.runtime.engines.openvino_packed",
                   "kvtool.runtime.engines.onnx_engine", "kvtool.evals", "kvtool.evals.runner",
                   "kvtool.evals.tasks", "kvtool.evals.taskspec", "kvtool.evals.loaders", "kvtool.evals.metrics", "kvtool.evals.judges",
                   "kvtool.evals.compare", "kvtool.evals.report", "kvtool.evals.shapes", "kvtool.devices",
                   "kvtool.manifest", "kvtool.quant_ops", "kvtool.quant_ops.attention", "kvtool.quant_ops.native", "transformers", "kvtool.versions"]


def _no_torch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", RUN_CLI, *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_run_path_imports_no_torch():
    # both ways: torch unimportable (each module imports), and with torch installed none of them loads it
    code = "import importlib, sys\nfor m in %r:\n    importlib.import_module(m)\n" % RUNTIME_MODULES
    code += "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if k.startswith('torch'))[:5]\n"
    for prefix in (NO_TORCH, ""):
        res = subprocess.run([sys.executable, "-c", prefix + code], cwd=REPO, capture_output=True, text=True,
                             env={**__import__("os").environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("name,backend", [("tiny-llava", "openvino"), ("tiny-qwen2-vl", "onnx"),
                                          pytest.param("tiny-llava-next", "openvino", marks=pytest.mark.slow)])
def test_run_without_torch_gives_the_same_answer(exported, tmp_path, name, backend):
    from kvtool.runtime.run import RunConfig, run_once

    out = exported(name, backend, 4 if backend == "openvino" and name == "tiny-llava" else 16,
                   "fp16" if backend == "openvino" and name == "tiny-llava" else "fp32")
    img = tmp_path / "img.png"
    random_image(3, (70, 110)).save(img)
    args = ["--kv", "g-KC128VT128", "--kv-bits", "2", "--max-new-tokens", "6"]
    res = _no_torch(["run", str(out), "--image", str(img), "--prompt", "What is this?", *args, "--json"], tmp_path)
    got = json.loads(res.stdout)
    ref = run_once(RunConfig(model=str(out), prompt="What is this?", images=[str(img)], kv="g-KC128VT128",
                             kv_bits=2, max_new_tokens=6))
    assert got["token_ids"] == ref["token_ids"] and got["text"] == ref["text"]
    assert got["stats"]["prompt_tokens"] == ref["stats"]["prompt_tokens"]


def test_eval_without_torch_gives_the_same_rows(exported, tmp_path):
    from kvtool.evals.runner import EvalConfig, read_predictions, run_eval

    out = exported("tiny-llava", "openvino", 4, "fp16")
    _no_torch(["eval", str(out), "--tasks", "shapes", "--limit", "2", "--max-new-tokens", "3", "-o",
               str(tmp_path / "no_torch")], tmp_path)
    run_eval(EvalConfig(model=str(out), output=str(tmp_path / "torch"), tasks=["shapes"], limit=2,
                        max_new_tokens=3, progress=False))
    a = read_predictions(tmp_path / "no_torch" / "shapes" / "predictions.jsonl")
    b = read_predictions(tmp_path / "torch" / "shapes" / "predictions.jsonl")
    assert len(a) == len(b) == 2
    assert [(r["id"], r["prediction"]) for r in a] == [(r["id"], r["prediction"]) for r in b]


# -- the processor ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHS)
def test_fast_processor_equals_the_processor_call(tiny_model, name):
    from kvtool.runtime.preprocess import build_prompt
    from kvtool.runtime.processing import FastProcessor, load_processor

    fp = load_processor(tiny_model(name))
    assert isinstance(fp, FastProcessor) and fp._kwargs is not None  # the fast path, not the fallback
    assert type(fp.image_processor).__name__.endswith("Pil")  # transformers' PIL backend, with or without torch
    sizes = [(70, 110), (130, 40), (48, 48), (31, 200)]
    for n in (1, 2):
        for i in range(len(sizes) - n + 1):
            ims = [random_image(i + j, sizes[i + j]) for j in range(n)]
            for question in ("What is this?", "Compare <image> with <image>." if n == 2 else "<image> What?"):
                prompt = build_prompt(fp, question, n)
                images = ims if n > 1 else ims[0]
                mine = fp(text=prompt, images=images, return_tensors="np")
                ref = fp.processor(text=prompt, images=images, return_tensors="np")
                assert sorted(mine) == sorted(ref)
                for k in ref:  # token ids exact, pixels bit-identical (the same image processor)
                    assert mine[k].dtype == ref[k].dtype and mine[k].shape == ref[k].shape, k
                    np.testing.assert_array_equal(mine[k], ref[k], err_msg=k)
    text = fp(text="Say hi.", return_tensors="np")
    ref = fp.processor(text="Say hi.", return_tensors="np")
    assert sorted(text) == sorted(ref) and all(np.array_equal(text[k], ref[k]) for k in ref)


def test_pil_processing_is_within_one_level_of_the_torchvision_one(tiny_model):
    # what switching the runtime to the PIL backend changes against transformers' default with torch installed
    from transformers import AutoProcessor

    from kvtool.runtime.processing import load_processor

    path = tiny_model("tiny-llava")
    img = random_image(5, (70, 110))
    a = load_processor(path).image_processor(img, return_tensors="np")["pixel_values"]
    b = AutoProcessor.from_pretrained(path).image_processor(img, return_tensors="np")["pixel_values"]
    std = min(load_processor(path).image_processor.image_std)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1.01 / 255 / std


# -- the numpy ports of transformers' layout rules ------------------------------------------------------------
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 config.json


def test_llava_next_packing_equals_transformers():
    import types

    import torch
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

    from kvtool.runtime.vision_layout import anyres_num_patches, pack_llava_next_features

    rng = np.random.default_rng(0)
    cfg = types.SimpleNamespace(image_grid_pinpoints=NEXT_PINPOINTS,
                                vision_config=types.SimpleNamespace(image_size=336, patch_size=14))
    sizes = np.array([[480, 640], [1000, 300], [336, 336], [250, 1200], [701, 699]])
    n_tiles = [anyres_num_patches(s, NEXT_PINPOINTS, 336) for s in sizes]
    assert n_tiles == [image_size_to_num_patches(s, NEXT_PINPOINTS, 336) for s in sizes]
    feats = [rng.standard_normal((n, 576, 8)).astype(np.float32) for n in n_tiles]
    newline = rng.standard_normal(8).astype(np.float32)
    for nl in (newline, None):
        mine = pack_llava_next_features(feats, sizes, NEXT_PINPOINTS, 336, 14, nl)
        ref, _ = LlavaNextModel.pack_image_features(
            types.SimpleNamespace(config=cfg), [torch.from_numpy(f) for f in feats], torch.from_numpy(sizes),
            vision_feature_select_strategy="default", image_newline=None if nl is None else torch.from_numpy(nl))
        np.testing.assert_array_equal(mine, torch.cat(list(ref), dim=0).numpy())


def test_llava_next_packing_equals_the_tiny_models_own(tiny_model):
    """The same rule on the tiny LLaVA-NeXT checkpoint's own config (its pinpoints, 48-px tiles, 4-px patches) and
    its loaded ``LlavaNextModel`` as ``self`` (no stand-in), with the model's learned ``image_newline``."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from kvtool.runtime.vision_layout import anyres_num_patches, pack_llava_next_features

    model = LlavaNextForConditionalGeneration.from_pretrained(str(tiny_model("tiny-llava-next"))).eval()
    cfg = model.config
    tile, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    newline = model.model.image_newline.detach()
    rng = np.random.default_rng(3)
    sizes = np.array([[70, 110], [48, 48], [130, 40], [97, 96]])
    n_tiles = [anyres_num_patches(s, cfg.image_grid_pinpoints, tile) for s in sizes]
    hidden = cfg.text_config.hidden_size
    feats = [rng.standard_normal((n, (tile // patch) ** 2, hidden)).astype(np.float32) for n in n_tiles]
    mine = pack_llava_next_features(feats, sizes, cfg.image_grid_pinpoints, tile, patch, newline.numpy())
    with torch.no_grad():
        ref, lens = model.model.pack_image_features([torch.from_numpy(f) for f in feats], torch.from_numpy(sizes),
                                                    vision_feature_select_strategy="default", image_newline=newline)
    ref = torch.cat(list(ref), dim=0).numpy() if isinstance(ref, (list, tuple)) else ref.numpy()
    assert mine.shape == ref.shape and mine.shape[0] == int(sum(lens))
    np.testing.assert_array_equal(mine, ref)


def test_qwen2_vl_vision_rotary_equals_transformers():
    import types

    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VisionTransformerPretrainedModel,
        VisionRotaryEmbedding,
    )

    from kvtool.runtime.vision_layout import qwen2_vl_vision_rotary

    grid = np.array([[1, 8, 12], [1, 36, 22], [2, 4, 4]])
    for head_dim in (80, 16):  # Qwen2-VL's vision heads (1280 / 16), the tiny model's
        stand_in = types.SimpleNamespace(spatial_merge_size=2, rotary_pos_emb=VisionRotaryEmbedding(head_dim // 2))
        ref = Qwen2VisionTransformerPretrainedModel.rot_pos_emb(stand_in, torch.from_numpy(grid)).numpy()
        mine = qwen2_vl_vision_rotary(grid, head_dim, 2)
        assert mine.dtype == np.float32 and mine.shape == ref.shape
        np.testing.assert_allclose(mine, ref, rtol=1e-6, atol=1e-6)


def test_mrope_positions_equal_transformers_get_rope_index():
    import functools
    import types

    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    from kvtool.runtime.positions import mrope_positions

    config = types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=2))
    rng = np.random.default_rng(1)
    for grid in (np.array([[1, 8, 12]]), np.array([[1, 4, 6], [1, 10, 2]]), np.array([[1, 2, 2], [1, 6, 4]])):
        pieces, types_ = [], []
        for g in grid:
            n_text = int(rng.integers(1, 9))
            pieces += [rng.integers(10, 100, n_text), np.full(int(np.prod(g)) // 4, 5)]
            types_ += [np.zeros(n_text, np.int64), np.ones(int(np.prod(g)) // 4, np.int64)]
        pieces.append(rng.integers(10, 100, 3))
        types_.append(np.zeros(3, np.int64))
        ids, mm = np.concatenate(pieces)[None], np.concatenate(types_)[None]
        pos, delta = mrope_positions(config, ids, mm, grid)
        stand_in = types.SimpleNamespace(config=config)
        stand_in.get_vision_position_ids = functools.partial(Qwen2VLModel.get_vision_position_ids, stand_in)
        ref, ref_delta = Qwen2VLModel.get_rope_index(stand_in, torch.from_numpy(ids), torch.from_numpy(mm),
                                                     image_grid_thw=torch.from_numpy(grid),
                                                     attention_mask=torch.ones(ids.shape, dtype=torch.long))
        np.testing.assert_array_equal(pos, ref.numpy())
        assert delta == int(ref_delta.reshape(-1)[0])


def test_full_only_command_says_which_install_it_needs(tmp_path):
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", RUN_CLI, "models", "make", "tiny-llava", str(tmp_path / "m")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert 'pip install "kvtool[full]"' in res.stderr and "'torch'" in res.stderr
    assert "Traceback" not in res.stderr
