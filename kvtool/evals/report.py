"""Reports over many eval runs: a Markdown and a CSV table in the shape of the study's Table 3 (rows model x
backend x weights x KV scheme x bits, columns the tasks' headline numbers) and PNG plots — headline vs KV bits per
scheme (one panel per task), the PAIRS association differences (male - female, white - black; the study's
Figure 2) and the SocialCounterfactuals metrics with the empty-output share (Figures 3-4).

It reads only ``results.json`` files; it does not score or compare (``runner`` / ``compare``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.evals.runner import load_results
from kvtool.evals.tasks import TASKS, headline_value

TABLE_ORDER = ("mmvet", "textvqa", "gqa", "mme", "scienceqa", "vqav2", "pope", "hallusionbench", "pairs",
               "socialcf", "shapes")


def _row_labels(res: dict[str, Any]) -> dict[str, Any]:
    cfg = res.get("config", {})
    info = res.get("pipeline") or {}
    manifest = info.get("manifest") or {}
    model = (manifest.get("source") or {}).get("model") or cfg.get("model") or "?"
    wbits = (manifest.get("weights") or {}).get("bits") or cfg.get("wbits") or 16
    kv = str(info.get("kv") or cfg.get("kv") or "fp16")
    kb, vb = info.get("k_bits", cfg.get("k_bits")), info.get("v_bits", cfg.get("v_bits"))
    if kv.lower() == "fp16":
        bits = "16"
    elif kb == vb:
        bits = str(kb)
    else:
        bits = f"K{kb}V{vb}"
    window = info.get("kv_residual", cfg.get("kv_residual"))
    if window:  # KIVI's deployed semantics: the same scheme with a full-precision window of R tokens
        kv = f"{kv} r{window}"
    backend = info.get("backend") or cfg.get("backend") or "?"
    return {"model": Path(str(model)).name or str(model), "backend": str(backend), "weights": f"W{wbits}",
            "kv": kv, "bits": bits}


def _headline(task: str, metrics: dict[str, Any]) -> float | None:
    return headline_value(TASKS[task], metrics)


def collect_rows(run_dirs: list[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    rows, tasks = [], []
    for d in run_dirs:
        res = load_results(d)
        row = {**_row_labels(res), "run": str(d)}
        for task, rec in res.get("tasks", {}).items():
            row[task] = _headline(task, rec.get("metrics", {}))
            row[f"_{task}_metrics"] = rec.get("metrics", {})
            if task not in tasks:
                tasks.append(task)
        rows.append(row)
    tasks.sort(key=lambda t: TABLE_ORDER.index(t) if t in TABLE_ORDER else 99)
    rows.sort(key=lambda r: (r["model"], r["backend"], r["weights"], r["kv"] != "fp16", r["kv"],
                             -_bits_num(r["bits"])))
    return rows, tasks


def _bits_num(bits: str) -> float:
    try:
        return float(bits)
    except ValueError:
        digits = [int(c) for c in bits if c.isdigit()]
        return sum(digits) / len(digits) if digits else 0.0


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}"


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Write report.md, report.csv and PNG plots for ``run_dirs`` into ``out_dir``; returns the paths."""
    if not run_dirs:
        raise InputError("report: no run directories given")
    rows, tasks = collect_rows(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = ["model", "backend", "weights", "kv", "bits"]
    titles = [f"{TASKS[t].title} ({TASKS[t].headline})" for t in tasks]
    md = ["| " + " | ".join(head + titles) + " |", "|" + "---|" * (len(head) + len(tasks))]
    for r in rows:
        md.append("| " + " | ".join([str(r[h]) for h in head] + [_fmt(r.get(t)) for t in tasks]) + " |")
    md += ["", "'–': metric missing (no judge / scorer, or the task was not run). Runs: "
           + ", ".join(r["run"] for r in rows)]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    with open(out / "report.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(head + tasks + ["run"])
        for r in rows:
            w.writerow([r[h] for h in head] + ["" if r.get(t) is None else r[t] for t in tasks] + [r["run"]])
    plots = _plots(rows, tasks, out)
    return {"markdown": str(out / "report.md"), "csv": str(out / "report.csv"), "plots": plots,
            "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]}


def _plots(rows: list[dict], tasks: list[str], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    curve_tasks = [t for t in tasks if t not in ("pairs", "socialcf")]
    if curve_tasks:
        fig, axes = plt.subplots(1, len(curve_tasks), figsize=(3.2 * len(curve_tasks), 3), squeeze=False)
        # one line per (model, backend, weights, kv scheme); the label names only the parts that vary
        parts = [k for k in ("model", "backend", "weights") if len({r[k] for r in rows}) > 1]
        for ax, t in zip(axes[0], curve_tasks, strict=True):
            series: dict[tuple, list[tuple[float, float]]] = {}
            for r in rows:
                if r.get(t) is not None:
                    series.setdefault((*(r[k] for k in parts), r["kv"]), []).append((_bits_num(r["bits"]), r[t]))
            for key, pts in sorted(series.items()):
                label = " ".join(str(x) for x in key)
                if key[-1] == "fp16":
                    ax.axhline(pts[0][1], linestyle="--", linewidth=1, color="k" if not parts else None, label=label)
                else:
                    pts.sort()
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_title(TASKS[t].title)
            ax.set_xlabel("KV bits")
            ax.set_ylabel(TASKS[t].headline)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(str(out / "accuracy_vs_bits.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if "pairs" in tasks:
        groups = ("gender_occupation", "race_status", "race_crime")
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, key in zip(axes, ("male_minus_female", "white_minus_black"), strict=True):
            width = 0.8 / max(1, len(rows))
            for k, r in enumerate(rows):
                m = r.get("_pairs_metrics", {})
                vals = [(m.get(g) or {}).get(key, 0.0) for g in groups]
                ax.bar([i + k * width for i in range(len(groups))], vals, width, label=f"{r['kv']} {r['bits']}")
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups, fontsize=8)
            ax.axhline(0, color="k", linewidth=0.8)
            ax.set_title(key.replace("_", " "))
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(str(out / "pairs.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if "socialcf" in tasks:
        keys = ("max_toxicity", "competence", "stereotype", "empty_share")
        fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 3))
        labels = [f"{r['kv']} {r['bits']}" for r in rows]
        for ax, key in zip(axes, keys, strict=True):
            vals = [(r.get("_socialcf_metrics") or {}).get(key) for r in rows]
            ax.bar(range(len(rows)), [0.0 if v is None else v for v in vals],
                   color=["#bbb" if v is None else "C0" for v in vals])
            ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
            ax.set_title(key)
        fig.tight_layout()
        paths.append(str(out / "socialcf.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
