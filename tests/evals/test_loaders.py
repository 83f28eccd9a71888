"""Loaders: hub ids (both lmms-lab and lmms-lab-encoder), save_to_disk copies, the shapes generator and its
parquet files, PAIRS naming errors; and the shapes task scored against its own answers."""

from __future__ import annotations

import pytest

from kvtool.errors import InputError
from kvtool.evals.loaders import load_task_data
from kvtool.evals.runner import EvalConfig, run_eval
from kvtool.evals.tasks import get_task, parse_tasks
from tests.evals.fixtures import ScriptedModel, image, make_pairs


def test_hub_ids_tried_in_order_with_clear_error(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(InputError, match="lmms-lab/textvqa or lmms-lab-encoder/textvqa.*--data-dir"):
        load_task_data(get_task("textvqa"))
    assert calls == [("lmms-lab/textvqa", None, "validation"), ("lmms-lab-encoder/textvqa", None, "validation")]
    calls.clear()
    with pytest.raises(InputError):
        load_task_data(get_task("scienceqa"))
    assert calls[0] == ("lmms-lab/ScienceQA", "ScienceQA-IMG", "test")


def test_hub_fallback_to_encoder_id(monkeypatch):
    import datasets

    ds = datasets.Dataset.from_dict({"question_id": ["1"], "image": [image(1)], "question": ["q"],
                                     "answer": ["yes"], "category": ["random"]})

    def fake_load(name, config=None, split=None, **kw):
        if name.startswith("lmms-lab/"):
            raise FileNotFoundError("renamed")
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows, where = load_task_data(get_task("pope"))
    assert where == "lmms-lab-encoder/POPE" and len(rows) == 1


def test_save_to_disk_copy_and_missing_split(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"question_id": ["1", "2"], "image": [image(1), image(2)],
                                     "question": ["q1", "q2"], "answer": ["yes", "no"],
                                     "category": ["random", "popular"]})
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "pope"))
    rows, _ = load_task_data(get_task("pope"), data_dir=str(tmp_path))
    assert len(rows) == 2 and rows[1]["answer"] == "no"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(InputError, match="splits train; expected 'test'"):
        load_task_data(get_task("pope"), source=str(tmp_path / "other"))


def test_shapes_generator_and_parquet_agree(tmp_path):
    from kvtool.evals.shapes import write_shapes_dataset

    gen, where = load_task_data(get_task("shapes"), n_rows=10)
    assert "generator" in where and len(gen) == 10
    write_shapes_dataset(tmp_path / "shapes", {"test": 10})
    disk, _ = load_task_data(get_task("shapes"), data_dir=str(tmp_path))
    assert [disk[i]["question"] for i in range(10)] == [gen[i]["question"] for i in range(10)]
    assert [disk[i]["answer"] for i in range(10)] == [gen[i]["answer"] for i in range(10)]


def test_shapes_task_scores_its_own_answers(tmp_path):
    from kvtool.evals.shapes import make_shapes_split, shapes_user_text

    # the task prompts as kvtool-shapes was trained: instruction, inline <image>, question, short-answer line
    answers = {(shapes_user_text(s["question"]), s["image"].tobytes()): s["answer"] for s in make_shapes_split("test", 20)}
    res = run_eval(EvalConfig(None, ["shapes"], str(tmp_path / "r"), limit=20, progress=False),
                   model=ScriptedModel(lambda i, p, s: answers[(p, i.tobytes())].capitalize() + "."))
    m = res["tasks"]["shapes"]["metrics"]
    assert m["accuracy"] == 100.0 and m["n"] == 20
    assert set(k for k in m if k.startswith("accuracy_")) == {f"accuracy_{t}" for t in
                                                              ("color", "shape", "count", "exists", "relation")}
    assert m["pope"]["mean_f1"] == 100.0
    wrong = run_eval(EvalConfig(None, ["shapes"], str(tmp_path / "w"), limit=20, progress=False),
                     model=ScriptedModel(lambda i, p, s: "purple"))
    assert wrong["tasks"]["shapes"]["metrics"]["accuracy"] < 30


def test_pairs_layout_and_bad_names(tmp_path):
    root = make_pairs(tmp_path)
    rows, _ = load_task_data(get_task("pairs"), source=str(root))
    assert len(rows) == 12 and {r["group"] for r in rows} == {"occupations", "status", "potential_crime"}
    image(1).save(root / "data" / "status" / "street" / "white_man1.png")  # PAIRS' own naming slip
    rows, _ = load_task_data(get_task("pairs"), source=str(root))
    assert len(rows) == 13 and rows[-1]["race"] in ("white", "black")
    (root / "data" / "occupations" / "spaceship").mkdir()
    image(1).save(root / "data" / "occupations" / "spaceship" / "white_man.png")
    with pytest.raises(InputError, match="unknown occupations scenario 'spaceship'"):
        load_task_data(get_task("pairs"), source=str(root))
    (root / "data" / "occupations" / "spaceship" / "white_man.png").unlink()
    image(1).save(root / "data" / "status" / "street" / "person.png")
    with pytest.raises(InputError, match="<black|white>_<man|woman>"):
        load_task_data(get_task("pairs"), source=str(root))
    with pytest.raises(InputError, match="PAIRS folder"):
        load_task_data(get_task("pairs"))


def test_task_names():
    assert [t.name for t in parse_tasks("TextVQA, pope")] == ["textvqa", "pope"]
    with pytest.raises(InputError, match="unknown task 'coco'"):
        parse_tasks("coco")
    with pytest.raises(InputError):
        parse_tasks(" , ")


def test_socialcf_subset_filtered_before_limit(tmp_path):
    from tests.evals.fixtures import make_socialcf

    make_socialcf(tmp_path)
    rows, _ = load_task_data(get_task("socialcf"), data_dir=str(tmp_path))
    assert len(rows) == 8 and all(rows[i]["a1_type"] == "physical" for i in range(8))


def test_headline_of_nested_metrics():
    from kvtool.evals.tasks import flatten_metrics, headline_value

    m = {"gender_occupation": {"male_minus_female": 0.25, "n": 3}, "n": 9, "flag": True}
    assert flatten_metrics(m) == {"gender_occupation.male_minus_female": 0.25}
    assert headline_value(get_task("pairs"), m) == 0.25
    assert headline_value(get_task("mmvet"), {"total": None}) is None
