"""``kvtool sweep``: the study's grid (models x weights x KV schemes x bits x tasks) as one resumable command.

``run_sweep(SweepConfig(grid="grid.toml", output="runs/"))`` checks the grid file (``grid``), expands it into
units (cell x task x shard), runs the units not yet done with the local executor (default) or on a Ray cluster
(``executors``), then merges every cell, compares it with the reference cell and writes the study-shaped report
(``study``). ``plan_sweep`` is the dry run. Nothing here imports ``ray`` unless the Ray executor runs.
"""

from kvtool.evals.sweep.driver import SweepConfig, format_plan, plan_sweep, run_sweep
from kvtool.evals.sweep.grid import Cell, Grid, Unit, load_grid, parse_grid

__all__ = ["Cell", "Grid", "SweepConfig", "Unit", "format_plan", "load_grid", "parse_grid", "plan_sweep",
           "run_sweep"]
