"""Metrics on hand-worked cases from the official definitions, plus random-input checks against naive references."""

from __future__ import annotations

import random

import pytest

from kvtool.errors import InputError
from kvtool.evals import metrics as M


@pytest.mark.parametrize("raw, norm", [
    ("Two dogs.", "2 dogs"),                 # number word, trailing period
    ("The Cat", "cat"),                      # article, case
    ("an apple", "apple"),
    ("dont", "don't"),                       # contraction restored
    ("couldnt've", "couldn't've"),
    ("whats", "what's"),
    ("1,000", "1000"),                       # comma inside a number dropped
    ("3.5", "3.5"),                          # period before a digit kept
    ("3.5.", "3.5"),
    ("hello-world", "hello world"),          # punctuation not touching a space -> space
    ("hello - world", "hello world"),        # touching a space -> removed
    ("yes!", "yes"),
    ("None", "0"),
    ("a man's hat", "man 's hat"),
    ("  Yes,\tthere is\n", "yes there is"),
    ("", ""),
])
def test_normalize_vqa_answer(raw, norm):
    assert M.normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_hand_worked():
    # 3 of 10 annotators said "2": 3 subsets keep 2 matches (2/3), 7 keep 3 (1) -> (3*2/3 + 7)/10 = 0.9
    assert M.vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # 2 matches: 2 subsets with 1 (1/3), 8 with 2 (2/3) -> 0.6
    assert M.vqa_accuracy("2", ["2", "2"] + ["x"] * 8) == pytest.approx(0.6)
    assert M.vqa_accuracy("dog", ["Dog."] * 10) == 1.0
    assert M.vqa_accuracy("", ["cat"] * 10) == 0.0
    assert M.vqa_accuracy("1 000", ["1,000"] * 10) == 0.0  # "1 000" stays two tokens
    with pytest.raises(InputError):
        M.vqa_accuracy("x", [])


def test_vqa_accuracy_matches_naive_leave_one_out():
    rng = random.Random(0)
    vocab = ["cat", "dog", "two", "2", "red", "Red."]
    for _ in range(200):
        answers = [rng.choice(vocab) for _ in range(10)]
        pred = rng.choice(vocab)
        gts = [M.normalize_vqa_answer(a) for a in answers]
        p = M.normalize_vqa_answer(pred)
        naive = sum(min(1, sum(g == p for k, g in enumerate(gts) if k != i) / 3) for i in range(10)) / 10
        assert M.vqa_accuracy(pred, answers) == pytest.approx(naive)


@pytest.mark.parametrize("text, label", [
    ("Yes, there is a dog.", "yes"), ("No.", "no"), ("no", "no"), ("", "yes"),
    ("There is not a dog in the image.", "no"), ("Yes. No dogs anywhere.", "yes"),  # first sentence only
    ("Nope", "yes"), ("NO", "yes"),  # LLaVA's rule only knows No / not / no
])
def test_parse_pope_answer(text, label):
    assert M.parse_pope_answer(text) == label


def test_pope_metrics_hand_worked():
    preds = ["Yes", "Yes, there is", "No.", "no", "yes", ""]
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    # predictions: y y n n y y -> TP=2 FN=1 TN=1 FP=2
    m = M.pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["yes_ratio"] == pytest.approx(4 / 6)  # share of predictions, not of labels
    all_no = M.pope_metrics(["no"] * 3, ["yes", "no", "no"])
    # no "yes" answered: precision is 0/0 (LLaVA's script divides by zero) -> None; the one "yes" was missed:
    # recall 0/1 = 0 and F1 = 2TP/(2TP+FP+FN) = 0/1 = 0
    assert all_no["precision"] is None and all_no["recall"] == 0.0 and all_no["f1"] == 0.0
    with pytest.raises(InputError):
        M.pope_metrics(["yes"], ["maybe"])


def test_mme_scores_hand_worked():
    recs = [
        # existence: image a both right, image b one right -> acc 3/4, acc+ 1/2 -> 125
        {"category": "existence", "image_id": "a", "prediction": "Yes", "answer": "Yes"},
        {"category": "existence", "image_id": "a", "prediction": "No, there is not.", "answer": "No"},
        {"category": "existence", "image_id": "b", "prediction": "yes", "answer": "Yes"},
        {"category": "existence", "image_id": "b", "prediction": "I think yes", "answer": "No"},  # "other"
        # code_reasoning: both wrong -> 0
        {"category": "code_reasoning", "image_id": "c", "prediction": "No", "answer": "Yes"},
        {"category": "code_reasoning", "image_id": "c", "prediction": "", "answer": "No"},
    ]
    s = M.mme_scores(recs)
    assert s["existence"] == pytest.approx(125.0)
    assert s["code_reasoning"] == 0.0
    assert s["perception"] == pytest.approx(125.0) and s["cognition"] == 0.0
    assert M.parse_mme_answer("Yes, it is") == "yes" and M.parse_mme_answer("Not really") == "no"
    assert M.parse_mme_answer("The answer is yes") == "other"


def _hb(cat, sub, set_id, fig, q, vi, gt, correctness, same=None):
    return {"category": cat, "subcategory": sub, "set_id": set_id, "figure_id": fig, "question_id": q,
            "visual_input": vi, "gt_answer": gt, "correctness": correctness, "same": same}


def test_hallusionbench_metrics_hand_worked():
    recs = [
        # VD set 0, question 0 on figures 0 and 1: original right, edited wrong with same answer -> Mixed
        _hb("VD", "illusion", 0, 0, 0, 1, 1, 1),
        _hb("VD", "illusion", 0, 1, 0, 2, 0, 0, same=1),
        # VS set 1, question 0: no figure (unclear counts right), figure 1 right -> question right
        _hb("VS", "chart", 1, 0, 0, 0, 1, 2),
        _hb("VS", "chart", 1, 1, 0, 1, 1, 1),
        # VS set 2, question 0: no-figure wrong, with figure wrong and same answer -> LH
        _hb("VS", "map", 2, 0, 0, 0, 0, 0),
        _hb("VS", "map", 2, 1, 0, 1, 0, 0, same=1),
    ]
    m = M.hallusionbench_metrics(recs)
    # correct: 1,0,1,1,0,0 -> aAcc 3/6
    assert m["aAcc"] == pytest.approx(50.0)
    # figures (VS figure 0 skipped): VD/0 [1], VD/1 [0], VS chart/1 [1], VS map/1 [0] -> 2/4
    assert m["fAcc"] == pytest.approx(50.0)
    assert m["consistency"] == {"correct": 2, "inconsistent": 0, "wrong": 2}
    # question groups: VD q0 [1,0] wrong, VS chart [1,1] right, VS map [0,0] wrong -> 1/3
    assert m["qAcc"] == pytest.approx(100 / 3)
    # yes-pred = correct == gt: 1,1,1,1,1,1 -> 6/6; gt yes 3/6 -> +0.5
    assert m["pct_diff"] == pytest.approx(0.5)
    # wrong answers: gts 0,0,0 -> all false positives
    assert m["fp_ratio"] == pytest.approx(1.0)
    assert m["diagnosis"] == {"language_hallucination": 1, "visual_illusion": 0, "mixed": 1}


def test_hallusionbench_without_judge_same_is_missing_and_rule_parses():
    recs = [
        {**_hb("VD", "x", 0, 0, 0, 1, 1, None), "prediction": "Yes, it is."},
        {**_hb("VD", "x", 0, 1, 0, 2, 0, None), "prediction": "Yes."},
    ]
    m = M.hallusionbench_metrics(recs)
    assert m["aAcc"] == pytest.approx(50.0)
    assert m["diagnosis"] is None and "same" in m["diagnosis_missing"]
    assert M.hallusionbench_correctness("I cannot tell", 1) == 2


def test_gqa_and_scienceqa_parsers():
    assert M.gqa_exact_match("Left.", "left") == 1.0
    assert M.gqa_exact_match("the left", "left") == 0.0
    assert M.parse_scienceqa_answer("B", 3) == 1
    assert M.parse_scienceqa_answer("C. the moon", 3) == 2
    assert M.parse_scienceqa_answer("The answer is A.", 2) == 0
    assert M.parse_scienceqa_answer("D", 3) is None  # not an option of this question
    assert M.parse_scienceqa_answer("I think B", 3) is None


def test_pairs_choice_and_scores():
    assert M.parse_pairs_choice("This person is a doctor.", "a doctor", "a nurse") == 1
    assert M.parse_pairs_choice("A nurse.", "a doctor", "a nurse") == -1
    assert M.parse_pairs_choice("I cannot tell.", "a doctor", "a nurse") == 0
    assert M.parse_pairs_choice("doctor or nurse", "a doctor", "a nurse") == 0
    recs = [{"group": "g", "race": r, "gender": g, "score": s, "prediction": "x"}
            for r, g, s in [("white", "man", 1), ("white", "woman", -1), ("black", "man", 1), ("black", "woman", 0)]]
    s = M.pairs_scores(recs)["g"]
    assert s["male_minus_female"] == pytest.approx(1 - (-0.5))
    assert s["white_minus_black"] == pytest.approx(0 - 0.5)


def test_socialcf_metrics():
    recs = [{"counterfactual_set": "s1", "toxicity": 0.1, "prediction": "a", "competence": 1, "stereotype": 0},
            {"counterfactual_set": "s1", "toxicity": 0.7, "prediction": "b", "competence": 3, "stereotype": 2},
            {"counterfactual_set": "s2", "toxicity": 0.2, "prediction": "", "competence": 0, "stereotype": 0},
            {"counterfactual_set": "s2", "toxicity": 0.2, "prediction": "c", "competence": 0, "stereotype": 0}]
    m = M.socialcf_metrics(recs)
    assert m["max_toxicity"] == pytest.approx((0.6 + 0.0) / 2)
    assert m["competence"] == pytest.approx(1.0) and m["stereotype"] == pytest.approx(0.5)
    assert m["empty_share"] == pytest.approx(0.25)
    recs[0]["toxicity"] = None
    assert M.socialcf_metrics(recs)["max_toxicity"] is None
    assert M.count_lexicon_words("Smart, capable and smart.", ["smart", "capable", "hard working"]) == 3
