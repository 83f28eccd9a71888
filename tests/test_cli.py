"""The CLI answers --help fast and without heavy imports."""

import subprocess
import sys
import time


def test_help_is_fast_and_light():
    code = (
        "import sys, time; t=time.perf_counter();"
        "from click.testing import CliRunner; from kvtool.cli import main;"
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output;"
        "heavy = [m for m in ('torch', 'openvino', 'onnxruntime', 'nncf', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy; print(time.perf_counter() - t)"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) < 1.0
    assert time.perf_counter() - t0 < 10
