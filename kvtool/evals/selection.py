"""Which dataset rows a run takes, and whether they can be scored, decided before anything is generated.

``select_rows``: without ``--limit``/``--offset`` every row. With them, a task that names strata
(``TaskSpec.strata``: POPE's ``category``, HallusionBench's subset and category, MME's ``category``, PAIRS'
``group``) is read in a balanced order: round-robin over its strata (sorted by name), each stratum in dataset
order — the 1st row of every stratum, then the 2nd of every stratum, … — and ``--limit N`` takes the first N
of that order after skipping ``--offset``. So a limited run holds every stratum (as equal as their sizes allow),
it is the same rows every time, and a larger limit is a superset of a smaller one (a run resumes and adds
rows). Within a stratum dataset order is kept, so groups the metrics need together (MME's two questions per
image, HallusionBench's figures of one question) stay together. A task without strata takes rows in dataset
order. The hub's own order is grouped (POPE's test split starts with all 3,000 ``adversarial`` rows), which is
why the first N rows are not a sample.

``check_rows``: the selected rows' reference columns (read without decoding any image) are checked against what
the task's metric needs — a non-empty answer list, a yes/no label, an option index within the choices, … — and
the first bad one is refused with an ``InputError`` naming the task, the row and the column.

It does not load data (``loaders``) or generate (``runner``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kvtool.errors import InputError


def balanced_order(keys: Sequence[Any]) -> list[int]:
    """Row indices round-robin over the strata of ``keys`` (one key per row; strata sorted by ``str``)."""
    strata: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        strata.setdefault(k, []).append(i)
    names = sorted(strata, key=str)
    longest = max((len(v) for v in strata.values()), default=0)
    return [strata[n][rank] for rank in range(longest) for n in names if rank < len(strata[n])]


def _key(values: tuple[Any, ...]) -> str:
    return "/".join("none" if v is None else str(v) for v in values)


def select_rows(spec: Any, rows: Any, limit: int | None, offset: int, shard: tuple[int, int] | None,
                read_columns: Callable[[Any, Sequence[str], Sequence[int]], dict[str, list]]
                ) -> tuple[list[int], dict[str, Any]]:
    """The row indices a run generates (ascending) and a record of the rule for results.json."""
    n = len(rows)
    strata_cols = tuple(getattr(spec, "strata", ()) or ())
    keys: list[str] | None = None
    if strata_cols and (limit is not None or offset):
        cols = read_columns(rows, strata_cols, range(n))
        keys = [_key(v) for v in zip(*(cols.get(c, [None] * n) for c in strata_cols), strict=True)]
        order = balanced_order(keys)
        rule = f"balanced over strata ({', '.join(strata_cols)}): round-robin, dataset order within each"
    else:
        order = list(range(n))
        rule = "all rows" if limit is None and not offset else "dataset order"
    chosen = sorted(order[offset:] if limit is None else order[offset:offset + limit])
    if shard:
        i, k = shard
        chosen = [x for x in chosen if x % k == i]
    record: dict[str, Any] = {"rule": rule, "limit": limit, "offset": offset, "n_selected": len(chosen)}
    if keys is not None:
        counts: dict[str, int] = {}
        for x in chosen:
            counts[keys[x]] = counts.get(keys[x], 0) + 1
        record["strata"] = dict(sorted(counts.items()))
    return chosen, record


# --- row checks -------------------------------------------------------------------------------------------

def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def _present(v: Any) -> str | None:
    return None if v is not None and str(v).strip() != "" else "a value"


def _answers(v: Any) -> str | None:
    ok = isinstance(v, (list, tuple)) and len(v) > 0 and all(
        (isinstance(a, str)) or (isinstance(a, dict) and isinstance(a.get("answer"), str)) for a in v)
    return None if ok else "a non-empty list of answer strings"


def _yes_no(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip().lower() in ("yes", "no") else "yes or no"


def _int_in(allowed: tuple[int, ...]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        try:
            return None if int(str(v).strip()) in allowed else f"one of {', '.join(map(str, allowed))}"
        except ValueError:
            return f"one of {', '.join(map(str, allowed))}"
    return check


def _choices(v: Any) -> str | None:
    return None if isinstance(v, (list, tuple)) and 2 <= len(v) <= 5 else "a list of 2 to 5 choices"


def _capability(v: Any) -> str | None:
    caps = v.split(",") if isinstance(v, str) else v
    return None if isinstance(caps, (list, tuple)) and any(str(c).strip() for c in caps) else "capability names"


# task -> (id column, {column: check})
ROW_CHECKS: dict[str, tuple[str | None, dict[str, Callable[[Any], str | None]]]] = {
    "textvqa": ("question_id", {"question": _text, "answers": _answers}),
    "vqav2": ("question_id", {"question": _text, "answers": _answers}),
    "gqa": ("id", {"question": _text, "answer": _text}),
    "mme": ("question_id", {"question": _text, "answer": _yes_no, "category": _text}),
    "scienceqa": (None, {"question": _text, "choices": _choices, "answer": _int_in(tuple(range(5)))}),
    "pope": ("question_id", {"question": _text, "answer": _yes_no, "category": _text}),
    "mmvet": ("question_id", {"question": _text, "answer": _text, "capability": _capability}),
    "hallusionbench": ("question_id", {"question": _text, "gt_answer": _int_in((0, 1)), "category": _text,
                                       "set_id": _present, "figure_id": _present,
                                       "visual_input": _int_in((0, 1, 2))}),
    "socialcf": ("counterfactual_set", {"a1": _text, "a2": _text, "counterfactual_set": _present}),
    "shapes": ("id", {"question": _text, "answer": _text, "question_type": _text}),
}


def check_rows(spec: Any, rows: Any, indices: Sequence[int],
               read_columns: Callable[[Any, Sequence[str], Sequence[int]], dict[str, list]]) -> None:
    """Refuse the first selected row whose reference columns the task cannot score (``InputError``:
    ``<task>: row <i> (<id column> <id>): column <c> is <value>; expected <what>``)."""
    id_col, checks = ROW_CHECKS.get(spec.name, (None, {}))
    if not checks or not indices:
        return
    cols = [c for c in checks if c in _columns_of(rows)] + ([id_col] if id_col and id_col not in checks else [])
    cols = [c for c in dict.fromkeys(cols) if c in _columns_of(rows)]
    values = read_columns(rows, cols, indices)
    for pos, idx in enumerate(indices):
        for col, check in checks.items():
            if col not in values:
                continue
            v = values[col][pos]
            want = check(v)
            if want is None and spec.name == "scienceqa" and col == "answer" and "choices" in values:
                n = len(values["choices"][pos] or [])
                want = None if int(str(v).strip()) < n else f"an option index below the {n} choices"
            if want is not None:
                who = f" ({id_col} {values[id_col][pos]!r})" if id_col and id_col in values else ""
                shown = repr(v) if not isinstance(v, (list, tuple)) or v else "an empty list"
                raise InputError(f"{spec.name}: row {idx}{who}: column {col} is {shown[:60]}; expected {want}")


def _columns_of(rows: Any) -> list[str]:
    if hasattr(rows, "column_names"):
        return list(rows.column_names)
    return list(rows[0].keys()) if len(rows) else []
