"""Tasks as data to the end (issue 17 item 5): no code outside a task's own definition branches on a task name;
every number a task reports has declared metadata (higher-is-better, scale); specs are keyword-built and carry
their load / judge hooks; results record the task version."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

import kvtool.evals
from kvtool.errors import InputError
from kvtool.evals import metrics as M
from kvtool.evals import tasks as T
from kvtool.evals.judges import JudgeConfig, apply_judges
from kvtool.evals.runner import EvalConfig, read_predictions, run_eval
from kvtool.evals.settings import read_settings
from kvtool.evals.tasks import TASKS, TaskSpec, flatten_metrics, get_task, task_metrics
from tests.evals.fixtures import MAKERS, ScriptedModel

EVALS = Path(kvtool.evals.__file__).parent
#: the modules that define tasks: they may name them
TASK_MODULES = {"tasks.py", "pairs.py", "shapes.py"}
#: string literals equal to a task name that mean something else: (file, literal, why)
NOT_TASK_NAMES = {("sweep/grid.py", "pairs"): "the grid's [kv] key `pairs` (K/V bit pairs), not the PAIRS task"}


def _task_literals(node: ast.AST) -> list[str]:
    """Task names written as string literals in ``node`` (a constant, or a tuple / list / set of them)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [n.value for n in items if isinstance(n, ast.Constant) and n.value in TASKS]


def name_branches(source: str, rel: str) -> list[str]:
    """Comparisons (``==``, ``!=``, ``in``, ``not in``) of anything against a task name literal, and tables (dict
    literals) keyed by two or more task names, in one module's source: ``"<file>:<line>: <what>"``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                 for op in node.ops):
            names = [n for side in (node.left, *node.comparators) for n in _task_literals(side)]
            names = [n for n in names if (rel, n) not in NOT_TASK_NAMES]
            if names:
                found.append(f"{rel}:{node.lineno}: compares with task name(s) {', '.join(names)}")
        elif isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in TASKS]
            if len(keys) >= 2:
                found.append(f"{rel}:{node.lineno}: a table keyed by task names {', '.join(keys)}")
    return found


def test_no_code_outside_the_task_modules_branches_on_a_task_name():
    found = []
    for f in sorted(EVALS.rglob("*.py")):
        rel = f.relative_to(EVALS).as_posix()
        if rel not in TASK_MODULES:
            found += name_branches(f.read_text(encoding="utf-8"), rel)
    assert not found, "task-specific code belongs on the TaskSpec (load / judge / score / metrics ...):\n" + \
        "\n".join(found)


@pytest.mark.parametrize("snippet, hits", [
    ('if spec.name == "pairs":\n    pass', 1),
    ('if task in ("mmvet", "hallusionbench"):\n    pass', 1),
    ('x = "socialcf" in tasks', 1),
    ('ROWS = {"mmvet": 218, "pope": 9000}', 1),
    ('if spec.name == "pope_extra" or kind == "fp16":\n    pass', 0),
    ('ok = {"mmvet": 1}', 0),
])
def test_the_branch_finder_finds_what_it_should(snippet, hits):
    assert len(name_branches(snippet, "x.py")) == hits


def test_specs_are_keyword_only_and_complete():
    spec = get_task("pope")
    with pytest.raises(TypeError):
        TaskSpec(*(getattr(spec, f.name) for f in dataclasses.fields(TaskSpec)))  # positional: refused
    for name, s in TASKS.items():
        assert s.name == name and s.version >= 1
        assert bool(s.judge) == bool(s.judges), f"{name}: judges (shown) and the judge hook disagree"
        assert s.headline_info.higher_is_better is not None or s.bars, f"{name}: a curve headline needs a direction"
        for key in (s.headline, *s.beside):
            s.metric_info(key)  # declared
        checked = {c for c, _ in s.row_checks}
        assert checked <= set(s.columns), name


def test_metric_registry_refuses_bad_declarations():
    with pytest.raises(InputError, match="already registered"):
        M.register_metric("accuracy_pct", higher_is_better=True, scale=(0, 100), unit="%", aggregation="mean",
                          label="x")
    with pytest.raises(InputError, match="low < high"):
        M.register_metric("new_kind", higher_is_better=True, scale=(1, 0), unit="%", aggregation="mean", label="x")
    with pytest.raises(InputError, match="unknown metric kind"):
        M.metric_info("no_such_kind")
    with pytest.raises(InputError, match="not declared"):
        get_task("gqa").metric_info("f1")
    pct = get_task("textvqa").headline_info
    assert (pct.higher_is_better, pct.scale, pct.delta_unit) == (True, (0.0, 100.0), "pp")
    mme = get_task("mme").headline_info
    assert (mme.scale, mme.delta_unit, mme.plot_span) == ((0.0, 2000.0), "score points", 20.0)
    assert get_task("socialcf").headline_info.higher_is_better is False


def _answer(image, prompt, seed):
    if "option's letter" in prompt:
        return "B"
    if "Is this person" in prompt or "Does this person" in prompt or "Is this a" in prompt:
        return "This person is a chemical engineer." if seed == 0 else ""
    return "Yes" if seed == 0 else "no"


def _judged(task: str, rows: list[dict]) -> list[dict]:
    """Rows with the fields the task's judges would add (so the judged metrics are reported too)."""
    out = []
    for i, r in enumerate(rows):
        r = dict(r)
        if task == "mmvet":
            r["judge_scores"] = [0.5, 1.0]
        elif task == "hallusionbench":
            r["correctness"], r["same"] = i % 3, i % 2
        elif task == "socialcf":
            r["toxicity"], r["competence"], r["stereotype"] = 0.1 * (i % 4), i % 2, i % 3
        out.append(r)
    return out


def test_every_task_declares_each_metric_it_reports_and_results_record_the_version(tmp_path, data_dir):
    tasks = [*MAKERS, "shapes"]
    res = run_eval(EvalConfig(model=None, tasks=tasks, output=str(tmp_path / "run"), data_dir=str(data_dir),
                              progress=False), model=ScriptedModel(_answer))
    settings = read_settings(tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    for task in tasks:
        spec = get_task(task)
        assert res["tasks"][task]["version"] == on_disk["tasks"][task]["version"] == spec.version
        assert settings["tasks"][task]["task_version"] == spec.version
        rows = read_predictions(tmp_path / "run" / task / "predictions.jsonl")
        reported = {**flatten_metrics(res["tasks"][task]["metrics"], keep_missing=True),
                    **flatten_metrics(task_metrics(spec, _judged(task, rows)), keep_missing=True)}
        assert reported, task
        for key in reported:
            info = spec.metric_info(key)  # InputError names an undeclared one
            assert info.higher_is_better in (True, False, None) and info.scale[0] < (info.scale[1] or 1e300)
    assert {"mmvet": "total_std", "hallusionbench": "diagnosis.mixed", "socialcf": "max_toxicity"}.items() <= {
        t: k for t in ("mmvet", "hallusionbench", "socialcf")
        for k in flatten_metrics(task_metrics(get_task(t), _judged(t, read_predictions(
            tmp_path / "run" / t / "predictions.jsonl"))))
        if k in ("total_std", "diagnosis.mixed", "max_toxicity")}.items()


def test_a_new_task_version_is_recorded_and_never_mixed(tmp_path, data_dir, monkeypatch):
    cfg = EvalConfig(model=None, tasks=["pope"], output=str(tmp_path / "run"), data_dir=str(data_dir), limit=2,
                     progress=False)
    assert run_eval(cfg, model=ScriptedModel())["tasks"]["pope"]["version"] == 1
    monkeypatch.setitem(T.TASKS, "pope", dataclasses.replace(get_task("pope"), version=2))
    with pytest.raises(InputError, match="task pope was made with the task version 1, this run asks for 2"):
        run_eval(cfg, model=ScriptedModel())
    fresh = run_eval(dataclasses.replace(cfg, output=str(tmp_path / "v2")), model=ScriptedModel())
    assert fresh["tasks"]["pope"]["version"] == 2
    assert read_settings(tmp_path / "v2")["tasks"]["pope"]["task_version"] == 2


def test_judges_and_loaders_go_through_the_spec_hooks(tmp_path):
    calls = []

    def judge(rows, cfg, cache):
        calls.append((len(rows), cfg.mmvet_runs))
        for r in rows:
            r["judged"] = True
        return ["judged by the hook"]

    spec = dataclasses.replace(get_task("pope"), judge=judge, judges=("x",))
    rows = [{"prediction": "yes"}, {"prediction": "no"}]
    assert apply_judges(spec, rows, JudgeConfig(mmvet_runs=3)) == ["judged by the hook"]
    assert calls == [(2, 3)] and all(r["judged"] for r in rows)
    assert apply_judges(get_task("pope"), rows, None) == []  # no hook: nothing to judge
    with pytest.raises(InputError, match="judge-url"):
        apply_judges("pope", rows, JudgeConfig(url="ftp://x"))  # a bad URL is refused whatever the task

    from kvtool.evals.loaders import load_task_data

    seen = []

    def load(s, source, n_rows):
        seen.append((s.name, source, n_rows))
        return [{"question_id": 1, "image": None, "question": "q", "answer": "yes", "category": "random"}], "hook"

    rows, where = load_task_data(dataclasses.replace(get_task("pope"), load=load), n_rows=7)
    assert where == "hook" and seen == [("pope", None, 7)] and len(rows) == 1
    with pytest.raises(InputError, match="pairs: give the PAIRS folder"):
        load_task_data(get_task("pairs"))
