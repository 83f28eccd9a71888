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


def test_eval_summary_line_is_whole_and_on_one_scale(capsys):
    """One line per task: the headline on the task's own scale and n, never a cut-off list mixing 0-1 shares
    with 0-100 accuracies (those are in results.json)."""
    from kvtool.cli import _print_results

    results = {"tasks": {
        "shapes": {"n_samples": 8, "metrics": {"accuracy": 87.5, "unparsed_share": 0.05, "n": 8}},
        "pope": {"n_samples": 6, "metrics": {"random_f1": None, "adversarial": {"f1": 0.8, "accuracy": 0.75,
                                                                               "precision": 0.66666, "recall": 1.0}}},
    }}
    _print_results(results)
    from kvtool.evals.tasks import get_task, headline_value

    expect = []
    for task, rec in results["tasks"].items():  # (headline names from the task specs, which own them)
        spec = get_task(task)
        val = headline_value(spec, rec["metrics"])
        shown = "missing" if val is None else f"{val:.2f}"
        beside = "".join(f" {k}=–" for k in spec.beside)  # (POPE: mean_f1 beside random_f1; undefined here)
        expect.append(f"{task:<15} {spec.headline}={shown:<10}{beside} n={rec['n_samples']}")
    assert capsys.readouterr().out.splitlines() == expect + [
        "(every metric: results.json in the run directory, or --json)"]
    assert expect[0] == "shapes          accuracy=87.50      n=8"
