"""Runner, loaders, resume, shards, rescore, compare and report with local fixtures and a scripted model."""

from __future__ import annotations

import json

import pytest

from kvtool.errors import InputError
from kvtool.evals.compare import bootstrap_ci, compare_runs
from kvtool.evals.report import write_report
from kvtool.evals.runner import EvalConfig, merge_shards, read_predictions, rescore, run_eval
from tests.evals.fixtures import MAKERS, ScriptedModel


def _cfg(tmp_path, data_dir, tasks, name="run", **kw):
    return EvalConfig(model=None, tasks=tasks, output=str(tmp_path / name), data_dir=str(data_dir),
                      progress=False, **kw)


def test_every_task_runs_on_its_local_format(tmp_path, data_dir):
    def answer(image, prompt, seed):
        if "option's letter" in prompt:
            return "B"
        if "OCR" in prompt:
            return "stop"
        if "how many" in prompt:
            return "two"
        if "which side" in prompt:
            return "Left."
        if "Is this person" in prompt or "Does this person" in prompt or "Is this a" in prompt:
            return "This person is a chemical engineer." if seed == 0 else "I cannot tell."
        return "Yes"

    tasks = [t for t in MAKERS] + ["shapes"]
    model = ScriptedModel(answer)
    res = run_eval(_cfg(tmp_path, data_dir, tasks, limit=8 if False else None), model=model)
    m = {t: res["tasks"][t]["metrics"] for t in tasks}
    assert m["textvqa"]["accuracy"] == pytest.approx(100.0)  # 7 of 10 said "stop"
    assert m["vqav2"]["accuracy"] == pytest.approx(100.0)   # "two" -> "2"
    assert m["gqa"]["accuracy"] == pytest.approx(100.0)
    assert m["scienceqa"]["accuracy"] == pytest.approx(100.0)
    # MME: always "Yes": each image gets 1 of 2 right -> acc 50, acc+ 0 -> 50 per category
    assert m["mme"]["existence"] == pytest.approx(50.0) and m["mme"]["perception"] == pytest.approx(100.0)
    assert m["mme"]["cognition"] == pytest.approx(50.0)
    assert m["pope"]["random"]["yes_ratio"] == 1.0 and "mean_f1" in m["pope"]
    assert m["mmvet"]["total"] is None and "grader" in m["mmvet"]["missing"]
    assert m["hallusionbench"]["correctness_source"] == "rule" and m["hallusionbench"]["diagnosis"] is None
    assert m["socialcf"]["n"] == 8 and m["socialcf"]["max_toxicity"] is None
    # PAIRS: lab_coat asks one question, status scenarios five; 4 images x 3 seeds; seed 0 says "chemical
    # engineer" (+1 on lab_coat, 0 elsewhere), seeds 1-2 refuse (0)
    go = m["pairs"]["gender_occupation"]
    assert go["n"] == 4 * 1 * 3 and m["pairs"]["race_status"]["n"] == 4 * 5 * 3
    assert go["white_man"] == pytest.approx(1 / 3) and go["male_minus_female"] == 0.0
    assert m["pairs"]["race_crime"]["n"] == 4 * 3
    assert m["shapes"]["n"] == 500
    # prompts follow LLaVA-1.5's eval scripts
    prompts = [c[1] for c in model.calls]
    assert "What is written 0?\nReference OCR token: stop, sign\nAnswer the question using a single word or phrase." in prompts
    assert any(p.startswith("Context: Animals live in many places.\nWhich is a mammal?\nA. frog\nB. whale\nC. shark\n"
                            "Answer with the option's letter") for p in prompts)
    assert not any("Please answer yes or no." in p for p in prompts)
    assert sum(c[0] is None for c in model.calls) == 1  # the one HallusionBench question without a figure
    kws = [c[2] for c in model.calls if c[1].startswith("What are five keywords")]
    assert kws and all(k["do_sample"] and k["temperature"] == 0.75 for k in kws)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["tasks"]["pairs"]["generation"]["seeds"] == [0, 1, 2]
    assert saved["config"]["tasks"] == tasks and saved["pipeline"]["backend"] == "scripted"


def test_missing_column_fails_clearly(tmp_path):
    from tests.evals.fixtures import _write, image

    _write([{"question_id": 1, "image": image(1), "question": "q"}], tmp_path / "pope" / "test.parquet")
    with pytest.raises(InputError, match="lacks column.*answer.*category"):
        run_eval(EvalConfig(None, ["pope"], str(tmp_path / "o"), data_dir=str(tmp_path), progress=False),
                 model=ScriptedModel())


def test_resume_after_kill_leaves_one_row_per_sample(tmp_path, data_dir, monkeypatch):
    cfg = _cfg(tmp_path, data_dir, ["pope"])
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, model=ScriptedModel(fail_after=4))
    path = tmp_path / "run" / "pope" / "predictions.jsonl"
    assert len(read_predictions(path)) == 4
    with open(path, "a") as fh:  # a write torn by the kill
        fh.write('{"id": "4", "predic')
    model = ScriptedModel()
    res = run_eval(cfg, model=model)
    rows = read_predictions(path)
    assert sorted(r["id"] for r in rows) == [str(i) for i in range(6)]
    assert len(model.calls) == 2 and res["tasks"]["pope"]["n_samples"] == 6
    # a complete run resumes without building (decoding) any row again, and with identical metrics
    import dataclasses

    from kvtool.evals import tasks as T

    def no_build(row):
        raise AssertionError("row rebuilt")

    monkeypatch.setitem(T.TASKS, "pope", dataclasses.replace(T.TASKS["pope"], build=no_build))
    again = run_eval(cfg, model=ScriptedModel(fail_after=0))
    assert again["tasks"]["pope"]["metrics"] == res["tasks"]["pope"]["metrics"]


def test_limit_offset_and_shards_merge(tmp_path, data_dir):
    # POPE's strata (adversarial 0-1, popular 2-3, random 4-5) read round-robin: 0, 2, 4, 1, 3, 5; skip 2, take 3
    res = run_eval(_cfg(tmp_path, data_dir, ["pope"], "lim", limit=3, offset=2), model=ScriptedModel())
    assert [r["id"] for r in read_predictions(tmp_path / "lim" / "pope" / "predictions.jsonl")] == ["1", "3", "4"]
    assert res["tasks"]["pope"]["n_samples"] == 3
    for i in range(2):
        run_eval(_cfg(tmp_path, data_dir, ["pope"], "sh", shard=(i, 2)), model=ScriptedModel())
    merged = merge_shards(tmp_path / "sh")
    full = run_eval(_cfg(tmp_path, data_dir, ["pope"], "full"), model=ScriptedModel())
    assert merged["tasks"]["pope"]["metrics"] == full["tasks"]["pope"]["metrics"]
    assert len(read_predictions(tmp_path / "sh" / "pope" / "predictions.jsonl")) == 6
    with pytest.raises(InputError):
        EvalConfig(None, ["pope"], "x", shard=(2, 2))


def test_compare_and_report(tmp_path, data_dir):
    a = run_eval(_cfg(tmp_path, data_dir, ["pope", "gqa"], "a"), model=ScriptedModel(lambda i, p, s: "Yes"))
    flip = {"n": 0}

    def answer_b(image, prompt, seed):
        flip["n"] += 1
        return "No" if flip["n"] % 2 else "Yes"

    run_eval(_cfg(tmp_path, data_dir, ["pope", "gqa"], "b", kv="g-KC128VT128", k_bits=2, v_bits=2),
             model=ScriptedModel(answer_b, info={"kv": "g-KC128VT128", "k_bits": 2, "v_bits": 2}))
    cmp = compare_runs(tmp_path / "a", tmp_path / "b", n_boot=200)
    pope = cmp["tasks"]["pope"]
    assert pope["n_paired"] == 6 and 0 <= pope["agreement"] <= 1
    # reference says yes everywhere: right on the 3 "yes" rows; B says No on calls 1,3,5 (rows 0,2,4: labels no)
    assert pope["wrong_to_right"] == 3 and pope["right_to_wrong"] == 0
    d = pope["metrics"]["random_f1"]
    assert d["delta"] == pytest.approx(d["b"] - d["a"])
    assert -100 <= d["ci95"][0] <= d["ci95"][1] <= 100
    assert a["tasks"]["pope"]["metrics"]["random_f1"] == pytest.approx(d["a"])
    import shutil

    (tmp_path / "c").mkdir()
    shutil.copy(tmp_path / "a" / "results.json", tmp_path / "c" / "results.json")  # a baseline's results only
    only = compare_runs(tmp_path / "c", tmp_path / "b")["tasks"]["pope"]
    assert only["agreement"] is None and only["metrics"]["random_f1"]["delta"] == pytest.approx(d["delta"])
    from kvtool.evals.compare import format_comparison

    assert "pope" in format_comparison(compare_runs(tmp_path / "c", tmp_path / "b"))
    rep = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| model | backend | weights | kv | bits |" in md and "g-KC128VT128 | 2 |" in md
    assert all((tmp_path / "rep" / p).exists() for p in ("report.csv", "accuracy_vs_bits.png"))
    assert len(rep["rows"]) == 2


def test_bootstrap_ci_matches_normal_approximation():
    import numpy as np

    rng = np.random.default_rng(1)
    x = rng.normal(size=400)
    lo, hi = bootstrap_ci(lambda idx: float(np.mean(x[idx])), len(x), n_boot=2000, seed=0)
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.3 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.3 * se)


def test_rescore_with_local_http_judge(tmp_path, data_dir):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"] if "messages" in body else ""
            seen.append(prompt)
            if self.path.endswith("/tox"):
                reply = {"scores": [0.9 if "rude" in t else 0.1 for t in body["texts"]]}
            else:
                content = "0.7" if "Correctness" in prompt else "same" if "response1" in prompt else "incorrect"
                reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        from kvtool.evals.judges import JudgeConfig

        n = {"calls": 0}

        def answer(image, prompt, seed):
            n["calls"] += 1
            if "keywords" in prompt:
                return "rude, smart" if n["calls"] % 2 else "kind, smart"
            return "Yes, smart"

        run_eval(_cfg(tmp_path, data_dir, ["mmvet", "hallusionbench", "socialcf"]), model=ScriptedModel(answer))
        words = tmp_path / "competence.txt"
        words.write_text("# test list\nsmart\n")
        ster = tmp_path / "stereo.json"
        ster.write_text(json.dumps({"obese": ["rude"], "female": ["smart"]}))
        judge = JudgeConfig(url=url + "/v1", model="local", mmvet_runs=2, toxicity_url=url + "/tox",
                            competence_words=str(words), stereotype_words=str(ster))
        res = rescore(tmp_path / "run", judge)
        mm = res["tasks"]["mmvet"]["metrics"]
        assert mm["total"] == pytest.approx(70.0) and mm["judge_runs"] == 2 and mm["rec"] == pytest.approx(70.0)
        hb = res["tasks"]["hallusionbench"]["metrics"]
        assert hb["correctness_source"] == "judge" and hb["aAcc"] == 0.0  # the judge says "incorrect"
        # VD: figure 0 wrong -> VI; VS: no-figure wrong, with figure wrong and "same" -> LH
        assert hb["diagnosis"] == {"language_hallucination": 1, "visual_illusion": 1, "mixed": 0}
        sc = res["tasks"]["socialcf"]["metrics"]
        assert sc["max_toxicity"] == pytest.approx(0.8) and sc["competence"] == pytest.approx(1.0)
        assert sc["stereotype"] is not None and "missing" not in sc
        n_calls = len(seen)
        rescore(tmp_path / "run", judge)  # cached: no new chat calls (toxicity is re-scored)
        assert len([s for s in seen[n_calls:] if "Correctness" in s or "Verdict" in s]) == 0
    finally:
        srv.shutdown()


def test_cli_rescore_and_merge(tmp_path, data_dir):
    from click.testing import CliRunner

    from kvtool.cli import main

    for i in range(2):
        run_eval(_cfg(tmp_path, data_dir, ["pope", "mme"], "sh", shard=(i, 2)), model=ScriptedModel())
    r = CliRunner()
    res = r.invoke(main, ["eval", "merge", str(tmp_path / "sh"), "--json"])
    assert res.exit_code == 0, res.output
    merged = json.loads(res.stdout)  # pure JSON on stdout
    assert merged["tasks"]["mme"]["metrics"]["perception"] == pytest.approx(100.0)
    res = r.invoke(main, ["eval", "rescore", str(tmp_path / "sh"), "--tasks", "pope"])
    assert res.exit_code == 0 and "random_f1" in res.output, res.output
    res = r.invoke(main, ["eval", "rescore", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and res.output.startswith("error:") and res.output.count("\n") == 1, res.output
    res = r.invoke(main, ["eval", "merge"])
    assert res.exit_code == 2 and "RUN_DIR" in res.output


def test_deprecated_merge_and_rescore_flags_still_work_and_say_so(tmp_path, data_dir):
    """``kvtool eval --merge -o DIR`` / ``--rescore DIR`` (the old spellings) do what the subcommands do, after one
    line on stderr naming the subcommand."""
    from click.testing import CliRunner

    from kvtool.cli import main

    for i in range(2):
        run_eval(_cfg(tmp_path, data_dir, ["pope", "mme"], "sh", shard=(i, 2)), model=ScriptedModel())
    r = CliRunner()
    res = r.invoke(main, ["eval", "--merge", "-o", str(tmp_path / "sh"), "--json"])
    assert res.exit_code == 0, res.output
    assert res.stderr == "warning: kvtool eval --merge -o RUN_DIR is deprecated; use kvtool eval merge RUN_DIR\n"
    assert json.loads(res.stdout)["tasks"]["mme"]["metrics"]["perception"] == pytest.approx(100.0)
    res = r.invoke(main, ["eval", "--rescore", str(tmp_path / "sh"), "--tasks", "pope"])
    assert res.exit_code == 0 and "random_f1" in res.stdout, res.output
    assert res.stderr.startswith("warning: kvtool eval --rescore RUN_DIR is deprecated; use kvtool eval rescore")
    res = r.invoke(main, ["eval", "--rescore", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and res.stderr.splitlines()[-1].startswith("error:"), res.output
    res = r.invoke(main, ["eval", "--merge"])
    assert res.exit_code == 2 and res.stderr.splitlines()[-1] == "error: --merge: give the run directory with -o"