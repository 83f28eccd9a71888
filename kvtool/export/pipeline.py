"""``export_model``: one export from checkpoint to a directory the runtime can rebuild from.

Stages (one progress bar): resolve and load the checkpoint (OpenVINO: in its own dtype, never up-cast;
ONNX: fp32), read the calibration set and turn it into language-model inputs (forward passes in the
checkpoint's dtype), apply kvtool's own AWQ scales and/or simulated 3-bit weights to the PyTorch weights
when asked (``kvtool.export.awq``), convert with the chosen backend (OpenVINO compresses each graph in
memory before its first save and releases the LM's torch weights once converted; ONNX quantizes after) —
all the while the memory-mapped checkpoint's pages are reclaimed as they are consumed (``pages.paging_out``),
copy the processor/tokenizer files and ``config.json`` (OpenVINO: also the tokenizer/detokenizer IRs of
openvino-tokenizers), and write the manifest ``kvtool.json``.
It does not run generation or check parity (tests and ``kvtool.runtime`` do).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.export.config import ExportConfig, ExportResult
from kvtool.manifest import MANIFEST_NAME, GraphInfo, Manifest, WeightInfo
from kvtool.versions import library_versions


def remove_stale(out: Path) -> None:
    """Delete the manifest and graph files of a previous export in ``out``: an export that fails half-way
    leaves no manifest pointing at missing or mixed graphs."""
    for f in [out / MANIFEST_NAME, *out.glob("openvino_*_model.*"), *out.glob("*.onnx"), *out.glob("*.onnx.data")]:
        if f.is_file():
            f.unlink()


def graph_rows(out: Path, graphs: dict[str, GraphInfo], backend: str) -> list[dict[str, Any]]:
    """One summary row per graph: role, file, bytes on disk (graph + weights), weight format."""
    rows = []
    for role, g in graphs.items():
        path = out / g.file
        if backend == "openvino":
            from kvtool.export.openvino_backend import weight_format

            size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
            fmt = weight_format(path)
        else:
            from kvtool.export.onnx_backend import onnx_bytes, onnx_weight_format

            size = onnx_bytes(path)
            fmt = onnx_weight_format(path)
        rows.append({"role": role, "file": g.file, "bytes": size, "weights": fmt})
    return rows


LIBRARY_LOGGERS = ("transformers", "optimum", "nncf", "openvino", "torch", "onnx", "onnxscript", "onnxruntime",
                   "accelerate", "huggingface_hub")


@contextmanager
def library_output(verbose: bool = False):
    """Where the exporters' own output goes for the duration (restored after); yields the stream kvtool's
    progress bar writes to (the real stderr).

    Quiet (default): the libraries' log records (their loggers raised above CRITICAL: optimum's "may have
    potential accuracy issues", OpenVINO's "Failed to build model wrapper.", transformers' and torch's
    notices), Python warnings, transformers' progress bars and whatever they print to stdout/stderr are
    dropped — the export's failures still arrive as exceptions. ``verbose=True`` shows all of it, on stderr.
    Either way stdout carries only kvtool's result (``--json``). Output written by C++ code straight to the
    file descriptors is not intercepted."""
    import io
    import logging
    import warnings
    from contextlib import redirect_stderr

    real_err = sys.stderr
    if verbose:
        with redirect_stdout(real_err):
            yield real_err
        return
    import nncf  # noqa: F401  (configures its logger now, so the level set below stays)
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # configures the library root logger now (same reason)
    try:
        from optimum.utils import logging as optimum_logging

        optimum_logging.get_logger("optimum")
    except ImportError:  # optimum-intel is only needed for OpenVINO exports
        pass
    loggers = [logging.getLogger(n) for n in LIBRARY_LOGGERS]
    levels = [lg.level for lg in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    sink = io.StringIO()
    with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
        warnings.simplefilter("ignore")
        for lg in loggers:  # (optimum's converter resets logging.disable, so levels it is)
            lg.setLevel(logging.CRITICAL + 1)
        hf_logging.disable_progress_bar()
        try:
            yield real_err
        finally:
            for lg, lvl in zip(loggers, levels, strict=True):
                lg.setLevel(lvl)
            if bars:
                hf_logging.enable_progress_bar()


def export_model(cfg: ExportConfig) -> ExportResult:
    """Export ``cfg.model`` to ``cfg.output`` per ``cfg``; see ``ExportConfig`` for the options. The
    libraries' chatter is shown only with ``cfg.verbose`` (``library_output``)."""
    with library_output(cfg.verbose) as progress_stream:
        return _export_model(cfg, progress_stream)


def _export_model(cfg: ExportConfig, progress_stream=None) -> ExportResult:
    from tqdm.auto import tqdm

    from kvtool import __version__
    from kvtool.export import source
    from kvtool.export.calibration import lm_inputs, load_calibration
    from kvtool.export.pages import paging_out

    t0 = time.perf_counter()
    cfg.validate()
    calib = load_calibration(cfg.calibration, cfg.num_samples) if cfg.awq and cfg.calibration else None
    model_dir = source.resolve_model_dir(cfg.model)
    hf_config = source.read_config(model_dir)
    arch = source.architecture_of(hf_config, cfg.model)
    bad = sorted(w for w in source.lm_linear_widths(hf_config) if cfg.recorded_group_size and w % cfg.group_size)
    if bad:  # checked again on the loaded model (awq.check_group_size); this one is instant
        raise InputError(f"--group-size {cfg.group_size}: does not divide the language model's layer widths {bad} "
                         "(choose a power of two dividing them, or -1 for per-channel)")
    if cfg.backend == "openvino":  # can the installed optimum-intel export it (ONNX: kvtool's own wrappers)
        from kvtool.export.openvino_backend import check_architecture

        check_architecture(arch)
    source.check_weights(model_dir, cfg.model)
    torch_transform = cfg.wbits == 3 or (cfg.awq and cfg.backend == "onnx")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    total = 5 + (len(calib.rows) if calib else 0) + (1 if torch_transform else 0)
    with (tqdm(total=total, desc=f"export {cfg.backend} w{cfg.wbits}", unit="step", file=progress_stream,
               disable=not cfg.progress) as bar,
          paging_out(source.weight_files(model_dir))):
        bar.set_postfix_str("load")
        model = source.load_torch_model(model_dir, cfg.trust_remote_code, own_dtype=True)
        lm = source.lm_info(model.config)
        if cfg.recorded_group_size is not None:
            from kvtool.export.awq import check_group_size

            check_group_size(model, cfg.group_size)
        bar.update(1)
        samples = None
        if calib is not None:
            from transformers import AutoProcessor

            bar.set_postfix_str("calibration")
            samples = lm_inputs(model, AutoProcessor.from_pretrained(model_dir), calib, progress=bar)
        if torch_transform:
            from kvtool.export.awq import transform_lm_weights

            bar.set_postfix_str("awq/3-bit" if cfg.awq else "3-bit")
            transform_lm_weights(model, cfg, samples)
            bar.update(1)
        bar.set_postfix_str("convert")
        if cfg.backend == "openvino":
            from kvtool.export.openvino_backend import export_openvino

            graphs = export_openvino(model, cfg, out, lm, samples if cfg.awq else None, progress=bar)
        else:
            from kvtool.export.onnx_backend import export_onnx

            graphs = export_onnx(model, arch, cfg, out, progress=bar)
        bar.set_postfix_str("processor")
        source.save_processor_files(model_dir, out, model)
        if cfg.backend == "openvino":
            from kvtool.export.openvino_backend import save_tokenizer_irs

            save_tokenizer_irs(out)
        bar.update(1)
        manifest = Manifest(
            source={"model": cfg.model if not Path(cfg.model).exists() else str(model_dir.resolve()),
                    "sha256": source.weights_sha256(model_dir)},
            architecture=arch,
            model_type=model.config.model_type,
            backend=cfg.backend,
            dtype=cfg.dtype,
            weights=WeightInfo(bits=cfg.wbits, group_size=cfg.recorded_group_size,
                               sym=cfg.sym, ratio=cfg.ratio, method=cfg.method, storage=cfg.storage,
                               calibration=calib.describe() if calib else None),
            graphs=graphs,
            lm=lm,
            stateful=cfg.is_stateful,
            versions=library_versions(),
            kvtool_version=__version__,
        )
        manifest.validate(str(out))
        manifest.save(out)
        bar.update(1)
    del model
    return ExportResult(output_dir=out, manifest=manifest, graphs=graph_rows(out, graphs, cfg.backend),
                        seconds=time.perf_counter() - t0)
