"""The machinery of eval tasks: the ``TaskSpec`` a benchmark is declared as (plain data + small functions), the
``Sample`` a dataset row becomes, a bar figure's ``BarPanel``, and the functions every task shares over saved
prediction rows — per-sample scores (``score_rows``), the official metrics (``task_metrics``), dotted metric keys
(``flatten_metrics``, ``headline_value``).

The task table itself (one ``TaskSpec`` per benchmark, its prompts and scores, ``get_task``) is
``kvtool.evals.tasks``, which re-exports everything here. This module names no task, loads no data and runs no
model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from kvtool.errors import InputError
from kvtool.evals import metrics as M

# LLaVA's question loader (llava/eval/model_vqa_loader.py: --max_new_tokens, default 128; the v1_5 eval scripts
# for TextVQA, VQAv2, GQA, MME and POPE pass none)
LLAVA_LOADER_TOKENS = 128


@dataclass(frozen=True)
class Sample:
    """One model query built from a dataset row: the image (or None), the user prompt, and the reference
    fields saved beside the prediction (whatever the metric needs)."""

    image: Any
    prompt: str
    ref: dict[str, Any]


@dataclass(frozen=True)
class BarPanel:
    """One panel of a task's bar figure (tasks without an accuracy-like headline, e.g. PAIRS): ``keys`` are
    dotted metric keys, one bar group each, named by ``groups``; ``ylabel`` defaults to the first key's metric
    label."""

    title: str
    keys: tuple[str, ...]
    groups: tuple[str, ...]
    ylabel: str = ""
    zero_line: bool = False


Loader = Callable[["TaskSpec", "str | None", "int | None"], tuple[Any, str]]
Judge = Callable[[list[dict], Any, Any], list[str]]
RowCheck = Callable[[Any], "str | None"]


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """A benchmark as data, built with keywords only. Everything task-specific hangs on the spec, so no code
    outside a task's own definition branches on its name:

    - ``build(row) -> [Sample]`` (one row may give several questions, e.g. PAIRS);
    - ``load(spec, source, n_rows) -> (rows, where)``: where the rows come from when the generic loader (hub ids,
      a local copy in the hub's format; ``loaders.load_rows``) does not fit — PAIRS' image folders, shapes'
      generator; None: the generic loader;
    - ``judge(rows, JudgeConfig, JudgeCache | None) -> [notes]``: adds judge fields to prediction rows in place
      (``kvtool.evals.judges``); None: the task needs no judge. ``judges`` names what it calls, for display;
    - ``score(row) -> float | None``: the per-sample correctness (0..1) used by compare;
    - ``aggregate(rows) -> dict``: the official metrics from saved prediction rows;
    - ``metrics``: (dotted-key pattern, registered metric kind) pairs, first match wins
      (``metrics.register_metric``: higher-is-better, scale, unit, aggregation) — every number the task
      reports is declared (``metric``);
    - ``row_checks`` / ``row_check`` / ``id_column``: what ``selection.check_rows`` checks in each selected row;
    - ``version``: bumped when a change to prompts or scoring changes predictions or scores; recorded in a
      run's settings (a run never mixes versions) and in results.json.
    """

    name: str
    title: str
    source: str
    hub_ids: tuple[str, ...]
    split: str | tuple[str, ...]
    columns: tuple[str, ...]
    metric: str  # a sentence saying what the task measures (shown by ``kvtool ls tasks``)
    headline: str
    build: Callable[[Mapping[str, Any]], list[Sample]]
    aggregate: Callable[[list[dict]], dict[str, Any]]
    metrics: tuple[tuple[str, str], ...]
    score: Callable[[dict], float | None] | None = None
    load: Loader | None = None
    judge: Judge | None = None
    config: str | None = None
    image_config: str | None = None  # GQA: images live in a second config, joined on imageId
    max_new_tokens: int = LLAVA_LOADER_TOKENS
    temperature: float = 0.0
    seeds: tuple[int, ...] = (0,)
    judges: tuple[str, ...] = ()
    row_filter: tuple[tuple[str, ...], Callable[..., bool]] | None = None  # (columns, keep(*values)) before --limit
    notes: str = ""
    generation_source: str = ""  # where max_new_tokens (and the greedy/sampled setting) comes from
    reports: str = ""  # the number the task reports and how it compares with published figures
    beside: tuple[str, ...] = ()  # metric keys shown next to the headline in summaries (POPE: mean_f1)
    # (issue 16) columns ``--limit`` balances over (kvtool.evals.selection); columns of ``columns`` whose values
    # may be null, so a local copy may leave them out (read as null)
    strata: tuple[str, ...] = ()
    optional_columns: tuple[str, ...] = ()
    id_column: str | None = None
    row_checks: tuple[tuple[str, RowCheck], ...] = ()
    row_check: Callable[[Mapping[str, Any]], tuple[str, str] | None] | None = None  # across columns: (col, want)
    card_rows: int | None = None  # rows of the evaluated split per the dataset's card (the sweep's estimate)
    bars: tuple[BarPanel, ...] = ()  # drawn as bars (no accuracy-like headline to plot against KV bits)
    version: int = 1

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def generation(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                "temperature": self.temperature if self.do_sample else 1.0, "top_p": 1.0,
                "seeds": list(self.seeds)}

    def metric_info(self, key: str) -> M.MetricInfo:
        """The declared ``MetricInfo`` of one dotted metric key (``InputError`` when the task does not declare
        it). ``empty_share`` and ``failed``, which every task reports, are declared for all."""
        for pattern, kind in (*self.metrics, *COMMON_METRICS):
            if fnmatchcase(key, pattern):
                return M.metric_info(kind)
        raise InputError(f"{self.name}: metric {key!r} is not declared in its TaskSpec.metrics")

    @property
    def headline_info(self) -> M.MetricInfo:
        return self.metric_info(self.headline)


# every task's rows get these (tasks.task_metrics, runner.score_task)
COMMON_METRICS = (("empty_share", "bad_share"), ("failed", "bad_count"))


def mean_or_none(xs: list[float]) -> float | None:
    """The mean, or None for no values (undefined, shown as missing; never 0)."""
    return sum(xs) / len(xs) if xs else None


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "", keep_missing: bool = False
                    ) -> dict[str, float | None]:
    """Numeric metrics with nested dicts flattened to dotted keys (``random.f1``); counts ``n`` left out.
    Undefined metrics (None) are left out too, unless ``keep_missing`` keeps them as None."""
    out: dict[str, float | None] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, key + ".", keep_missing))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n":
            out[key] = float(v)
        elif v is None and keep_missing and k != "n":
            out[key] = None
    return out


def headline_value(spec: TaskSpec, metrics: Mapping[str, Any]) -> float | None:
    """The task's headline number (a dotted key into its metrics), or None when missing."""
    return flatten_metrics(metrics).get(spec.headline)


def score_rows(spec: TaskSpec, rows: list[dict]) -> list[dict]:
    """Attach each row's per-sample ``score`` (None where the task has none or a judge is missing)."""
    for r in rows:
        r["score"] = spec.score(r) if spec.score else None
    return rows


def task_metrics(spec: TaskSpec, rows: list[dict]) -> dict[str, Any]:
    """The task's official metrics from saved prediction rows (empty rows -> InputError)."""
    if not rows:
        raise InputError(f"{spec.name}: no predictions to score")
    out = spec.aggregate(score_rows(spec, [dict(r) for r in rows]))
    out["empty_share"] = mean_or_none([not str(r.get("prediction", "")).strip() for r in rows])
    return out
