"""``run_sweep(SweepConfig)``: a grid file -> units -> an executor -> merged cells, comparisons and the study report.

Layout of a sweep directory::

    OUT/sweep.json                         # the grid as last run (cells and their settings), no secrets
    OUT/units.jsonl                        # one line per finished unit: rows, seconds, worker, its arguments
    OUT/cells/<cell>/cell.json             # the settings that produced this cell's rows (refused if changed)
    OUT/cells/<cell>/units/<task>/         # the units' run dir (predictions.shard-i-of-n.jsonl, results.shard-*)
    OUT/cells/<cell>/results.json          # the cell as one run dir (kvtool compare / report read it)
    OUT/cells/<cell>/<task>/predictions.jsonl
    OUT/compare/<cell>.json                # the cell against the reference (bootstrap 95% CIs)
    OUT/report/                            # report.md/csv + plots (kvtool report), study.md + figures

Resumable as a whole: a unit whose ``results.shard-i-of-n.json`` exists is skipped, a partial one resumes its
rows (the runner's contract); a cell directory whose ``cell.json`` records other settings than the grid is
refused before anything runs, naming the cell and the setting. ``plan_sweep`` is the dry run: unit counts,
samples and a time estimate from rows/s measured by earlier runs (results it cannot measure from — resumed,
merged, missing — are listed in the plan, ``rates_skipped``). This module does not parse grids
(``grid``), run units (``executors``) or build tables (``study``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.evals.sweep.grid import Cell, Grid, Unit, grid_json, load_grid

EXECUTORS = ("local", "ray")


@dataclass
class SweepConfig:
    """One sweep: the grid file, the output folder and how to run its units."""

    grid: str
    output: str
    executor: str = "local"
    address: str | None = None  # Ray: auto | ray://host:port; None starts a local Ray instance
    workers: int = 1  # local: process pool size (1 = in this process); Ray: CPUs of a local instance
    max_retries: int = 3  # Ray: retries of a unit whose worker died
    dry_run: bool = False
    n_boot: int = 1000
    rates_from: list[str] = field(default_factory=list)  # earlier run/sweep dirs to measure rows/s from
    progress: bool = True
    model_names: dict[str, str] = field(default_factory=dict)  # name -> directory a grid's model path may name

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise InputError(f"--executor {self.executor!r}: expected one of {', '.join(EXECUTORS)}")
        if self.workers < 1:
            raise InputError(f"--workers {self.workers}: expected >= 1")
        if self.address and self.executor != "ray":
            raise InputError("--address: only with --executor ray")


def cell_dir(out: Path, cell: str) -> Path:
    return out / "cells" / cell


def unit_dir(out: Path, unit: Unit) -> Path:
    return cell_dir(out, unit.cell) / "units" / unit.task


def unit_done(out: Path, unit: Unit) -> bool:
    return (unit_dir(out, unit) / f"results.shard-{unit.shard}-of-{unit.n_shards}.json").is_file()


def unit_started(out: Path, unit: Unit) -> bool:
    return (unit_dir(out, unit) / unit.task / f"predictions.shard-{unit.shard}-of-{unit.n_shards}.jsonl").is_file()


def check_cells(grid: Grid, out: Path) -> None:
    """Refuse a grid whose cell settings differ from what ``out`` holds: one line naming cell and setting."""
    for c in grid.cells:
        f = cell_dir(out, c.name) / "cell.json"
        if not f.is_file():
            continue
        try:
            old = json.loads(f.read_text(encoding="utf-8"))["settings"]
        except (json.JSONDecodeError, KeyError):
            raise InputError(f"cell {c.name}: {f} is not a cell record; move it away or use a new -o") from None
        new = json.loads(json.dumps(c.identity()))
        for key in new:
            if old.get(key) != new[key]:
                raise InputError(f"cell {c.name}: setting {key} is {new[key]!r} in the grid but {old.get(key)!r} "
                                 f"in {f}; restore it or sweep into a new output folder (rows are never mixed)")


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def unit_args(grid: Grid, cell: Cell, unit: Unit, out: Path) -> dict[str, Any]:
    """The recorded arguments of one unit (plain data; never a secret: the key travels in the environment)."""
    gpus = grid.gpus_per_torch_unit if cell.backend == "torch" else 0.0
    return {"unit": unit.key, "task": unit.task, "shard": unit.shard, "n_shards": unit.n_shards,
            "output": str(unit_dir(out, unit)), "device": grid.device, "cpus": grid.cpus_per_unit, "gpus": gpus,
            "judge": dict(grid.judge), **json.loads(json.dumps(cell.identity()))}


def _rows_per_unit(cell: Cell, task: str) -> int | None:
    from kvtool.evals.tasks import TASKS

    # rows of the evaluated split per the dataset's card (TaskSpec.card_rows); None where unknown
    n = TASKS[task].card_rows if task in TASKS else None
    limit = cell.limits.get(task, cell.limit)
    if limit is not None:
        n = limit if n is None else min(max(0, n - cell.offset), limit)
    elif n is not None:
        n = max(0, n - cell.offset)
    return n


def measured_rates(dirs: list[Path], skipped: list[dict[str, str]] | None = None) -> dict[tuple[str, str], float]:
    """Rows/s per (backend, task) from earlier runs' results files under ``dirs`` (rows generated in one go
    over their generation seconds). Left out, each appended to ``skipped`` as ``{"where", "why"}`` when a list is
    given: a folder that does not exist or holds no results file, an unreadable file, a merged result (its shards
    are counted), a task whose rows were resumed (found at start: its seconds cover only some rows) or that
    recorded no rows generated or no seconds."""
    totals: dict[tuple[str, str], list[float]] = {}
    skip = skipped if skipped is not None else []
    for d in dirs:
        files = list(d.rglob("results.json")) + list(d.rglob("results.shard-*-of-*.json")) if d.is_dir() else []
        if not files:
            skip.append({"where": str(d), "why": "no such folder" if not d.is_dir() else "no results files"})
        for f in files:
            try:
                res = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, OSError) as exc:
                skip.append({"where": str(f), "why": f"unreadable ({type(exc).__name__})"})
                continue
            if res.get("merged_from"):
                skip.append({"where": str(f), "why": "merged result (its shards are counted)"})
                continue
            backend = str((res.get("pipeline") or {}).get("backend") or res.get("config", {}).get("backend"))
            for task, rec in (res.get("tasks") or {}).items():
                n, s = rec.get("n_generated_now"), (rec.get("timing") or {}).get("generate_s")
                if n and s and n == rec.get("n_samples"):
                    t = totals.setdefault((backend, task), [0.0, 0.0])
                    t[0] += n
                    t[1] += s
                elif n and s:
                    skip.append({"where": f"{f} {task}", "why": f"resumed ({n} of {rec.get('n_samples')} rows "
                                                                f"generated in its last session)"})
                else:
                    skip.append({"where": f"{f} {task}", "why": "no rows generated" if not n else "no seconds"})
    return {k: v[0] / v[1] for k, v in totals.items() if v[1] > 0}


def plan_sweep(grid: Grid, out: Path, rates_from: list[str] | None = None) -> dict[str, Any]:
    """What a sweep would run: units (total, done, partial, to run), rows per task and a time estimate in
    single-worker seconds from measured rows/s (``None`` where no earlier run measured the backend/task)."""
    units = grid.units()
    skipped: list[dict[str, str]] = []
    rates = measured_rates([out, *[Path(p) for p in rates_from or []]], skipped)
    skipped = [s for s in skipped if s["where"] != str(out)]  # a new sweep folder holds no results yet
    by_backend: dict[str, list[float]] = {}
    for (b, _), r in rates.items():
        by_backend.setdefault(b, []).append(r)
    todo, n_done, n_partial, rows_todo, est, unknown = [], 0, 0, 0, 0.0, set()
    rows_by_task: dict[str, int | None] = {}
    for u in units:
        cell = grid.cell(u.cell)
        rows = _rows_per_unit(cell, u.task)
        rows_by_task[u.task] = rows
        if unit_done(out, u):
            n_done += 1
            continue
        n_partial += unit_started(out, u)
        todo.append(u)
        if rows is None:
            unknown.add(f"{u.task} rows")
            continue
        shard_rows = len(range(u.shard, rows, u.n_shards))
        rows_todo += shard_rows
        backend = cell.backend
        rate = rates.get((backend, u.task))
        if rate is None and by_backend.get(backend):
            rate = sum(by_backend[backend]) / len(by_backend[backend])  # another task on this backend
        if rate is None:
            unknown.add(f"{backend} rows/s")
        else:
            est += shard_rows / rate
    return {"cells": len(grid.cells), "tasks": grid.tasks, "units": len(units), "units_done": n_done,
            "units_partial": n_partial, "units_to_run": len(todo), "rows_per_task_per_cell": rows_by_task,
            "rows_to_run": rows_todo, "rates_rows_per_s": {f"{b}/{t}": r for (b, t), r in sorted(rates.items())},
            "estimate_s": None if unknown else est, "estimate_unknown": sorted(unknown), "rates_skipped": skipped,
            "reference": grid.reference, "cell_names": [c.name for c in grid.cells]}


def format_plan(plan: dict[str, Any]) -> str:
    est = plan["estimate_s"]
    est_s = (f"{est / 3600:.2f} worker-hours ({est:.0f} s) at the measured rows/s" if est is not None
             else "unknown (no earlier run measured " + ", ".join(plan["estimate_unknown"]) + ")")
    rows = ", ".join(f"{t}: {'?' if n is None else n}" for t, n in plan["rows_per_task_per_cell"].items())
    return "\n".join([
        f"cells: {plan['cells']} (reference {plan['reference']}), tasks: {', '.join(plan['tasks'])}",
        f"units: {plan['units']} ({plan['units_done']} done, {plan['units_partial']} partial, "
        f"{plan['units_to_run']} to run)",
        f"rows per cell: {rows}; rows to run: {plan['rows_to_run']}",
        f"time estimate (one worker): {est_s}", *_skipped_lines(plan.get("rates_skipped") or [])])


def _skipped_lines(skipped: list[dict[str, str]], show: int = 5) -> list[str]:
    """What ``--rates-from`` did not measure rows/s from, and why (the first ``show``, then a count)."""
    if not skipped:
        return []
    lines = [f"rows/s: left out {len(skipped)} result(s) (not measured from):"]
    lines += [f"  {s['where']}: {s['why']}" for s in skipped[:show]]
    if len(skipped) > show:
        lines.append(f"  … and {len(skipped) - show} more")
    return lines


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Check the grid, plan, run the units not yet done, then merge, compare and report (``study``).
    Returns ``{"plan", "units_run", "failed", "study"}``; with ``dry_run`` only ``{"plan"}``."""
    from tqdm import tqdm

    from kvtool.evals.sweep.study import finish_sweep

    grid = load_grid(cfg.grid, cfg.model_names)
    out = Path(cfg.output).resolve()  # units on other machines write to this path: it must be absolute (shared)
    check_cells(grid, out)
    plan = plan_sweep(grid, out, cfg.rates_from)
    if cfg.dry_run:
        return {"plan": plan}
    for c in grid.cells:
        f = cell_dir(out, c.name) / "cell.json"
        if not f.is_file():
            write_json(f, {"cell": c.name, "settings": c.identity()})
    write_json(out / "sweep.json", {"grid": grid_json(grid), "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime())})
    todo = [u for u in grid.units() if not unit_done(out, u)]
    args = [unit_args(grid, grid.cell(u.cell), u, out) for u in todo]
    failed: list[dict[str, Any]] = []
    bar = tqdm(total=len(args), desc="sweep units", unit="unit", disable=not cfg.progress)
    t0 = time.perf_counter()

    by_key = {a["unit"]: a for a in args}

    def on_done(rec: dict[str, Any]) -> None:
        rec = {**rec, "driver_t_s": time.perf_counter() - t0, "args": by_key.get(rec["unit"])}
        with open(out / "units.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        if "error" in rec:
            failed.append(rec)
        bar.update(1)
        bar.set_postfix_str(rec["unit"][-40:])

    if args:
        if cfg.executor == "ray":
            from kvtool.evals.sweep.executors import run_ray

            run_ray(args, on_done, address=cfg.address, workers=cfg.workers, max_retries=cfg.max_retries)
        else:
            from kvtool.evals.sweep.executors import run_local

            run_local(args, on_done, workers=cfg.workers)
    bar.close()
    wall = time.perf_counter() - t0
    bad_cells = {f["unit"].split("/")[0] for f in failed}
    study = finish_sweep(grid, out, skip=bad_cells, n_boot=cfg.n_boot)
    return {"plan": plan, "units_run": len(args), "run_wall_s": wall, "failed": failed, "study": study}
