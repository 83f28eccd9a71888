"""Parity of two eval runs (a compressed run against its reference): per task, the delta of every headline
number with a paired bootstrap 95% interval, per-sample answer agreement, and flips right->wrong / wrong->right.

Samples are matched by id (the dataset row, question and seed), so two runs over the same data and
selection pair up exactly; samples present in only one run are counted and left out of the paired figures, and
each side's own headline over all its rows is shown beside them. A run whose rows of a task carry more than one
settings fingerprint (rows made under different settings) is refused. When one run has only its results.json (a
baseline measured elsewhere), the metrics are compared without intervals or per-sample figures. A sample is "right"
when its per-sample score is at least 0.5 (for VQA soft accuracy: at least two annotators agree). The
bootstrap resamples the paired samples and recomputes the task's own aggregate on both runs, so MME, POPE
and the other non-mean metrics get intervals too. It does not run models or judges: metrics that need a
judge compare only when both runs carry the judge's fields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.evals.runner import as_scored, load_results, task_rows
from kvtool.evals.tasks import flatten_metrics, get_task, headline_value, score_rows


def bootstrap_ci(statistic: Callable[[list[int]], float], n: int, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``statistic(indices)`` over ``n_boot`` resamples (with replacement) of range(n)."""
    import numpy as np

    if n < 1:
        raise InputError("bootstrap_ci: no samples")
    if not 0 < level < 1:
        raise InputError(f"bootstrap_ci: level {level} must lie in (0, 1)")
    rng = np.random.default_rng(seed)
    vals = np.asarray([statistic(rng.integers(0, n, size=n).tolist()) for _ in range(n_boot)], dtype=float)
    if np.isnan(vals).all():
        return float("nan"), float("nan")
    # resamples where the statistic is undefined (e.g. no POPE "random" row drawn) are left out
    lo, hi = np.nanquantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _norm(text: str) -> str:
    return " ".join(str(text).lower().strip().rstrip(".").split())


def compare_task(task: str, rows_a: list[dict], rows_b: list[dict], n_boot: int = 1000, seed: int = 0
                 ) -> dict[str, Any]:
    """Compare one task's prediction rows of run A (reference) and run B."""
    spec = get_task(task)
    by_a = {r["id"]: r for r in as_scored(rows_a)}  # failed rows count as wrong, as in the run's own metrics
    by_b = {r["id"]: r for r in as_scored(rows_b)}
    ids = [i for i in by_a if i in by_b]
    if not ids:
        raise InputError(f"{task}: the two runs share no samples (different data, --limit/--offset or shards?)")
    a = score_rows(spec, [dict(by_a[i]) for i in ids])
    b = score_rows(spec, [dict(by_b[i]) for i in ids])
    agree = sum(_norm(x["prediction"]) == _norm(y["prediction"]) for x, y in zip(a, b, strict=True))
    out: dict[str, Any] = {"n_a": len(by_a), "n_b": len(by_b), "n_paired": len(ids), "only_a": len(by_a) - len(ids),
                           "only_b": len(by_b) - len(ids), "agreement": agree / len(ids)}
    # each side's own headline over all its rows, beside the paired one below
    out["own"] = {side: headline_value(spec, spec.aggregate(score_rows(spec, [dict(r) for r in by.values()])))
                  for side, by in (("a", by_a), ("b", by_b))}
    if all(r["score"] is not None for r in a + b):
        ra = [r["score"] >= 0.5 for r in a]
        rb = [r["score"] >= 0.5 for r in b]
        out["right_to_wrong"] = sum(x and not y for x, y in zip(ra, rb, strict=True))
        out["wrong_to_right"] = sum(y and not x for x, y in zip(ra, rb, strict=True))
        out["flipped_ids"] = {"right_to_wrong": [i for i, x, y in zip(ids, ra, rb, strict=True) if x and not y][:50],
                              "wrong_to_right": [i for i, x, y in zip(ids, ra, rb, strict=True) if y and not x][:50]}
    ma = flatten_metrics(spec.aggregate([dict(r) for r in a]), keep_missing=True)
    mb = flatten_metrics(spec.aggregate([dict(r) for r in b]), keep_missing=True)
    deltas = _deltas(ma, mb)
    head = spec.headline
    if head in deltas and deltas[head]["delta"] is not None and n_boot > 0:
        def stat(idx: list[int]) -> float:
            va = headline_value(spec, spec.aggregate([dict(a[i]) for i in idx]))
            vb = headline_value(spec, spec.aggregate([dict(b[i]) for i in idx]))
            return float(vb) - float(va) if va is not None and vb is not None else float("nan")

        lo, hi = bootstrap_ci(stat, len(ids), n_boot=n_boot, seed=seed)
        deltas[head]["ci95"] = [lo, hi]
    out["headline"] = head
    out["headline_meaning"] = headline_meaning(spec)
    out["metrics"] = deltas
    return out


def headline_meaning(spec: Any) -> dict[str, Any]:
    """How to read a change of the task's headline (its declared ``MetricInfo``): which direction is better,
    its scale and the unit of a difference (``pp`` for percentages)."""
    info = spec.headline_info
    return {"higher_is_better": info.higher_is_better, "scale": list(info.scale), "delta_unit": info.delta_unit}


def compare_runs(a: str | Path, b: str | Path, tasks: Iterable[str] | None = None, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """Compare run directory ``b`` against reference ``a`` on their common tasks."""
    ra, rb = load_results(a), load_results(b)
    common = [t for t in ra.get("tasks", {}) if t in rb.get("tasks", {})]
    chosen = list(tasks) if tasks else common
    missing = [t for t in chosen if t not in common]
    if missing or not chosen:
        raise InputError(f"runs {a} and {b} do not both hold task(s) {', '.join(missing) or '(any)'}; "
                         f"common tasks: {', '.join(common) or 'none'}")
    out = {"a": str(a), "b": str(b), "a_config": ra.get("config"), "b_config": rb.get("config"), "tasks": {}}
    for t in chosen:
        try:
            rows_a, rows_b = task_rows(a, t), task_rows(b, t)
            for run, rows in ((a, rows_a), (b, rows_b)):
                _check_one_setting(run, t, rows)
        except FileNotFoundError as exc:  # e.g. a baseline's results.json brought without its predictions
            out["tasks"][t] = _compare_metrics_only(t, ra["tasks"][t].get("metrics", {}),
                                                    rb["tasks"][t].get("metrics", {}), str(exc))
            continue
        out["tasks"][t] = compare_task(t, rows_a, rows_b, n_boot=n_boot, seed=seed)
    return out


def _deltas(fa: dict[str, float | None], fb: dict[str, float | None]) -> dict[str, dict[str, float | None]]:
    """Per metric of either run: A, B and B - A; an undefined (None) side makes the delta None."""
    out = {}
    for k in [*fa, *(k for k in fb if k not in fa)]:
        va, vb = fa.get(k), fb.get(k)
        out[k] = {"a": va, "b": vb, "delta": None if va is None or vb is None else vb - va}
    return out


def _check_one_setting(run: str | Path, task: str, rows: list[dict]) -> None:
    """Refuse a run whose rows of ``task`` were made under more than one setting (their ``settings`` prints)."""
    prints: dict[Any, int] = {}
    for r in rows:
        prints[r.get("settings")] = prints.get(r.get("settings"), 0) + 1
    if len(prints) > 1:
        shown = ", ".join(f"{n} rows {p or 'unrecorded'}" for p, n in prints.items())
        raise InputError(f"{run}: task {task} mixes rows made under {len(prints)} settings ({shown}); "
                         "its numbers belong to no single run")


def _compare_metrics_only(task: str, ma: dict, mb: dict, why: str) -> dict[str, Any]:
    fa, fb = flatten_metrics(ma, keep_missing=True), flatten_metrics(mb, keep_missing=True)
    spec = get_task(task)
    return {"headline": spec.headline, "headline_meaning": headline_meaning(spec), "agreement": None,
            "note": f"metrics only: {why}", "metrics": _deltas(fa, fb)}


def _num(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def format_comparison(cmp: dict[str, Any]) -> str:
    """A short human table of a ``compare_runs`` result; an undefined (None) value or delta shows as "–"."""
    lines = [f"A (reference): {cmp['a']}", f"B: {cmp['b']}", "",
             f"{'task':<15} {'metric':<22} {'A':>9} {'B':>9} {'delta':>8} {'95% CI':>19} {'agree':>6} {'R->W':>5} {'W->R':>5}"]
    notes = []
    for task, t in cmp["tasks"].items():
        m = t["metrics"].get(t["headline"])
        if "n_paired" in t:
            own = t.get("own", {})
            shown = {k: "-" if v is None else f"{v:.2f}" for k, v in own.items()}
            notes.append(f"{task}: A has {t['n_a']} rows, B {t['n_b']}; {t['n_paired']} paired (the table is over "
                         f"those); over all its own rows {t['headline']} is A {shown.get('a', '-')}, "
                         f"B {shown.get('b', '-')}")
        if m is None:
            lines.append(f"{task:<15} {t['headline']:<22} {'–':>9} {'–':>9}")
            continue
        ci = m.get("ci95")
        ci_s = f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "-"
        lines.append(f"{task:<15} {t['headline']:<22} {_num(m['a'], '.2f'):>9} {_num(m['b'], '.2f'):>9} "
                     f"{_num(m['delta'], '+.2f'):>8} {ci_s:>19} "
                     f"{'-' if t['agreement'] is None else format(t['agreement'], '.1%'):>6} "
                     f"{t.get('right_to_wrong', '-'):>5} {t.get('wrong_to_right', '-'):>5}")
    return "\n".join(lines + ([""] + notes if notes else []))
