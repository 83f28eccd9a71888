"""Figures of kvtool's reports and demo, built from plain point dicts (no run directories, no scoring).

Three figures:

- ``accuracy_vs_bits_figure``: one panel per task, a task's headline (with its unit) against KV bits per value
  on a log2 axis with integer ticks only; one line per KV scheme, each with its own marker, line style and
  colour, drawn slightly apart on x so schemes at equal accuracy stay visible; the bootstrap 95 % interval as
  error bars; runs with fp16 KV (references) as distinct horizontal lines with their interval as a band and a
  point at 16 bits, so a report of one run still shows its value and interval.
- ``tradeoff_figure``: the study's question at a glance — the change of a task's headline against the
  reference (paired bootstrap 95 % interval) versus the KV bytes held per token relative to fp16, one point per
  scheme x bits (marker = scheme, colour = bits; hollow where the bytes are quant_ops' bound, not measured),
  with the Pareto front (least memory for the accuracy kept) drawn as a staircase and its points named; points
  that would be drawn on one spot are set side by side along x (``spread_coincident``), the direction without
  an interval, and the legend says so.
- ``bars_figure``: grouped bars for the PAIRS and SocialCounterfactuals metrics (one bar per run).

Axis labels, units of a change and the smallest y-range come from each task's declared headline metric
(``TaskSpec.metrics``). Every figure keeps its legend outside the axes and sets y-limits from the data and every interval drawn (never
a fixed 0-100 range). The functions return a matplotlib ``Figure``; ``save_figure`` writes it (Agg backend).
``pareto_front`` is the plain computation. This module does not read runs or compute intervals (``report``,
``compare``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (3, 1, 1, 1, 1, 1)))
#: reference lines: dark colours and styles of their own, apart from the schemes' colour cycle
REF_STYLES = (("black", "--"), ("#6b6b6b", ":"), ("#7b3294", "-."), ("#4d4d4d", (0, (5, 2, 1, 2))))
BITS_COLORS = {2: "#d62728", 3: "#ff7f0e", 4: "#1f77b4", 8: "#2ca02c", 16: "#7f7f7f"}

def _headline_info(task: str):
    """The declared ``MetricInfo`` of ``task``'s headline (``TaskSpec.metrics``), or None for an unknown task."""
    from kvtool.evals.tasks import TASKS

    return TASKS[task].headline_info if task in TASKS else None


def headline_label(task: str) -> str:
    """The y-axis label of ``task``'s headline number, with its unit (its declared metric's ``label``)."""
    info = _headline_info(task)
    return info.label if info else "headline"


def delta_label(task: str) -> str:
    """The axis label of a change of ``task``'s headline ('pp': percentage points), from its declared unit."""
    info = _headline_info(task)
    unit = info.delta_unit if info else "pp"
    return f"change vs reference ({unit})" if unit else "change vs reference"


def _ok(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def pareto_front(xs: Sequence[float | None], ys: Sequence[float | None]) -> list[int]:
    """Indices of the points no other point dominates, smaller x (memory) and larger y (accuracy) being better:
    ``q`` dominates ``p`` when ``x_q <= x_p`` and ``y_q >= y_p`` with one of them strict (exact duplicates both
    stay). Points with a missing (None / NaN) coordinate take no part. Returned in increasing x. O(n log n)."""
    if len(xs) != len(ys):
        raise ValueError(f"pareto_front: {len(xs)} x values but {len(ys)} y values")
    idx = sorted((i for i in range(len(xs)) if _ok(xs[i]) and _ok(ys[i])), key=lambda i: (xs[i], -ys[i]))
    front: list[int] = []
    best_y, best_x = -math.inf, math.nan
    for i in idx:
        if ys[i] > best_y:
            best_y, best_x = ys[i], xs[i]
            front.append(i)
        elif ys[i] == best_y and xs[i] == best_x:
            front.append(i)
    return front


def _ylim(ax, values: list[float], pad_frac: float = 0.08, min_span: float = 1.0) -> None:
    vals = [v for v in values if _ok(v)]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    span = hi - lo
    if span < min_span:  # one run, or equal values: still a readable range around them
        mid = (lo + hi) / 2
        lo, hi, span = mid - min_span / 2, mid + min_span / 2, min_span
    ax.set_ylim(lo - pad_frac * span, hi + pad_frac * span)


def _legend_outside(fig, axes, **kw) -> None:
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if not lab.startswith("_"):
                seen.setdefault(lab, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="upper left", bbox_to_anchor=(1.0, 0.98),
                   fontsize=8, frameon=False, **kw)


def _yerr(value: float, ci: Sequence[float] | None) -> list[list[float]] | None:
    if ci is None or not all(_ok(c) for c in ci):
        return None
    return [[max(0.0, value - ci[0])], [max(0.0, ci[1] - value)]]


def _panel_grid(plt, n: int, max_cols: int, size: tuple[float, float]):
    """A figure of ``n`` panels in rows of at most ``max_cols``, each ``size`` inches (w, h); the grid's unused
    cells are hidden. Returns (figure, the axes as a flat list)."""
    ncols = min(max_cols, n)
    nrows = -(-n // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def accuracy_vs_bits_figure(points: list[dict[str, Any]], tasks: list[str], titles: dict[str, str] | None = None,
                            title: str | None = None):
    """Headline vs KV bits, one panel per task in ``tasks``.

    ``points``: dicts ``{"task", "series" (legend label), "reference" (bool: fp16 KV, drawn as a line),
    "bits" (float, mean K/V bits; 16 for references), "value", "ci95" ((lo, hi) or None)}`` in the headline's
    own scale; a None value is skipped. Returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    titles = titles or {}
    fig, axes = _panel_grid(plt, len(tasks), max_cols=4, size=(4.2, 3.6))
    series_names = list(dict.fromkeys(p["series"] for p in points if not p.get("reference")))
    ref_names = list(dict.fromkeys(p["series"] for p in points if p.get("reference")))
    n = len(series_names)
    for ax, task in zip(axes, tasks, strict=False):
        pts = [p for p in points if p["task"] == task and _ok(p.get("value"))]
        yvals: list[float] = []
        xs: set[float] = set()
        for j, name in enumerate(ref_names):
            for p in (q for q in pts if q["series"] == name):
                color, ls = REF_STYLES[j % len(REF_STYLES)]
                ax.axhline(p["value"], color=color, ls=ls, lw=1.3, label=name, zorder=1)
                ci = p.get("ci95")
                if _yerr(p["value"], ci):
                    ax.axhspan(ci[0], ci[1], color=color, alpha=0.07, lw=0, zorder=0)
                    yvals += list(ci)
                x16 = 16 * 2 ** ((j - (len(ref_names) - 1) / 2) * 0.12)
                ax.errorbar([x16], [p["value"]], yerr=_yerr(p["value"], ci), fmt="*", ms=9, color=color, capsize=3,
                            zorder=3)
                if len(pts) == 1:  # a report of one run: say its value
                    ax.annotate(f"{p['value']:.2f}", (x16, p["value"]), xytext=(7, 3), textcoords="offset points",
                                fontsize=8, color=color)
                yvals.append(p["value"])
                xs.add(16.0)
        for i, name in enumerate(series_names):
            sp = sorted((q for q in pts if q["series"] == name), key=lambda q: q["bits"])
            if not sp:
                continue
            dodge = 2 ** ((i - (n - 1) / 2) * 0.06)  # multiplicative: equal on the log2 axis
            x = [q["bits"] * dodge for q in sp]
            y = [q["value"] for q in sp]
            yerr = [_yerr(q["value"], q.get("ci95")) for q in sp]
            err = None
            if any(yerr):
                err = [[e[0][0] if e else 0.0 for e in yerr], [e[1][0] if e else 0.0 for e in yerr]]
            ax.errorbar(x, y, yerr=err, marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[i % len(LINESTYLES)],
                        color=f"C{i % 10}", ms=6, lw=1.4, capsize=2.5, label=name, zorder=2,
                        mfc="white" if i >= 10 else None)
            for q in sp:
                yvals.append(q["value"])
                yvals += [c for c in (q.get("ci95") or ()) if _ok(c)]
                xs.add(q["bits"])
        ax.set_xscale("log", base=2)
        ticks = sorted({math.floor(x) for x in xs} | {math.ceil(x) for x in xs})  # integers only (K4V3: 3, 4)
        if ticks:
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.set_xticklabels([str(t) for t in ticks])
            ax.set_xlim(min(ticks) / 1.25, max(ticks) * 1.25)
        ax.xaxis.set_minor_locator(NullLocator())
        _ylim(ax, yvals, min_span=_min_span(task))
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_title(titles.get(task, task))
        ax.set_xlabel("KV bits per value (fp16 = 16)")
        ax.set_ylabel(headline_label(task))
        if not pts:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="grey")
    if title:
        fig.suptitle(title, fontsize=10)
    _legend_outside(fig, axes[:len(tasks)], title="KV scheme (bars: 95% CI)")
    fig.tight_layout()
    return fig


def _min_span(task: str) -> float:
    """The smallest y-range of ``task``'s panels: its headline metric's declared ``plot_span``."""
    info = _headline_info(task)
    return info.plot_span if info else 2.0


def tradeoff_figure(panels: list[dict[str, Any]], title: str | None = None):
    """Accuracy change vs KV bytes per token relative to fp16, with the Pareto front; one panel per entry.

    ``panels``: dicts ``{"task", "title", "reference" (label of the run compared against), "points": [{"scheme",
    "bits" (int, or a 'K4V2' label), "kv_ratio" (KV bytes held / fp16 bytes), "kv_ratio_source" ("measured" or
    "bound"), "delta", "ci95" ((lo, hi) or None)}]}``; deltas in the headline's scale (percentage points for
    % metrics). Points without a delta or ratio are skipped. Returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = _panel_grid(plt, len(panels), max_cols=3, size=(5.6, 4.2))
    schemes = list(dict.fromkeys(p["scheme"] for pan in panels for p in pan["points"]))
    marker = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(schemes)}
    bits_seen = sorted({p["bits"] for pan in panels for p in pan["points"]}, key=lambda b: (isinstance(b, str), b))
    extra = [b for b in bits_seen if b not in BITS_COLORS]
    color = {**BITS_COLORS, **{b: f"C{4 + i % 6}" for i, b in enumerate(extra)}}
    sources: set[str] = set()
    spread_any = False
    for ax, pan in zip(axes, panels, strict=False):
        pts = [p for p in pan["points"] if _ok(p.get("delta")) and _ok(p.get("kv_ratio"))]
        yvals = [0.0] + [v for p in pts for v in [p["delta"], *(p.get("ci95") or ())] if _ok(v)]
        lo, hi = min(yvals), max(yvals)
        # points drawn on one spot (e.g. several 2-bit schemes at 0 pp and one bytes ratio) are set side by
        # side along x, the direction without an interval; y and the intervals stay exact
        xs = spread_coincident([p["kv_ratio"] for p in pts], [p["delta"] for p in pts],
                               max(hi - lo, _min_span(pan["task"])))
        spread_any |= any(x != p["kv_ratio"] for x, p in zip(xs, pts, strict=True))
        ax.axhline(0, color="black", lw=0.9, zorder=1)
        for x, p in zip(xs, pts, strict=True):
            hollow = p.get("kv_ratio_source") != "measured"
            sources.add("bound" if hollow else "measured")
            c = color[p["bits"]]
            ax.errorbar([x], [p["delta"]], yerr=_yerr(p["delta"], p.get("ci95")),
                        marker=marker[p["scheme"]], ms=7, color=c, mfc="white" if hollow else c, mew=1.4,
                        capsize=2.5, lw=1.1, ls="none", zorder=3)
        front = pareto_front([p["kv_ratio"] for p in pts], [p["delta"] for p in pts])
        if front:
            fx = [xs[i] for i in front]
            fy = [pts[i]["delta"] for i in front]
            ax.step(fx, fy, where="post", color="black", lw=2.2, alpha=0.25, zorder=2)
        ratios = [p["kv_ratio"] for p in pts] or [1.0]  # ticks from the true ratios; room for the spread ones
        _ratio_axis(ax, min(ratios), max(ratios))
        if xs:
            x0, x1 = ax.get_xlim()
            ax.set_xlim(min(x0, min(xs) / 1.08), max(x1, max(xs) * 1.08))
        _ylim(ax, yvals, pad_frac=0.12, min_span=_min_span(pan["task"]))
        if front:
            _label_points(ax, [(x, p["delta"]) for x, p in zip(xs, pts, strict=True)],
                          {i: f"{pts[i]['scheme']} {pts[i]['bits']}b" for i in front},
                          obstacles=[(x, c) for x, p in zip(xs, pts, strict=True) for c in (p.get("ci95") or ())
                                     if _ok(c)])
        ax.grid(True, alpha=0.3)
        ax.set_title(pan.get("title") or pan["task"], fontsize=10)
        ax.set_xlabel("KV bytes held per token / fp16 (log scale)")
        ax.set_ylabel(delta_label(pan["task"]))
        if not pts:
            ax.text(0.5, 0.5, "no compressed runs to compare", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
    refs = list(dict.fromkeys(pan["reference"] for pan in panels if pan.get("reference")))
    handles = [Line2D([], [], color="black", lw=0.9, label="reference: " + "; ".join(refs) if refs else "reference"),
               Line2D([], [], color="black", lw=2.2, alpha=0.25, label="Pareto front (least memory per accuracy)")]
    handles += [Line2D([], [], ls="none", marker=marker[s], color="black", mfc="white", label=s) for s in schemes]
    handles += [Line2D([], [], ls="none", marker="s", color=color[b], ms=8, label=f"{b}-bit KV" if b != 16
                       else "16-bit (fp16) KV") for b in bits_seen]
    note = ["bars: 95% paired bootstrap CI"]
    if "measured" in sources:
        note.append("filled: KV bytes measured (kv_bytes)")
    if "bound" in sources:
        note.append("hollow: quant_ops bound\n(run recorded no kv_bytes)")
    if spread_any:
        note.append("equal points set side by side\nalong x (values unchanged)")
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.98), fontsize=8, frameon=False,
               title="\n".join(note), title_fontsize=8, alignment="left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def spread_coincident(xs: Sequence[float], ys: Sequence[float], y_span: float, min_sep: float = 0.12,
                      tol_y: float = 0.03) -> list[float]:
    """x positions on a log2 axis that keep points from covering each other, y never moved (it carries the
    interval). Points whose y lie within ``tol_y * y_span`` of each other (chained) form a band; within a band,
    points closer than ``min_sep`` in log2 x (chained) form a cluster, laid out ``min_sep`` apart in their x
    order around the cluster's mean log2 x, and clusters that then come too close are merged and laid out
    again. Lone points keep their x exactly. ``min_sep`` 0.12 is about 1.5 markers (7 pt) on the trade-off
    panels. Returns the x values in the input order."""
    n = len(xs)
    lx = [math.log2(x) for x in xs]
    out = list(lx)
    by_y = sorted(range(n), key=lambda i: ys[i])
    bands: list[list[int]] = []
    for i in by_y:
        if bands and ys[i] - ys[bands[-1][-1]] < tol_y * y_span:
            bands[-1].append(i)
        else:
            bands.append([i])
    for band in bands:
        clusters = [[i] for i in sorted(band, key=lambda i: (lx[i], i))]
        while True:
            for c in clusters:  # lay each cluster out around its mean, in x order
                if len(c) > 1:
                    mid = sum(lx[i] for i in c) / len(c)
                    for k, i in enumerate(c):
                        out[i] = mid + (k - (len(c) - 1) / 2) * min_sep
            merged = False
            for j in range(len(clusters) - 1):
                if out[clusters[j + 1][0]] - out[clusters[j][-1]] < min_sep - 1e-12:
                    clusters[j:j + 2] = [clusters[j] + clusters[j + 1]]
                    merged = True
                    break
            if not merged:
                break
    return [float(xs[i]) if out[i] == lx[i] else 2.0 ** out[i] for i in range(n)]


def _label_points(ax, xy: list[tuple[float, float]], labels: dict[int, str], fontsize: int = 7,
                  obstacles: Sequence[tuple[float, float]] = ()) -> None:
    """Write ``labels[i]`` beside point ``xy[i]``, at the place (of six: four sides, above, below) whose text
    box lies farthest from the other points, the ``obstacles`` (data coordinates, e.g. interval ends) and the
    labels already placed (limits and scales must be set)."""
    fig = ax.figure
    px = ax.transData.transform(xy)  # pixels
    scale = fig.dpi / 72
    taken = [tuple(p) for p in px]
    blocked = [tuple(p) for p in ax.transData.transform(list(obstacles))] if len(obstacles) else []
    for i, text in labels.items():
        w, h = 0.55 * fontsize * len(text) * scale, fontsize * scale
        best, best_score = None, -1e18
        for dx, dy, ha in ((6, 4, "left"), (6, -12, "left"), (-6, 4, "right"), (-6, -12, "right"),
                           (0, 12, "center"), (0, -20, "center")):
            x0 = px[i][0] + dx * scale + {"left": 0, "right": -w, "center": -w / 2}[ha]
            y0 = px[i][1] + dy * scale
            cx, cy = x0 + w / 2, y0 + h / 2
            others = [(qx, qy) for k, (qx, qy) in enumerate(taken) if k != i] + blocked
            # distance from the box to the nearest other point (0 when one lies inside it)
            score = min((math.hypot(max(x0 - qx, 0, qx - x0 - w), max(y0 - qy, 0, qy - y0 - h))
                         for qx, qy in others), default=1e9)
            bbox = ax.get_window_extent()
            if x0 < bbox.x0 or x0 + w > bbox.x1 or y0 < bbox.y0 or y0 + h > bbox.y1:
                score -= 1e6  # outside the axes
            if score > best_score:
                best, best_score = (dx, dy, ha, cx, cy), score
        dx, dy, ha, cx, cy = best
        ax.annotate(text, xy[i], xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, ha=ha)
        taken.append((cx, cy))


def _ratio_axis(ax, lo: float, hi: float) -> None:
    """A log2 x-axis for bytes ratios with ticks at powers of two written as fractions (1/8, 1/4, ... 1, 2)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    e0, e1 = math.floor(math.log2(min(lo, 1.0))), math.ceil(math.log2(max(hi, 1.0)))
    ticks = [2.0 ** e for e in range(e0, e1 + 1)]
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"1/{int(1 / t)}" if t < 1 else f"{int(t)}" for t in ticks])
    ax.set_xlim(ticks[0] / 1.15, ticks[-1] * 1.15)


def bars_figure(panels: list[dict[str, Any]], labels: list[str], title: str | None = None, zero_line: bool = False):
    """Grouped bars: ``panels`` = ``[{"title", "ylabel", "groups": [names], "values": [[v per group] per
    label]}]`` with one bar colour per entry of ``labels`` (a run), each bar labelled with its value; a None
    value is left out and marked 'n/a'. Returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(panels), figsize=(max(3.2, 0.45 * len(labels) * max(len(p["groups"]) for p in
                                                                                            panels) + 1.8) * len(panels), 3.6),
                             squeeze=False)
    width = 0.8 / max(1, len(labels))
    for ax, pan in zip(axes[0], panels, strict=True):
        groups = pan["groups"]
        yvals = [0.0]
        for k, lab in enumerate(labels):
            vals = pan["values"][k]
            xs = [g + k * width for g in range(len(groups))]
            bars = ax.bar([x for x, v in zip(xs, vals, strict=True) if _ok(v)], [v for v in vals if _ok(v)], width,
                          label=lab, color=f"C{k % 10}", hatch=("//" if k >= 10 else None))
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
            for x, v in zip(xs, vals, strict=True):
                if not _ok(v):
                    ax.text(x, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="grey")
            yvals += [v for v in vals if _ok(v)]
        ax.set_xticks([g + width * (len(labels) - 1) / 2 for g in range(len(groups))], groups, fontsize=8,
                      rotation=15 if len(groups) > 2 else 0)
        ax.set_xlim(-width, len(groups) - 1 + width * len(labels))
        if zero_line:
            ax.axhline(0, color="black", lw=0.8)
        _ylim(ax, yvals, pad_frac=0.15, min_span=0.05)
        ax.set_title(pan["title"], fontsize=10)
        ax.set_ylabel(pan["ylabel"])
        ax.grid(True, axis="y", alpha=0.3)
    handles = [Patch(facecolor=f"C{k % 10}", hatch=("//" if k >= 10 else None), label=lab)
               for k, lab in enumerate(labels)]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.98), fontsize=8, frameon=False,
               title="run ('n/a': metric missing)", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: int = 120) -> str:
    """Write ``fig`` as PNG (legend outside the axes kept by a tight bounding box) and close it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return str(path)
