"""Export memory regression: the OpenVINO exporter never holds an fp32 copy of an fp16 checkpoint, and
does not keep the memory-mapped checkpoint's pages resident once consumed.

The same random model is written in fp16 and in fp32 and each is exported to int4 in its own subprocess,
which reads its resident set after importing the libraries (``VmRSS``) and its peak after the export
(``VmHWM``, /proc/self/status). An exporter that up-casts the fp16 checkpoint to fp32 holds that fp32 copy
(plus what it read) and peaks at least as high as for the fp32 checkpoint; one that works in the checkpoint's
dtype peaks lower by about the fp16 checkpoint's size (the fixed cost of tracing and compressing, ~250 MiB
here, is the same for both, so the difference is asserted rather than a ratio of the peaks). The ONNX
exporter's test compares two decoder depths of an fp16 checkpoint instead (see its docstring).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import torch, transformers, openvino, nncf, openvino_tokenizers  # noqa: F401
import optimum.exporters.openvino  # noqa: F401
from kvtool.export import ExportConfig, export_model

def status(key):
    return int([ln for ln in open('/proc/self/status') if ln.startswith(key)][0].split()[1]) * 1024

base = status('VmRSS')
export_model(ExportConfig(model=sys.argv[1], output=sys.argv[2], wbits=4))
print(json.dumps({'base': base, 'hwm': status('VmHWM')}))
"""


def _export_peak_above_imports(model_dir, out, env=None) -> int:
    res = subprocess.run([sys.executable, "-c", PROBE, str(model_dir), str(out)], capture_output=True, text=True,
                         check=True, env=env)
    d = json.loads(res.stdout.strip().splitlines()[-1])
    return d["hwm"] - d["base"]


@pytest.mark.slow
def test_fp16_checkpoint_is_exported_without_an_fp32_copy(tmp_path):
    from kvtool.models import make_tiny_model

    sizes = dict(hidden=1024, intermediate=2816, layers=4, heads=8, kv_heads=8)  # ~100 MB of fp16 LM weights
    peaks, sizes_on_disk = {}, {}
    for dtype in ("float16", "float32"):
        ckpt = make_tiny_model("tiny-llava", tmp_path / dtype, dtype=dtype, **sizes)
        sizes_on_disk[dtype] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        peaks[dtype] = _export_peak_above_imports(ckpt, tmp_path / f"out-{dtype}")
    saved = (peaks["float32"] - peaks["float16"]) / sizes_on_disk["float16"]
    print(f"\n[export memory] peak above imports: fp16 ckpt {peaks['float16'] / 2**20:.0f} MiB, "
          f"fp32 ckpt {peaks['float32'] / 2**20:.0f} MiB; difference {saved:.2f}x the fp16 checkpoint")
    # measured ~0.9x (2026-11-30); an fp32 copy of the fp16 checkpoint would make it <= 0
    assert saved > 0.5, (peaks, sizes_on_disk)


@pytest.mark.slow
def test_checkpoint_pages_are_not_held_resident(tmp_path):
    """The same fp16 export with the checkpoint's pages reclaimed as consumed (default) and kept
    (``KVTOOL_EXPORT_KEEP_PAGES``): the default peaks lower by most of the checkpoint's bytes (asserted as
    that fraction: the fixed cost of tracing and compressing is the same for both). Measured 2026-11-30:
    406 MiB checkpoint, peak above imports 708 MiB kept vs 341 MiB reclaimed, 0.91x saved."""
    from kvtool.models import make_tiny_model

    ckpt = make_tiny_model("tiny-llava", tmp_path / "ckpt", dtype="float16", hidden=2048, intermediate=5632,
                           layers=4, heads=16, kv_heads=16)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    peaks = {}
    for keep in ("1", ""):
        env = dict(os.environ, KVTOOL_EXPORT_KEEP_PAGES=keep)
        peaks[keep] = _export_peak_above_imports(ckpt, tmp_path / f"out-{keep or 'paged'}", env)
    saved = (peaks["1"] - peaks[""]) / size
    print(f"\n[export memory] checkpoint {size / 2**20:.0f} MiB fp16; peak above imports: pages kept "
          f"{peaks['1'] / 2**20:.0f} MiB, reclaimed {peaks[''] / 2**20:.0f} MiB; saved {saved:.2f}x the checkpoint")
    assert saved > 0.4, (peaks, size)


ONNX_PROBE = """
import json, sys
import torch, transformers, onnx, onnxruntime, onnxscript, onnx_ir  # noqa: F401
from kvtool.export import ExportConfig, export_model

def status(key):
    return int([ln for ln in open('/proc/self/status') if ln.startswith(key)][0].split()[1]) * 1024

base = status('VmRSS')
export_model(ExportConfig(model=sys.argv[1], output=sys.argv[2], backend='onnx', wbits=4))
print(json.dumps({'base': base, 'hwm': status('VmHWM')}))
"""


@pytest.mark.slow
def test_onnx_export_memory_grows_slower_than_the_checkpoint(tmp_path):
    """ONNX int4 export of an fp16 checkpoint at two decoder depths (4 and 12 layers, the same widths):
    the peak resident set above the imports grows by less than the checkpoint grows (asserted on the
    ratio of the two differences, since tracing's fixed cost (~0.6 GiB) dwarfs a small checkpoint). The
    exporter before this change (fp32 model, fp32 graphs loaded whole to check and to quantize) grew by
    ~2x the added checkpoint bytes; weight-by-weight it grows by the packed int4 weights and one fp32
    weight at a time. Both depths are above ``onnx_backend.CHECK_MAX_PARAMS``, so neither runs the
    onnxruntime check."""
    from kvtool.models import make_tiny_model

    peaks, sizes = {}, {}
    for layers in (4, 12):
        ckpt = make_tiny_model("tiny-llava", tmp_path / f"L{layers}", dtype="float16", hidden=1024,
                               intermediate=2816, layers=layers, heads=8, kv_heads=8)
        sizes[layers] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        res = subprocess.run([sys.executable, "-c", ONNX_PROBE, str(ckpt), str(tmp_path / f"out-{layers}")],
                             capture_output=True, text=True, check=True)
        d = json.loads(res.stdout.strip().splitlines()[-1])
        peaks[layers] = d["hwm"] - d["base"]
    slope = (peaks[12] - peaks[4]) / (sizes[12] - sizes[4])
    print(f"\n[export memory] onnx int4: checkpoint {sizes[4] / 2**20:.0f} -> {sizes[12] / 2**20:.0f} MiB fp16, "
          f"peak above imports {peaks[4] / 2**20:.0f} -> {peaks[12] / 2**20:.0f} MiB; {slope:.2f}x the added bytes")
    assert slope < 0.8, (peaks, sizes)
