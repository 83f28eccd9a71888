"""The report's figures on hand-made data: what is drawn (points, intervals, Pareto set, ticks, legend place,
y-limits), and ``write_report`` on hand-made run directories (deltas, KV ratios and their source)."""

from __future__ import annotations

import math
import random

import pytest

from kvtool.errors import InputError
from kvtool.evals import plots as P
from kvtool.evals.report import (
    add_headline_cis,
    choose_references,
    collect_rows,
    headline_ci,
    kv_ratio,
    series_points,
    write_report,
)
from tests.evals.report_fixtures import study_runs, write_run


def _naive_front(xs, ys):
    ok = [i for i in range(len(xs)) if xs[i] is not None and ys[i] is not None
          and not (isinstance(xs[i], float) and math.isnan(xs[i]))]
    return sorted((i for i in ok if not any(
        xs[j] <= xs[i] and ys[j] >= ys[i] and (xs[j] < xs[i] or ys[j] > ys[i]) for j in ok)),
        key=lambda i: (xs[i], -ys[i]))


def test_pareto_front_matches_the_definition_on_random_points():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 14)
        # few distinct values, so ties and exact duplicates are common
        xs = [rng.choice([0.125, 0.14, 0.25, 0.27, 0.5, 1.0, None, float("nan")]) for _ in range(n)]
        ys = [rng.choice([-60.0, -5.0, -1.7, 0.0, 0.3, None]) for _ in range(n)]
        assert sorted(P.pareto_front(xs, ys)) == sorted(_naive_front(xs, ys)), (xs, ys)
    assert P.pareto_front([0.25, 0.125, 0.25], [-1.0, -5.0, -1.0]) == [1, 0, 2]  # duplicates both stay, by x
    with pytest.raises(ValueError, match="2 x values but 1"):
        P.pareto_front([1, 2], [1])


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _legend_outside(fig) -> None:
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    assert fig.legends, "the legend is a figure legend"
    for leg in fig.legends:
        for ax in fig.axes:
            assert not _overlap(leg.get_window_extent(r), ax.get_window_extent(r))


def _points():
    pts = [{"task": "shapes", "series": "torch W16, fp16 KV", "reference": True, "bits": 16, "value": 99.7,
            "ci95": (99.0, 100.0)},
           {"task": "shapes", "series": "openvino W4, fp16 KV", "reference": True, "bits": 16, "value": 99.3,
            "ci95": (98.3, 100.0)}]
    vals = {("uniform", 4): 99.0, ("uniform", 2): 96.3, ("g-T128", 4): 99.0, ("g-T128", 2): 98.0,
            ("g-KC128VT128", 4): 99.7, ("g-KC128VT128", 2): None}  # None: a metric B reports missing
    for (s, b), v in vals.items():
        pts.append({"task": "shapes", "series": s, "reference": False, "bits": b, "value": v,
                    "ci95": None if v is None else (v - 1.2, min(100.0, v + 0.8))})
    return pts


def test_accuracy_vs_bits_figure_structure():
    fig = P.accuracy_vs_bits_figure(_points(), ["shapes"], {"shapes": "shapes (accuracy)"})
    ax = fig.axes[0]
    conts = ax.containers  # one errorbar per scheme line and per reference point
    assert len(conts) == 3 + 2
    lines = {c.get_label(): c.lines[0] for c in conts if not c.get_label().startswith("_")}
    assert set(lines) == {"uniform", "g-T128", "g-KC128VT128"}
    assert [len(lines[s].get_xdata()) for s in ("uniform", "g-T128", "g-KC128VT128")] == [2, 2, 1]  # None skipped
    assert len({ln.get_marker() for ln in lines.values()}) == 3
    assert len({str(ln.get_linestyle()) for ln in lines.values()}) == 3
    # uniform and g-T128 tie at 4 bits (99.0): drawn apart, not on top of each other
    x_u = dict(zip(lines["uniform"].get_ydata(), lines["uniform"].get_xdata(), strict=True))[99.0]
    x_t = dict(zip(lines["g-T128"].get_ydata(), lines["g-T128"].get_xdata(), strict=True))[99.0]
    assert x_u != x_t and abs(math.log2(x_u) - math.log2(x_t)) < 0.2
    # the two references: horizontal lines of different colour and style, labelled apart
    refs = [ln for ln in ax.lines if ln.get_label() in ("torch W16, fp16 KV", "openvino W4, fp16 KV")]
    assert len(refs) == 2 and len({(ln.get_color(), str(ln.get_linestyle())) for ln in refs}) == 2
    assert {ln.get_label(): ln.get_ydata()[0] for ln in refs} == {"torch W16, fp16 KV": 99.7,
                                                                   "openvino W4, fp16 KV": 99.3}
    ticks = list(ax.get_xticks())
    assert ticks == [2, 4, 16] and [t.get_text() for t in ax.get_xticklabels()] == ["2", "4", "16"]
    assert ax.xaxis.get_minorticklocs().size == 0
    lo, hi = ax.get_ylim()
    all_ci = [c for p in _points() if p["ci95"] for c in p["ci95"]]
    assert lo <= min(all_ci) and hi >= max(all_ci)
    assert lo > 90  # the range shows a 96.3 vs 99.7 difference instead of a 0-100 axis
    assert "(%)" in ax.get_ylabel()
    _legend_outside(fig)


def test_mixed_bits_give_integer_ticks_only():
    pts = [{"task": "gqa", "series": "g-T128", "reference": False, "bits": 3.0, "value": 60.0, "ci95": None},
           {"task": "gqa", "series": "g-T128", "reference": False, "bits": 8, "value": 62.0, "ci95": None}]
    ax = P.accuracy_vs_bits_figure(pts, ["gqa"]).axes[0]
    assert all(float(t).is_integer() for t in ax.get_xticks()) and list(ax.get_xticks()) == [3, 8]
    pts[0]["bits"] = 3.5  # K4V3
    ax = P.accuracy_vs_bits_figure(pts, ["gqa"]).axes[0]
    assert list(ax.get_xticks()) == [3, 4, 8]


@pytest.mark.parametrize("reference", [True, False])
def test_a_single_run_plots_its_value_and_interval(reference):
    pt = {"task": "shapes", "series": "fp16" if reference else "g-T128", "reference": reference,
          "bits": 16 if reference else 2, "value": 91.67, "ci95": (83.3, 98.3)}
    fig = P.accuracy_vs_bits_figure([pt], ["shapes"])
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo <= 83.3 and hi >= 98.3 and hi - lo < 30  # around the value, not 0-1
    assert any(91.67 in list(ln.get_ydata()) for ln in ax.lines)
    assert list(ax.get_xticks()) == [16 if reference else 2]
    _legend_outside(fig)


def _trade_points():
    return [{"scheme": "fp16", "bits": 16, "kv_ratio": 1.0, "kv_ratio_source": "measured", "delta": -0.3,
             "ci95": (-1.0, 0.3)},
            {"scheme": "uniform", "bits": 4, "kv_ratio": 0.2502, "kv_ratio_source": "measured", "delta": -0.7,
             "ci95": (-1.7, 0.0)},
            {"scheme": "uniform", "bits": 2, "kv_ratio": 0.1252, "kv_ratio_source": "measured", "delta": -3.4,
             "ci95": (-4.6, -2.2)},
            {"scheme": "g-T128", "bits": 4, "kv_ratio": 0.2656, "kv_ratio_source": "bound", "delta": 0.0,
             "ci95": (-0.7, 0.7)},
            {"scheme": "g-T128", "bits": 2, "kv_ratio": 0.1406, "kv_ratio_source": "measured", "delta": -0.7,
             "ci95": (-1.7, 0.3)},
            {"scheme": "or2", "bits": 2, "kv_ratio": None, "kv_ratio_source": "none", "delta": -1.0, "ci95": None}]


def test_tradeoff_figure_structure():
    pts = _trade_points()
    fig = P.tradeoff_figure([{"task": "shapes", "title": "shapes", "reference": "torch-fp32", "points": pts}])
    ax = fig.axes[0]
    drawn = [c.lines[0] for c in ax.containers]
    assert len(drawn) == 5  # one per scheme x bits with a ratio (or2 has none)
    xy = sorted((float(ln.get_xdata()[0]), float(ln.get_ydata()[0])) for ln in drawn)
    assert xy == sorted((p["kv_ratio"], p["delta"]) for p in pts if p["kv_ratio"] is not None)
    # hollow marker exactly where the bytes are quant_ops' bound
    hollow = [(float(ln.get_xdata()[0])) for ln in drawn if ln.get_markerfacecolor() in ("white", (1, 1, 1, 1))]
    assert hollow == [0.2656]
    # the Pareto front drawn is the naive front: (0.1252, -3.4), (0.1406, -0.7), (0.2656, 0.0)
    fronts = [ln for ln in ax.lines if ln.get_drawstyle() == "steps-post"]
    assert len(fronts) == 1
    assert list(zip(fronts[0].get_xdata(), fronts[0].get_ydata(), strict=True)) == [
        (0.1252, -3.4), (0.1406, -0.7), (0.2656, 0.0)]
    ok = [p for p in pts if p["kv_ratio"] is not None]
    assert [(ok[i]["kv_ratio"], ok[i]["delta"]) for i in _naive_front([p["kv_ratio"] for p in ok],
                                                                       [p["delta"] for p in ok])] == [
        (0.1252, -3.4), (0.1406, -0.7), (0.2656, 0.0)]
    assert {t.get_text() for t in ax.texts} >= {"uniform 2b", "g-T128 2b", "g-T128 4b"}
    lo, hi = ax.get_ylim()
    assert lo <= -4.6 and hi >= 0.7 and hi - lo < 10
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1/8", "1/4", "1/2", "1"]
    assert "pp" in ax.get_ylabel() and "fp16" in ax.get_xlabel()
    legend_text = " ".join(t.get_text() for t in fig.legends[0].get_texts()) + fig.legends[0].get_title().get_text()
    assert "quant_ops bound" in legend_text and "measured" in legend_text and "Pareto" in legend_text
    _legend_outside(fig)


def test_kv_ratio_measured_bound_or_unknown():
    assert kv_ratio({"mean_kv_bytes": 250.0, "mean_kv_fp16_bytes": 1000.0}, "g-T128", 4, 4) == (0.25, "measured")
    # g-KC128VT128 at 4 bits: 4 bit codes + one fp16 scale and min (32 bits) per group of 128 -> 4.25 / 16
    assert kv_ratio({}, "g-KC128VT128", 4, 4) == (pytest.approx(4.25 / 16), "bound")
    assert kv_ratio({}, "g-KC128VT128", 4, 2) == (pytest.approx((4.25 + 2.25) / 2 / 16), "bound")
    assert kv_ratio({}, "fp16", None, None) == (1.0, "bound")
    assert kv_ratio({"mean_kv_bytes": 0}, "no-such-scheme", 2, 2) == (None, "none")


def test_headline_ci_is_the_bootstrap_of_the_run(tmp_path):
    run = write_run(tmp_path, "r", "g-T128", 2, 55, n=60)
    lo, hi = headline_ci(run, "shapes", n_boot=400)
    p = 55 / 60
    se = 100 * math.sqrt(p * (1 - p) / 60)
    assert lo < 100 * p < hi and (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.35)
    assert headline_ci(run, "shapes", n_boot=0) is None
    (run / "shapes" / "predictions.jsonl").unlink()  # results.json alone: no interval
    assert headline_ci(run, "shapes") is None


def test_write_report_on_hand_made_runs(tmp_path):
    runs = study_runs(tmp_path)
    rep = write_report(runs, tmp_path / "rep", n_boot=100)
    names = {p.rsplit("/", 1)[-1] for p in rep["plots"]}
    assert names == {"accuracy_vs_bits.png", "tradeoff.png"}
    for p in rep["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    pts = {p["run"].rsplit("/", 1)[-1]: p for p in rep["tradeoff"]}
    assert set(pts) == {r.name for r in runs} - {"torch-fp32"}  # every run but the reference
    assert all(p["reference"].endswith("torch-fp32") for p in pts.values())
    # delta = B - reference, in accuracy points (reference: 58 of 60 right)
    for name, right in (("ov-w4-fp16", 57), ("uniform-2", 20), ("g-T128-2", 50), ("g-KC128VT128-4", 57)):
        assert pts[name]["delta"] == pytest.approx(100 * (right - 58) / 60)
    assert pts["uniform-2"]["ci95"][0] < pts["uniform-2"]["delta"] < pts["uniform-2"]["ci95"][1]
    assert pts["g-T128-2"]["kv_ratio"] == pytest.approx(0.1406) and pts["g-T128-2"]["kv_ratio_source"] == "measured"
    assert pts["g-KC128VT128-4"]["kv_ratio"] == pytest.approx(4.25 / 16)
    assert pts["g-KC128VT128-4"]["kv_ratio_source"] == "bound"
    assert pts["g-KC128VT128-4"]["scheme"] == "g-KC128VT128" and pts["g-KC128VT128-4"]["bits"] == 4
    front = {n for n, p in pts.items() if p["pareto"]}
    order = list(pts)
    naive = _naive_front([pts[n]["kv_ratio"] for n in order], [pts[n]["delta"] for n in order])
    assert front == {order[i] for i in naive} == {"uniform-2", "g-KC128VT128-2", "uniform-4", "g-KC128VT128-4"}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Trade-off against the reference" in md and "| bound |" in md and "| measured |" in md
    # the accuracy-vs-bits series are the schemes; the references are named by backend and weights
    rows, tasks = collect_rows(runs)
    series = {p["series"] for p in series_points(rows, tasks)}
    assert series == {"uniform", "g-T128", "g-KC128VT128", "torch W16, fp16 KV", "openvino W4, fp16 KV"}


def test_reference_choice(tmp_path):
    runs = study_runs(tmp_path)
    rows, _ = collect_rows(runs)
    assert choose_references(rows)["toy"]["run"].endswith("torch-fp32")  # PyTorch first
    no_torch = [r for r in rows if r["backend"] != "torch"]
    assert choose_references(no_torch)["toy"]["run"].endswith("ov-w4-fp16")  # else the fp16-KV run
    assert choose_references([r for r in no_torch if r["kv"] != "fp16"]) == {}  # no fp16-KV run: no reference
    picked = choose_references(rows, reference=tmp_path / "ov-w4-fp16")
    assert picked["toy"]["run"].endswith("ov-w4-fp16")
    with pytest.raises(InputError, match="--reference .*nowhere: expected one of the report's run directories"):
        choose_references(rows, reference=tmp_path / "nowhere")


def test_single_run_report(tmp_path):
    one = write_run(tmp_path, "only", "fp16", None, 55, backend="torch", wbits=16)
    rep = write_report([one], tmp_path / "rep", n_boot=100)
    assert [p.rsplit("/", 1)[-1] for p in rep["plots"]] == ["accuracy_vs_bits.png"]  # nothing to trade off
    rows, tasks = collect_rows([one])
    add_headline_cis(rows, tasks, n_boot=100)
    pts = series_points(rows, tasks)
    assert len(pts) == 1 and pts[0]["value"] == pytest.approx(100 * 55 / 60)
    lo, hi = pts[0]["ci95"]
    assert lo < pts[0]["value"] < hi


def test_bars_figure_marks_missing_values_and_keeps_colours():
    pan = [{"title": "max_toxicity", "ylabel": "max - min toxicity (0-1)", "groups": ["SocialCF"],
            "values": [[None], [0.3]]},
           {"title": "empty_share", "ylabel": "share", "groups": ["a", "b"], "values": [[0.0, 0.1], [0.5, None]]}]
    fig = P.bars_figure(pan, ["fp16 16", "g-T128 2"])
    ax0, ax1 = fig.axes
    assert [round(b.get_height(), 3) for b in ax0.patches] == [0.3]
    assert [t.get_text() for t in ax0.texts if t.get_text() == "n/a"] == ["n/a"]
    assert [round(b.get_height(), 3) for b in ax1.patches] == [0.0, 0.1, 0.5]
    leg = fig.legends[0]
    assert [t.get_text() for t in leg.get_texts()] == ["fp16 16", "g-T128 2"]
    # the legend's colour of a run is its bars' colour
    assert leg.legend_handles[1].get_facecolor() == ax0.patches[0].get_facecolor()
    lo, hi = ax1.get_ylim()
    assert lo <= 0 and hi >= 0.5 and ax1.get_xlim()[1] > 1  # both groups inside the axes
    _legend_outside(fig)


def test_mixed_kv_bits_sit_at_their_mean():
    from kvtool.evals.report import _bits_num

    assert (_bits_num("4"), _bits_num("K4V2"), _bits_num("K16V2")) == (4.0, 3.0, 9.0)


def test_report_cli(tmp_path):
    import json

    from click.testing import CliRunner

    from kvtool.cli import main

    runs = [str(p) for p in study_runs(tmp_path)]
    r = CliRunner().invoke(main, ["report", *runs, "-o", str(tmp_path / "rep"), "--n-boot", "50", "--reference",
                                  runs[1], "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert [p.rsplit("/", 1)[-1] for p in rep["plots"]] == ["accuracy_vs_bits.png", "tradeoff.png"]
    assert {p["reference"] for p in rep["tradeoff"]} == {runs[1]} and len(rep["tradeoff"]) == len(runs) - 1
    r = CliRunner().invoke(main, ["report", *runs, "-o", str(tmp_path / "rep"), "--n-boot", "-1"])
    assert r.exit_code == 2 and "error: --n-boot -1: expected 0 or a positive number" in r.output
    r = CliRunner().invoke(main, ["report", *runs, "-o", str(tmp_path / "rep"), "--reference", "elsewhere"])
    assert r.exit_code == 2 and "error: --reference elsewhere: expected one of the report's run directories" in r.output


def test_tradeoff_table_shows_an_undefined_delta_as_a_dash():
    from kvtool.evals.report import _tradeoff_markdown

    md = _tradeoff_markdown([{"task": "pope", "reference": "ref", "scheme": "uniform", "bits": 2, "kv_ratio": 0.149,
                              "kv_ratio_source": "measured", "delta": None, "ci95": None, "pareto": False}])
    assert md[-1] == "| pope | ref | uniform | 2 | 0.149 | measured | – | – |  |"


def test_coincident_tradeoff_points_are_drawn_side_by_side(tmp_path):
    """Three 2-bit schemes at 0 pp and one bytes ratio (the demo's case) no longer hide each other: they are set
    apart along x only, their middle at the true ratio, y and intervals exact; a lone point stays put."""
    xs = P.spread_coincident([0.1406, 0.1406, 0.1406, 0.25], [0.0, 0.0, 0.01, 0.0], y_span=4.0)
    assert xs[3] == 0.25 and len(set(xs[:3])) == 3
    assert math.log2(xs[1]) == pytest.approx(math.log2(0.1406))  # the middle one at the true x
    assert math.log2(xs[2]) - math.log2(xs[0]) == pytest.approx(0.24)  # min_sep 0.12 apart
    assert P.spread_coincident([0.1406, 0.1406], [0.0, 2.0], y_span=4.0) == [0.1406, 0.1406]  # apart in y: kept
    # a neighbour pushed into by a spread cluster joins it: all at least min_sep apart, in their x order
    xs = P.spread_coincident([0.125, 0.1406, 0.1406, 0.1406, 0.5], [0.0] * 5, y_span=4.0)
    lx = [math.log2(x) for x in xs]
    assert lx == sorted(lx) and min(b - a for a, b in zip(lx, lx[1:], strict=False)) >= 0.12 - 1e-9
    assert xs[4] == 0.5 and sum(lx[:4]) / 4 == pytest.approx((math.log2(0.125) + 3 * math.log2(0.1406)) / 4)
    pts = [{"scheme": s, "bits": 2, "kv_ratio": 0.1406, "kv_ratio_source": "measured", "delta": 0.0,
            "ci95": (-1.0, 1.0)} for s in ("g-T128", "g-KC128VT128", "g-KCNVT128")]
    fig = P.tradeoff_figure([{"task": "shapes", "title": "shapes", "reference": "torch", "points": pts}])
    ax = fig.axes[0]
    drawn = [c.lines[0] for c in ax.containers]
    assert len({float(ln.get_xdata()[0]) for ln in drawn}) == 3
    assert {float(ln.get_ydata()[0]) for ln in drawn} == {0.0}
    fig.canvas.draw()  # the markers (7 pt) do not cover each other on screen
    px = sorted(ax.transData.transform((float(ln.get_xdata()[0]), 0.0))[0] for ln in drawn)
    assert min(b - a for a, b in zip(px, px[1:], strict=False)) >= 7 * fig.dpi / 72 * 0.9
    assert "side by side" in fig.legends[0].get_title().get_text()
    P.save_figure(fig, tmp_path / "coincident.png")


def test_labels_units_and_spans_come_from_the_declared_metrics():
    # the values the plots hard-coded per task before the metadata existed
    old_labels = {"mmvet": "MM-Vet total (score, 0-100)", "textvqa": "VQA accuracy (%)", "gqa": "accuracy (%)",
                  "mme": "perception score (0-2000)", "scienceqa": "accuracy (%)", "vqav2": "VQA accuracy (%)",
                  "pope": "random-split F1 (%)", "hallusionbench": "question accuracy qAcc (%)",
                  "shapes": "accuracy (%)", "socialcf": "max toxicity (0-1)"}
    for task, label in old_labels.items():
        assert P.headline_label(task) == label, task
    units = {"mme": "score points", "mmvet": "score points", "pairs": "score", "gqa": "pp", "pope": "pp"}
    for task, unit in units.items():
        assert P.delta_label(task) == f"change vs reference ({unit})"
    assert P.delta_label("socialcf") == "change vs reference"
    spans = {"mme": 20.0, "socialcf": 0.05, "pairs": 0.05, "gqa": 2.0, "shapes": 2.0}
    assert {t: P._min_span(t) for t in spans} == spans
    assert P.headline_label("no-such-task") == "headline"


def test_report_labels_an_unquantized_run_by_its_recorded_kv_dtype(tmp_path):
    """`kvtool report` and `kvtool demo` read the same recorded element type: the PyTorch fp32 reference is
    fp32 / 32 in both, the graphs' fp16 KV fp16 / 16, a run that recorded none fp16 / 16 as before."""
    import json

    from kvtool.demo import format_table

    runs = study_runs(tmp_path)
    for run, dtype in ((runs[0], "float32"), (runs[1], "float16")):
        res = json.loads((run / "results.json").read_text())
        res["pipeline"]["engine"] = {"kv_dtype": dtype}
        (run / "results.json").write_text(json.dumps(res))
    rows, _ = collect_rows(runs)
    by_run = {r["run"].rsplit("/", 1)[-1]: r for r in rows}
    assert (by_run["torch-fp32"]["kv"], by_run["torch-fp32"]["bits"]) == ("fp32", "32")
    assert (by_run["ov-w4-fp16"]["kv"], by_run["ov-w4-fp16"]["bits"]) == ("fp16", "16")
    assert choose_references(rows)["toy"]["run"].endswith("torch-fp32")  # still the reference
    rep = write_report(runs, tmp_path / "rep", n_boot=0)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| toy | torch | W16 | fp32 | 32 |" in md and "| toy | openvino | W4 | fp16 | 16 |" in md
    assert "shapes accuracy: accuracy (%), higher is better" in md
    assert {p["run"].rsplit("/", 1)[-1] for p in rep["tradeoff"]} >= {"ov-w4-fp16", "uniform-2"}
    series = {p["series"] for p in series_points(rows, ["shapes"])}
    assert {"torch W16, fp32 KV", "openvino W4, fp16 KV"} <= series
    demo_rows = [{"name": "x", "backend": "torch", "wbits": 16, "kv": "fp16", "k_bits": 16, "v_bits": 16, "n": 60,
                  "accuracy": 0.9, "pope_f1": None, "kv_ratio": 2.0, "decode_ms_per_token": 1.0, "agreement": 1.0,
                  "accuracy_delta": 0.0, "accuracy_delta_ci95": [0.0, 0.0], "kv_dtype": "float32"}]
    demo_line = format_table(demo_rows).splitlines()[2].split()
    assert demo_line[2:4] == [by_run["torch-fp32"]["kv"], by_run["torch-fp32"]["bits"]]
