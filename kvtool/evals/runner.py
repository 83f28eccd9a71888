"""The eval runner: tasks x model -> ``predictions.jsonl`` (appended and flushed per sample) and ``results.json``.

``run_eval(EvalConfig)`` loads each task's rows, builds the prompts, asks the model (anything with
``generate(image, prompt, max_new_tokens=, do_sample=, temperature=, top_p=, seed=, text_only=)`` returning an
object with ``.text`` — ``kvtool.runtime.VLMPipeline`` by default), writes one JSON line per sample and scores
the task. A re-run of the same command resumes: rows already in the file are skipped, a torn last line from a
killed run is cut off, so no row is lost or duplicated; it says how many rows it found, and Ctrl-C says how many
are saved (``EvalInterrupted``). The run directory records the settings that produced it (``settings``) and a
re-run under other settings is refused; every row carries their fingerprint. Rows are chosen by ``selection``
(``--limit``: balanced across the task's strata) and checked before anything is generated. A sample that fails
(unreadable image, processor error, prompt too long) is saved as a failed row and counts as wrong
(``as_scored``); resumed runs keep failed rows unless ``retry_failed``. Nothing is created on disk before the
first row. ``--shard i/n`` writes ``predictions.shard-i-of-n.jsonl`` and ``merge_shards`` joins them; ``rescore`` recomputes metrics (calling the judges) from saved predictions.

Layout of a run directory::

    runs/NAME/settings.json                # what produced the rows (kvtool.evals.settings); checked on re-runs
    runs/NAME/results.json                 # config, settings, pipeline info; per task its version and metrics
    runs/NAME/<task>/predictions.jsonl     # one row per sample: id, prompt, prediction, reference fields, stats
    runs/NAME/<task>/judgements.jsonl      # judge replies cache

It does not define metrics (``tasks`` / ``metrics``) or compare runs (``compare``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.evals.judges import JudgeCache, JudgeConfig, apply_judges
from kvtool.evals.loaders import UNREADABLE, load_task_data, read_columns, row_without_images
from kvtool.evals.selection import check_rows, select_rows
from kvtool.evals.settings import (
    check_and_record,
    check_row_prints,
    check_settings,
    fingerprint,
    read_settings,
    run_settings,
    task_settings,
)
from kvtool.evals.tasks import TaskSpec, get_task, parse_tasks, task_metrics
from kvtool.versions import library_versions

RESULTS = "results.json"
FAIL_GUARD = 3  # a task whose first FAIL_GUARD samples all fail (none ever succeeded) stops the run


def _say(msg: str) -> None:
    """A progress note on stderr that does not break a tqdm bar."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


@dataclass
class EvalConfig:
    """Everything a run depends on; stored in results.json."""

    model: str | None
    tasks: list[str]
    output: str
    backend: str = "auto"
    device: str = "auto"
    kv: str = "fp16"
    k_bits: int | None = None  # None: 4 for a quantizing scheme; must stay None for fp16 / ov-* (kvspec)
    v_bits: int | None = None
    kv_mode: str = "packed"
    first_token: str = "compressed"
    conversation: str = "auto"  # vicuna_v1 for LLaVA-1.5 (LLaVA's eval scripts), else the chat template
    wbits: int | None = None  # label for reports when the model dir has no manifest saying it
    limit: int | None = None
    offset: int = 0
    seed: int = 0
    shard: tuple[int, int] | None = None
    data: dict[str, str] = field(default_factory=dict)  # task -> local path or hub id
    data_dir: str | None = None
    max_new_tokens: int | None = None  # overrides every task's default when set
    seeds: list[int] | None = None  # overrides the trust tasks' seeds
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    progress: bool = True
    retry_failed: bool = False  # generate failed rows of a resumed run again (else they are kept)
    kv_residual: int | None = None  # KIVI's full-precision window of the newest R tokens (quantizing schemes)

    def __post_init__(self) -> None:
        from kvtool.runtime.kvspec import make_kv_spec, resolve_bits
        from kvtool.runtime.pipeline import BACKEND_ALIASES

        self.backend = BACKEND_ALIASES.get(self.backend, self.backend)
        self.k_bits, self.v_bits = resolve_bits(self.kv, None, self.k_bits, self.v_bits)
        # every KV option checked now, before any model loads
        make_kv_spec(self.kv, self.k_bits, self.v_bits, self.kv_mode, self.first_token, residual=self.kv_residual)
        if self.limit is not None and self.limit < 1:
            raise InputError(f"--limit {self.limit}: expected a positive number of samples")
        if self.offset < 0:
            raise InputError(f"--offset {self.offset}: expected >= 0")
        if self.shard is not None:
            i, n = self.shard
            if not (n >= 1 and 0 <= i < n):
                raise InputError(f"--shard {i}/{n}: expected i/n with 0 <= i < n")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["judge"] = self.judge.public()
        return d


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"--shard {text!r}: expected i/n with 0 <= i < n")
    return i, n


def _predictions_path(task_dir: Path, shard: tuple[int, int] | None) -> Path:
    return task_dir / (f"predictions.shard-{shard[0]}-of-{shard[1]}.jsonl" if shard else "predictions.jsonl")


def read_predictions(path: str | Path, repair: bool = False) -> list[dict]:
    """Rows of a predictions file; a torn last line (a killed run) is skipped, and cut off when ``repair``."""
    p = Path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    rows, good_end, pos = [], 0, 0
    for line in data.split(b"\n"):
        end = pos + len(line) + 1
        if end > len(data):  # no newline: the last write did not complete
            break
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        good_end, pos = end, end
    if repair and good_end < len(data):
        with open(p, "r+b") as fh:
            fh.truncate(good_end)
    return rows


def _conversation(cfg: EvalConfig, model: Any = None) -> str:
    """The prompt format the rows are generated in, as the runtime resolves it: the loaded model's own
    (``VLMPipeline.conversation``), or, before the model loads (the settings check comes first), what its load
    will resolve (``VLMPipeline.prompt_format``). The runner reads no model files for it."""
    own = getattr(model, "conversation", None)
    if isinstance(own, str) and own:
        return own
    from kvtool.runtime import VLMPipeline

    return VLMPipeline.prompt_format(cfg.model, cfg.conversation)


def load_model(cfg: EvalConfig):
    """The real pipeline for ``cfg.model`` (an exported dir, or an HF dir with backend torch)."""
    if not cfg.model:
        raise InputError("MODEL_OR_DIR: missing; expected an exported dir or an HF checkpoint dir")
    if not Path(cfg.model).exists():
        raise FileNotFoundError(f"model {cfg.model} does not exist")
    from kvtool.runtime import VLMPipeline

    return VLMPipeline.load(cfg.model, backend=cfg.backend, device=cfg.device, kv=cfg.kv, k_bits=cfg.k_bits,
                            v_bits=cfg.v_bits, kv_mode=cfg.kv_mode, first_token=cfg.first_token,
                            conversation=cfg.conversation, kv_residual=cfg.kv_residual)  # load resolves auto


def _sample_id(idx: int, j: int, n_samples: int, seed: int, n_seeds: int) -> str:
    return str(idx) + (f".{j}" if n_samples > 1 else "") + (f"@s{seed}" if n_seeds > 1 else "")


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def task_generation(spec: TaskSpec, cfg: EvalConfig) -> dict[str, Any]:
    """The generation settings a task runs with under ``cfg`` (its defaults, the CLI's overrides applied)."""
    seeds = list(cfg.seeds) if (cfg.seeds and spec.do_sample) else list(spec.seeds)
    if not spec.do_sample:
        seeds = [cfg.seed]
    return {**spec.generation(), "max_new_tokens": cfg.max_new_tokens or spec.max_new_tokens, "seeds": seeds}


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:300] if msg else type(exc).__name__


class _RowWriter:
    """Appends rows to a predictions file, creating the task dir and recording the run's settings (once) only
    when the first row is written, so a run that fails before generating anything leaves no directory."""

    def __init__(self, path: Path, on_first_write):
        self.path, self.on_first_write, self.fh = path, on_first_write, None

    def write(self, rec: dict) -> None:
        if self.fh is None:
            self.on_first_write()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.path, "a", encoding="utf-8")
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def _drop_failed(path: Path) -> int:
    """--retry-failed: rewrite the predictions file without its failed rows; returns how many were dropped."""
    rows = read_predictions(path, repair=True)
    keep = [r for r in rows if not r.get("failed")]
    if len(keep) < len(rows):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        tmp.replace(path)
    return len(rows) - len(keep)


def failure_summary(rows: list[dict]) -> dict[str, Any]:
    """How many rows failed, and why (reason -> count, with the first few ids)."""
    failed = [r for r in rows if r.get("failed")]
    reasons: dict[str, dict[str, Any]] = {}
    for r in failed:
        e = reasons.setdefault(r["failed"], {"n": 0, "ids": []})
        e["n"] += 1
        if len(e["ids"]) < 5:
            e["ids"].append(r["id"])
    return {"n": len(failed), "reasons": reasons}


def generate_task(spec: TaskSpec, model, cfg: EvalConfig, task_dir: Path, fingerprint: str = "",
                  on_first_write=lambda: None) -> tuple[list[dict], dict]:
    """Generate (or resume) one task's predictions; returns this selection's rows and a task record.

    Every row carries ``settings`` (``fingerprint``). A sample that fails (unreadable image, processor error,
    prompt too long — any ``Exception`` from reading the row or from ``model.generate``) is written as a row
    with ``failed`` (the reason) and an empty ``prediction``, and the run goes on; failed rows are kept on
    resume (``cfg.retry_failed`` generates them again). If the first ``FAIL_GUARD`` samples of a task all fail
    and none ever succeeded, nothing is written and an ``InputError`` stops the run (a broken model or
    setting, not bad samples)."""
    from tqdm import tqdm

    rows_src, where = load_task_data(spec, cfg.data.get(spec.name), cfg.data_dir,
                                     n_rows=(cfg.offset + cfg.limit) if cfg.limit else None)
    selection, sel_record = select_rows(spec, rows_src, cfg.limit, cfg.offset, cfg.shard, read_columns)
    check_rows(spec, rows_src, selection, read_columns)
    path = _predictions_path(task_dir, cfg.shard)
    n_retry = _drop_failed(path) if cfg.retry_failed and path.is_file() else 0
    done = {r["id"]: r for r in read_predictions(path, repair=path.is_file())}
    check_row_prints(str(path), list(done.values()), fingerprint)
    gen = task_generation(spec, cfg)
    seeds, max_new = gen["seeds"], gen["max_new_tokens"]
    selected = set(selection)
    found = [r for r in done.values() if r["row"] in selected]
    if found:
        n_failed = sum(bool(r.get("failed")) for r in found)
        _say(f"{spec.name}: resuming {path}: found {len(found)} saved rows of this selection"
             + (f" ({n_failed} failed, kept; --retry-failed generates them again)" if n_failed else "")
             + (f"; {n_retry} failed rows dropped to retry" if n_retry else ""))
    planned: list[str] = []
    n_new, t0, example = 0, time.perf_counter(), None
    ever_ok = any(not r.get("failed") for r in done.values())
    pending: list[dict] = []  # failures held back until a sample succeeds (see FAIL_GUARD)
    writer = _RowWriter(path, on_first_write)

    def emit(rec: dict) -> None:
        nonlocal ever_ok
        if rec.get("failed") and not ever_ok:
            pending.append(rec)
            if len(pending) >= FAIL_GUARD:
                raise InputError(f"{spec.name}: the first {FAIL_GUARD} samples all failed ({pending[0]['failed']}); "
                                 "nothing was written: this looks like a fault of the model or the settings, "
                                 "not of the samples")
            return
        if not rec.get("failed"):
            ever_ok = True
            for p in pending:
                writer.write(p)
            pending.clear()
        writer.write(rec)

    try:
        by_row: dict[int, list[str]] = {}
        for r in done.values():
            by_row.setdefault(r["row"], []).append(r["id"])
        for idx in tqdm(selection, desc=spec.name, unit="row", disable=not cfg.progress):
            got = by_row.get(idx, [])
            first = done[got[0]] if got else {}
            if got and len(got) == first.get("row_samples") and first.get("seeds") == seeds:
                # the row is complete: resume without decoding its image again
                planned.extend(sorted(got, key=lambda sid: done[sid]["order"]))
                continue
            try:
                row, row_error = rows_src[idx], None
            except Exception as exc:  # noqa: BLE001 - an undecodable image: a failed row, not the end of the run
                row, row_error = {**row_without_images(rows_src, idx), "image": UNREADABLE}, _reason(exc)
            try:
                samples = spec.build(row)
            except InputError as exc:
                raise InputError(f"{spec.name}: row {idx}: {str(exc).splitlines()[0]}") from None
            for j, s in enumerate(samples):
                example = example or s.prompt
                for seed in seeds:
                    sid = _sample_id(idx, j, len(samples), seed, len(seeds))
                    planned.append(sid)
                    if sid in done:
                        continue
                    rec = {"id": sid, "task": spec.name, "row": idx, "seed": seed,
                           "row_samples": len(samples) * len(seeds), "seeds": seeds,
                           "order": j * len(seeds) + seeds.index(seed), "settings": fingerprint,
                           "prompt": s.prompt, **_jsonable(s.ref)}
                    failed = row_error
                    if failed is None:
                        try:
                            out = model.generate(s.image, s.prompt, max_new_tokens=max_new,
                                                 do_sample=gen["do_sample"], temperature=gen["temperature"],
                                                 top_p=gen["top_p"], seed=seed, text_only=s.image is None)
                        except Exception as exc:  # noqa: BLE001 - any per-sample failure becomes a failed row
                            failed = _reason(exc)
                    if failed is None:
                        rec.update(prediction=out.text, new_tokens=len(getattr(out, "token_ids", []) or []),
                                   stats=_jsonable(getattr(out, "stats", {}) or {}))
                    else:
                        rec.update(prediction="", failed=failed, new_tokens=0, stats={})
                    emit(rec)
                    done[sid] = rec
                    n_new += 1
        for p in pending:  # fewer than FAIL_GUARD samples in all, every one failed: they are results
            writer.write(p)
        pending.clear()
    finally:
        writer.close()
    rows = [done[sid] for sid in planned]
    record = {"version": spec.version, "data": where, "n_rows_in_data": len(rows_src), "selection": sel_record,
              "n_samples": len(rows),
              "n_found_at_start": len(found), "n_generated_now": n_new, "settings": fingerprint,
              "failed": failure_summary(rows),
              "generation": {**gen, "max_new_tokens": max_new, "seeds": seeds}, "prompt_example": example,
              "predictions": str(path.relative_to(task_dir.parent)),
              "timing": {"generate_s": time.perf_counter() - t0, **_timing(rows)}}
    return rows, record


def _timing(rows: list[dict]) -> dict[str, float]:
    stats = [r.get("stats") or {} for r in rows]
    out = {}
    for key in ("prefill_ms", "decode_ms_per_token", "tokens_per_s", "kv_bytes", "kv_fp16_bytes"):
        vals = [float(s[key]) for s in stats if isinstance(s.get(key), (int, float))]
        if vals:
            out[f"mean_{key}"] = sum(vals) / len(vals)
    return out


def _wrong_reply(r: dict) -> str:
    answer = str(r.get("answer", "")).strip().lower()
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    if "gt_answer" in r:  # HallusionBench: 1 = yes
        return "No" if str(r["gt_answer"]).strip() == "1" else "Yes"
    return ""


def as_scored(rows: list[dict]) -> list[dict]:
    """Copies of prediction rows as the metrics read them: a failed row (no reply) counts as a wrong reply —
    where the reference is yes/no (POPE, MME, HallusionBench, shapes' yes/no questions) the opposite answer,
    because LLaVA's POPE rule reads an empty reply as "yes" and HallusionBench's rule scores it "uncertain";
    elsewhere the empty reply, which every other task's scorer counts as wrong or unparsed (VQA/GQA exact and
    soft match, ScienceQA and PAIRS unparsed, MME "other"). The saved row keeps its empty prediction."""
    out = []
    for r in rows:
        r = dict(r)
        if r.get("failed"):
            r["prediction"] = _wrong_reply(r)
        out.append(r)
    return out


def score_task(spec: TaskSpec, rows: list[dict], judge: JudgeConfig | None, task_dir: Path) -> dict[str, Any]:
    """Judges (cached in the task dir), then the task's metrics; failed rows count as wrong (``as_scored``)."""
    rows = as_scored(rows)
    notes = apply_judges(spec, rows, judge, JudgeCache(task_dir / "judgements.jsonl"))
    metrics = task_metrics(spec, rows)
    metrics["failed"] = sum(bool(r.get("failed")) for r in rows)
    if notes:
        metrics["judge_notes"] = notes
    return metrics


def _pipeline_info(model) -> dict[str, Any] | None:
    info = getattr(model, "info", None)
    return _jsonable(info()) if callable(info) else None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


class EvalInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``run_eval``; its message says how many rows are saved and that the same command resumes."""


def _count_rows(path: Path) -> int:
    return len(read_predictions(path)) if path.is_file() else 0


def _interrupted_message(cfg: EvalConfig, specs: list[TaskSpec], out: Path) -> str:
    per = [(s.name, _count_rows(_predictions_path(out / s.name, cfg.shard))) for s in specs]
    total = sum(n for _, n in per)
    where = ", ".join(f"{t} {n}" for t, n in per)
    return (f"interrupted: {total} rows are saved in {out} ({where}); run the same command again to resume "
            "(saved rows are not generated again)")


def run_eval(cfg: EvalConfig, model=None) -> dict[str, Any]:
    """Run (or resume) every task of ``cfg``; returns the results dict also written to results.json
    (``results.shard-i-of-n.json`` for a shard). ``model`` defaults to ``VLMPipeline.load`` of cfg.model.

    Before anything is loaded the run's settings (``kvtool.evals.settings``) are checked against those recorded
    in ``cfg.output``: a different model, scheme, bits, … raises ``InputError`` naming the setting. Nothing is
    created on disk until the first row is written. Ctrl-C raises ``EvalInterrupted`` (a KeyboardInterrupt)
    saying how many rows are saved."""
    from kvtool import __version__
    from kvtool.memory import peak_rss_bytes

    specs = parse_tasks(cfg.tasks)
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out}: is a file; expected a run directory (new, or one kvtool eval wrote)")
    run_set = run_settings(cfg, _conversation(cfg, model))
    task_sets = {s.name: task_settings(s, task_generation(s, cfg)) for s in specs}
    for s in specs:
        task_sets[s.name]["fingerprint"] = fingerprint(run_set, task_sets[s.name])
    has_rows = {s.name: any(f.stat().st_size > 0 for f in (out / s.name).glob("predictions*.jsonl"))
                for s in specs}
    check_settings(out, run_set, task_sets, has_rows)
    recorded = {"done": False}

    def record_once() -> None:
        if not recorded["done"]:
            out.mkdir(parents=True, exist_ok=True)
            check_and_record(out, run_set, task_sets, has_rows)
            recorded["done"] = True

    t0 = time.perf_counter()
    try:
        if model is None:
            model = load_model(cfg)
        results: dict[str, Any] = {"kvtool_version": __version__,
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "config": cfg.to_json(), "settings": {"run": run_set, "tasks": task_sets},
                                   "pipeline": _pipeline_info(model), "versions": library_versions(), "tasks": {}}
        for spec in specs:
            rows, record = generate_task(spec, model, cfg, out / spec.name, task_sets[spec.name]["fingerprint"],
                                         record_once)
            record["metrics"] = score_task(spec, rows, cfg.judge, out / spec.name)
            results["tasks"][spec.name] = record
    except KeyboardInterrupt:
        raise EvalInterrupted(_interrupted_message(cfg, specs, out)) from None
    results["timing"] = {"total_s": time.perf_counter() - t0}
    results["memory"] = {"peak_rss_bytes": peak_rss_bytes()}  # this process's own high-water mark
    record_once()
    name = f"results.shard-{cfg.shard[0]}-of-{cfg.shard[1]}.json" if cfg.shard else RESULTS
    _write_json(out / name, results)
    return results


def run_dir_path(run_dir: str | Path, what: str = "run directory") -> Path:
    """``run_dir`` as a ``Path`` when it is an existing directory; else one line naming it: a missing path
    raises ``FileNotFoundError``, a file ``InputError`` (the commands over run directories: eval merge / rescore,
    compare, report, submission; an output directory: ``-o``)."""
    p = Path(run_dir)
    if not p.exists():
        raise FileNotFoundError(f"{what} {p}: does not exist (expected a run directory written by kvtool eval -o)")
    if not p.is_dir():
        raise InputError(f"{what} {p}: is a file, not a directory (expected a run directory written by kvtool "
                         f"eval -o)")
    return p


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """The results.json of ``run_dir`` (or ``run_dir`` itself when it is that file); ``FileNotFoundError`` naming
    a missing path or a directory without results.json, ``InputError`` for a file that is not valid JSON."""
    p = Path(run_dir)
    p = p if p.is_file() else run_dir_path(p) / RESULTS
    if not p.is_file():
        raise FileNotFoundError(f"no {RESULTS} at {p} (run kvtool eval, or kvtool eval merge RUN_DIR for shards)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not valid JSON ({exc.msg})") from exc


def task_rows(run_dir: str | Path, task: str) -> list[dict]:
    """The saved prediction rows of one task of a run."""
    p = run_dir_path(run_dir) / task / "predictions.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no predictions for task {task} at {p}")
    return read_predictions(p)


def _expected_print(run: Path, task: str, parts: list[dict]) -> str:
    """The fingerprint a task's rows must carry: the one in settings.json, else the first shard's record."""
    rec = (read_settings(run) or {}).get("tasks", {}).get(task, {}).get("fingerprint")
    rec = rec or parts[0]["tasks"].get(task, {}).get("settings")
    if rec is None:
        raise InputError(f"{run}: task {task} has no recorded settings (an older kvtool); its shards cannot be "
                         "checked for mixed settings")
    return rec


def merge_shards(run_dir: str | Path, judge: JudgeConfig | None = None) -> dict[str, Any]:
    """Join ``predictions.shard-*`` files into ``predictions.jsonl`` (one row per id), score, write results.json."""
    run = run_dir_path(run_dir)
    shard_results = sorted(run.glob("results.shard-*-of-*.json"))
    if not shard_results:
        raise FileNotFoundError(f"no results.shard-*-of-*.json in {run}; run kvtool eval --shard i/n first")
    parts = [json.loads(p.read_text(encoding="utf-8")) for p in shard_results]
    n = {int(p.name.split("-of-")[1].split(".")[0]) for p in shard_results}
    if len(n) != 1 or len(shard_results) != n.pop():
        raise InputError(f"{run}: shards {[p.name for p in shard_results]} are not one complete i/n set")
    base = parts[0]
    results = {**base, "tasks": {}, "merged_from": [p.name for p in shard_results]}
    results["config"] = {**base["config"], "shard": None}
    for task in base["tasks"]:
        spec = get_task(task)
        rows: dict[str, dict] = {}
        for f in sorted((run / task).glob("predictions.shard-*-of-*.jsonl")):
            for r in read_predictions(f):
                rows.setdefault(r["id"], r)
        ordered = sorted(rows.values(), key=lambda r: (r["row"], r["id"]))
        check_row_prints(f"{run / task} (shards)", ordered, _expected_print(run, task, parts))
        with open(run / task / "predictions.jsonl", "w", encoding="utf-8") as fh:
            for r in ordered:
                fh.write(json.dumps(r) + "\n")
        record = {**base["tasks"][task], "n_samples": len(ordered), "predictions": f"{task}/predictions.jsonl",
                  "failed": failure_summary(ordered)}
        record["timing"] = {"generate_s": sum(p["tasks"][task]["timing"]["generate_s"] for p in parts),
                            **_timing(ordered)}
        record["metrics"] = score_task(spec, ordered, judge or JudgeConfig(**{
            k: v for k, v in base["config"].get("judge", {}).items() if k in JudgeConfig.__dataclass_fields__}),
            run / task)
        results["tasks"][task] = record
    _write_json(run / RESULTS, results)
    return results


def rescore(run_dir: str | Path, judge: JudgeConfig | None = None, tasks: Iterable[str] | None = None
            ) -> dict[str, Any]:
    """Recompute metrics from saved predictions (calling the configured judges); updates results.json."""
    run = run_dir_path(run_dir)
    results = load_results(run)
    for task in list(tasks or results["tasks"]):
        spec = get_task(task)
        results["tasks"].setdefault(task, {})["metrics"] = score_task(spec, task_rows(run, task), judge, run / task)
    results["rescored"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "judge": (judge or JudgeConfig()).public()}
    _write_json(run / RESULTS, results)
    return results
