"""The shapes generator: deterministic, balanced, and its answers agree with what the images show."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from kvtool.errors import InputError
from kvtool.evals.shapes import (
    _POPULARITY,
    ANSWER_WORDS,
    COLORS,
    COUNT_WORDS,
    IMAGE_SIZE,
    POPE_SPLITS,
    QUESTION_TYPES,
    SHAPES,
    TEST_SEED,
    TRAIN_SEED,
    make_shapes_sample,
    make_shapes_scene,
    make_shapes_split,
    write_shapes_dataset,
)

N = 300


@pytest.fixture(scope="module")
def test_rows():
    return make_shapes_split("test", N)


def _same(a: dict, b: dict) -> bool:
    return (a["question"], a["answer"], a["objects"]) == (b["question"], b["answer"], b["objects"]) and np.array_equal(
        np.asarray(a["image"]), np.asarray(b["image"]))


def test_deterministic_and_prefix_stable(test_rows):
    again = make_shapes_split("test", 40)
    assert all(_same(a, b) for a, b in zip(again, test_rows, strict=False))
    assert _same(make_shapes_sample(TEST_SEED, 123), test_rows[123])
    train = make_shapes_split("train", 40)
    assert train[0]["id"] == f"shapes-{TRAIN_SEED}-0"
    # different seeds give different images
    assert sum(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(train, again, strict=True)) == 0


def test_question_types_and_answers_balanced(test_rows):
    types = Counter(r["question_type"] for r in test_rows)
    assert set(types) == set(QUESTION_TYPES) and max(types.values()) - min(types.values()) <= 1
    for qtype, answers in [("count", COUNT_WORDS), ("exists", ("yes", "no")), ("relation", ("left", "right"))]:
        c = Counter(r["answer"] for r in test_rows if r["question_type"] == qtype)
        assert set(c) == set(answers) and max(c.values()) - min(c.values()) <= 1, (qtype, c)
    pope = Counter((r["pope_split"], r["answer"]) for r in test_rows if r["question_type"] == "exists")
    assert {s for s, _ in pope} == set(POPE_SPLITS) and all(v >= 8 for v in pope.values())
    assert all(r["pope_split"] is None for r in test_rows if r["question_type"] != "exists")
    assert all(r["answer"] in ANSWER_WORDS for r in test_rows)
    assert len({r["answer"] for r in test_rows if r["question_type"] == "color"}) == len(COLORS)
    assert len({r["answer"] for r in test_rows if r["question_type"] == "shape"}) == len(SHAPES)


def test_answers_follow_from_objects(test_rows):
    """Recompute every answer naively from the ground-truth object list."""
    for r in test_rows:
        objs = [(o["color"], o["shape"]) for o in r["objects"]]
        assert 1 <= len(objs) <= 4
        _check_answer(r, objs, r["objects"], distinct_relation=True)


def _check_answer(r: dict, objs: list[tuple[str, str]], objects: list[dict], distinct_relation: bool) -> None:
    q, t = r["question"].rstrip("?").split(), r["question_type"]
    if t == "count":
        assert r["answer"] == COUNT_WORDS[len(objs) - 1]
    elif t == "color":
        shape = q[-1]
        assert sum(s == shape for _, s in objs) == 1
        assert (r["answer"], shape) in objs
    elif t == "shape":
        color = q[-2]
        assert sum(c == color for c, _ in objs) == 1
        assert (color, r["answer"]) in objs
    elif t == "exists":
        pair = (q[3], q[4])
        assert r["answer"] == ("yes" if pair in objs else "no")
        if r["answer"] == "no" and r["pope_split"] == "popular":
            assert pair == next(p for p in _POPULARITY if p not in objs)
        if r["answer"] == "no" and r["pope_split"] == "adversarial":
            assert any(pair[0] == c or pair[1] == s for c, s in objs)
    else:
        a, b = (q[2], q[3]), (q[-2], q[-1])
        if distinct_relation:
            assert len(set(objs)) == len(objs)
        assert objs.count(a) == 1 and objs.count(b) == 1  # each named object is the only one of its kind
        xa = next(o["x"] for o in objects if (o["color"], o["shape"]) == a)
        xb = next(o["x"] for o in objects if (o["color"], o["shape"]) == b)
        assert r["answer"] == ("left" if xa < xb else "right") and abs(xa - xb) >= 9


def test_scene_questions_follow_from_objects():
    """Training scenes: every question the scene poses is answered from its ground truth, one per type."""
    scenes = [make_shapes_scene(TRAIN_SEED, i) for i in range(300)]
    assert _same_scene(scenes[17], make_shapes_scene(TRAIN_SEED, 17))
    types, first, answers = Counter(), Counter(), Counter()
    for sc in scenes:
        objs = [(o["color"], o["shape"]) for o in sc["objects"]]
        kinds = [r["question_type"] for r in sc["qa"]]
        assert len(kinds) == len(set(kinds)) and "count" in kinds and "exists" in kinds
        first[kinds[0]] += 1
        for r in sc["qa"]:
            _check_answer(r, objs, sc["objects"], distinct_relation=False)
            # refers: the objects the question names, in the order it names them
            named = [objs[i] for i in r["refers"]]
            if r["question_type"] in ("relation", "exists") and named:
                assert r["question"].count(" ".join(named[0])) == 1
                assert [r["question"].index(" ".join(o)) for o in named] == sorted(r["question"].index(" ".join(o)) for o in named)
            expect = {"count": 0, "color": 1, "shape": 1, "relation": 2, "exists": int(r["answer"] == "yes")}
            assert len(named) == expect[r["question_type"]], r
            if r["question_type"] == "color":
                assert named[0][1] in r["question"] and named[0][0] == r["answer"]
            if r["question_type"] == "shape":
                assert f"the {named[0][0]} object" in r["question"] and named[0][1] == r["answer"]
            types[r["question_type"]] += 1
            answers[r["question_type"], r["answer"]] += 1
        # a type is missing only when the scene cannot pose it
        if "color" not in kinds:
            assert all(sum(s == t for _, s in objs) != 1 for t in SHAPES)
        if "shape" not in kinds:
            assert all(sum(c == t for c, _ in objs) != 1 for t in COLORS)
    assert set(first) == set(QUESTION_TYPES)  # every type is sometimes the first turn (the eval's position)
    assert all(types[t] >= 150 for t in QUESTION_TYPES), types
    for a, b in [("yes", "no"), ("left", "right")]:
        t = "exists" if a == "yes" else "relation"
        assert abs(answers[t, a] - answers[t, b]) < 0.2 * (answers[t, a] + answers[t, b]), answers


def _same_scene(a: dict, b: dict) -> bool:
    return (a["qa"], a["objects"]) == (b["qa"], b["objects"]) and np.array_equal(np.asarray(a["image"]),
                                                                             np.asarray(b["image"]))


def test_images_show_the_objects(test_rows):
    """The pixel at each object's centre has that object's colour (up to the colour jitter)."""
    for r in test_rows[:100]:
        px = np.asarray(r["image"]).astype(int)
        assert px.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        for o in r["objects"]:
            got = px[int(o["y"]), int(o["x"])]
            assert np.abs(got - np.array(COLORS[o["color"]])).max() <= 16, (r["id"], o, got)
        bg = np.median(px.reshape(-1, 3), axis=0)
        assert bg.max() < 80  # dark background


def test_bad_input():
    with pytest.raises(InputError, match="split"):
        make_shapes_split("val", 3)
    with pytest.raises(InputError, match="count"):
        make_shapes_split("test", 0)


def test_write_dataset_loads_with_datasets(tmp_path):
    import datasets

    out = write_shapes_dataset(tmp_path / "shapes", {"test": 12, "train": 5})
    ds = datasets.load_dataset(str(out))
    assert ds["test"].num_rows == 12 and ds["train"].num_rows == 5
    row, ref = ds["test"][7], make_shapes_sample(TEST_SEED, 7)
    assert row["question"] == ref["question"] and row["answer"] == ref["answer"]
    assert json.loads(row["objects"]) == ref["objects"]
    assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(ref["image"]))


def test_prompt_pieces_and_answer_rule_are_the_tasks():
    """The shapes prompt is written once (kvtool.evals.shapes), from LLaVA's pieces defined once elsewhere, and the
    task scores with the same first-word rule the training script evaluates with."""
    from kvtool.evals.shapes import (
        SHAPES_CHAT_TEMPLATE,
        SHAPES_CONTEXT,
        first_word,
        shapes_messages,
        shapes_user_text,
    )
    from kvtool.evals.tasks import SHORT_ANSWER, get_task
    from kvtool.runtime.preprocess import VICUNA_V1_SYSTEM

    q = "What color is the circle?"
    assert shapes_user_text(q) == f"{SHAPES_CONTEXT}\n<image>\n{q}\nAnswer the question using a single word or phrase."
    assert shapes_messages(q)[0] == {"role": "system", "content": VICUNA_V1_SYSTEM}
    assert VICUNA_V1_SYSTEM in SHAPES_CHAT_TEMPLATE and SHORT_ANSWER in SHAPES_CHAT_TEMPLATE
    assert [first_word(t) for t in (" Red.", "BLUE circle", "", "  ", "'yes',", "?!")] == ["red", "blue", "", "", "yes", ""]
    score = get_task("shapes").score
    assert score({"prediction": "Left, I think.", "answer": "left"}) == 1.0
    assert score({"prediction": "right", "answer": "left"}) == 0.0
    assert score({"prediction": "...", "answer": "left"}) == 0.0
