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


# --- row checks (each task names its own in TaskSpec.row_checks / row_check) -----------------------------

def text(v: Any) -> str | None:
    """A non-empty string."""
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def present(v: Any) -> str | None:
    """Any value but null or an empty string."""
    return None if v is not None and str(v).strip() != "" else "a value"


def answers(v: Any) -> str | None:
    """A non-empty list of answer strings (or VQAv2's ``{"answer": str}`` dicts)."""
    ok = isinstance(v, (list, tuple)) and len(v) > 0 and all(
        (isinstance(a, str)) or (isinstance(a, dict) and isinstance(a.get("answer"), str)) for a in v)
    return None if ok else "a non-empty list of answer strings"


def yes_no(v: Any) -> str | None:
    """"yes" or "no" (any case)."""
    return None if isinstance(v, str) and v.strip().lower() in ("yes", "no") else "yes or no"


def int_in(allowed: tuple[int, ...]) -> Callable[[Any], str | None]:
    """A check that the value reads as one of the integers ``allowed``."""
    def check(v: Any) -> str | None:
        try:
            return None if int(str(v).strip()) in allowed else f"one of {', '.join(map(str, allowed))}"
        except ValueError:
            return f"one of {', '.join(map(str, allowed))}"
    return check


def choices(v: Any) -> str | None:
    """A list of 2 to 5 choices."""
    return None if isinstance(v, (list, tuple)) and 2 <= len(v) <= 5 else "a list of 2 to 5 choices"


def capability(v: Any) -> str | None:
    """MM-Vet's capability names: a list or a comma-separated string with at least one name."""
    caps = v.split(",") if isinstance(v, str) else v
    return None if isinstance(caps, (list, tuple)) and any(str(c).strip() for c in caps) else "capability names"


def check_rows(spec: Any, rows: Any, indices: Sequence[int],
               read_columns: Callable[[Any, Sequence[str], Sequence[int]], dict[str, list]]) -> None:
    """Refuse the first selected row whose reference columns the task cannot score (``InputError``:
    ``<task>: row <i> (<id column> <id>): column <c> is <value>; expected <what>``). The checks are the spec's:
    ``row_checks`` (column, check) pairs, then ``row_check`` over the row's checked values (across columns)."""
    id_col, checks = spec.id_column, dict(spec.row_checks)
    if not checks or not indices:
        return
    cols = [c for c in checks if c in _columns_of(rows)] + ([id_col] if id_col and id_col not in checks else [])
    cols = [c for c in dict.fromkeys(cols) if c in _columns_of(rows)]
    values = read_columns(rows, cols, indices)
    for pos, idx in enumerate(indices):
        bad = next(((col, want) for col, check in checks.items() if col in values
                    for want in [check(values[col][pos])] if want is not None), None)
        if bad is None and spec.row_check is not None:
            bad = spec.row_check({c: v[pos] for c, v in values.items()})
        if bad is not None:
            col, want = bad
            v = values[col][pos]
            who = f" ({id_col} {values[id_col][pos]!r})" if id_col and id_col in values else ""
            shown = repr(v) if not isinstance(v, (list, tuple)) or v else "an empty list"
            raise InputError(f"{spec.name}: row {idx}{who}: column {col} is {shown[:60]}; expected {want}")


def _columns_of(rows: Any) -> list[str]:
    if hasattr(rows, "column_names"):
        return list(rows.column_names)
    return list(rows[0].keys()) if len(rows) else []
