"""OpenVINO backend: optimum-intel's VLM exporter with NNCF weight compression while converting.

``export_openvino`` converts a loaded PyTorch VLM — in the checkpoint's own dtype: a 16-bit model is traced
with OpenVINO's 16-bit patching, as ``optimum-cli`` does, never up-cast to fp32 — with optimum-intel
(``export_from_model``, task image-text-to-text) into its IRs: ``openvino_language_model.xml`` (stateful by
default: KV inside the graph, ``beam_idx`` input; stateless: explicit ``past_key_values.{i}.key|value``
inputs and ``present.{i}.key|value`` outputs), ``..._text_embeddings_...``, ``..._vision_embeddings_...``
and, for Qwen2-VL, ``..._vision_embeddings_merger_...``. Each IR is edited and compressed in memory before
its first (and only) save, through a context manager around optimum-intel's save step (restored after):
the language model's ``logits`` are computed for the last position only (a Slice before the lm_head
MatMul) and its weights compressed with ``nncf.compress_weights`` (int4 group-wise / int8 per-channel, AWQ
and scale estimation when given calibration inputs), the other graphs to int8; there is no fp32 IR round
trip. The torch weights of each converted graph are released unless a graph still to convert uses them.
Input/output names are read back from the saved IRs, never assumed. It does not run generation and does not
prepare calibration data (``kvtool.export.calibration``).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.export.config import ExportConfig
from kvtool.manifest import GraphInfo, LMInfo

# role -> IR file name optimum-intel writes for image-text-to-text models
OV_GRAPH_FILES = {
    "language_model": "openvino_language_model.xml",
    "text_embeddings": "openvino_text_embeddings_model.xml",
    "vision_embeddings": "openvino_vision_embeddings_model.xml",
    "vision_embeddings_merger": "openvino_vision_embeddings_merger_model.xml",
}


def check_architecture(arch: str) -> None:
    """Refuse ``arch`` (a ``config.model_type`` such as ``llava``) unless the installed optimum-intel registers an
    OpenVINO export config for it with task ``image-text-to-text`` (its ``TasksManager``), the task
    ``export_openvino`` converts with. kvtool's three architectures all have one in optimum-intel 2.2 (Qwen2-VL
    exported through ``_qwen2_vl_patches``). Raises ``InputError`` naming the architecture and the optimum-intel
    version."""
    from optimum.exporters.openvino import model_configs  # noqa: F401  (registers the OpenVINO configs)
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(arch, exporter="openvino", library_name="transformers")
    except KeyError:
        tasks = {}
    if "image-text-to-text" not in tasks:
        from kvtool.versions import library_versions

        version = library_versions(("optimum-intel",)).get("optimum-intel")
        raise InputError(f"architecture {arch}: optimum-intel {version} has no OpenVINO image-text-to-text export "
                         f"for it (use --backend onnx, or an optimum-intel that supports it)")


@contextmanager
def _qwen2_vl_patches(model: Any):
    """Export-time patches for Qwen2-VL, restored on exit.

    optimum-intel 2.2 caps its Qwen2-VL config at transformers 5.0; with transformers 5.5 the exported graphs
    match PyTorch (tests/export parity, logits <= 1e-4), so the cap is lifted for the export. Its dummy vision
    input is a 420x420 image, which gives a patch grid not divisible by the 2x2 merger for small patch sizes
    (tiny checkpoints): the dummy side is set to a multiple of patch_size * spatial_merge_size.
    """
    from optimum.exporters.openvino import input_generators, model_configs

    cfg_cls = model_configs.Qwen2VLOpenVINOConfig
    gen_cls = input_generators.DummyQwen2VLVisionEmbedInputGenerator
    old_cap, old_init = cfg_cls.MAX_TRANSFORMERS_VERSION, gen_cls.__init__
    vc = model.config.vision_config
    side = vc.patch_size * vc.spatial_merge_size * max(1, 420 // (vc.patch_size * vc.spatial_merge_size * 4))

    def init(self, *args, **kwargs):
        kwargs["width"] = kwargs["height"] = side
        old_init(self, *args, **kwargs)

    cfg_cls.MAX_TRANSFORMERS_VERSION = None
    gen_cls.__init__ = init
    try:
        yield
    finally:
        cfg_cls.MAX_TRANSFORMERS_VERSION = old_cap
        gen_cls.__init__ = old_init


def slice_last_logits(model: Any) -> bool:
    """Edit an in-memory LM IR so ``logits`` is computed for the last position only: a ``Slice`` of the
    hidden states ``[B, T, H] -> [B, 1, H]`` is put before the lm_head ``MatMul`` (the pattern openvino.genai
    applies at load time; at a 32k vocabulary a 7k-token prompt's full logits are 0.9 GB). Returns whether the
    MatMul was found (walking back from the ``logits`` result through Convert nodes)."""
    import numpy as np
    import openvino.opset13 as ops

    node = model.output("logits").get_node().input_value(0).get_node()
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "MatMul":
        return False
    hidden = node.input_value(0)
    last = ops.slice(hidden, np.array([-1], np.int64), np.array([np.iinfo(np.int64).max], np.int64),
                     np.array([1], np.int64), np.array([1], np.int64))
    node.input(0).replace_source_output(last.output(0))
    model.validate_nodes_and_infer_types()
    return True


def role_of(path: Path) -> str | None:
    """Graph role of an IR file name optimum-intel writes (``OV_GRAPH_FILES``), or None."""
    return {name: role for role, name in OV_GRAPH_FILES.items()}.get(Path(path).name)


def compress_in_memory(model: Any, role: str, cfg: ExportConfig, calibration: list[dict] | None) -> Any:
    """NNCF weight compression of one in-memory IR per ``cfg`` (nothing at 16 bits; the LM at ``cfg.wbits``
    with AWQ / scale estimation on ``calibration`` feeds when asked, the other graphs int8)."""
    import nncf

    if role == "language_model" and cfg.wbits in (8, 4):
        opts = nncf_lm_options(cfg)
        if cfg.awq:
            opts.update(awq=True, scale_estimation=cfg.scale_estimation)
            if calibration:
                opts.update(dataset=nncf.Dataset(calibration), subset_size=len(calibration))
        return nncf.compress_weights(model, **opts)
    if role != "language_model" and cfg.wbits < 16:
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    return model


def _typed_feeds(model: Any, feeds: list[dict]) -> list[dict]:
    """Calibration feeds cast to the element types of ``model``'s inputs (fp16 checkpoints capture fp16)."""
    import numpy as np

    types = {i.get_any_name(): i.get_element_type().get_type_name() for i in model.inputs}
    np_of = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32}
    return [{k: (v.astype(np_of[types[k]]) if types.get(k) in np_of else v) for k, v in f.items()} for f in feeds]


def release_lm_weights(model: Any) -> int:
    """Free the torch storage of the language model's decoder layers, final norm and lm_head (each replaced
    by an empty tensor of its dtype), keeping the input embeddings (their own graph, maybe tied to lm_head).
    Called once the LM graph is saved (its OpenVINO constants may share this memory until then). Returns the
    bytes released."""
    import torch

    lm = model.model.language_model
    keep = {p.data_ptr() for p in model.get_input_embeddings().parameters()}
    freed = 0
    for mod in (lm.layers, lm.norm, model.lm_head):
        for p in mod.parameters():
            if p.numel() and p.data_ptr() not in keep:
                freed += p.numel() * p.element_size()
                p.data = torch.empty(0, dtype=p.dtype)
    return freed


@contextmanager
def _compress_while_converting(torch_model: Any, cfg: ExportConfig, lm: LMInfo, samples: list[dict] | None):
    """Patch optimum-intel's save step (restored on exit) so that each in-memory IR is, before its first save,
    given last-position-only logits (language model) and compressed with NNCF, and, once the language model's
    IR is saved, its torch weights are released. Not before: OpenVINO's converted constants may share the
    torch tensors' memory (they do for a bf16 Qwen2-VL-2B, whose export then crashed in NNCF reading freed
    weights), so they are released only when nothing reads them any more."""
    from optimum.exporters.openvino import convert

    old_save = convert._save_model
    sliced: dict[str, bool] = {}

    def save(model, path, *args, **kwargs):
        role = role_of(Path(path))
        feeds = None
        if role == "language_model":
            sliced[role] = slice_last_logits(model)
            if samples and cfg.wbits in (8, 4) and cfg.awq:
                from kvtool.export.calibration import ov_lm_feeds

                names = [i.get_any_name() for i in model.inputs]
                feeds = _typed_feeds(model, ov_lm_feeds(samples, names, lm.num_kv_heads, lm.head_dim))
        if role is not None:
            model = compress_in_memory(model, role, cfg, feeds)
        saved = old_save(model, path, *args, **kwargs)
        if role == "language_model":
            release_lm_weights(torch_model)
        return saved

    convert._save_model = save
    try:
        yield sliced
    finally:
        convert._save_model = old_save


def convert_openvino(model: Any, out: Path, cfg: ExportConfig, lm: LMInfo,
                     samples: list[dict] | None = None) -> dict[str, Path]:
    """Run optimum-intel's exporter on ``model`` (in its own dtype: a 16-bit model is traced with OpenVINO's
    16-bit patching, never up-cast) with compression while converting; returns role -> IR path."""
    import torch
    from optimum.exporters.openvino.convert import export_from_model
    from optimum.intel import OVConfig

    patches = _qwen2_vl_patches(model) if model.config.model_type == "qwen2_vl" else nullcontext()
    half = model.dtype in (torch.float16, torch.bfloat16)
    with patches, _compress_while_converting(model, cfg, lm, samples) as sliced:
        export_from_model(model, out, task="image-text-to-text", ov_config=OVConfig(dtype=cfg.dtype),
                          stateful=cfg.is_stateful, patch_16bit_model=half)
    found = {role: out / name for role, name in OV_GRAPH_FILES.items() if (out / name).is_file()}
    if "language_model" not in found:
        raise RuntimeError(f"optimum-intel wrote no {OV_GRAPH_FILES['language_model']} in {out}")
    if not sliced.get("language_model"):
        raise RuntimeError("the language model IR has no lm_head MatMul before 'logits' to slice")
    return found


def nncf_lm_options(cfg: ExportConfig) -> dict[str, Any]:
    """Keyword arguments of ``nncf.compress_weights`` for the language model under ``cfg``."""
    import nncf

    if cfg.wbits == 8:
        mode = nncf.CompressWeightsMode.INT8_SYM if cfg.sym else nncf.CompressWeightsMode.INT8_ASYM
        return {"mode": mode}
    if cfg.wbits == 4:
        mode = nncf.CompressWeightsMode.INT4_SYM if cfg.sym else nncf.CompressWeightsMode.INT4_ASYM
        return {"mode": mode, "group_size": cfg.group_size, "ratio": cfg.ratio}
    raise ValueError(f"no NNCF mode for {cfg.wbits} bits")


TOKENIZER_IRS = ("openvino_tokenizer.xml", "openvino_detokenizer.xml")


def save_tokenizer_irs(out: Path) -> None:
    """Write ``openvino_tokenizer.xml`` / ``openvino_detokenizer.xml`` for the tokenizer saved in ``out``
    with openvino-tokenizers (``convert_tokenizer(..., with_detokenizer=True)``), left padding as
    optimum-intel sets it for image-text-to-text: what openvino.genai's ``VLMPipeline`` reads."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    tok.padding_side = tok.truncation_side = "left"
    ov_tok, ov_detok = convert_tokenizer(tok, with_detokenizer=True)
    for model, name in zip((ov_tok, ov_detok), TOKENIZER_IRS, strict=True):
        ov.save_model(model, out / name)


def graph_info(path: Path, out: Path) -> GraphInfo:
    """File (relative to ``out``) and the exact input/output names of a saved IR."""
    import openvino as ov

    model = ov.Core().read_model(path)
    return GraphInfo(file=str(path.relative_to(out)), inputs=[i.get_any_name() for i in model.inputs],
                     outputs=[o.get_any_name() for o in model.outputs])


def weight_format(path: Path) -> str:
    """Weight element types of an IR, most frequent first by element count (e.g. 'u4+u8+f16')."""
    import openvino as ov

    counts: dict[str, int] = {}
    for op in ov.Core().read_model(path).get_ops():
        if op.get_type_name() == "Constant":
            n = 1
            for d in op.get_output_shape(0):
                n *= d
            if n >= 256:  # weights, not shape constants
                et = op.get_element_type().get_type_name()
                counts[et] = counts.get(et, 0) + n
    return "+".join(k for k, _ in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def export_openvino(model: Any, cfg: ExportConfig, out: Path, lm: LMInfo, samples: list[dict] | None = None,
                    progress: Any = None) -> dict[str, GraphInfo]:
    """Export ``model`` (its own dtype, possibly with simulated-3-bit weights) to compressed IRs in ``out``;
    ``samples`` are calibration LM inputs (``calibration.lm_inputs``) for NNCF's data-aware AWQ / scale
    estimation. The torch weights are released as the graphs are converted (``model`` is spent after)."""
    paths = convert_openvino(model, out, cfg, lm, samples)
    if progress is not None:
        progress.update(2)
    return {role: graph_info(p, out) for role, p in paths.items()}
