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
