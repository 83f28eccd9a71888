"""kvtool sweep with the Ray executor on a local Ray cluster started here (127.0.0.1, 2 CPUs, one per module):
the same rows as the local executor, the judge key reaching the workers through their environment but no file
(the sweep's or Ray's own logs), and a worker SIGKILLed in the middle of a unit: the unit is retried and its
predictions hold every row once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from kvtool.evals.runner import read_predictions
from kvtool.evals.sweep import SweepConfig, run_sweep
from kvtool.evals.sweep.executors import join_secrets, split_secrets
from tests.evals.fixtures import make_mmvet
from tests.evals.sweep_helpers import JudgeServer, cell_predictions, files_containing, grid_text

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    temp = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=str(temp),
             log_to_driver=False)
    yield temp
    ray.shutdown()


def test_secret_shares_round_trip_and_hide_the_key():
    env = {"KVTOOL_JUDGE_KEY": "sk-abc", "KVTOOL_JUDGE_URL": "http://127.0.0.1:1/v1"}
    env_vars, shares = split_secrets(env)
    assert "sk-abc" not in json.dumps(env_vars) and "sk-abc" not in json.dumps(shares)
    assert env_vars["KVTOOL_JUDGE_URL"] == env["KVTOOL_JUDGE_URL"]
    assert join_secrets(shares, env_vars) == {"KVTOOL_JUDGE_KEY": "sk-abc"}
    _, shares2 = split_secrets(env)
    assert shares2 != shares  # a fresh pad each time


def test_ray_equals_local_and_keeps_the_judge_key_out_of_files(ray_cluster, tmp_path, tiny_model, monkeypatch):
    secret = "sk-test-0c4e2a9b7d15f3e8-ray-never-written"
    make_mmvet(tmp_path / "data", n=1)  # 1 row in 2 shards: shard 1 is empty, and finished
    grid = tmp_path / "grid.toml"
    grid.write_text(grid_text({"a": (tiny_model("tiny-llava"), "torch")},
                              [{"schemes": ["g-KC128VT128"], "pairs": ["k4v2"]}],
                              tasks=("shapes", "mmvet"), data_dir=str(tmp_path / "data"), limit=2, shards=2,
                              max_new_tokens=2))
    with JudgeServer() as judge:
        monkeypatch.setenv("KVTOOL_JUDGE_KEY", secret)
        monkeypatch.setenv("KVTOOL_JUDGE_URL", judge.url)
        local = run_sweep(SweepConfig(grid=str(grid), output=str(tmp_path / "local"), n_boot=20, progress=False))
        n_local_calls = len(judge.auth)
        remote = run_sweep(SweepConfig(grid=str(grid), output=str(tmp_path / "ray"), executor="ray", n_boot=20,
                                       progress=False))
    assert local["units_run"] == remote["units_run"] == 8 and not local["failed"] and not remote["failed"]
    for cell in local["plan"]["cell_names"]:
        for task in ("shapes", "mmvet"):
            a = cell_predictions(tmp_path / "local", cell, task)
            assert a and a == cell_predictions(tmp_path / "ray", cell, task), (cell, task)
    ray_units = [json.loads(line) for line in (tmp_path / "ray" / "units.jsonl").read_text().splitlines()]
    assert {u["pid"] for u in ray_units}.isdisjoint({os.getpid()})  # ran in Ray workers
    # the key reached the workers' judge calls ...
    assert len(judge.auth) > n_local_calls and set(judge.auth) == {f"Bearer {secret}"}
    # ... and no file: not the sweep's, not the grid, not Ray's session logs
    assert files_containing(tmp_path, secret) == []
    assert files_containing(ray_cluster, secret) == []


def _unit_workers(marker: str) -> list[int]:
    """Pids of Ray workers running a sweep unit whose environment holds ``marker``."""
    pids = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if (p / "cmdline").read_bytes().startswith(b"ray::ray_unit") and marker.encode() in (
                    p / "environ").read_bytes():
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def test_worker_killed_mid_unit_is_retried_without_losing_or_duplicating_rows(ray_cluster, tmp_path, tiny_model,
                                                                              monkeypatch):
    n = 24  # enough rows that the killer (polling one file once the worker is known) lands mid-unit
    marker = f"http://127.0.0.1:9/kill-test-{os.getpid()}-{time.time_ns()}"
    monkeypatch.setenv("KVTOOL_JUDGE_URL", marker)  # travels in the runtime env: finds this test's worker
    grid = tmp_path / "grid.toml"
    grid.write_text(grid_text({"a": (tiny_model("tiny-llava"), "torch")}, [], limit=n, shards=1,
                              max_new_tokens=2))
    out = tmp_path / "out"
    preds = out / "cells" / "a-fp16" / "units" / "shapes" / "shapes" / "predictions.shard-0-of-1.jsonl"
    killed: dict[str, int] = {}

    def killer() -> None:
        deadline = time.time() + 120
        pids: list[int] = []
        while time.time() < deadline and not killed:
            if not pids:  # scanning /proc is slow: find the unit's worker once, then watch only its file
                pids = _unit_workers(marker)
                time.sleep(0.02)
                continue
            rows = len(read_predictions(preds)) if preds.exists() else 0
            if 1 <= rows < n:
                os.kill(pids[0], signal.SIGKILL)
                killed.update(pid=pids[0], rows=rows)
            time.sleep(0.005)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = run_sweep(SweepConfig(grid=str(grid), output=str(out), executor="ray", max_retries=2, n_boot=20,
                                progress=False))
    t.join(timeout=1)
    assert killed, "the unit finished before the worker could be killed"
    assert not res["failed"] and res["units_run"] == 1
    rows = read_predictions(preds)
    assert len(rows) == n and len({r["id"] for r in rows}) == n  # every row once
    assert preds.read_bytes().count(b"\n") == n
    (unit,) = [json.loads(line) for line in (out / "units.jsonl").read_text().splitlines()]
    assert unit["pid"] != killed["pid"]  # finished by the retry ...
    assert unit["n_generated_now"] <= n - killed["rows"]  # ... which resumed after the killed worker's rows
