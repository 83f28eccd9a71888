"""Device discovery and the choice ``auto`` makes, against what the libraries report themselves."""

from __future__ import annotations

import pytest

from kvtool.devices import list_devices, resolve_device
from kvtool.errors import InputError


def test_lists_what_the_libraries_report():
    import onnxruntime as ort
    import openvino as ov
    import torch

    d = list_devices()
    assert [x["device"] for x in d["openvino"]] == ov.Core().available_devices
    assert all(x["name"] for x in d["openvino"])  # full device names
    assert d["onnxruntime"] == ort.get_available_providers()
    assert len(d["torch"]) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_auto_choices_are_available_devices():
    d = list_devices()
    assert d["auto"]["openvino"] in [x["device"] for x in d["openvino"]]
    assert d["auto"]["onnxruntime"] in d["onnxruntime"]
    assert d["auto"]["torch"] in [x["device"] for x in d["torch"]]
    if "GPU" not in {x["device"].split(".")[0] for x in d["openvino"]}:
        assert d["auto"]["openvino"] == "CPU"


def test_explicit_names_and_aliases():
    assert resolve_device("openvino", "cpu") == "CPU"
    assert resolve_device("onnxruntime", "cpu") == "CPUExecutionProvider"
    assert resolve_device("torch", "CPU") == "cpu"


@pytest.mark.parametrize("backend,device", [("openvino", "TPU"), ("onnxruntime", "rocm"), ("torch", "xpu:3"),
                                            ("tensorflow", "auto")])
def test_unknown_device_is_a_one_line_input_error(backend, device):
    with pytest.raises(InputError) as e:
        resolve_device(backend, device)
    assert "\n" not in str(e.value)
