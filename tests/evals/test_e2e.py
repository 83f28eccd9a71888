"""Every task end to end through the real ``VLMPipeline`` (torch engine) with a tiny random LLaVA-1.5, on local
fixtures in each dataset's format; then compare of a 2-bit KV run against the fp16 run, and the CLI."""

from __future__ import annotations

import json

from click.testing import CliRunner

from kvtool.cli import main
from kvtool.evals.compare import compare_runs
from kvtool.evals.runner import EvalConfig, read_predictions, run_eval
from tests.evals.fixtures import MAKERS

ALL_TASKS = [*MAKERS, "shapes"]


def test_all_tasks_with_tiny_llava(tmp_path, data_dir, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = str(tiny_model("tiny-llava"))
    common = dict(tasks=ALL_TASKS, data_dir=str(data_dir), backend="torch", limit=2, max_new_tokens=3, seeds=[0],
                  progress=False)
    ref = run_eval(EvalConfig(model=model, output=str(tmp_path / "fp16"), kv="fp16", **common))
    assert ref["pipeline"]["conversation"] == "vicuna_v1"  # LLaVA-1.5 -> LLaVA's eval conversation
    for task in ALL_TASKS:
        rows = read_predictions(tmp_path / "fp16" / task / "predictions.jsonl")
        assert rows and all(isinstance(r["prediction"], str) for r in rows), task
        assert len({r["id"] for r in rows}) == len(rows)
        assert ref["tasks"][task]["metrics"]["n"] >= 1 if "n" in ref["tasks"][task]["metrics"] else True
        assert rows[0]["stats"]["prefill_ms"] > 0
    # greedy, batch 1: the same command again is a no-op resume, and a fresh run reproduces every answer
    again = run_eval(EvalConfig(model=model, output=str(tmp_path / "fp16"), kv="fp16", **common))
    assert all(again["tasks"][t]["n_generated_now"] == 0 for t in ALL_TASKS)
    fresh = run_eval(EvalConfig(model=model, output=str(tmp_path / "fp16b"), kv="fp16",
                                **{**common, "tasks": ["pope", "gqa"]}))
    cmp_same = compare_runs(tmp_path / "fp16", tmp_path / "fp16b", n_boot=50)
    assert all(t["agreement"] == 1.0 for t in cmp_same["tasks"].values())
    assert fresh["tasks"]["pope"]["metrics"]["mean_f1"] == ref["tasks"]["pope"]["metrics"]["mean_f1"]

    q = run_eval(EvalConfig(model=model, output=str(tmp_path / "kv2"), kv="g-KC128VT128", k_bits=2, v_bits=2,
                            **{**common, "tasks": ["pope", "textvqa"]}))
    assert q["pipeline"]["kv"].lower() == "g-kc128vt128" and q["pipeline"]["k_bits"] == 2
    cmp = compare_runs(tmp_path / "fp16", tmp_path / "kv2", n_boot=50)
    assert set(cmp["tasks"]) == {"pope", "textvqa"} and cmp["tasks"]["pope"]["n_paired"] == 2


def test_cli_eval_compare_report_and_errors(tmp_path, data_dir, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = str(tiny_model("tiny-llava"))
    r = CliRunner()
    base = ["eval", model, "--tasks", "pope", "--backend", "torch", "--data-dir", str(data_dir), "--limit", "2",
            "--max-new-tokens", "2", "--no-progress"]
    res = r.invoke(main, [*base, "-o", str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["tasks"]["pope"]["n_samples"] == 2
    res = r.invoke(main, [*base, "-o", str(tmp_path / "b"), "--kv", "g-KC128VT128", "--kv-bits", "2"])
    assert res.exit_code == 0, res.output
    assert "pope" in res.output and "random_f1" in res.output
    res = r.invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--n-boot", "20"])
    assert res.exit_code == 0 and "pope" in res.output and "95% CI" in res.output, res.output
    res = r.invoke(main, ["report", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "rep")])
    assert res.exit_code == 0 and (tmp_path / "rep" / "report.csv").exists(), res.output
    res = r.invoke(main, ["eval", model, "--tasks", "nosuch", "-o", str(tmp_path / "c")])
    assert res.exit_code == 2 and "unknown task" in res.output
    res = r.invoke(main, [*base[:-1], "-o", str(tmp_path / "d"), "--shard", "3/2"])
    assert res.exit_code == 2 and "--shard" in res.output
    res = r.invoke(main, ["ls", "tasks", "--json"])
    assert res.exit_code == 0 and len(json.loads(res.output)) == 12  # vqav2_testdev added
