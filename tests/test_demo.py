"""kvtool demo: the plan and table on their own, and ``kvtool demo --quick --json`` end to end."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvtool.cli import main
from kvtool.demo import (
    DEMO_BITS,
    DEMO_SCHEMES,
    QUICK_N,
    DemoConfig,
    demo_plan,
    format_table,
    plot_demo,
    plot_demo_tradeoff,
)
from kvtool.errors import InputError

ROW_KEYS = {"backend", "wbits", "kv", "k_bits", "v_bits", "accuracy", "kv_bytes", "kv_fp16_bytes", "agreement"}


def test_plan_has_the_issue_rows():
    plan = demo_plan(DEMO_SCHEMES, DEMO_BITS)
    assert len(plan) == 2 + len(DEMO_SCHEMES) * len(DEMO_BITS)
    assert plan[0] == {"name": "torch-fp32", "backend": "torch", "wbits": 16, "kv": "fp16", "k_bits": 16,
                       "v_bits": 16}
    assert plan[1]["backend"] == "openvino" and plan[1]["wbits"] == 4 and plan[1]["kv"] == "fp16"
    assert {(r["kv"], r["k_bits"]) for r in plan[2:]} == {(s, b) for s in DEMO_SCHEMES for b in DEMO_BITS}
    assert len({r["name"] for r in plan}) == len(plan)


def test_config_checks_input():
    assert DemoConfig(quick=True).n == QUICK_N
    with pytest.raises(InputError, match="--bits"):
        DemoConfig(bits=(5,))
    with pytest.raises(InputError, match="--n"):
        DemoConfig(n=0)
    with pytest.raises(ValueError):
        DemoConfig(schemes=("g-XY7",))
    r = CliRunner().invoke(main, ["demo", "--bits", "four"])
    assert r.exit_code == 2 and "error: --bits" in r.output


def test_table_and_plot_from_rows(tmp_path):
    def row(backend, wbits, kv, b, acc, agree, delta):
        return {"name": kv, "backend": backend, "wbits": wbits, "kv": kv, "k_bits": b, "v_bits": b, "n": 10,
                "accuracy": acc, "accuracy_color": acc, "accuracy_count": acc / 2, "pope_f1": 0.8,
                "kv_bytes": 100 * b, "kv_fp16_bytes": 1600, "kv_ratio": b / 16, "decode_ms_per_token": 1.5,
                "agreement": agree, "accuracy_delta": delta, "accuracy_delta_ci95": [delta - 0.1, delta + 0.1]}

    rows = [row("torch", 16, "fp16", 16, 0.95, 1.0, 0.0), row("openvino", 4, "fp16", 16, 0.94, 0.97, -0.01),
            row("openvino", 4, "g-T128", 4, 0.9, 0.9, -0.05), row("openvino", 4, "g-T128", 2, 0.3, 0.3, -0.65)]
    table = format_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert "count" in table[0] and "POPE F1" in table[0]
    last = table[-1]
    assert "g-T128" in last and "30.0" in last and "-65.0 [-75.0, -55.0]" in last and "0.125" in last
    png = plot_demo(rows, tmp_path / "demo.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = plot_demo_tradeoff(rows, tmp_path / "demo_tradeoff.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _demo_rows():
    """The issue's case: reference 99.7 %, one scheme at 96.3 %; intervals as the demo records them."""
    def row(backend, kv, b, acc, ratio, source="measured"):
        return {"name": kv, "backend": backend, "wbits": 16 if backend == "torch" else 4, "kv": kv, "k_bits": b,
                "v_bits": b, "n": 300, "accuracy": acc, "accuracy_ci95": [acc - 0.01, min(1.0, acc + 0.003)],
                "kv_ratio": ratio, "kv_ratio_source": source, "accuracy_delta": acc - 0.997,
                "accuracy_delta_ci95": [acc - 0.997 - 0.012, acc - 0.997 + 0.008]}

    return [row("torch", "fp16", 16, 0.997, 2.0), row("openvino", "fp16", 16, 0.993, 1.0),
            row("openvino", "uniform", 4, 0.99, 0.2502), row("openvino", "uniform", 2, 0.963, 0.1252),
            row("openvino", "g-T128", 4, 0.997, 0.2656, "bound"), row("openvino", "g-T128", 2, 0.99, 0.1406)]


def test_demo_figures_show_small_differences_with_intervals():
    from kvtool.demo import demo_accuracy_figure, demo_tradeoff_figure

    rows = _demo_rows()
    fig = demo_accuracy_figure(rows)
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo <= 95.3 and hi >= 100.0 and lo > 90  # 96.3 vs 99.7 is a visible gap, every interval inside
    assert [c.get_label() for c in ax.containers if not c.get_label().startswith("_")] == ["uniform", "g-T128"]
    assert all(c.has_yerr for c in ax.containers)
    assert list(ax.get_xticks()) == [2, 4, 16]
    fig.canvas.draw()
    leg = fig.legends[0].get_window_extent()
    box = ax.get_window_extent()
    assert leg.x0 >= box.x1 or leg.y1 <= box.y0 or leg.y0 >= box.y1  # legend outside the data
    fig = demo_tradeoff_figure(rows)
    ax = fig.axes[0]
    assert len(ax.containers) == len(rows) - 1  # every row but the reference, one point each
    front = next(ln for ln in ax.lines if ln.get_drawstyle() == "steps-post")
    # least memory for the accuracy kept: uniform 2-bit, g-T128 2-bit, g-T128 4-bit
    assert [round(x, 4) for x in front.get_xdata()] == [0.1252, 0.1406, 0.2656]
    lo, hi = ax.get_ylim()
    assert lo <= 100 * (0.963 - 0.997 - 0.012) and hi >= 0.8


def test_demo_cli_small_plan_json(tmp_path):
    """The CI-sized run: the real export and runtime, one scheme at 2 bits, 12 questions."""
    js = tmp_path / "d.json"
    r = CliRunner().invoke(main, ["demo", "--n", "12", "--schemes", "g-KC128VT128", "--bits", "2", "--out",
                                  str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "cache"), "--json", str(js)])
    assert r.exit_code == 0, r.output
    rows = json.loads(js.read_text())["rows"]
    assert [(x["backend"], x["wbits"], x["kv"], x["k_bits"]) for x in rows] == [
        ("torch", 16, "fp16", 16), ("openvino", 4, "fp16", 16), ("openvino", 4, "g-KC128VT128", 2)]
    assert all(ROW_KEYS <= set(x) and x["n"] == 12 for x in rows)
    assert abs(rows[1]["accuracy"] - rows[0]["accuracy"]) <= 1 / 12 + 1e-9  # int4: at most one answer of 12 flips
    assert 0 < rows[2]["kv_bytes"] < rows[2]["kv_fp16_bytes"]
    # what is held is what is reported: the torch reference holds fp32 (2x fp16), the graphs' fp16 KV fp16
    assert (rows[0]["kv_dtype"], rows[0]["kv_ratio"]) == ("float32", 2.0)
    assert (rows[1]["kv_dtype"], rows[1]["kv_ratio"]) == ("float16", 1.0)


def test_table_labels_the_kv_dtype_held():
    base = {"name": "x", "wbits": 16, "kv": "fp16", "k_bits": 16, "v_bits": 16, "n": 10, "accuracy": 0.9,
            "pope_f1": None, "kv_bytes": 3200, "kv_fp16_bytes": 1600, "kv_ratio": 2.0, "decode_ms_per_token": 1.0,
            "agreement": 1.0, "accuracy_delta": 0.0, "accuracy_delta_ci95": [0.0, 0.0]}
    rows = [{**base, "backend": "torch", "kv_dtype": "float32"},
            {**base, "backend": "openvino", "kv_dtype": "float16", "kv_bytes": 1600, "kv_ratio": 1.0}]
    torch_line, ov_line = format_table(rows).splitlines()[2:]
    assert torch_line.split()[:4] == ["torch", "16", "fp32", "32"] and "2.000" in torch_line
    assert ov_line.split()[:4] == ["openvino", "16", "fp16", "16"] and "1.000" in ov_line


def test_demo_quick_end_to_end(tmp_path):
    """``kvtool demo --quick --json PATH``, the issue's CI check (~1 min: export + 14 rows x 60 questions)."""
    out, js = tmp_path / "demo", tmp_path / "demo.json"
    r = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                                  "--json", str(js)])
    assert r.exit_code == 0, r.output
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == 2 + len(DEMO_SCHEMES) * len(DEMO_BITS)
    assert all(ROW_KEYS <= set(x) for x in rows)
    ref, base = rows[0], rows[1]
    assert (ref["backend"], ref["wbits"], ref["kv"]) == ("torch", 16, "fp16")
    from kvtool.models.bundled import SHAPES_MODEL_DIR

    recorded = json.loads((SHAPES_MODEL_DIR / "TRAINING.json").read_text())["test_accuracy"]
    assert abs(ref["accuracy"] - recorded) <= 0.12 and ref["agreement"] == 1.0  # 60 of the 500 questions
    assert ref["accuracy"] >= 0.9  # the issue's bar for the reference row
    assert (base["backend"], base["wbits"], base["kv"]) == ("openvino", 4, "fp16")
    assert abs(base["accuracy"] - ref["accuracy"]) <= 0.05
    for x in rows[2:]:
        assert 0.0 <= x["accuracy"] <= 1.0 and 0.0 <= x["agreement"] <= 1.0
        assert 0 < x["kv_bytes"] < x["kv_fp16_bytes"]
    by = {(x["kv"], x["k_bits"]): x for x in rows[2:]}
    for s in DEMO_SCHEMES:
        assert by[(s, 2)]["kv_bytes"] < by[(s, 4)]["kv_bytes"]
    assert (out / "demo.png").is_file() and (out / "demo_tradeoff.png").is_file() and "g-KC128VT128" in r.output
    assert all(x["kv_ratio_source"] == "measured" for x in rows)  # the runs record kv_bytes
    assert all(x["accuracy_ci95"][0] <= x["accuracy"] <= x["accuracy_ci95"][1] for x in rows)
