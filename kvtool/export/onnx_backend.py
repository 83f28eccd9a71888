"""ONNX backend: ``torch.onnx.export`` (dynamo) of thin wrapper modules, weights through MatMulNBits.

No public exporter handles LLaVA-family models to ONNX (optimum has no LLaVA ONNX config), so kvtool wraps
the PyTorch submodules itself — written here by hand, mirroring the graph roles, input/output names and
``[B, H, N, D]`` KV layout of the OpenVINO export so that one runtime drives both:

* ``language_model``: ``inputs_embeds``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value``
  -> ``logits`` (last position only, [B, 1, V]), ``present.{i}.key|value`` (the past fills a transformers ``DynamicCache``; an empty past works);
* ``text_embeddings``: ``input`` (token ids) -> ``inputs_embeds``;
* ``vision_embeddings``: ``pixel_values`` [num_images_or_tiles, 3, H, W] -> ``last_hidden_state`` (vision tower
  feature layer, CLS dropped per the config's select strategy, projector applied; LLaVA-NeXT tile packing and
  newline tokens are left to the runtime, as with optimum-intel's graph).

The checkpoint stays in its own dtype: each graph is traced as an fp32 graph with placeholder weights and
the weights are up-cast and written one tensor at a time, then released (``onnx_weights``). Each small graph
is checked in onnxruntime against the wrapper on the export's example inputs (``CHECK_MAX_PARAMS``). int4/int8 weights of
the language model use onnxruntime's ``MatMulNBitsQuantizer`` (block size = group size; RTN by default, HQQ
as an option). fp16 storage converts initializers with onnxruntime's float16 converter keeping fp32 I/O.
For Qwen2-VL the LM takes 3-D mRoPE ``position_ids`` [3, B, T] and the vision side is two graphs as in
optimum-intel: ``vision_embeddings`` (patch embedding, ``hidden_states`` [N, C*T*P*P]) and
``vision_embeddings_merger`` (``hidden_states``, ``attention_mask`` [1, N, N], ``rotary_pos_emb``). This module
does not run generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvtool.export.config import ExportConfig
from kvtool.manifest import GraphInfo

ONNX_GRAPH_FILES = {
    "language_model": "language_model.onnx",
    "text_embeddings": "text_embeddings.onnx",
    "vision_embeddings": "vision_embeddings.onnx",
}


def _wrappers(model: Any):
    """torch modules for the three graphs (built lazily so torch is imported only when exporting)."""
    import torch
    from transformers import DynamicCache

    text_config = model.config.get_text_config()

    class LanguageModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = model.model.language_model
            self.head = model.lm_head

        def forward(self, inputs_embeds, attention_mask, position_ids, *past):
            # past: k0, v0, k1, v1, ...  each [B, H, P, D]
            cache = DynamicCache(config=text_config)
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
            hidden = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True).last_hidden_state
            present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            return (self.head(hidden[:, -1:]), *present)  # logits of the last position only: [B, 1, V]

    class TextEmbeddings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = model.get_input_embeddings()

        def forward(self, input):  # noqa: A002 - the graph input is named like optimum-intel's
            return self.embed(input)

    class VisionEmbeddings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = model.model.vision_tower
            self.projector = model.model.multi_modal_projector
            self.layer = model.config.vision_feature_layer
            self.select = model.config.vision_feature_select_strategy

        def forward(self, pixel_values):
            states = self.tower(pixel_values, output_hidden_states=True).hidden_states
            if isinstance(self.layer, int):
                feats = states[self.layer]
            else:
                feats = torch.cat([states[i] for i in self.layer], dim=-1)
            if self.select == "default":
                feats = feats[:, 1:]
            return self.projector(feats)

    vision = None if model.config.model_type == "qwen2_vl" else VisionEmbeddings()  # see _qwen2_vl_vision_wrappers
    return LanguageModel(), TextEmbeddings(), vision


def _qwen2_vl_vision_wrappers(model: Any):
    """Qwen2-VL's vision graphs as optimum-intel splits them: the patch embedding, then the ViT blocks and
    the 2x2 merger taking an additive block-diagonal ``attention_mask`` [1, N, N] (patches attend within
    their own image) and the ``rotary_pos_emb`` [N, head_dim/2] the runtime computes — because the model's
    own forward splits attention by ``cu_seqlens`` in Python, which a traced graph cannot keep dynamic."""
    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    visual = model.model.visual

    class PatchEmbed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = visual.patch_embed

        def forward(self, hidden_states):  # [N, C * T * P * P] -> [N, embed_dim]
            return self.patch_embed(hidden_states)

    class Merger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.merger = visual.blocks, visual.merger

        def forward(self, hidden_states, attention_mask, rotary_pos_emb):
            emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            h, n = hidden_states, hidden_states.shape[0]
            for blk in self.blocks:
                att = blk.attn
                # q, k, v: [N, heads, head_dim]
                q, k, v = att.qkv(blk.norm1(h)).reshape(n, 3, att.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
                q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, N, head_dim]
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask.unsqueeze(0))
                h = h + att.proj(o.squeeze(0).transpose(0, 1).reshape(n, -1))
                h = h + blk.mlp(blk.norm2(h))
            return self.merger(h)

    return PatchEmbed(), Merger()


# the export-time onnxruntime check runs the wrapper in PyTorch with fp32 weights and the graph in
# onnxruntime (two fp32 copies of the graph's weights): only for graphs up to this many parameters (the tiny
# models; tests/export's parity tests check every architecture's graphs), never at a real shape
CHECK_MAX_PARAMS = 32 << 20


def _export_one(module: Any, args: tuple, names_in: list[str], names_out: list[str], dynamic: dict,
                path: Path) -> set[str]:
    """Trace ``module`` as an fp32 graph with placeholder weights, then write the checkpoint's weights
    up-cast one at a time (``onnx_weights``); returns the parameter names the graph holds."""
    import torch

    from kvtool.export.onnx_weights import attach_real_weights, placeholder_weights, save_ir

    module.eval()
    with placeholder_weights(module) as real:
        prog = torch.onnx.export(module, args, dynamo=True, input_names=names_in, output_names=names_out,
                                 dynamic_shapes=dynamic, verbose=False, optimize=False)
    used = attach_real_weights(prog.model, real)
    prog.optimize()
    save_ir(prog.model, path)
    return used


def _check_in_ort(path: Path, module: Any, args: tuple, names_in: list[str], atol: float = 1e-4) -> None:
    """Run the saved graph in onnxruntime and compare with the wrapper (fp32 weights) on the example inputs;
    skipped above ``CHECK_MAX_PARAMS``."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from kvtool.export.onnx_weights import fp32_weights, param_count

    if param_count(module) > CHECK_MAX_PARAMS:
        return
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: a.numpy() for n, a in zip(names_in, args, strict=True)})
    del sess
    with torch.no_grad(), fp32_weights(module):
        ref = module(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for g, r in zip(got, ref, strict=True):
        err = float(np.abs(g - r.numpy()).max())
        if err > atol:
            raise RuntimeError(f"{path.name}: onnxruntime differs from PyTorch by {err:.2e} (> {atol})")


def _done(module: Any, used: set[str]) -> None:
    """Release the torch weights a written graph holds (``onnx_weights.release_weights``)."""
    from kvtool.export.onnx_weights import release_weights

    release_weights(module, used)


def export_graphs_fp32(model: Any, out: Path, progress: Any = None) -> dict[str, Path]:
    """Export the fp32 graphs of ``model`` (loaded in any float dtype: its weights are up-cast one tensor at
    a time as they are written) one graph at a time, verify the small ones in onnxruntime, and release each
    graph's torch weights once it is written; returns role -> path. ``model`` cannot run afterwards."""
    import torch

    lm_mod, te_mod, ve_mod = _wrappers(model)
    tc = model.config.get_text_config()
    layers = tc.num_hidden_layers
    kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    B, T, P = 1, 5, 3
    g = torch.Generator().manual_seed(0)
    past = [torch.randn(B, kv_heads, P, head_dim, generator=g) for _ in range(2 * layers)]
    mrope = model.config.model_type == "qwen2_vl"  # position_ids [3, B, T]
    pos = torch.arange(P, P + T)[None]
    args = (torch.randn(B, T, tc.hidden_size, generator=g), torch.ones(B, T + P, dtype=torch.int64),
            pos.expand(3, B, T).contiguous() if mrope else pos, *past)
    past_names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    names_in = ["inputs_embeds", "attention_mask", "position_ids", *past_names]
    names_out = ["logits", *[f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]]
    batch, seq, past_len, mask_len = (torch.export.Dim(n, max=m) for n, m in
                                      (("batch", 64), ("seq", 1 << 16), ("past", 1 << 17), ("mask", 1 << 17)))
    # *past is one varargs entry of the signature: its dynamic shapes are one nested tuple
    dyn: tuple = ({0: batch, 1: seq}, {0: batch, 1: mask_len}, {1: batch, 2: seq} if mrope else {0: batch, 1: seq},
                  tuple({0: batch, 2: past_len} for _ in past))
    paths = {role: out / name for role, name in ONNX_GRAPH_FILES.items()}
    if mrope:
        paths["vision_embeddings_merger"] = out / "vision_embeddings_merger.onnx"
    used = _export_one(lm_mod, args, names_in, names_out, dyn, paths["language_model"])
    _check_in_ort(paths["language_model"], lm_mod, args, names_in)
    pos0 = torch.arange(T)[None]
    empty = (args[0], torch.ones(B, T, dtype=torch.int64), pos0.expand(3, B, T).contiguous() if mrope else pos0,
             *[torch.zeros(B, kv_heads, 0, head_dim) for _ in past])
    _check_in_ort(paths["language_model"], lm_mod, empty, names_in)
    _done(lm_mod, used)
    if progress is not None:
        progress.update(1)
    ids = torch.randint(0, tc.vocab_size, (B, T), generator=g)
    used = _export_one(te_mod, (ids,), ["input"], ["inputs_embeds"], ({0: batch, 1: seq},), paths["text_embeddings"])
    _check_in_ort(paths["text_embeddings"], te_mod, (ids,), ["input"], atol=1e-6)
    _done(te_mod, used)
    vc = model.config.vision_config
    if mrope:
        _export_qwen2_vl_vision(model, paths, g)
        return paths
    pix = torch.randn(2, 3, vc.image_size, vc.image_size, generator=g)
    used = _export_one(ve_mod, (pix,), ["pixel_values"], ["last_hidden_state"],
                       ({0: torch.export.Dim("images", max=1024)},), paths["vision_embeddings"])
    _check_in_ort(paths["vision_embeddings"], ve_mod, (pix,), ["pixel_values"])
    _done(ve_mod, used)
    return paths


def _export_qwen2_vl_vision(model: Any, paths: dict[str, Path], g: Any) -> None:
    """Export and check Qwen2-VL's patch-embedding and merger graphs (two images of 4x4 patches)."""
    import torch

    vc = model.config.vision_config
    patch_mod, merger_mod = _qwen2_vl_vision_wrappers(model)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    flat = torch.randn(n, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, generator=g)
    from kvtool.export.onnx_weights import fp32_weights

    used = _export_one(patch_mod, (flat,), ["hidden_states"], ["last_hidden_state"],
                       ({0: torch.export.Dim("patches", max=1 << 16)},), paths["vision_embeddings"])
    _check_in_ort(paths["vision_embeddings"], patch_mod, (flat,), ["hidden_states"])
    with torch.no_grad(), fp32_weights(patch_mod):  # the merger's example input (one small conv)
        hidden = patch_mod(flat)
        rot = model.model.visual.rot_pos_emb(grid)
    _done(patch_mod, used)
    mask = torch.full((1, n, n), float("-inf"))
    for i in range(grid.shape[0]):
        a = 16 * i
        mask[0, a:a + 16, a:a + 16] = 0.0
    groups = torch.export.Dim("merge_groups", max=1 << 14)
    npatch = vc.spatial_merge_size**2 * groups  # the merger folds spatial_merge_size^2 patches into one token
    args = (hidden, mask, rot)
    names = ["hidden_states", "attention_mask", "rotary_pos_emb"]
    used = _export_one(merger_mod, args, names, ["last_hidden_state"],
                       ({0: npatch}, {1: npatch, 2: npatch}, {0: npatch}), paths["vision_embeddings_merger"])
    _check_in_ort(paths["vision_embeddings_merger"], merger_mod, args, names)
    _done(merger_mod, used)


def quantize_lm(path: Path, cfg: ExportConfig) -> None:
    """Replace the language model's MatMuls by MatMulNBits (cfg.wbits 4 or 8) in place, weight by weight
    (``onnx_weights.quantize_matmuls``: one fp32 weight in memory at a time)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
    )

    # MatMulNBits has no per-channel mode in its QOperator form: int8 uses blocks of group_size too
    if cfg.wbits == 4 and cfg.onnx_quant == "hqq":
        algo = HQQWeightOnlyQuantConfig(block_size=cfg.group_size, bits=4)
    else:
        algo = DefaultWeightOnlyQuantConfig(block_size=cfg.group_size, is_symmetric=cfg.sym, bits=cfg.wbits)
    from kvtool.export.onnx_weights import quantize_matmuls

    _save(quantize_matmuls(path, algo), path)


def to_fp16(path: Path) -> None:
    """Store float initializers as fp16 (graph inputs/outputs stay fp32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True, disable_shape_infer=True)
    _save(model, path)


def _save(model: Any, path: Path) -> None:
    """Save with weights in ``<name>.data``; drops the exporter's per-node stack-trace metadata (it can
    outweigh a small model's weights)."""
    import onnx

    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def export_onnx(model: Any, arch: str, cfg: ExportConfig, out: Path, progress: Any = None) -> dict[str, GraphInfo]:
    """Export ``model`` (in the checkpoint's dtype, possibly AWQ-scaled / simulated 3-bit) to ONNX graphs in
    ``out``; the graphs compute in fp32 and the weights are up-cast one tensor at a time as written. Every
    kvtool architecture (``source.architecture_of``, which refuses the others) has wrappers here. ``model``'s
    weights are released as the graphs are written: it cannot run afterwards."""
    if getattr(model.model, "image_newline", None) is not None:
        # LLaVA-NeXT's learned newline embedding is not in any graph: config.json carries it (as the
        # OpenVINO exporter does), so the runtime packs tiles without the source checkpoint
        model.config.image_newline = model.model.image_newline.detach().float().tolist()
    paths = export_graphs_fp32(model, out, progress)
    if cfg.wbits in (8, 4):
        quantize_lm(paths["language_model"], cfg)
    if cfg.dtype == "fp16":  # (fp32: the graphs are saved as they are)
        for p in paths.values():
            to_fp16(p)
    if progress is not None:
        progress.update(1)
    return {role: graph_info(p, out) for role, p in paths.items()}


def graph_info(path: Path, out: Path) -> GraphInfo:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return GraphInfo(file=str(path.relative_to(out)), inputs=[i.name for i in m.graph.input],
                     outputs=[o.name for o in m.graph.output])


def onnx_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def onnx_weight_format(path: Path) -> str:
    """'MatMulNBits(int4)x14+f16' style summary of how an ONNX graph stores its weights."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    parts = []
    if nbits:
        bits = {a.i for n in nbits for a in n.attribute if a.name == "bits"}
        parts.append(f"MatMulNBits(int{'/'.join(map(str, sorted(bits)))})x{len(nbits)}")
    types = {{onnx.TensorProto.FLOAT: "f32", onnx.TensorProto.FLOAT16: "f16"}[t.data_type] for t in m.graph.initializer
             if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    parts.extend(sorted(types))
    return "+".join(parts) or "-"
