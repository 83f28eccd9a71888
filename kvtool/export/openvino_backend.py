"""OpenVINO backend: optimum-intel's VLM exporter, then NNCF weight compression of each IR.

``export_openvino`` converts a loaded PyTorch VLM with optimum-intel (``export_from_model``, task
image-text-to-text) into its IRs — ``openvino_language_model.xml`` (stateless by default: explicit
``past_key_values.{i}.key|value`` inputs and ``present.{i}.key|value`` outputs), ``..._text_embeddings_...``,
``..._vision_embeddings_...`` and, for Qwen2-VL, ``..._vision_embeddings_merger_...`` — then compresses the
language model's weights with ``nncf.compress_weights`` (int4 group-wise / int8 per-channel, AWQ and scale
estimation when given calibration inputs) and the other graphs to int8, and saves each IR in the requested
dtype. Input/output names are read back from the saved IRs, never assumed. It does not run generation and
does not prepare calibration data (``kvtool.export.calibration``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

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
    """All of kvtool's architectures export with optimum-intel (Qwen2-VL through ``_qwen2_vl_patches``)."""


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


def convert_openvino(model: Any, out: Path, stateful: bool) -> dict[str, Path]:
    """Run optimum-intel's exporter on ``model`` (fp32 weights kept); returns role -> IR path."""
    from optimum.exporters.openvino.convert import export_from_model
    from optimum.intel import OVConfig

    patches = _qwen2_vl_patches(model) if model.config.model_type == "qwen2_vl" else nullcontext()
    with patches:
        export_from_model(model, out, task="image-text-to-text", ov_config=OVConfig(dtype="fp32"), stateful=stateful)
    found = {role: out / name for role, name in OV_GRAPH_FILES.items() if (out / name).is_file()}
    if "language_model" not in found:
        raise RuntimeError(f"optimum-intel wrote no {OV_GRAPH_FILES['language_model']} in {out}")
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


def compress_and_save(path: Path, role: str, cfg: ExportConfig, calibration: list[dict] | None) -> None:
    """Compress one IR in place per ``cfg`` and re-save it in ``cfg.dtype``."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(path)
    if role == "language_model" and cfg.wbits in (8, 4):
        opts = nncf_lm_options(cfg)
        if cfg.awq:
            opts.update(awq=True, scale_estimation=cfg.scale_estimation)
            if calibration:
                opts.update(dataset=nncf.Dataset(calibration), subset_size=len(calibration))
        model = nncf.compress_weights(model, **opts)
    elif role != "language_model" and cfg.wbits < 16:
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    tmp = path.with_name(path.stem + ".tmp.xml")
    ov.save_model(model, tmp, compress_to_fp16=(cfg.dtype == "fp16"))
    del model
    os.replace(tmp, path)
    os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))


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
    """Export ``model`` (fp32, possibly with simulated-3-bit weights) to IRs in ``out``; ``samples`` are
    calibration LM inputs (``calibration.lm_inputs``) for NNCF's data-aware AWQ / scale estimation."""
    from kvtool.export.calibration import ov_lm_feeds

    paths = convert_openvino(model, out, cfg.stateful)
    if progress is not None:
        progress.update(1)
    feeds = None
    if samples and cfg.wbits in (8, 4):
        names = graph_info(paths["language_model"], out).inputs
        feeds = ov_lm_feeds(samples, names, lm.num_kv_heads, lm.head_dim)
    for role, path in paths.items():
        compress_and_save(path, role, cfg, feeds if role == "language_model" else None)
    if progress is not None:
        progress.update(1)
    return {role: graph_info(p, out) for role, p in paths.items()}
