"""Upload files for benchmarks whose answers only an evaluation server holds (VQAv2 test-dev on EvalAI).

``vqa_submission`` builds what LLaVA's ``scripts/convert_vqav2_for_submission.py`` writes: a JSON list of
``{"question_id": int, "answer": str}``, every answer passed through EvalAI's answer processor
(``metrics.normalize_vqa_answer``). Given the full question list (LLaVA pads to every test2015 question, e.g.
its ``llava_vqav2_mscoco_test2015.jsonl`` or VQA's ``v2_OpenEnded_mscoco_test2015_questions.json``), there is one
entry per listed question, in its order, ``""`` where the run has no prediction; without it, one entry per
predicted question. ``write_submission`` does that for a run directory's saved predictions.

It does not generate or score: the number comes from the server (the VQA challenge's test-dev phase).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.evals.metrics import normalize_vqa_answer

SUBMISSION_TASKS = ("vqav2_testdev",)


def _qid(v: Any) -> Any:
    """Question ids as EvalAI expects them: ints (ids saved as digit strings are turned back into ints)."""
    if isinstance(v, str) and v.strip().isdigit():
        return int(v)
    return v


def vqa_submission(rows: Iterable[Mapping[str, Any]], question_ids: Iterable[Any] | None = None
                   ) -> list[dict[str, Any]]:
    """EvalAI VQA upload entries from prediction rows (``question_id``, ``prediction``).

    A later row of the same question replaces an earlier one (as LLaVA's dict of results). Raises InputError
    for a row without ``question_id``."""
    answers: dict[Any, str] = {}
    for i, r in enumerate(rows):
        if r.get("question_id") is None:
            raise InputError(f"submission: prediction row {i} has no question_id; expected VQAv2 prediction rows")
        answers[_qid(r["question_id"])] = str(r.get("prediction") or "")
    order = list(answers) if question_ids is None else [_qid(q) for q in question_ids]
    return [{"question_id": q, "answer": normalize_vqa_answer(answers[q]) if q in answers else ""} for q in order]


def read_question_ids(path: str | Path) -> list[Any]:
    """Question ids, in order, from VQA's questions JSON (``{"questions": [...]}``), a JSON list (of objects
    with ``question_id`` or of ids) or a JSONL file of objects with ``question_id`` (LLaVA's question files)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--question-ids {path}: no such file; expected a VQA questions JSON or a JSONL question file")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        items = data["questions"] if isinstance(data, dict) and "questions" in data else data
    except json.JSONDecodeError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InputError(f"--question-ids {path}: neither JSON nor JSONL ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(items, list):
        raise InputError(f"--question-ids {path}: expected a list of questions or {{\"questions\": [...]}}")
    ids = []
    for k, item in enumerate(items):
        q = item.get("question_id") if isinstance(item, Mapping) else item
        if q is None:
            raise InputError(f"--question-ids {path}: entry {k} has no question_id")
        ids.append(q)
    return ids


def write_submission(run_dir: str | Path, output: str | Path, task: str = "vqav2_testdev",
                     question_ids: str | Path | None = None) -> dict[str, Any]:
    """Write the EvalAI upload of ``task``'s saved predictions in ``run_dir`` to ``output`` (JSON).

    Returns ``{"path", "task", "n_answers", "n_predicted", "n_blank"}``; ``n_blank`` counts listed questions
    without a prediction (written as ``""``, as LLaVA does)."""
    from kvtool.evals.runner import task_rows

    if task not in SUBMISSION_TASKS:
        raise InputError(f"--task {task!r}: no submission format; expected one of {', '.join(SUBMISSION_TASKS)}")
    if Path(output).is_dir():
        raise InputError(f"output {output}: is a directory; expected the JSON file to write")
    rows = task_rows(run_dir, task)
    ids = read_question_ids(question_ids) if question_ids else None
    entries = vqa_submission(rows, ids)
    predicted = {_qid(r["question_id"]) for r in rows}
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entries), encoding="utf-8")
    return {"path": str(out), "task": task, "n_answers": len(entries), "n_predicted": len(predicted),
            "n_blank": sum(e["question_id"] not in predicted for e in entries)}
