"""Reports over many eval runs: a Markdown and a CSV table in the shape of the study's Table 3 (rows model x
backend x weights x KV scheme x bits, columns the tasks' headline numbers), a trade-off table, and PNG plots
(``kvtool.evals.plots``):

- ``accuracy_vs_bits.png``: each task's headline vs KV bits per scheme, with each run's own bootstrap 95 %
  interval (resampling its prediction rows, the task's own aggregate recomputed);
- ``tradeoff.png``: change of the headline against the reference run (paired bootstrap 95 % interval,
  ``compare``) vs KV bytes held per token relative to fp16, one point per scheme x bits, the Pareto front drawn.
  The bytes are the run's recorded ``kv_bytes / kv_fp16_bytes`` (results.json timing); a run that recorded none
  gets quant_ops' storage bound (``KVQuantSpec.bits_per_value / 16``) and is drawn hollow;
- ``pairs.png`` / ``socialcf.png``: the PAIRS association differences (the study's Figure 2) and the
  SocialCounterfactuals metrics with the empty-output share (Figures 3-4).

A run whose KV cache is not quantized is labelled by the element type it recorded (``fp32`` / 32 bits for the
PyTorch reference, ``fp16`` / 16 for the graphs; ``held_kv_label``, which ``kvtool demo`` uses too). Task order,
which tasks are bars and how a headline reads (direction, scale) come from the task specs. The reference of a
model is the ``--reference`` run, else its unquantized-KV run with the most weight bits, PyTorch first. It reads ``results.json`` and the prediction rows; it does not run models or judges.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.evals.runner import load_results, task_rows
from kvtool.evals.tasks import TASKS, get_task, headline_value, score_rows

#: the element type an unquantized KV cache was held in (results.json ``pipeline.engine.kv_dtype``) -> its label
HELD_KV = {"float32": ("fp32", "32"), "float16": ("fp16", "16"), "bfloat16": ("bf16", "16")}


def held_kv_label(kv_dtype: str | None) -> tuple[str, str]:
    """(KV label, bits) of a run whose cache is not quantized (scheme ``fp16``), from the element type the run
    recorded: ``("fp32", "32")`` for the PyTorch fp32 reference, ``("fp16", "16")`` for the graphs' fp16 KV and
    for a run that recorded none. ``kvtool report`` and ``kvtool demo`` both label with it."""
    return HELD_KV.get(kv_dtype or "", ("fp16", "16"))


def run_kv_dtype(res: dict[str, Any]) -> str | None:
    """The KV element type a run recorded (``pipeline.engine.kv_dtype`` in results.json), or None."""
    return ((res.get("pipeline") or {}).get("engine") or {}).get("kv_dtype")


def table_order(task: str) -> int:
    """A task's place in report tables and plots: its place in the registry (``TASKS``); unknown ones last."""
    return list(TASKS).index(task) if task in TASKS else len(TASKS)


def bar_tasks(tasks: list[str]) -> list[str]:
    """The tasks drawn as bars (their specs declare ``bars``: no accuracy-like headline to plot against bits)."""
    return [t for t in tasks if t in TASKS and TASKS[t].bars]


def _row_labels(res: dict[str, Any]) -> dict[str, Any]:
    cfg = res.get("config", {})
    info = res.get("pipeline") or {}
    manifest = info.get("manifest") or {}
    model = (manifest.get("source") or {}).get("model") or cfg.get("model") or "?"
    wbits = (manifest.get("weights") or {}).get("bits") or cfg.get("wbits") or 16
    kv = str(info.get("kv") or cfg.get("kv") or "fp16")
    kb, vb = info.get("k_bits", cfg.get("k_bits")), info.get("v_bits", cfg.get("v_bits"))
    full = kv.lower() == "fp16"  # not quantized: labelled by the element type the run held it in
    if full:
        kv, bits = held_kv_label(run_kv_dtype(res))
    elif kb == vb:
        bits = str(kb)
    else:
        bits = f"K{kb}V{vb}"
    window = info.get("kv_residual", cfg.get("kv_residual"))
    if window:  # KIVI's deployed semantics: the same scheme with a full-precision window of R tokens
        kv = f"{kv} r{window}"
    backend = info.get("backend") or cfg.get("backend") or "?"
    return {"model": Path(str(model)).name or str(model), "backend": str(backend), "weights": f"W{wbits}",
            "kv": kv, "bits": bits, "_k_bits": kb, "_v_bits": vb, "_full_kv": full,
            "_scheme": "fp16" if full else kv}


def _headline(task: str, metrics: dict[str, Any]) -> float | None:
    return headline_value(TASKS[task], metrics)


def collect_rows(run_dirs: list[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per run (labels, ``run``, each task's headline; private ``_<task>_metrics`` and
    ``_<task>_kv_ratio``), sorted as Table 3; and the tasks in the study's order."""
    rows, tasks = [], []
    for d in run_dirs:
        res = load_results(d)
        row = {**_row_labels(res), "run": str(d)}
        for task, rec in res.get("tasks", {}).items():
            row[task] = _headline(task, rec.get("metrics", {}))
            row[f"_{task}_metrics"] = rec.get("metrics", {})
            row[f"_{task}_kv_ratio"] = kv_ratio(rec.get("timing") or {}, row["_scheme"], row["_k_bits"],
                                                row["_v_bits"])
            if task not in tasks:
                tasks.append(task)
        rows.append(row)
    tasks.sort(key=table_order)
    rows.sort(key=lambda r: (r["model"], r["backend"], r["weights"], not r["_full_kv"], r["kv"],
                             -_bits_num(r["bits"])))
    return rows, tasks


def _bits_num(bits: str) -> float:
    """KV bits as a number: ``"4"`` -> 4.0, ``"K8V2"`` -> 5.0 (the mean of K and V bits)."""
    try:
        return float(bits)
    except ValueError:
        nums = [int(x) for x in re.findall(r"\d+", bits)]
        return sum(nums) / len(nums) if nums else 0.0


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}"


def kv_ratio(timing: dict[str, Any], kv: str, k_bits: Any, v_bits: Any) -> tuple[float | None, str]:
    """KV bytes held per token relative to fp16, and where the figure comes from: ``"measured"`` — the run's
    recorded ``mean_kv_bytes / mean_kv_fp16_bytes`` (both over the same tokens, so per token too); else
    ``"bound"`` — quant_ops' storage cost of the scheme (``KVQuantSpec.bits_per_value(k_bits, v_bits) / 16``,
    codes + fp16 group parameters at N = D_model = 4096); ``(None, "none")`` for a scheme quant_ops does not know."""
    kb, kf = timing.get("mean_kv_bytes"), timing.get("mean_kv_fp16_bytes")
    if isinstance(kb, (int, float)) and isinstance(kf, (int, float)) and kb > 0 and kf > 0:
        return kb / kf, "measured"
    from kvtool.quant_ops import parse_scheme

    try:
        spec = parse_scheme(kv)
        if spec.kind == "fp16":
            return 1.0, "bound"
        return spec.bits_per_value(int(k_bits or 16), int(v_bits or k_bits or 16)) / 16, "bound"
    except (ValueError, TypeError):  # InputError is a ValueError
        return None, "none"


def headline_ci(run_dir: str | Path, task: str, n_boot: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """Bootstrap 95 % interval of one run's own headline for ``task``: its prediction rows resampled with
    replacement ``n_boot`` times and the task's aggregate recomputed (``compare.bootstrap_ci``). None when the
    run has no prediction rows (results.json alone), ``n_boot`` is 0, or the headline is undefined."""
    import math

    from kvtool.evals.compare import bootstrap_ci

    if n_boot <= 0:
        return None
    try:
        rows = task_rows(run_dir, task)
    except FileNotFoundError:
        return None
    if not rows:
        return None
    spec = get_task(task)
    scored = score_rows(spec, [dict(r) for r in rows])

    def stat(idx: list[int]) -> float:
        v = headline_value(spec, spec.aggregate([dict(scored[i]) for i in idx]))
        return float("nan") if v is None else float(v)

    lo, hi = bootstrap_ci(stat, len(scored), n_boot=n_boot, seed=seed)
    return None if math.isnan(lo) or math.isnan(hi) else (lo, hi)


def add_headline_cis(rows: list[dict[str, Any]], tasks: list[str], n_boot: int = 1000, seed: int = 0) -> None:
    """Set ``row["_<task>_ci"]`` (``headline_ci``) on every row of ``collect_rows`` that has the task's value."""
    for r in rows:
        for t in tasks:
            r[f"_{t}_ci"] = headline_ci(r["run"], t, n_boot, seed) if r.get(t) is not None else None


def _weight_bits(label: str) -> int:
    return int(label[1:]) if label[1:].isdigit() else 0


def choose_references(rows: list[dict[str, Any]], reference: str | Path | None = None) -> dict[str, dict]:
    """``{model: reference row}``: the given ``reference`` run for every model, else per model its fp16-KV run
    with the most weight bits, a PyTorch run first. Models without an fp16-KV run have none."""
    if reference is not None:
        ref = next((r for r in rows if Path(r["run"]).resolve() == Path(reference).resolve()), None)
        if ref is None:
            raise InputError(f"--reference {reference}: expected one of the report's run directories")
        return {r["model"]: ref for r in rows}
    refs: dict[str, dict] = {}
    for r in rows:
        if not r["_full_kv"]:
            continue
        key = (r["backend"] == "torch", _weight_bits(r["weights"]))
        old = refs.get(r["model"])
        if old is None or key > (old["backend"] == "torch", _weight_bits(old["weights"])):
            refs[r["model"]] = r
    return refs


def tradeoff_points(rows: list[dict[str, Any]], tasks: list[str], refs: dict[str, dict], n_boot: int = 1000,
                    seed: int = 0) -> list[dict[str, Any]]:
    """One point per (non-reference run, task): the headline's change against the model's reference with its
    paired bootstrap 95 % interval (``compare_runs``), the KV bytes ratio and its source, and whether the point
    is on the Pareto front of its (task, reference). Runs that share no rows with the reference are left out."""
    from kvtool.evals.compare import compare_runs
    from kvtool.evals.plots import pareto_front

    parts = [k for k in ("model", "backend", "weights")
             if len({r[k] for r in rows if r is not refs.get(r["model"])}) > 1]
    out = []
    for t in tasks:
        for r in rows:
            ref = refs.get(r["model"])
            if ref is None or r is ref or r.get(t) is None or ref.get(t) is None:
                continue
            try:
                m = compare_runs(ref["run"], r["run"], tasks=[t], n_boot=n_boot, seed=seed)["tasks"][t]
            except InputError:
                continue
            d = m["metrics"].get(m["headline"])
            if d is None:
                continue
            ratio, source = r[f"_{t}_kv_ratio"]
            out.append({"task": t, "run": r["run"], "reference": ref["run"],
                        "scheme": " ".join([*(str(r[k]) for k in parts), r["kv"]]),
                        "bits": int(r["bits"]) if r["bits"].isdigit() else r["bits"],
                        "kv_ratio": ratio, "kv_ratio_source": source, "delta": d["delta"], "ci95": d.get("ci95")})
    for t in tasks:
        # the front keeps the least memory for the most kept quality: a lower-is-better headline flips the sign
        sign = -1.0 if get_task(t).headline_info.higher_is_better is False else 1.0
        for ref in {p["reference"] for p in out if p["task"] == t}:
            group = [p for p in out if p["task"] == t and p["reference"] == ref]
            front = set(pareto_front([p["kv_ratio"] for p in group],
                                     [None if p["delta"] is None else sign * p["delta"] for p in group]))
            for i, p in enumerate(group):
                p["pareto"] = i in front
    return out


def write_report(run_dirs: list[str | Path], out_dir: str | Path, reference: str | Path | None = None,
                 n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Write report.md, report.csv and PNG plots for ``run_dirs`` into ``out_dir``; returns the paths, the rows
    and the trade-off points. ``reference``: the run the trade-off compares against (default: see module);
    ``n_boot``: bootstrap resamples of every interval (0: no intervals)."""
    if not run_dirs:
        raise InputError("report: no run directories given")
    rows, tasks = collect_rows(run_dirs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out}: is a file; expected a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    curve_tasks = [t for t in tasks if t not in bar_tasks(tasks)]
    add_headline_cis(rows, curve_tasks, n_boot, seed)
    refs = choose_references(rows, reference)
    points = tradeoff_points(rows, curve_tasks, refs, n_boot, seed)
    head = ["model", "backend", "weights", "kv", "bits"]
    titles = [f"{TASKS[t].title} ({TASKS[t].headline})" for t in tasks]
    md = ["| " + " | ".join(head + titles) + " |", "|" + "---|" * (len(head) + len(tasks))]
    for r in rows:
        md.append("| " + " | ".join([str(r[h]) for h in head] + [_fmt(r.get(t)) for t in tasks]) + " |")
    md += ["", "'–': metric missing (no judge / scorer, or the task was not run). Runs: "
           + ", ".join(r["run"] for r in rows)]
    md += ["Headlines (TaskSpec.metrics): " + "; ".join(_headline_meaning(t) for t in tasks)]
    md += _tradeoff_markdown(points)
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    with open(out / "report.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(head + tasks + ["run"])
        for r in rows:
            w.writerow([r[h] for h in head] + ["" if r.get(t) is None else r[t] for t in tasks] + [r["run"]])
    plots = _plots(rows, tasks, points, out)
    return {"markdown": str(out / "report.md"), "csv": str(out / "report.csv"), "plots": plots,
            "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], "tradeoff": points}


def _headline_meaning(task: str) -> str:
    """``"MME perception: perception score (0-2000), higher is better"`` from the task's declared metric."""
    spec = get_task(task)
    info = spec.headline_info
    better = {True: "higher is better", False: "lower is better", None: "neither direction is better"}
    return f"{spec.title} {spec.headline}: {info.label}, {better[info.higher_is_better]}"


def _tradeoff_markdown(points: list[dict[str, Any]]) -> list[str]:
    if not points:
        return []
    md = ["", "Trade-off against the reference (delta: B - reference, paired bootstrap 95% CI; KV/fp16: bytes "
          "held per token relative to fp16, measured = the run's kv_bytes, bound = quant_ops' storage bound; "
          "* = on the Pareto front):", "",
          "| task | reference | scheme | bits | KV/fp16 | source | delta | 95% CI | Pareto |", "|" + "---|" * 9]
    for p in points:
        ci = p.get("ci95")
        md.append(f"| {p['task']} | {p['reference']} | {p['scheme']} | {p['bits']} | "
                  + ("–" if p["kv_ratio"] is None else f"{p['kv_ratio']:.3f}") + f" | {p['kv_ratio_source']} | "
                  + ("–" if p["delta"] is None else f"{p['delta']:+.2f}") + " | "
                  + (f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "–")
                  + f" | {'*' if p.get('pareto') else ''} |")
    return md


def series_points(rows: list[dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    """The accuracy-vs-bits points (``plots.accuracy_vs_bits_figure``) of ``rows``: one series per (model,
    backend, weights, KV scheme), named by the parts that vary among them; fp16-KV runs are references at 16
    bits, named by backend and weights."""
    quant = [r for r in rows if not r["_full_kv"]]
    parts = [k for k in ("model", "backend", "weights") if len({r[k] for r in quant}) > 1]
    many_models = len({r["model"] for r in rows}) > 1
    pts = []
    for r in rows:
        ref = r["_full_kv"]
        name = (" ".join([r["model"]] * many_models + [r["backend"], r["weights"]]) + f", {r['kv']} KV" if ref
                else " ".join([*(str(r[k]) for k in parts), r["kv"]]))
        for t in tasks:
            if r.get(t) is None:
                continue
            pts.append({"task": t, "series": name, "reference": ref,
                        "bits": 16.0 if ref else _bits_num(r["bits"]), "value": r[t], "ci95": r.get(f"_{t}_ci")})
    return pts


def _plots(rows: list[dict], tasks: list[str], points: list[dict], out: Path) -> list[str]:
    from kvtool.evals import plots as P
    from kvtool.evals.tasks import flatten_metrics

    paths = []
    bars = bar_tasks(tasks)
    curve_tasks = [t for t in tasks if t not in bars]
    titles = {t: f"{TASKS[t].title} ({TASKS[t].headline})" for t in curve_tasks}
    if curve_tasks:
        fig = P.accuracy_vs_bits_figure(series_points(rows, curve_tasks), curve_tasks, titles)
        paths.append(P.save_figure(fig, out / "accuracy_vs_bits.png"))
    panels = []
    for t in curve_tasks:
        for ref in dict.fromkeys(p["reference"] for p in points if p["task"] == t):
            panels.append({"task": t, "title": f"{titles[t]} vs {Path(ref).name}", "reference": Path(ref).name,
                           "points": [p for p in points if p["task"] == t and p["reference"] == ref]})
    if panels:
        paths.append(P.save_figure(P.tradeoff_figure(panels), out / "tradeoff.png"))
    labels = [" ".join(str(r[k]) for k in ("backend", "weights", "kv", "bits")) for r in rows]
    for t in bars:  # the task's own bar panels (TaskSpec.bars), values by dotted metric key
        spec = TASKS[t]
        flat = [flatten_metrics(r.get(f"_{t}_metrics") or {}) for r in rows]
        pan = [{"title": b.title, "ylabel": b.ylabel or spec.metric_info(b.keys[0]).label, "groups": list(b.groups),
                "values": [[f.get(k) for k in b.keys] for f in flat]} for b in spec.bars]
        paths.append(P.save_figure(P.bars_figure(pan, labels, spec.title, zero_line=any(b.zero_line for b in spec.bars)),
                                   out / f"{t}.png"))
    return paths
