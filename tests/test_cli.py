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


def test_ls_models_lists_the_bundled_model_with_its_path():
    import json

    from click.testing import CliRunner

    from kvtool.cli import main
    from kvtool.models.bundled import SHAPES_MODEL_DIR, model_path

    res = CliRunner().invoke(main, ["ls", "models"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "kvtool-shapes" in x)
    assert line.split() == ["kvtool-shapes", str(SHAPES_MODEL_DIR)]
    d = json.loads(CliRunner().invoke(main, ["ls", "models", "--json"]).output)
    assert d["bundled"]["kvtool-shapes"]["path"] == str(SHAPES_MODEL_DIR) and "tiny-llava" in d["tiny"]
    assert model_path("kvtool-shapes") == str(SHAPES_MODEL_DIR) and model_path("some/dir") == "some/dir"
