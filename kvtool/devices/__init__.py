"""Discovery and choice of devices: OpenVINO devices (CPU/GPU/NPU, with full names), ONNX Runtime execution
providers, and CUDA via torch; and what ``device="auto"`` picks for each backend.

Nothing else: it does not load models or set performance properties.
"""

from __future__ import annotations

from typing import Any

from kvtool.errors import InputError

OV_AUTO_ORDER = ("GPU", "CPU")  # NPU is left to an explicit choice: stateless graphs with dynamic KV shapes don't fit it
ORT_AUTO_ORDER = ("CUDAExecutionProvider", "CPUExecutionProvider")


def openvino_devices() -> list[dict[str, str]]:
    try:
        import openvino as ov
    except ImportError:
        return []
    core = ov.Core()
    out = []
    for d in core.available_devices:
        try:
            name = core.get_property(d, "FULL_DEVICE_NAME")
        except Exception:  # a plugin that cannot report its name is still listed
            name = ""
        out.append({"device": d, "name": str(name)})
    return out


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def torch_devices() -> list[dict[str, str]]:
    out = [{"device": "cpu", "name": "CPU"}]
    try:
        import torch
    except ImportError:
        return out
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i)})
    return out


def resolve_device(backend: str, device: str = "auto") -> str:
    """The concrete device for ``backend`` ("openvino" -> an OpenVINO device name, "onnxruntime" -> an
    execution provider, "torch" -> a torch device); ``InputError`` when the requested one is absent."""
    device = device or "auto"
    if backend == "openvino":
        have = [d["device"] for d in openvino_devices()]
        if device.lower() == "auto":
            for want in OV_AUTO_ORDER:
                hit = [d for d in have if d.split(".")[0] == want]
                if hit:
                    return hit[0]
            return "CPU"
        dev = device.upper()
        if dev not in have and dev.split(".")[0] not in {d.split(".")[0] for d in have}:
            raise InputError(f"device: OpenVINO has no {device!r} here (available: {', '.join(have) or 'none'})")
        return dev
    if backend == "onnxruntime":
        have = onnxruntime_providers()
        if device.lower() == "auto":
            return next((p for p in ORT_AUTO_ORDER if p in have), "CPUExecutionProvider")
        aliases = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "gpu": "CUDAExecutionProvider"}
        prov = aliases.get(device.lower(), device)
        if prov not in have:
            raise InputError(f"device: ONNX Runtime has no {device!r} provider here (available: {', '.join(have)})")
        return prov
    if backend == "torch":
        have = [d["device"] for d in torch_devices()]
        if device.lower() == "auto":
            return "cuda:0" if "cuda:0" in have else "cpu"
        dev = device.lower()
        if dev == "cuda":
            dev = "cuda:0"
        if dev == "gpu":
            dev = "cuda:0"
        if dev not in have:
            raise InputError(f"device: torch has no {device!r} here (available: {', '.join(have)})")
        return dev
    raise InputError(f"backend: expected openvino, onnxruntime or torch, got {backend!r}")


def list_devices() -> dict[str, Any]:
    """Everything available, and what ``auto`` picks per backend (JSON-serialisable)."""
    return {
        "openvino": openvino_devices(),
        "onnxruntime": onnxruntime_providers(),
        "torch": torch_devices(),
        "auto": {b: resolve_device(b, "auto") for b in ("openvino", "onnxruntime", "torch")},
    }
