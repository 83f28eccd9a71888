"""Fidelity to the official scorers and question files (issue 16, items 4, 5, 6, 22, 23, 24).

Every expected value here is worked by hand from the official definition named beside it: LLaVA's
llava/eval/{eval_science_qa,eval_pope,m4c_evaluator}.py, scripts/convert_vqav2_for_submission.py,
playground/data/eval/{textvqa/llava_textvqa_val_v051_ocr.jsonl, MME/llava_mme.jsonl, MME/convert_answer_to_mme.py}
and tianyi-lab/HallusionBench utils.py.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvtool.cli import _print_results, main
from kvtool.errors import InputError
from kvtool.evals import metrics as M
from kvtool.evals.compare import compare_task, format_comparison
from kvtool.evals.report import write_report
from kvtool.evals.submission import read_question_ids, vqa_submission
from kvtool.evals.tasks import TASKS, get_task, task_metrics

# --- item 4: ScienceQA reads one option letter ---------------------------------------------------------


@pytest.mark.parametrize("reply, n, idx", [
    ("AB", 3, None),        # not one of LLaVA's options ["A".."E"] (a list: no substring match)
    ("ABC", 5, None),
    ("BA", 3, None),
    ("", 3, None),
    ("a", 3, None),         # lower case is not an option letter
    ("B", 3, 1),
    (" C \n", 3, 2),        # LLaVA strips the decoded reply
    ("E", 4, None),         # a letter beyond this question's choices
    ("C. the moon", 3, 2),  # "X. " prefix
    ("AB. x", 3, None),
    ("The answer is B.", 3, 1),
    ("The answer is AB", 3, 0),  # LLaVA's unescaped "." matches the B: its pattern reads A
    ("The answer is A. The answer is B.", 3, None),  # two matches: FAILED
])
def test_scienceqa_parses_only_a_single_option_letter(reply, n, idx):
    assert M.parse_scienceqa_answer(reply, n) == idx


def test_scienceqa_multi_letter_reply_is_scored_wrong_and_unparsed():
    spec = get_task("scienceqa")
    rows = [{"prediction": "AB", "answer": 0, "n_choices": 3}, {"prediction": "A", "answer": 0, "n_choices": 3}]
    m = task_metrics(spec, rows)
    assert m["accuracy"] == pytest.approx(50.0) and m["unparsed_share"] == pytest.approx(0.5)


# --- item 5: an empty denominator is undefined ---------------------------------------------------------

def _hb(cat, sub, set_id, fig, q, vi, gt, correctness):
    return {"category": cat, "subcategory": sub, "set_id": set_id, "figure_id": fig, "question_id": q,
            "visual_input": vi, "gt_answer": gt, "correctness": correctness}


def test_hallusionbench_fp_ratio_without_wrong_answers_is_undefined():
    # HallusionBench's yes_ratio_stats: fp = (len(fp) - sum(fp)) / len(fp) over the wrong answers -> 0/0
    rows = [_hb("VD", "x", 0, 0, 0, 1, 1, 1), _hb("VD", "x", 0, 1, 0, 2, 0, 1)]
    m = M.hallusionbench_metrics(rows)
    assert m["fp_ratio"] is None and m["aAcc"] == 100.0
    assert m["pct_diff"] == pytest.approx(0.0)  # yes-pred 1/2 - yes-gt 1/2
    # one wrong answer on a "no" question: FP ratio 1/1
    rows[1]["correctness"] = 0
    assert M.hallusionbench_metrics(rows)["fp_ratio"] == pytest.approx(1.0)


def test_hallusionbench_facc_without_figures_is_undefined():
    # get_eval_fig skips VS questions without a figure: no figure left -> fAcc 0/0
    m = M.hallusionbench_metrics([_hb("VS", "chart", 1, 0, 0, 0, 1, 1), _hb("VS", "chart", 1, 0, 1, 0, 0, 0)])
    assert m["fAcc"] is None and m["n_figures"] == 0 and m["aAcc"] == pytest.approx(50.0)


def test_pope_ratios_with_empty_denominators_are_undefined():
    only_tn = M.pope_metrics(["no", "No."], ["no", "no"])  # TP = FP = FN = 0
    assert only_tn["precision"] is None and only_tn["recall"] is None and only_tn["f1"] is None
    assert only_tn["accuracy"] == 1.0 and only_tn["yes_ratio"] == 0.0
    no_yes_labels = M.pope_metrics(["yes", "no"], ["no", "no"])  # TP = 0, FP = 1, no positive label
    assert no_yes_labels["precision"] == 0.0 and no_yes_labels["recall"] is None and no_yes_labels["f1"] == 0.0
    # the splits' mean F1 is undefined when one split's F1 is
    spec = get_task("pope")
    rows = [{"prediction": "no", "answer": "no", "pope_split": "random", "question_id": 1},
            {"prediction": "yes", "answer": "yes", "pope_split": "popular", "question_id": 2}]
    m = task_metrics(spec, rows)
    assert m["random_f1"] is None and m["mean_f1"] is None and m["popular"]["f1"] == 1.0


def test_mme_sum_without_its_categories_is_undefined():
    recs = [{"category": "code_reasoning", "image_id": "c", "prediction": "Yes", "answer": "Yes"},
            {"category": "code_reasoning", "image_id": "c", "prediction": "No", "answer": "No"}]
    s = M.mme_scores(recs)
    assert s["perception"] is None and s["cognition"] == pytest.approx(200.0)


def test_pairs_difference_with_a_missing_group_is_undefined():
    recs = [{"group": "g", "race": "white", "gender": "man", "score": 1, "prediction": "x"},
            {"group": "g", "race": "black", "gender": "man", "score": -1, "prediction": "x"}]
    g = M.pairs_scores(recs)["g"]
    assert g["male_minus_female"] is None and g["white_minus_black"] == pytest.approx(2.0)


def test_report_and_compare_show_undefined_as_dash(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    metrics = M.mme_scores([{"category": "code_reasoning", "image_id": "c", "prediction": "Yes", "answer": "Yes"}])
    (run / "results.json").write_text(json.dumps({"config": {"model": "m", "kv": "fp16", "backend": "torch"},
                                                  "tasks": {"mme": {"metrics": metrics}}}))
    rep = write_report([run], tmp_path / "rep")
    row = [line for line in open(rep["markdown"], encoding="utf-8") if line.startswith("| m ")][0]
    assert row.rstrip().endswith("| – |")
    # a nested headline (PAIRS: no woman answered) is missing too, and its plot leaves the bar out
    pairs = {"gender_occupation": {"male_minus_female": None, "white_minus_black": 0.5, "n": 2}, "n": 2}
    (run / "results.json").write_text(json.dumps({"config": {"model": "m", "kv": "fp16", "backend": "torch"},
                                                  "tasks": {"pairs": {"metrics": pairs}}}))
    rep = write_report([run], tmp_path / "rep2")
    assert [line for line in open(rep["markdown"], encoding="utf-8") if line.startswith("| m ")][0].rstrip().endswith("| – |")
    assert any(p.endswith("pairs.png") for p in rep["plots"])
    # compare: B answers every HallusionBench question right, so its FP ratio is undefined
    a = [{"id": str(i), **_hb("VD", "x", 0, i, 0, 1, 0, 0), "prediction": "Yes"} for i in range(2)]
    b = [{**r, "correctness": 1, "prediction": "No"} for r in a]
    cmp = compare_task("hallusionbench", a, b, n_boot=0)
    assert cmp["metrics"]["fp_ratio"] == {"a": 1.0, "b": None, "delta": None}
    text = format_comparison({"a": "A", "b": "B", "tasks": {"mme": {
        "headline": "perception", "agreement": None, "metrics": {"perception": {"a": 100.0, "b": None, "delta": None}}}}})
    line = text.splitlines()[-1].split()
    assert line[:5] == ["mme", "perception", "100.00", "–", "–"]


# --- item 6: EvalAI's answer processor ------------------------------------------------------------------

@pytest.mark.parametrize("raw, norm", [
    ("somebody'd", "somebodyd"),       # EvalAI's odd entry maps the apostrophe form *to* "somebodyd"
    ("'ows'at", "'ow's'at"),
    ("ow's'at", "ow 's'at"),           # "'s" is split off first, so the table's "ow's'at" key never fires
    ("'ow'sat", "'ow 'sat"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("Im", "im"),                       # the table's "Im" key is capitalised: lower-cased text never matches
    ("Ive", "ive"),
    ("let's go", "let 's go"),
    ("twas", "'twas"),
    ("somebodyd", "somebodyd"),         # not a key
    ("hed", "he'd"),
    ("a-b c", "b c"),                   # "-" touches no space -> space; then the article "a" is dropped
    ("Mr. T", "mr t"),                  # a period before a space is deleted
    ("(yes)", "yes"),
    ("yes (maybe)", "yes maybe"),       # "(" touches a space: deleted; ")" touches none: space
    ("3.14.", "3.14"),
    ("1,000,000 dogs", "1000000 dogs"),
    ("The one", "1"),
    ("." * 40, "." * 8),                # EvalAI's re.sub gets re.UNICODE (32) as its count
])
def test_evalai_answer_processor_hand_worked(raw, norm):
    assert M.normalize_vqa_answer(raw) == norm


def test_evalai_contraction_table_entries():
    t = M._CONTRACTIONS
    assert len(t) == 120
    assert t["somebody'd"] == "somebodyd" and t["ow's'at"] == "'ow's'at" and t["'ow'sat"] == "'ow's'at"
    assert t["Id've"] == "I'd've" and t["let's"] == "let's" and t["she's"] == "she's"
    assert "wed" not in t and "shes" not in t and "somebodyd" not in t  # EvalAI has no such keys


# --- item 22: prompts exactly as LLaVA's question files ----------------------------------------------

def test_textvqa_prompt_is_llava_question_file_line():
    build = get_task("textvqa").build
    row = {"question": "what is the brand of this camera?", "question_id": "q", "image": None,
           "answers": ["dakota"] * 10, "ocr_tokens": ["DAKOTA", "DIGITAL", "Single-Use", "Camera", "Pire", "digitat"]}
    # llava_textvqa_val_v051_ocr.jsonl, question 003a8ae2ef43b901
    assert build(row)[0].prompt == ("What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, "
                                    "Single-Use, Camera, Pire, digitat\nAnswer the question using a single word "
                                    "or phrase.")
    # question 97b1112b17015396 has no OCR token: LLaVA keeps the line, empty
    row.update(question="whats the lowest number yard line that you can see?", ocr_tokens=[])
    assert build(row)[0].prompt == ("Whats the lowest number yard line that you can see?\nReference OCR token: \n"
                                    "Answer the question using a single word or phrase.")


@pytest.mark.parametrize("question", [
    "Is a python code shown in the picture? Please answer yes or no.",
    "Is a python code shown in the picture?  Please answer yes or no.",   # double-spaced in MME's files
    "Is a python code shown in the picture?  Please answer yes or no. \n",
    "Is a python code shown in the picture?",
])
def test_mme_prompt_is_llava_question_file_line(question):
    row = {"question": question, "question_id": "code_reasoning/0020.png", "image": None,
           "category": "code_reasoning", "answer": "Yes"}
    # llava_mme.jsonl's first line
    assert get_task("mme").build(row)[0].prompt == ("Is a python code shown in the picture?\n"
                                                    "Answer the question using a single word or phrase.")


# --- item 23: VQAv2 test-dev upload and which number each task reports -----------------------------------

def test_vqa_submission_as_llava_converter():
    rows = [{"question_id": 1, "prediction": "Two dogs."}, {"question_id": "2", "prediction": "somebody'd"},
            {"question_id": 1, "prediction": "The cat"}]  # a later row replaces an earlier one
    assert vqa_submission(rows) == [{"question_id": 1, "answer": "cat"}, {"question_id": 2, "answer": "somebodyd"}]
    # padded to the full question list, in its order, "" where there is no prediction
    assert vqa_submission(rows, [3, 2, 1]) == [{"question_id": 3, "answer": ""},
                                               {"question_id": 2, "answer": "somebodyd"},
                                               {"question_id": 1, "answer": "cat"}]
    with pytest.raises(InputError, match="row 0 has no question_id"):
        vqa_submission([{"prediction": "x"}])


def test_submission_cli_writes_evalai_file(tmp_path):
    run = tmp_path / "run"
    (run / "vqav2_testdev").mkdir(parents=True)
    rows = [{"id": "0", "question_id": 10, "prediction": "Yes."}, {"id": "1", "question_id": 11, "prediction": "two"}]
    (run / "vqav2_testdev" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    qfile = tmp_path / "llava_vqav2_mscoco_test2015.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": q, "image": "x.jpg", "text": "q"}) + "\n" for q in (9, 10, 11)))
    out = tmp_path / "up.json"
    res = CliRunner().invoke(main, ["submission", str(run), "-o", str(out), "--question-ids", str(qfile)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text()) == [{"question_id": 9, "answer": ""}, {"question_id": 10, "answer": "yes"},
                                           {"question_id": 11, "answer": "2"}]
    assert "3 answers (2 predicted, 1 blank)" in res.output
    assert read_question_ids(tmp_path / "up.json") == [9, 10, 11]
    res = CliRunner().invoke(main, ["submission", str(run), "-o", str(out), "--task", "vqav2"])
    assert res.exit_code == 2 and "no submission format" in res.output
    res = CliRunner().invoke(main, ["submission", str(run), "-o", str(out), "--question-ids", str(tmp_path / "no")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_vqav2_testdev_task_has_no_local_score():
    spec = get_task("vqav2_testdev")
    assert spec.split == "testdev" and get_task("vqav2").split == "validation"
    s = spec.build({"question_id": 7, "question": "how many dogs?", "image": None})[0]
    assert s.prompt == "how many dogs?\nAnswer the question using a single word or phrase."
    m = task_metrics(spec, [{"question_id": 7, "prediction": "2", **s.ref}])
    assert m["accuracy"] is None and "kvtool submission" in m["missing"]


def test_ls_tasks_says_which_number_each_task_reports():
    res = CliRunner().invoke(main, ["ls", "tasks", "--json"])
    rows = {r["task"]: r for r in json.loads(res.output)}
    assert all(r["reports"] and r["generation_source"] for r in rows.values())
    assert "mean_f1" in rows["pope"]["reports"] and rows["pope"]["beside"] == ["mean_f1"]
    assert "test-dev" in rows["vqav2"]["reports"]
    text = CliRunner().invoke(main, ["ls", "tasks"]).output
    assert text.count("reports: ") == len(TASKS) and "max new tokens: 1024; source: LLaVA" in text


def test_summary_shows_pope_mean_f1_beside_random_f1(capsys):
    metrics = {"random": {"f1": 0.8}, "popular": {"f1": 0.7}, "random_f1": 80.0, "mean_f1": 75.0, "n": 4}
    _print_results({"tasks": {"pope": {"metrics": metrics, "n_samples": 4}}})
    assert "random_f1=80.00      mean_f1=75.00 n=4" in capsys.readouterr().out


# --- item 24: official generation lengths -----------------------------------------------------------------

def test_generation_lengths_are_the_official_ones():
    expected = {"mmvet": 1024, "scienceqa": 1024,  # LLaVA model_vqa.py / model_vqa_science.py
                "textvqa": 128, "gqa": 128, "mme": 128, "vqav2": 128, "vqav2_testdev": 128, "pope": 128,  # loader
                "hallusionbench": 128,  # lmms-eval
                "pairs": 512, "socialcf": 128, "shapes": 4}  # the study / kvtool
    assert {t.name: t.max_new_tokens for t in TASKS.values()} == expected
    assert all(t.generation()["do_sample"] is False for t in TASKS.values() if t.name not in ("pairs", "socialcf"))
