"""Issue 16 (evals): a run never mixes settings, a bad sample is a failed row, rows are checked at load, a
limited run is balanced across strata, Ctrl-C says what is saved, compare says what was paired."""

from __future__ import annotations

import json

import pytest

from kvtool.errors import InputError
from kvtool.evals.runner import EvalConfig, EvalInterrupted, merge_shards, read_predictions, run_eval
from kvtool.evals.tasks import get_task
from tests.evals.fixtures import ScriptedModel, _write, image, make_pope


def _cfg(out, data_dir, tasks=("pope",), **kw):
    return EvalConfig(model=kw.pop("model", None), tasks=list(tasks), output=str(out), data_dir=str(data_dir),
                      progress=False, **kw)


def _model_dir(tmp_path, name="m", weights=b"w" * 10):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (d / "model.safetensors").write_bytes(weights)
    return d


# --- item 1: settings recorded, re-runs under other settings refused, limit grows a run --------------------

def test_resume_refuses_other_settings_and_limit_grows_the_run(tmp_path):
    data = tmp_path / "data"
    make_pope(data, n=12)
    out = tmp_path / "runs" / "x"
    m = _model_dir(tmp_path)
    base = dict(model=str(m), kv="uniform", k_bits=2, v_bits=2)
    run_eval(_cfg(out, data, limit=6, **base), model=ScriptedModel())
    with pytest.raises(InputError) as e:
        run_eval(_cfg(out, data, limit=8, **{**base, "kv": "g-KC128VT128"}), model=ScriptedModel())
    assert str(e.value) == (f"{out}: was made with --kv uniform, this run asks for g-KC128VT128; use another -o "
                            f"(a run never mixes settings) or delete {out}")
    other = _model_dir(tmp_path, "other")
    with pytest.raises(InputError, match=r"was made with MODEL_OR_DIR .*/m, this run asks for .*/other;"):
        run_eval(_cfg(out, data, limit=8, **{**base, "model": str(other)}), model=ScriptedModel())
    with pytest.raises(InputError, match="was made with --v-bits 2, this run asks for 4"):
        run_eval(_cfg(out, data, limit=8, **{**base, "v_bits": 4}), model=ScriptedModel())
    pope_default = get_task("pope").max_new_tokens  # the task's official length (LLaVA's 128)
    with pytest.raises(InputError, match=f"task pope was made with --max-new-tokens {pope_default}, this run asks for 8"):
        run_eval(_cfg(out, data, limit=8, max_new_tokens=8, **base), model=ScriptedModel())
    _model_dir(tmp_path, weights=b"v" * 10)  # the same path, retrained: other weights
    with pytest.raises(InputError, match=r"was made with the model's files \(model_hash\)"):
        run_eval(_cfg(out, data, limit=8, **base), model=ScriptedModel())
    _model_dir(tmp_path)  # back to the weights the run was made with
    # limit, offset and output are not settings: --limit 8 after --limit 6 resumes and adds 2 rows
    model = ScriptedModel()
    res = run_eval(_cfg(out, data, limit=8, **base), model=model)
    rows = read_predictions(out / "pope" / "predictions.jsonl")
    assert len(model.calls) == 2 and len(rows) == 8 and res["tasks"]["pope"]["n_samples"] == 8
    assert res["tasks"]["pope"]["n_found_at_start"] == 6
    prints = {r["settings"] for r in rows}
    assert prints == {res["settings"]["tasks"]["pope"]["fingerprint"]} and len(prints.pop()) == 16
    saved = json.loads((out / "settings.json").read_text())
    assert saved["run"]["kv"] == "uniform" and saved["run"]["k_bits"] == 2 and "limit" not in saved["run"]


def test_fp16_takes_no_bits_and_cli_refusal_is_one_line(tmp_path, data_dir):
    from click.testing import CliRunner

    from kvtool.cli import main

    m = _model_dir(tmp_path)
    out = tmp_path / "fp"
    # fp16 holds no bits: bits given with it are refused (issue 16 item 18), before anything is written
    with pytest.raises(InputError, match="kv=fp16 keeps K and V unquantized: k_bits=4, v_bits=4 does not apply"):
        run_eval(_cfg(out, data_dir, model=str(m), kv="fp16", k_bits=4, v_bits=4), model=ScriptedModel())
    assert not out.exists()
    run_eval(_cfg(out, data_dir, model=str(m), kv="fp16", k_bits=None, v_bits=None), model=ScriptedModel())
    # another spelling of the same setting is the same run (nothing new to generate)
    again = run_eval(_cfg(out, data_dir, model=str(m), kv="FP16", k_bits=None, v_bits=None),
                     model=ScriptedModel(fail_after=0))
    assert again["tasks"]["pope"]["n_generated_now"] == 0
    res = CliRunner().invoke(main, ["eval", str(m), "--tasks", "pope", "-o", str(out), "--kv", "uniform",
                                    "--kv-bits", "2", "--data-dir", str(data_dir), "--no-progress"])
    assert res.exit_code == 2
    assert res.output == (f"error: {out}: was made with --kv fp16, this run asks for uniform; use another -o "
                          f"(a run never mixes settings) or delete {out}\n")


def test_rows_without_recorded_settings_are_not_resumed(tmp_path, data_dir):
    out = tmp_path / "old"
    run_eval(_cfg(out, data_dir), model=ScriptedModel())
    (out / "settings.json").unlink()  # a run dir made by an older kvtool
    with pytest.raises(InputError, match="pope holds predictions without recorded settings"):
        run_eval(_cfg(out, data_dir), model=ScriptedModel())


def test_merge_and_compare_refuse_mixed_rows(tmp_path, data_dir):
    from kvtool.evals.compare import compare_runs

    for i in range(2):
        run_eval(_cfg(tmp_path / "sh", data_dir, shard=(i, 2)), model=ScriptedModel())
    f = tmp_path / "sh" / "pope" / "predictions.shard-1-of-2.jsonl"
    rows = read_predictions(f)
    rows[0]["settings"] = "0123456789abcdef"  # a row made under other settings
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"row '1' was made under settings 0123456789abcdef, the run's are"):
        merge_shards(tmp_path / "sh")
    run_eval(_cfg(tmp_path / "a", data_dir), model=ScriptedModel())
    run_eval(_cfg(tmp_path / "b", data_dir), model=ScriptedModel())
    p = tmp_path / "b" / "pope" / "predictions.jsonl"
    rows = read_predictions(p)
    rows[2]["settings"] = "0123456789abcdef"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"task pope mixes rows made under 2 settings \(5 rows [0-9a-f]{16}, "
                                         r"1 rows 0123456789abcdef\)"):
        compare_runs(tmp_path / "a", tmp_path / "b", n_boot=10)


# --- item 2: a failed sample is a failed row; the run goes on -------------------------------------------

def _png(seed: int) -> dict:
    import io

    buf = io.BytesIO()
    image(seed).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _textvqa_with_bad_rows(root):
    rows = [{"question_id": i, "question": f"what is written {i}?", "image": _png(i), "answers": ["stop"] * 10,
             "ocr_tokens": ["stop"]} for i in range(6)]
    rows[3]["image"] = {"bytes": b"not an image", "path": None}  # undecodable in the dataset
    _write(rows, root / "textvqa" / "validation-00000-of-00001.parquet")
    return root


def _fussy_answer(image, prompt, seed):
    if "written 1?" in prompt:  # e.g. Qwen2-VL's processor on a 3000x10 image
        raise ValueError("absolute aspect ratio must be smaller than 200, got 300.0")
    if "written 4?" in prompt:
        raise InputError("prompt: 4657 tokens + 16 new tokens exceed the model's 4096 positions")
    return "stop"


def test_failed_samples_are_rows_and_the_run_goes_on(tmp_path, capsys):
    data = _textvqa_with_bad_rows(tmp_path / "d")
    out = tmp_path / "r"
    model = ScriptedModel(_fussy_answer)
    res = run_eval(_cfg(out, data, ["textvqa"]), model=model)
    t = res["tasks"]["textvqa"]
    # rows 1 and 4 reach the model and fail there; row 3's image never decodes, so it is not asked
    assert t["n_samples"] == 6 and [c[1].split("?")[0][-1] for c in model.calls] == ["0", "1", "2", "4", "5"]
    assert t["failed"]["n"] == 3 and t["metrics"]["failed"] == 3
    reasons = t["failed"]["reasons"]
    assert reasons["ValueError: absolute aspect ratio must be smaller than 200, got 300.0"]["ids"] == ["1"]
    assert reasons["InputError: prompt: 4657 tokens + 16 new tokens exceed the model's 4096 positions"]["ids"] == ["4"]
    assert any(k.startswith("UnidentifiedImageError") and v["ids"] == ["3"] for k, v in reasons.items())
    # scored as empty replies: 3 of 6 right (VQA accuracy 100 each) -> 50.0
    assert t["metrics"]["accuracy"] == pytest.approx(50.0)
    rows = {r["id"]: r for r in read_predictions(out / "textvqa" / "predictions.jsonl")}
    assert rows["3"]["prediction"] == "" and rows["3"]["question_id"] == 3 and rows["3"]["failed"]
    # a re-run keeps failed rows (and says so); --retry-failed generates them again
    again = ScriptedModel(lambda i, p, s: "stop")
    res2 = run_eval(_cfg(out, data, ["textvqa"]), model=again)
    assert again.calls == [] and res2["tasks"]["textvqa"]["failed"]["n"] == 3
    assert "textvqa: resuming" in capsys.readouterr().err
    res3 = run_eval(_cfg(out, data, ["textvqa"], retry_failed=True), model=again)
    assert len(again.calls) == 2  # rows 1 and 4; row 3's image is still unreadable
    assert res3["tasks"]["textvqa"]["failed"]["n"] == 1 and res3["tasks"]["textvqa"]["metrics"]["accuracy"] == (
        pytest.approx(100 * 5 / 6))
    assert len(read_predictions(out / "textvqa" / "predictions.jsonl")) == 6  # still one row per sample


def test_failed_yes_no_rows_count_as_wrong(tmp_path, data_dir):
    from kvtool.evals.compare import compare_runs

    n = {"k": 0}

    def second_fails(image, prompt, seed):
        n["k"] += 1
        if n["k"] == 2:  # row 1: adversarial, label "yes"
            raise ValueError("bad image")
        return "Yes"

    res = run_eval(_cfg(tmp_path / "f", data_dir), model=ScriptedModel(second_fails))
    adv = res["tasks"]["pope"]["metrics"]["adversarial"]
    # row 0 (no) answered "Yes": wrong; row 1 (yes) failed: wrong too, not read as LLaVA's rule reads "" ("yes")
    assert adv["accuracy"] == 0.0 and adv["yes_ratio"] == 0.5
    assert res["tasks"]["pope"]["metrics"]["popular"]["accuracy"] == 0.5
    run_eval(_cfg(tmp_path / "ok", data_dir), model=ScriptedModel())
    cmp = compare_runs(tmp_path / "ok", tmp_path / "f", n_boot=10)["tasks"]["pope"]
    assert cmp["right_to_wrong"] == 1 and cmp["flipped_ids"]["right_to_wrong"] == ["1"]


def test_a_model_that_fails_every_sample_stops_and_leaves_nothing(tmp_path, data_dir):
    def broken(image, prompt, seed):
        raise RuntimeError("graph compile failed")

    out = tmp_path / "runs" / "broken"
    with pytest.raises(InputError, match=r"^pope: the first 3 samples all failed \(RuntimeError: graph compile "
                                         r"failed\); nothing was written"):
        run_eval(_cfg(out, data_dir), model=ScriptedModel(broken))
    assert not out.exists()


def test_failed_model_load_leaves_no_run_dir(tmp_path, data_dir):
    out = tmp_path / "runs" / "nomodel"
    with pytest.raises(FileNotFoundError):
        run_eval(_cfg(out, data_dir, model=str(tmp_path / "missing")))
    assert not out.exists() and not out.parent.exists()


# --- item 3: rows are checked before generation ---------------------------------------------------------

def test_bad_rows_are_refused_before_generation(tmp_path):
    rows = [{"question_id": 10 + i, "question": "what?", "image": image(i), "answers": ["a"] * 10,
             "ocr_tokens": []} for i in range(4)]
    rows[2]["answers"] = []
    _write(rows, tmp_path / "textvqa" / "validation-00000-of-00001.parquet")
    model = ScriptedModel()
    with pytest.raises(InputError) as e:
        run_eval(_cfg(tmp_path / "o", tmp_path, ["textvqa"]), model=model)
    assert str(e.value) == ("textvqa: row 2 (question_id 12): column answers is an empty list; "
                            "expected a non-empty list of answer strings")
    assert model.calls == [] and not (tmp_path / "o").exists()
    pope = [{"question_id": str(i), "question": "Is there a dog?", "image": image(i), "category": "random",
             "answer": "yes" if i != 1 else "maybe"} for i in range(3)]
    _write(pope, tmp_path / "pope" / "test-00000-of-00001.parquet")
    with pytest.raises(InputError, match=r"^pope: row 1 \(question_id '1'\): column answer is 'maybe'; "
                                         r"expected yes or no$"):
        run_eval(_cfg(tmp_path / "o", tmp_path), model=model)


# --- item 21: --limit is a balanced, deterministic, nested sample across strata ----------------------------

def test_limit_is_balanced_across_strata(tmp_path, data_dir):
    # the fixture is ordered as the hub: adversarial rows first, so the first 3 rows hold no "random" row
    res = run_eval(_cfg(tmp_path / "l3", data_dir, limit=3), model=ScriptedModel())
    t = res["tasks"]["pope"]
    assert t["selection"]["strata"] == {"adversarial": 1, "popular": 1, "random": 1}
    assert "random_f1" in t["metrics"]
    ids3 = [r["id"] for r in read_predictions(tmp_path / "l3" / "pope" / "predictions.jsonl")]
    assert ids3 == ["0", "2", "4"]
    again = run_eval(_cfg(tmp_path / "l3b", data_dir, limit=3), model=ScriptedModel())
    assert again["tasks"]["pope"]["selection"] == t["selection"]
    res5 = run_eval(_cfg(tmp_path / "l3", data_dir, limit=5), model=ScriptedModel())
    assert res5["tasks"]["pope"]["selection"]["strata"] == {"adversarial": 2, "popular": 2, "random": 1}
    # HallusionBench: the non_image subset comes after every image row; a limit of 3 still holds it
    hb = run_eval(_cfg(tmp_path / "hb", data_dir, ["hallusionbench"], limit=3), model=ScriptedModel())
    assert hb["tasks"]["hallusionbench"]["selection"]["strata"] == {"image/VD": 1, "image/VS": 1,
                                                                    "non_image/VS": 1}


def test_balanced_order_round_robin():
    from kvtool.evals.selection import balanced_order

    keys = ["b", "b", "b", "a", "c", "c"]
    assert balanced_order(keys) == [3, 0, 4, 1, 5, 2]
    # nested: the first n of the order for any n is a prefix
    order = balanced_order(["x"] * 5 + ["y"] * 2)
    assert order == [0, 5, 1, 6, 2, 3, 4]


# --- item 17: Ctrl-C ---------------------------------------------------------------------------------------

def test_ctrl_c_says_what_is_saved_and_exits_130(tmp_path, data_dir, monkeypatch):
    from click.testing import CliRunner

    from kvtool.cli import main
    from kvtool.evals import runner

    out = tmp_path / "cc"
    with pytest.raises(EvalInterrupted) as e:
        run_eval(_cfg(out, data_dir), model=ScriptedModel(fail_after=2))
    assert str(e.value) == (f"interrupted: 2 rows are saved in {out} (pope 2); run the same command again to "
                            "resume (saved rows are not generated again)")
    m = _model_dir(tmp_path)
    monkeypatch.setattr(runner, "load_model", lambda cfg: ScriptedModel(fail_after=3))
    args = ["eval", str(m), "--tasks", "pope", "-o", str(tmp_path / "cli"), "--data-dir", str(data_dir),
            "--no-progress"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 130 and "Aborted" not in res.output
    assert res.output.strip().splitlines()[-1] == (
        f"interrupted: 3 rows are saved in {tmp_path / 'cli'} (pope 3); run the same command again to resume "
        "(saved rows are not generated again)")
    monkeypatch.setattr(runner, "load_model", lambda cfg: ScriptedModel())
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0
    assert f"pope: resuming {tmp_path / 'cli' / 'pope' / 'predictions.jsonl'}: found 3 saved rows" in res.output


# --- item 16: compare says what was paired and each side's own figure -----------------------------------

def test_compare_reports_row_counts_and_own_accuracy(tmp_path, data_dir):
    from kvtool.evals.compare import compare_runs, format_comparison

    run_eval(_cfg(tmp_path / "a", data_dir, ["gqa"]), model=ScriptedModel(lambda i, p, s: "left"))
    n = {"k": 0}

    def b(image, prompt, seed):
        n["k"] += 1
        return "left" if n["k"] != 2 else "right"

    run_eval(_cfg(tmp_path / "b", data_dir, ["gqa"], limit=2), model=ScriptedModel(b))
    cmp = compare_runs(tmp_path / "a", tmp_path / "b", n_boot=20)
    t = cmp["tasks"]["gqa"]
    assert (t["n_a"], t["n_b"], t["n_paired"], t["only_a"]) == (4, 2, 2, 2)
    assert t["own"] == {"a": pytest.approx(100.0), "b": pytest.approx(50.0)}
    assert t["metrics"]["accuracy"]["a"] == pytest.approx(100.0)
    text = format_comparison(cmp)
    assert ("gqa: A has 4 rows, B 2; 2 paired (the table is over those); over all its own rows accuracy is "
            "A 100.00, B 50.00") in text


# --- item 19 (parts): local paths, optional null columns ----------------------------------------------------

def test_missing_local_data_path_fails_at_once(tmp_path, monkeypatch):
    import datasets

    from kvtool.evals.loaders import load_task_data, looks_local
    from kvtool.evals.tasks import get_task

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        ConnectionError("offline")))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for src in ("data/pope", "./pope", "pope", "copies/pope/test.parquet", str(tmp_path / "nope")):
        with pytest.raises(FileNotFoundError) as e:
            load_task_data(get_task("pope"), source=src)
        assert str(e.value) == (f"pope: data path {src} does not exist (a local path: no hub download is tried; "
                                "a hub id is owner/name)")
    assert calls == []
    assert not looks_local("lmms-lab/POPE")
    with pytest.raises(InputError, match="could not load lmms-lab/POPE"):
        load_task_data(get_task("pope"), source="lmms-lab/POPE")
    assert len(calls) == 1
    with pytest.raises(FileNotFoundError, match="--data-dir nowhere: no such folder"):
        load_task_data(get_task("pope"), data_dir="nowhere")


def test_shapes_jsonl_without_pope_split_column(tmp_path):
    from kvtool.evals.loaders import load_task_data
    from kvtool.evals.tasks import get_task

    img = tmp_path / "a.png"
    image(1).save(img)
    d = tmp_path / "shapes"
    d.mkdir()
    (d / "test.jsonl").write_text("".join(json.dumps({"id": str(i), "image": str(img), "question": "What color?",
                                                      "answer": "red", "question_type": "color"}) + "\n"
                                          for i in range(3)))
    rows, _ = load_task_data(get_task("shapes"), data_dir=str(tmp_path))
    assert len(rows) == 3
    res = run_eval(EvalConfig(None, ["shapes"], str(tmp_path / "o"), data_dir=str(tmp_path), progress=False),
                   model=ScriptedModel(lambda i, p, s: "red"))
    assert res["tasks"]["shapes"]["metrics"]["accuracy"] == 100.0 and "pope" not in res["tasks"]["shapes"]["metrics"]


# --- item 20: peak memory is the process's own ------------------------------------------------------------

@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs procfs (Linux)")
def test_peak_rss_is_the_process_own_not_the_parents(tmp_path):
    import subprocess
    import sys

    from kvtool.memory import vm_hwm_bytes

    assert vm_hwm_bytes("Name:\tx\nVmPeak:\t 9 kB\nVmHWM:\t    1234 kB\nVmRSS: 5 kB\n") == 1234 * 1024
    assert vm_hwm_bytes("Name:\tzombie\n") is None
    child = ("import resource; from kvtool.runtime.pipeline import _peak_rss_bytes; "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _peak_rss_bytes())")
    parent = ("import subprocess, sys\nx = bytearray(400 * 2**20)\nfor i in range(0, len(x), 4096): x[i] = 1\n"
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True).stdout)")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout
    inherited, own = (int(v) for v in out.split())
    assert inherited >= 400 * 2**20  # Linux carries the parent's ru_maxrss into the child ...
    assert own < 300 * 2**20  # ... the child's own high-water mark is far below it


@pytest.mark.slow
def test_processor_refusal_is_a_failed_row_in_eval_and_one_line_in_run(tmp_path, tiny_model):
    """Qwen2-VL's processor refuses a 3000x10 image (aspect ratio over 200): eval goes on, run says why."""
    from click.testing import CliRunner
    from PIL import Image

    from kvtool.cli import main

    model_dir = tiny_model("tiny-qwen2-vl")
    rows = [{"question_id": str(i), "question": "Is there a dog?", "image": image(i), "category": "random",
             "answer": "yes"} for i in range(3)]
    rows[1]["image"] = Image.new("RGB", (3000, 10))
    _write(rows, tmp_path / "pope" / "test-00000-of-00001.parquet")
    res = run_eval(EvalConfig(str(model_dir), ["pope"], str(tmp_path / "r"), backend="torch", data_dir=str(tmp_path),
                              max_new_tokens=2, progress=False))
    t = res["tasks"]["pope"]
    assert t["n_samples"] == 3 and (tmp_path / "r" / "results.json").is_file()
    assert t["failed"] == {"n": 1, "reasons": {
        "ValueError: absolute aspect ratio must be smaller than 200, got 300.0": {"n": 1, "ids": ["1"]}}}
    img = tmp_path / "wide.png"
    rows[1]["image"].save(img)
    out = CliRunner().invoke(main, ["run", str(model_dir), "--backend", "torch", "--image", str(img), "--prompt",
                                    "What is it?", "--max-new-tokens", "2"])
    assert out.exit_code == 2
    assert out.output.strip().splitlines()[-1] == ("error: input refused by the model's processor: ValueError: "
                                                   "absolute aspect ratio must be smaller than 200, got 300.0")
