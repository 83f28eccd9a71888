"""Export configuration and result: what `kvtool export` was asked to do, checked before any heavy work.

``ExportConfig`` is the single description of an export (model, backend, weight bits and method, calibration,
dtype); ``validate()`` turns every bad value into a one-line ``InputError`` naming the option and what was
expected. ``ExportResult`` is what ``export_model`` hands back. This module does not load models or export
anything (see ``kvtool.export.pipeline``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.manifest import BACKENDS, MANIFEST_NAME, Manifest

WBITS = (16, 8, 4, 3)
DTYPES = ("fp16", "fp32")
ONNX_QUANT = ("rtn", "hqq")


@dataclass
class ExportConfig:
    """One export.

    ``wbits``: 16 no weight compression; 8 int8 per-channel; 4 int4 group-wise (``group_size``, asym unless
    ``sym``, ``ratio`` of the LM's layers in int4, the rest int8); 3 group-wise asymmetric 3-bit stored
    dequantized in the graph (``storage: simulated`` — studies accuracy, saves no memory).
    ``awq`` runs data-aware AWQ on ``calibration`` (a .jsonl file of ``{"text": ...}`` rows, or of
    ``{"image": path, "question": ...}`` rows, or a kvtool eval-task name) with ``num_samples`` samples;
    ``scale_estimation`` adds NNCF's scale estimation (OpenVINO, 4 bits). Without ``calibration``, OpenVINO
    4-bit AWQ is NNCF's data-free AWQ (recorded with ``calibration: null``); ONNX and 3-bit AWQ use kvtool's
    own data-aware search and refuse to run without data. ``dtype`` is the precision of
    everything left unquantized. ``stateful`` (None: True for OpenVINO) exports optimum-intel's stateful LM
    (KV inside the graph; what the fast engine, ``OVModelForVisualCausalLM`` and openvino.genai read); False
    the stateless one (explicit past/present K/V); ONNX is always stateless. ``onnx_quant`` picks the MatMulNBits algorithm.
    ``force`` lets the export replace another export found in ``output`` (refused otherwise); ``verbose``
    shows the exporting libraries' own log lines and warnings (hidden by default); ``progress`` kvtool's own
    progress bar of the export's steps, on stderr (shown by default).
    """

    model: str
    output: str
    backend: str = "openvino"
    wbits: int = 16
    group_size: int = 128
    sym: bool = False
    ratio: float = 1.0
    awq: bool = False
    scale_estimation: bool = False
    calibration: str | None = None
    num_samples: int = 32
    dtype: str = "fp16"
    stateful: bool | None = None
    onnx_quant: str = "rtn"
    trust_remote_code: bool = False
    force: bool = False
    verbose: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.backend == "onnxruntime":  # the runtime's name for the same backend; manifests say "onnx"
            self.backend = "onnx"

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"--backend {self.backend!r}: expected one of {', '.join(BACKENDS)} (onnxruntime = onnx)")
        if self.wbits not in WBITS:
            raise InputError(f"--wbits {self.wbits}: expected one of {', '.join(map(str, WBITS))}")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.onnx_quant not in ONNX_QUANT:
            raise InputError(f"--onnx-quant {self.onnx_quant!r}: expected one of {', '.join(ONNX_QUANT)}")
        if self.group_size != -1 and (self.group_size < 8 or self.group_size & (self.group_size - 1)):
            raise InputError(f"--group-size {self.group_size}: expected a power of two >= 8, or -1 for per-channel")
        if not 0.0 < self.ratio <= 1.0:
            raise InputError(f"--ratio {self.ratio}: expected a fraction in (0, 1]")
        if self.ratio < 1.0 and self.wbits != 4:
            raise InputError(f"--ratio {self.ratio}: only meaningful with --wbits 4 (mixed int4/int8)")
        if self.num_samples < 1:
            raise InputError(f"--num-samples {self.num_samples}: expected a positive count")
        if self.scale_estimation and not self.awq:
            raise InputError("--scale-estimation: needs --awq (it refines AWQ's data-aware statistics)")
        if self.awq and self.wbits == 16:
            raise InputError("--awq: needs quantized weights (--wbits 8, 4 or 3)")
        if self.scale_estimation and (self.backend != "openvino" or self.wbits != 4):
            raise InputError("--scale-estimation: supported for --backend openvino --wbits 4 only (NNCF)")
        if self.awq and self.wbits == 8:
            raise InputError("--awq: supported at --wbits 4 and 3 (int8 per-channel weights need no AWQ)")
        if self.ratio < 1.0 and self.backend != "openvino":
            raise InputError(f"--ratio {self.ratio}: mixed int4/int8 layers are an openvino (NNCF) option")
        if self.group_size == -1 and self.backend == "onnx" and self.wbits in (8, 4):
            raise InputError("--group-size -1: per-channel weights are not available with --backend onnx "
                             "(MatMulNBits quantizes in blocks; pass a block size such as 128)")
        if self.stateful is True and self.backend != "openvino":
            raise InputError("--stateful: only the openvino backend has a stateful export")
        if self.onnx_quant == "hqq" and (self.backend != "onnx" or self.wbits != 4):
            raise InputError("--onnx-quant hqq: applies to --backend onnx --wbits 4 only")
        if self.awq and self.calibration is None and self.wbits == 3:
            raise InputError("--awq with --wbits 3: needs --calibration DATA (kvtool's own AWQ search is data-aware)")
        if self.awq and self.calibration is None and self.backend == "onnx":
            raise InputError("--awq with --backend onnx: needs --calibration DATA (kvtool's own AWQ search is data-aware)")
        out = Path(self.output)
        if out.exists() and not out.is_dir():
            raise InputError(f"--output {self.output}: exists and is not a directory")
        held = previous_export_files(out)
        if held and not self.force:
            raise InputError(f"--output {self.output}: holds another export ({held[0]}); pass --force to replace "
                             f"it, or choose another directory")

    @property
    def method(self) -> str:
        """Weight method recorded in the manifest: none | rtn | awq | awq+se | hqq."""
        if self.wbits == 16:
            return "none"
        if self.awq:
            return "awq+se" if self.scale_estimation else "awq"
        if self.backend == "onnx" and self.wbits == 4 and self.onnx_quant == "hqq":
            return "hqq"
        return "rtn"

    @property
    def recorded_group_size(self) -> int | None:
        """Group size the weights really have (None: per-channel or unquantized)."""
        if self.wbits == 16 or self.group_size == -1 or (self.wbits == 8 and self.backend == "openvino"):
            return None
        return self.group_size

    @property
    def is_stateful(self) -> bool:
        """The LM graph keeps its KV cache inside (OpenVINO default); ONNX is always stateless."""
        return self.backend == "openvino" and self.stateful is not False

    @property
    def storage(self) -> str:
        return {16: "none", 3: "simulated"}.get(self.wbits, "packed")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def previous_export_files(out: Path) -> list[str]:
    """Names of the export files (manifest, OpenVINO or ONNX graphs) already in directory ``out``, manifest
    first; [] when there are none (or no such directory)."""
    if not out.is_dir():
        return []
    names = [MANIFEST_NAME] if (out / MANIFEST_NAME).is_file() else []
    graphs = [*out.glob("openvino_*_model.xml"), *out.glob("*.onnx")]
    return names + sorted(p.name for p in graphs if p.is_file())


@dataclass
class ExportResult:
    """What ``export_model`` produced: the directory, its manifest, and one row per graph for the summary
    table (``role``, ``file``, ``bytes`` on disk including weights, ``weights`` format)."""

    output_dir: Path
    manifest: Manifest
    graphs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"output_dir": str(self.output_dir), "seconds": round(self.seconds, 2), "graphs": self.graphs,
                "manifest": self.manifest.to_dict()}
