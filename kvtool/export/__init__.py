"""kvtool.export: HF checkpoint -> OpenVINO IR / ONNX graphs with compressed weights, plus the manifest.

Public API::

    from kvtool.export import ExportConfig, export_model
    res = export_model(ExportConfig(model="ckpt_dir", output="out_dir", backend="openvino", wbits=4))

Heavy libraries are imported inside the functions that use them. This package does not run generation.
"""

from kvtool.export.config import ExportConfig, ExportResult
from kvtool.export.pipeline import export_model
from kvtool.manifest import Manifest

__all__ = ["ExportConfig", "ExportResult", "Manifest", "export_model"]
