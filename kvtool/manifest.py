"""The manifest ``kvtool.json`` written beside every export, and read back by the runtime.

It records everything the runtime needs to rebuild a pipeline (never parsed out of file names): the source
model and its hash, architecture, backend, dtype, weight compression (bits, group size, method, storage,
calibration), each graph's file and input/output names, the language model's KV geometry, and the versions
of kvtool and the libraries that produced it. This module only defines, validates, reads and writes the
manifest; it does not export anything.

Layout (``format`` 1)::

    {
      "format": 1,
      "kvtool_version": "0.1.0",
      "source": {"model": "/path/or/hub-id", "sha256": "<hash of the weight files>"},
      "architecture": "llava" | "llava_next" | "qwen2_vl",
      "model_type": "<config.model_type>",
      "backend": "openvino" | "onnx",
      "dtype": "fp16" | "fp32",
      "stateful": false,
      "weights": {"bits": 4, "group_size": 128, "sym": false, "ratio": 1.0,
                  "method": "none" | "rtn" | "awq" | "awq+se" | "hqq",
                  "storage": "none" | "packed" | "simulated",
                  "calibration": null | {"source": "...", "kind": "text" | "image-question", "num_samples": 32}},
      "graphs": {"language_model": {"file": "openvino_language_model.xml",
                                    "inputs": ["inputs_embeds", ...], "outputs": ["logits", ...]},
                 "text_embeddings": {...}, "vision_embeddings": {...},
                 "vision_embeddings_merger": {...}   # Qwen2-VL only
                },
      "lm": {"num_layers": 2, "num_kv_heads": 4, "head_dim": 32, "hidden_size": 128, "vocab_size": 1000},
      "versions": {"openvino": "...", "nncf": "...", "transformers": "...", ...}
    }
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtool.errors import InputError

MANIFEST_NAME = "kvtool.json"
MANIFEST_FORMAT = 1
ARCHITECTURES = ("llava", "llava_next", "qwen2_vl")
BACKENDS = ("openvino", "onnx")
GRAPH_ROLES = ("language_model", "text_embeddings", "vision_embeddings", "vision_embeddings_merger")


@dataclass(frozen=True)
class GraphInfo:
    """One exported graph: its file (relative to the export dir) and its input/output names."""

    file: str
    inputs: list[str]
    outputs: list[str]


@dataclass(frozen=True)
class WeightInfo:
    """How the language model's weights were compressed."""

    bits: int = 16
    group_size: int | None = None
    sym: bool = False
    ratio: float = 1.0
    method: str = "none"  # none | rtn | awq | awq+se | hqq
    storage: str = "none"  # none | packed | simulated (3-bit: dequantized values stored in the graph)
    calibration: dict[str, Any] | None = None


@dataclass(frozen=True)
class LMInfo:
    """KV-cache geometry of the language model: KV tensors are [B, num_kv_heads, N, head_dim]."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class Manifest:
    source: dict[str, Any]
    architecture: str
    model_type: str
    backend: str
    dtype: str
    weights: WeightInfo
    graphs: dict[str, GraphInfo]
    lm: LMInfo
    stateful: bool = False
    versions: dict[str, str] = field(default_factory=dict)
    kvtool_version: str = ""
    format: int = MANIFEST_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        try:
            fmt = int(d.get("format", 0))
            if fmt != MANIFEST_FORMAT:
                raise InputError(f"{where}: manifest format {fmt} is not supported (expected {MANIFEST_FORMAT})")
            graphs = {role: GraphInfo(**g) for role, g in d["graphs"].items()}
            m = cls(
                source=dict(d["source"]),
                architecture=d["architecture"],
                model_type=d["model_type"],
                backend=d["backend"],
                dtype=d["dtype"],
                weights=WeightInfo(**d["weights"]),
                graphs=graphs,
                lm=LMInfo(**d["lm"]),
                stateful=bool(d.get("stateful", False)),
                versions=dict(d.get("versions", {})),
                kvtool_version=d.get("kvtool_version", ""),
                format=fmt,
            )
        except InputError:
            raise
        except (KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{where}: malformed kvtool manifest ({type(exc).__name__}: {exc})") from None
        m.validate(where)
        return m

    def validate(self, where: str = "manifest") -> None:
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"{where}: architecture {self.architecture!r} not one of {', '.join(ARCHITECTURES)}")
        if self.backend not in BACKENDS:
            raise InputError(f"{where}: backend {self.backend!r} not one of {', '.join(BACKENDS)}")
        for role in self.graphs:
            if role not in GRAPH_ROLES:
                raise InputError(f"{where}: unknown graph role {role!r} (expected {', '.join(GRAPH_ROLES)})")
        if "language_model" not in self.graphs:
            raise InputError(f"{where}: no language_model graph listed")

    def save(self, export_dir: str | Path) -> Path:
        path = Path(export_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, export_dir: str | Path) -> Manifest:
        export_dir = Path(export_dir)
        path = export_dir / MANIFEST_NAME
        if not export_dir.exists():
            raise InputError(f"{export_dir}: no such directory (expected a kvtool export directory)")
        if not path.is_file():
            raise InputError(f"{export_dir}: no {MANIFEST_NAME} manifest (expected a directory made by `kvtool export`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data, where=str(path))


def is_export_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory holding a kvtool manifest."""
    return (Path(path) / MANIFEST_NAME).is_file()
