"""The end of a sweep: merge each cell's shards into one run directory, compare every cell with the reference,
and write the study-shaped report.

``finish_sweep`` writes, under ``OUT/report/``: ``report.md`` / ``report.csv`` and the plots of
``kvtool report`` over every finished cell, and ``study.md`` with

- Table 3 (per model x weights: rows KV scheme x bits, columns the tasks' headline numbers, each with its delta
  against the reference and the paired bootstrap 95% interval from ``kvtool.evals.compare``);
- Table 4 (weights x KV: one table per task, rows the models / weight settings, columns the KV settings) when the
  grid has more than one model entry;
- Fig. 5 (``fig5_kv_bits.png``: headline delta over K bits x V bits per scheme) when some cell has K != V bits;
- Fig. 6 (``fig6_group_size.png``: headline vs group size, with 95% intervals) when a scheme family (e.g.
  g-KC<g1>VT<g2>) appears with more than one group size.

Merging and comparing are redone only when a cell's inputs are newer than their outputs. This module does not
run units (``executors``) or decide what to run (``driver``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from kvtool.evals.sweep.grid import Cell, Grid


def _mtime(p: Path) -> float:
    return p.stat().st_mtime if p.exists() else -1.0


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes the same file as ``src`` (a hard link; a copy across file systems)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(dst.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    tmp.replace(dst)


def merge_cell(cell: Cell, out: Path, judge) -> Path | None:
    """Join a cell's finished units into ``OUT/cells/<cell>`` as one run dir; None while a unit is missing."""
    from kvtool.evals.runner import load_results, merge_shards
    from kvtool.evals.sweep.driver import cell_dir, write_json

    cdir = cell_dir(out, cell.name)
    tasks: dict[str, Any] = {}
    first: dict[str, Any] | None = None
    changed = not (cdir / "results.json").is_file()
    for t in cell.tasks:
        udir = cdir / "units" / t
        shards = [udir / f"results.shard-{i}-of-{cell.shards}.json" for i in range(cell.shards)]
        if not all(s.is_file() for s in shards):
            return None
        if _mtime(udir / "results.json") < max(_mtime(s) for s in shards):
            merge_shards(udir, judge)
            changed = True
        res = load_results(udir)
        dst = cdir / t / "predictions.jsonl"
        if _mtime(dst) < _mtime(udir / t / "predictions.jsonl") or not dst.is_file():
            _link(udir / t / "predictions.jsonl", dst)
            changed = True
        first = first or res
        tasks[t] = {**res["tasks"][t], "predictions": f"{t}/predictions.jsonl"}
    if changed and first is not None:
        results = {**first, "tasks": tasks, "merged_from": [f"units/{t}" for t in cell.tasks],
                   "config": {**first["config"], "tasks": list(cell.tasks), "output": str(cdir), "shard": None},
                   "sweep": {"cell": cell.name, "settings": cell.identity()}}
        write_json(cdir / "results.json", results)
    return cdir


def finish_sweep(grid: Grid, out: Path, skip: set[str] | None = None, n_boot: int = 1000) -> dict[str, Any]:
    """Merge, compare and report every finished cell; returns paths and the cells left out (unfinished)."""
    from kvtool.evals.compare import compare_runs
    from kvtool.evals.judges import JudgeConfig
    from kvtool.evals.report import write_report
    from kvtool.evals.sweep.driver import write_json

    judge = JudgeConfig.from_env(**grid.judge)
    done: dict[str, Path] = {}
    missing = []
    for c in grid.cells:
        d = None if c.name in (skip or set()) else merge_cell(c, out, judge)
        if d is None:
            missing.append(c.name)
        else:
            done[c.name] = d
    comparisons: dict[str, dict[str, Any]] = {}
    ref = done.get(grid.reference)
    if ref is not None:
        for name, d in done.items():
            if name == grid.reference:
                continue
            f = out / "compare" / f"{name}.json"
            if _mtime(f) < max(_mtime(ref / "results.json"), _mtime(d / "results.json")):
                write_json(f, compare_runs(ref, d, tasks=grid.cell(name).tasks, n_boot=n_boot))
            comparisons[name] = json.loads(f.read_text(encoding="utf-8"))
    result: dict[str, Any] = {"cells_done": list(done), "cells_missing": missing, "reference_done": ref is not None}
    if not done:
        return result
    rep = write_report([done[c.name] for c in grid.cells if c.name in done], out / "report")
    result["report"] = {k: rep[k] for k in ("markdown", "csv", "plots")}
    result.update(write_study(grid, out, done, comparisons))
    return result


# --------------------------------------------------------------------------------------------------------
# study tables and figures
# --------------------------------------------------------------------------------------------------------


def cell_values(grid: Grid, done: dict[str, Path], comparisons: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """``{cell: {task: {"value", "delta", "ci95"}}}``: headline numbers and their delta against the reference."""
    from kvtool.evals.runner import load_results
    from kvtool.evals.tasks import TASKS, headline_value

    out: dict[str, dict[str, dict]] = {}
    for name, d in done.items():
        res = load_results(d)
        out[name] = {}
        for t, rec in res.get("tasks", {}).items():
            v = headline_value(TASKS[t], rec.get("metrics", {}))
            entry: dict[str, Any] = {"value": v, "delta": 0.0 if name == grid.reference else None, "ci95": None}
            cmp = comparisons.get(name, {}).get("tasks", {}).get(t)
            if cmp:
                m = cmp["metrics"].get(cmp["headline"])
                if m:
                    entry.update(delta=m["delta"], ci95=m.get("ci95"))
            out[name][t] = entry
    return out


def _fmt(e: dict | None) -> str:
    if not e or e["value"] is None:
        return "–"
    s = f"{e['value']:.2f}"
    if e.get("delta") is not None and e.get("ci95"):
        lo, hi = e["ci95"]
        s += f" ({e['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}])"
    return s


def _bits(c: Cell) -> str:
    return "16" if c.kv == "fp16" else (str(c.k_bits) if c.k_bits == c.v_bits else f"K{c.k_bits}V{c.v_bits}")


def _kv_label(c: Cell) -> str:
    extra = ("" if c.kv_mode == "packed" else f" {c.kv_mode}") + ("" if c.first_token == "compressed" else " fp1st")
    return f"{c.kv} {_bits(c)}{extra}"


def write_study(grid: Grid, out: Path, done: dict[str, Path], comparisons: dict[str, dict]) -> dict[str, Any]:
    """Write ``report/study.md`` (Tables 3 and 4) and the Fig. 5 / Fig. 6 PNGs; returns their paths."""
    from kvtool.evals.tasks import TASKS

    vals = cell_values(grid, done, comparisons)
    cells = [c for c in grid.cells if c.name in done]
    tasks = grid.tasks
    ref = grid.cell(grid.reference)
    lines = [f"# Sweep report ({grid.source})", "",
             f"Reference: `{ref.name}` ({ref.model}, {ref.backend}, {_kv_label(ref)}). Cells show the headline "
             "number, then its delta against the reference with the paired bootstrap 95% interval.", ""]
    # Table 3: per model entry, rows scheme x bits
    lines += ["## Table 3 — tasks x KV schemes x bits", ""]
    for model in dict.fromkeys(c.model for c in cells):
        mc = [c for c in cells if c.model == model]
        lines += [f"### {model} (`{mc[0].path}`, {mc[0].backend})", "",
                  "| KV | bits | " + " | ".join(f"{TASKS[t].title} ({TASKS[t].headline})" for t in tasks) + " |",
                  "|---|---|" + "---|" * len(tasks)]
        for c in mc:
            lines.append(f"| {c.kv}{'' if c.kv_mode == 'packed' else ' ' + c.kv_mode}"
                         f"{'' if c.first_token == 'compressed' else ' fp1st'} | {_bits(c)} | "
                         + " | ".join(_fmt(vals[c.name].get(t)) for t in tasks) + " |")
        lines.append("")
    models = list(dict.fromkeys(c.model for c in cells))
    if len(models) > 1:
        lines += ["## Table 4 — weights x KV", ""]
        kvs = list(dict.fromkeys(_kv_label(c) for c in cells))
        for t in tasks:
            lines += [f"### {TASKS[t].title} ({TASKS[t].headline})", "",
                      "| model / weights | " + " | ".join(kvs) + " |", "|---|" + "---|" * len(kvs)]
            for m in models:
                by_kv = {_kv_label(c): c for c in cells if c.model == m}
                w = by_kv and next(iter(by_kv.values())).wbits
                lines.append(f"| {m}{f' (W{w})' if w else ''} | "
                             + " | ".join(_fmt(vals[by_kv[k].name].get(t)) if k in by_kv else "·" for k in kvs)
                             + " |")
            lines.append("")
    figs = {}
    f5 = _fig5(cells, tasks, vals, out / "report" / "fig5_kv_bits.png")
    if f5:
        figs["fig5"] = str(f5)
        lines += ["## Fig. 5 — K/V bits ablation", "", f"![K/V bits]({f5.name})", ""]
    f6 = _fig6(cells, tasks, vals, out / "report" / "fig6_group_size.png")
    if f6:
        figs["fig6"] = str(f6)
        lines += ["## Fig. 6 — group size", "", f"![group size]({f6.name})", ""]
    missing = [c.name for c in grid.cells if c.name not in done]
    if missing:
        lines += [f"Cells not finished yet (re-run the sweep): {', '.join(missing)}", ""]
    path = out / "report" / "study.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    _write_json_values(out / "report" / "study.json", grid, cells, vals)
    return {"study": str(path), "figures": figs}


def _write_json_values(path: Path, grid: Grid, cells: list[Cell], vals: dict) -> None:
    rows = [{"cell": c.name, "model": c.model, "backend": c.backend, "wbits": c.wbits, "kv": c.kv,
             "k_bits": c.k_bits, "v_bits": c.v_bits, "kv_mode": c.kv_mode, "first_token": c.first_token,
             "reference": c.name == grid.reference, "tasks": vals[c.name]} for c in cells]
    path.write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fig5(cells: list[Cell], tasks: list[str], vals: dict, path: Path) -> Path | None:
    """Headline delta against the reference on a K-bits x V-bits grid, one panel per (scheme, task)."""
    import numpy as np

    quant = [c for c in cells if c.kv != "fp16" and not c.kv.startswith("ov-")]
    if not any(c.k_bits != c.v_bits for c in quant):
        return None
    schemes = list(dict.fromkeys(c.kv for c in quant))
    plt = _plt()
    fig, axes = plt.subplots(len(tasks), len(schemes), figsize=(3.2 * len(schemes), 2.8 * len(tasks)),
                             squeeze=False)
    for i, t in enumerate(tasks):
        for j, s in enumerate(schemes):
            sc = [c for c in quant if c.kv == s]
            kb = sorted({c.k_bits for c in sc})
            vb = sorted({c.v_bits for c in sc})
            grid = np.full((len(kb), len(vb)), np.nan)
            for c in sc:
                d = vals[c.name].get(t, {}).get("delta")
                if d is not None:
                    grid[kb.index(c.k_bits), vb.index(c.v_bits)] = d
            ax = axes[i][j]
            im = ax.imshow(grid, cmap="RdBu", vmin=-np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else -1,
                           vmax=np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1)
            for a in range(len(kb)):
                for b in range(len(vb)):
                    if np.isfinite(grid[a, b]):
                        ax.text(b, a, f"{grid[a, b]:+.1f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(vb)), [str(v) for v in vb])
            ax.set_yticks(range(len(kb)), [str(k) for k in kb])
            ax.set_xlabel("V bits")
            ax.set_ylabel("K bits")
            ax.set_title(f"{s}: {t} delta", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _family(kv: str) -> tuple[str, int | None, int | None] | None:
    from kvtool.quant_ops import parse_scheme

    s = parse_scheme(kv)
    if s.kind != "group":
        return None
    k, v = s.granularity("k"), s.granularity("v")
    return f"{k.axis[0].upper()}/{v.axis[0].upper()}", k.group, v.group


def _fig6(cells: list[Cell], tasks: list[str], vals: dict, path: Path) -> Path | None:
    """Headline vs the K group size (x) per scheme family, one line per V group x bits, 95% intervals."""
    fams: dict[str, list[tuple[Cell, int | None, int | None]]] = {}
    for c in cells:
        f = _family(c.kv) if c.kv != "fp16" else None
        if f:
            fams.setdefault(f[0], []).append((c, f[1], f[2]))
    fams = {k: v for k, v in fams.items() if len({(g1, g2) for _, g1, g2 in v}) > 1}
    if not fams:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(tasks), len(fams), figsize=(4 * len(fams), 3 * len(tasks)), squeeze=False)
    for i, t in enumerate(tasks):
        for j, (fam, members) in enumerate(fams.items()):
            ax = axes[i][j]
            lines: dict[tuple, list[tuple[float, float, float, float]]] = {}
            for c, g1, g2 in members:
                e = vals[c.name].get(t) or {}
                if e.get("value") is None:
                    continue
                lo, hi = e["ci95"] if e.get("ci95") else (e.get("delta") or 0.0, e.get("delta") or 0.0)
                d = e.get("delta") or 0.0
                x = float(g1 if g1 is not None else 4096)  # N: all tokens, drawn at the right edge
                lines.setdefault((g2, _bits(c)), []).append((x, e["value"], d - lo, hi - d))
            for (g2, b), pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
                pts.sort()
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[2] for p in pts], [p[3] for p in pts]],
                            marker="o", capsize=3, label=f"V group {g2 or 'N'}, {b} bits")
            ax.set_xscale("log", base=2)
            xs = sorted({float(g1 if g1 is not None else 4096) for _, g1, _ in members})
            ax.set_xticks(xs, ["N" if x == 4096 else str(int(x)) for x in xs])
            ax.set_xlabel("K group size (N: all tokens)")
            ax.set_ylabel(t)
            ax.set_title(f"{fam} scheme family", fontsize=8)
            ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
