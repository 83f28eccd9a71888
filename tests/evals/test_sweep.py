"""kvtool sweep with the local executor on tiny offline models: every unit once, the same rows as kvtool eval by
hand, a report with every cell, resumability (no generation on a re-run; a changed cell runs alone; a changed
setting is refused), bad grid files (one line, exit 2, nothing started) and the judge key kept out of files."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvtool.cli import main
from kvtool.errors import InputError
from kvtool.evals.sweep import SweepConfig, parse_grid, plan_sweep, run_sweep
from tests.evals.fixtures import make_mmvet
from tests.evals.sweep_helpers import JudgeServer, cell_predictions, files_containing, grid_text

TOP = {"limit": 2, "max_new_tokens": 2, "shards": 1}


def _blocks(qwen_or2_pairs):
    return [{"schemes": ["uniform", "g-KC128VT128"], "bits": [4, 2]},
            {"models": ["a"], "schemes": ["or2"], "bits": [4, 2]},
            {"models": ["b"], "schemes": ["or2"], "pairs": qwen_or2_pairs}]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, tiny_model):
    """2 models x 3 schemes x 2 bits x shapes (+ the fp16 reference), run once by the local executor."""
    root = tmp_path_factory.mktemp("sweep_local")
    models = {"a": (tiny_model("tiny-llava"), "torch"), "b": (tiny_model("tiny-qwen2-vl"), "torch")}
    grid = root / "grid.toml"
    grid.write_text(grid_text(models, _blocks(["k4v4", "k2v2"]), **TOP))
    out = root / "out"
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "ray", None)  # the local executor must not import ray: this makes `import ray` fail
    try:
        result = run_sweep(SweepConfig(grid=str(grid), output=str(out), n_boot=50, progress=False))
    finally:
        mp.undo()
    return {"root": root, "grid": grid, "out": out, "models": models, "result": result}


def test_local_sweep_runs_every_unit_once_and_reports_every_cell(local_sweep):
    res, out = local_sweep["result"], local_sweep["out"]
    names = res["plan"]["cell_names"]
    assert len(names) == 13 and names[0] == "a-fp16"  # reference + 2 models x 3 schemes x 2 bits
    assert res["units_run"] == 13 and not res["failed"]
    done = [json.loads(line)["unit"] for line in (out / "units.jsonl").read_text().splitlines()]
    assert sorted(done) == sorted(f"{n}/shapes/0-of-1" for n in names)
    assert res["study"]["cells_done"] == names and not res["study"]["cells_missing"]
    with open(out / "report" / "report.csv") as fh:
        runs = {r["run"] for r in csv.DictReader(fh)}
    assert runs == {str(out / "cells" / n) for n in names}
    study = (out / "report" / "study.md").read_text()
    assert study.count("\n| uniform | 4 |") == 2 and study.count("\n| or2 | 2 |") == 2
    assert "Table 4" in study and "Fig. 5" not in study  # two models; no K != V cell yet
    for n in names[1:]:
        cmp = json.loads((out / "compare" / f"{n}.json").read_text())
        assert cmp["tasks"]["shapes"]["n_paired"] == 2
        assert "ci95" in cmp["tasks"]["shapes"]["metrics"]["accuracy"]


@pytest.mark.parametrize("cell,model,kv", [("a-fp16", "a", []), ("b-or2-k2v2", "b", ["--kv", "or2", "--kv-bits", "2"]),
                                           ("a-g-KC128VT128-k4v4", "a", ["--kv", "g-KC128VT128", "--kv-bits", "4"])])
def test_local_sweep_equals_kvtool_eval_by_hand(local_sweep, cell, model, kv):
    by_hand = local_sweep["root"] / f"hand-{cell}"
    path, backend = local_sweep["models"][model]
    res = CliRunner().invoke(main, ["eval", str(path), "--tasks", "shapes", "--backend", backend, "--limit", "2",
                                    "--max-new-tokens", "2", "--no-progress", "-o", str(by_hand), *kv])
    assert res.exit_code == 0, res.output
    hand = {r["id"]: r["prediction"] for r in map(json.loads, (by_hand / "shapes" / "predictions.jsonl").open())}
    assert len(hand) == 2 and cell_predictions(local_sweep["out"], cell) == hand
    sweep_res = json.loads((local_sweep["out"] / "cells" / cell / "results.json").read_text())
    hand_res = json.loads((by_hand / "results.json").read_text())
    assert sweep_res["tasks"]["shapes"]["metrics"] == hand_res["tasks"]["shapes"]["metrics"]


def test_changed_setting_is_refused_naming_cell_and_setting(local_sweep):
    grid = local_sweep["root"] / "grid-limit.toml"
    grid.write_text(grid_text(local_sweep["models"], _blocks(["k4v4", "k2v2"]), **{**TOP, "limit": 3}))
    res = CliRunner().invoke(main, ["sweep", str(grid), "-o", str(local_sweep["out"]), "--no-progress"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [res.output.strip()]
    assert "cell a-fp16: setting limit is 3 in the grid but 2" in res.output


def test_rerun_generates_nothing_and_a_changed_cell_runs_alone(local_sweep):
    out = local_sweep["out"]
    preds = sorted((out / "cells").rglob("predictions.shard-*.jsonl"))
    before = {p: p.stat().st_mtime_ns for p in preds}
    again = run_sweep(SweepConfig(grid=str(local_sweep["grid"]), output=str(out), n_boot=50, progress=False))
    assert again["units_run"] == 0 and again["plan"]["units_done"] == 13
    assert {p: p.stat().st_mtime_ns for p in preds} == before
    # an interrupted unit (results file missing, one row kept and a torn line) resumes its rows only
    udir = out / "cells" / "a-uniform-k2v2" / "units" / "shapes"
    part = udir / "shapes" / "predictions.shard-0-of-1.jsonl"
    first_line = part.read_text().splitlines()[0]
    part.write_text(first_line + "\n" + '{"id": "1", "pred')
    (udir / "results.shard-0-of-1.json").unlink()
    resumed = run_sweep(SweepConfig(grid=str(local_sweep["grid"]), output=str(out), n_boot=50, progress=False))
    assert resumed["units_run"] == 1 and resumed["plan"]["units_partial"] == 1
    last = json.loads((out / "units.jsonl").read_text().splitlines()[-1])
    assert last["unit"] == "a-uniform-k2v2/shapes/0-of-1" and last["n_generated_now"] == 1
    rows = part.read_text().splitlines()
    assert len(rows) == 2 and rows[0] == first_line and len({json.loads(r)["id"] for r in rows}) == 2
    preds = [p for p in preds if p != part]
    before = {p: p.stat().st_mtime_ns for p in preds}
    # one cell's bits change (b-or2 k2v2 -> k3v2): only that cell runs
    local_sweep["grid"].write_text(grid_text(local_sweep["models"], _blocks(["k4v4", "k3v2"]), **TOP))
    dry = CliRunner().invoke(main, ["sweep", str(local_sweep["grid"]), "-o", str(out), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.output)["plan"]
    assert plan["units_to_run"] == 1 and plan["rows_to_run"] == 2 and plan["estimate_s"] > 0
    changed = run_sweep(SweepConfig(grid=str(local_sweep["grid"]), output=str(out), n_boot=50, progress=False))
    assert changed["units_run"] == 1 and not changed["failed"]
    last = json.loads((out / "units.jsonl").read_text().splitlines()[-1])
    assert last["unit"] == "b-or2-k3v2/shapes/0-of-1" and last["n_generated_now"] == 2
    assert {p: p.stat().st_mtime_ns for p in preds} == before
    assert "Fig. 5" in (out / "report" / "study.md").read_text()  # K3V2 is a K != V cell
    assert len(cell_predictions(out, "b-or2-k3v2")) == 2


@pytest.mark.parametrize("top,body,key", [
    ({}, '[[kv]]\nschemes = ["g-XY9"]\nbits = [4]\n', "kv[0].schemes"),
    ({}, '[[kv]]\nschemes = ["uniform"]\nbits = [5]\n', "kv[0].bits"),
    ({}, '[[kv]]\nschemes = ["ov-u8"]\nbits = [4]\n', "kv[0].bits"),
    ({}, '[[kv]]\nschemes = ["uniform"]\npairs = ["k4x2"]\n', "kv[0].pairs"),
    ({}, '[[kv]]\nschemes = ["uniform"]\n', "kv[0].bits"),
    ({}, '[[kv]]\nmodels = ["zz"]\nschemes = ["fp16"]\n', "kv[0].models"),
    ({}, '[judge]\nkey = "sk-123"\n', "judge.key"),
    ({"limit": 0}, "", "limit"),
    ({"tasks_extra": 1}, "", "tasks_extra"),
    ({"limits": {"vqav2": 5}}, "", "limits.vqav2"),
    ({"data": {"vqav2": "x"}}, "", "data.vqav2"),
    ({"limits": 5}, "", "limits"),
])
def test_bad_grid_one_line_exit_2_before_any_unit(tmp_path, tiny_model, top, body, key):
    text = grid_text({"a": (tiny_model("tiny-llava"), "torch")}, [], **{**TOP, **top}) + body
    (tmp_path / "g.toml").write_text(text)
    res = CliRunner().invoke(main, ["sweep", str(tmp_path / "g.toml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith(f"error: {tmp_path / 'g.toml'}: {key}:"), line
    assert not (tmp_path / "out").exists()


def test_bad_grid_unknown_task_and_missing_model(tmp_path, tiny_model):
    model = tiny_model("tiny-llava")
    cases = [(grid_text({"a": (model, "torch")}, [], tasks=("shapes", "nosuchtask")), "tasks"),
             (grid_text({"a": (tmp_path / "missing", "torch")}, []), "models.a.path"),
             (grid_text({"a": (model, "torch")}, [], reference="zz"), "reference.model")]
    for text, key in cases:
        with pytest.raises(InputError, match=rf"^G: {key.replace('.', '[.]')}: "):
            parse_grid(text, "G", tmp_path)
    g = parse_grid(grid_text({"a": (model, "torch")}, [{"schemes": ["fp16", "ov-u4", "g-KC128VT128"],
                                                         "k_bits": [4, 2], "v_bits": [4]}]), "G")
    assert [c.name for c in g.cells] == ["a-fp16", "a-ov-u4-k4v4", "a-g-KC128VT128-k4v4", "a-g-KC128VT128-k2v4"]
    g = parse_grid(grid_text({"a": (model, "torch")}, [], tasks=("shapes", "pope"), limit=7,
                             limits={"pope": 3}), "G")
    rows = plan_sweep(g, tmp_path / "none")["rows_per_task_per_cell"]
    assert g.cells[0].limits == {"pope": 3} and rows == {"shapes": 7, "pope": 3}


def test_judge_key_reaches_the_judge_and_no_file_the_sweep_wrote(tmp_path, tiny_model, monkeypatch):
    secret = "sk-test-7f3a9c1e5b2d4680-never-written"
    make_mmvet(tmp_path / "data", n=2)
    with JudgeServer() as judge:
        monkeypatch.setenv("KVTOOL_JUDGE_KEY", secret)
        monkeypatch.setenv("KVTOOL_JUDGE_URL", judge.url)
        grid = tmp_path / "grid.toml"
        grid.write_text(grid_text({"a": (tiny_model("tiny-llava"), "torch")}, [], tasks=("mmvet",),
                                  data_dir=str(tmp_path / "data"), **TOP))
        res = CliRunner().invoke(main, ["sweep", str(grid), "-o", str(tmp_path / "out"), "--no-progress"])
        assert res.exit_code == 0, res.output
    assert judge.auth and set(judge.auth) == {f"Bearer {secret}"}
    results = json.loads((tmp_path / "out" / "cells" / "a-fp16" / "results.json").read_text())
    assert results["tasks"]["mmvet"]["metrics"]["total"] == pytest.approx(50.0)
    assert files_containing(tmp_path, secret) == [] and secret not in res.output


def test_sweep_options_checked(tmp_path):
    r = CliRunner()
    res = r.invoke(main, ["sweep", str(tmp_path / "nope.toml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "GRID" in res.output and "no such file" in res.output
    (tmp_path / "g.toml").write_text("tasks = [\n")
    res = r.invoke(main, ["sweep", str(tmp_path / "g.toml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "not valid TOML" in res.output
    with pytest.raises(InputError, match="--address"):
        SweepConfig(grid="g.toml", output="o", address="auto")
    with pytest.raises(InputError, match="--workers"):
        SweepConfig(grid="g.toml", output="o", workers=0)


@pytest.mark.slow
def test_local_process_pool_equals_in_process(tmp_path, tiny_model):
    grid = tmp_path / "grid.toml"
    grid.write_text(grid_text({"a": (tiny_model("tiny-llava"), "torch")}, [{"schemes": ["uniform"], "bits": [2]}],
                              **{**TOP, "shards": 2}))
    one = run_sweep(SweepConfig(grid=str(grid), output=str(tmp_path / "one"), n_boot=20, progress=False))
    two = run_sweep(SweepConfig(grid=str(grid), output=str(tmp_path / "two"), workers=2, n_boot=20, progress=False))
    assert one["units_run"] == two["units_run"] == 4 and not two["failed"]
    for cell in one["plan"]["cell_names"]:
        assert cell_predictions(tmp_path / "one", cell) == cell_predictions(tmp_path / "two", cell)


def test_rates_from_says_what_it_left_out(tmp_path, tiny_model):
    """A resumed run (rows found at start), a merged result and a missing folder are not measured from, and the
    plan says so instead of skipping them silently; a run generated in one go gives the rate."""
    from kvtool.evals.sweep.driver import format_plan

    def results(path: Path, n_now: int, n: int, merged: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        res = {"config": {"backend": "torch"}, "pipeline": {"backend": "torch"},
               "tasks": {"shapes": {"n_generated_now": n_now, "n_samples": n, "timing": {"generate_s": 10.0}}}}
        if merged:
            res["merged_from"] = ["results.shard-0-of-2.json"]
        path.write_text(json.dumps(res))

    results(tmp_path / "old" / "whole" / "results.json", 40, 40)
    results(tmp_path / "old" / "resumed" / "results.json", 5, 40)
    results(tmp_path / "old" / "merged" / "results.json", 40, 40, merged=True)
    g = parse_grid(grid_text({"a": (tiny_model("tiny-llava"), "torch")}, [], limit=8), "G")
    plan = plan_sweep(g, tmp_path / "new", [str(tmp_path / "old"), str(tmp_path / "nowhere")])
    assert plan["rates_rows_per_s"] == {"torch/shapes": pytest.approx(4.0)}  # only the whole run: 40 rows / 10 s
    why = {Path(s["where"].split(" ")[0]).parent.name or s["where"]: s["why"] for s in plan["rates_skipped"]}
    assert why["resumed"].startswith("resumed (5 of 40 rows") and why["merged"].startswith("merged result")
    assert any(s["where"].endswith("nowhere") and s["why"] == "no such folder" for s in plan["rates_skipped"])
    assert not any(s["where"] == str(tmp_path / "new") for s in plan["rates_skipped"])  # the new sweep's own folder
    text = format_plan(plan)
    assert "left out 3 result(s)" in text and "resumed (5 of 40" in text and "nowhere: no such folder" in text
