"""The eval package's modules stay under the ~600-line guideline (STYLE.md); the task table (``tasks``) and its
machinery (``taskspec``) are one set of objects: what ``tasks`` re-exports is ``taskspec``'s own."""

from pathlib import Path

import kvtool.evals as evals_pkg
from kvtool.evals import tasks, taskspec


def test_eval_and_cli_modules_under_600_lines():
    roots = [Path(evals_pkg.__file__).parent, Path(evals_pkg.__file__).parent.parent / "cli"]
    long = {str(p): n for root in roots for p in root.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert not long, long


def test_tasks_reexports_the_machinery():
    for name in ("TaskSpec", "Sample", "BarPanel", "COMMON_METRICS", "LLAVA_LOADER_TOKENS", "flatten_metrics",
                 "headline_value", "score_rows", "task_metrics"):
        assert getattr(tasks, name) is getattr(taskspec, name), name
    assert all(isinstance(t, taskspec.TaskSpec) for t in tasks.TASKS.values())
    assert "TASKS" not in vars(taskspec)  # the machinery names no task
