"""The eval runner: tasks x model -> ``predictions.jsonl`` (appended and flushed per sample) and ``results.json``.

``run_eval(EvalConfig)`` loads each task's rows, builds the prompts, asks the model (anything with
``generate(image, prompt, max_new_tokens=, do_sample=, temperature=, top_p=, seed=, text_only=)`` returning an
object with ``.text`` — ``kvtool.runtime.VLMPipeline`` by default), writes one JSON line per sample and scores
the task. A re-run of the same command resumes: rows already in the file are skipped, a torn last line from a
killed run is cut off, so no row is lost or duplicated. ``--shard i/n`` writes ``predictions.shard-i-of-n.jsonl``
and ``merge_shards`` joins them; ``rescore`` recomputes metrics (calling the judges) from saved predictions.

Layout of a run directory::

    runs/NAME/results.json                 # config, generation settings, pipeline info, metrics per task
    runs/NAME/<task>/predictions.jsonl     # one row per sample: id, prompt, prediction, reference fields, stats
    runs/NAME/<task>/judgements.jsonl      # judge replies cache

It does not define metrics (``tasks`` / ``metrics``) or compare runs (``compare``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.evals.judges import JudgeCache, JudgeConfig, apply_judges
from kvtool.evals.loaders import load_task_data
from kvtool.evals.tasks import TaskSpec, get_task, parse_tasks, task_metrics
from kvtool.versions import library_versions

RESULTS = "results.json"


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


def _conversation(cfg: EvalConfig) -> str:
    if cfg.conversation != "auto":
        return cfg.conversation
    root = Path(cfg.model or "")
    for name, key in (("kvtool.json", "architecture"), ("config.json", "model_type")):
        f = root / name
        if f.is_file():
            try:
                if json.loads(f.read_text()).get(key) == "llava":
                    return "vicuna_v1"
            except json.JSONDecodeError:
                pass
            return "chat_template"
    return "chat_template"


def load_model(cfg: EvalConfig):
    """The real pipeline for ``cfg.model`` (an exported dir, or an HF dir with backend torch)."""
    if not cfg.model:
        raise InputError("MODEL_OR_DIR: missing; expected an exported dir or an HF checkpoint dir")
    if not Path(cfg.model).exists():
        raise FileNotFoundError(f"model {cfg.model} does not exist")
    from kvtool.runtime import VLMPipeline

    return VLMPipeline.load(cfg.model, backend=cfg.backend, device=cfg.device, kv=cfg.kv, k_bits=cfg.k_bits,
                            v_bits=cfg.v_bits, kv_mode=cfg.kv_mode, first_token=cfg.first_token,
                            conversation=_conversation(cfg), kv_residual=cfg.kv_residual)


def _sample_id(idx: int, j: int, n_samples: int, seed: int, n_seeds: int) -> str:
    return str(idx) + (f".{j}" if n_samples > 1 else "") + (f"@s{seed}" if n_seeds > 1 else "")


def _selection(n: int, cfg: EvalConfig) -> list[int]:
    end = n if cfg.limit is None else min(n, cfg.offset + cfg.limit)
    idx = list(range(min(cfg.offset, n), end))
    if cfg.shard:
        i, k = cfg.shard
        idx = [x for x in idx if x % k == i]
    return idx


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


def generate_task(spec: TaskSpec, model, cfg: EvalConfig, task_dir: Path) -> tuple[list[dict], dict]:
    """Generate (or resume) one task's predictions; returns this selection's rows and a task record."""
    from tqdm import tqdm

    rows_src, where = load_task_data(spec, cfg.data.get(spec.name), cfg.data_dir,
                                     n_rows=(cfg.offset + cfg.limit) if cfg.limit else None)
    task_dir.mkdir(parents=True, exist_ok=True)
    path = _predictions_path(task_dir, cfg.shard)
    done = {r["id"]: r for r in read_predictions(path, repair=True)}
    seeds = list(cfg.seeds) if (cfg.seeds and spec.do_sample) else list(spec.seeds)
    if not spec.do_sample:
        seeds = [cfg.seed]
    gen = spec.generation()
    max_new = cfg.max_new_tokens or spec.max_new_tokens
    selection = _selection(len(rows_src), cfg)
    planned: list[str] = []
    n_new, t0, example = 0, time.perf_counter(), None
    with open(path, "a", encoding="utf-8") as fh:
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
            samples = spec.build(rows_src[idx])
            for j, s in enumerate(samples):
                example = example or s.prompt
                for seed in seeds:
                    sid = _sample_id(idx, j, len(samples), seed, len(seeds))
                    planned.append(sid)
                    if sid in done:
                        continue
                    out = model.generate(s.image, s.prompt, max_new_tokens=max_new, do_sample=gen["do_sample"],
                                         temperature=gen["temperature"], top_p=gen["top_p"], seed=seed,
                                         text_only=s.image is None)
                    rec = {"id": sid, "task": spec.name, "row": idx, "seed": seed,
                           "row_samples": len(samples) * len(seeds), "seeds": seeds,
                           "order": j * len(seeds) + seeds.index(seed),
                           "prompt": s.prompt,
                           "prediction": out.text, **_jsonable(s.ref),
                           "new_tokens": len(getattr(out, "token_ids", []) or []),
                           "stats": _jsonable(getattr(out, "stats", {}) or {})}
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                    done[sid] = rec
                    n_new += 1
    rows = [done[sid] for sid in planned]
    record = {"data": where, "n_rows_in_data": len(rows_src), "n_samples": len(rows), "n_generated_now": n_new,
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


def score_task(spec: TaskSpec, rows: list[dict], judge: JudgeConfig | None, task_dir: Path) -> dict[str, Any]:
    """Judges (cached in the task dir), then the task's metrics."""
    rows = [dict(r) for r in rows]
    notes = apply_judges(spec.name, rows, judge, JudgeCache(task_dir / "judgements.jsonl"))
    metrics = task_metrics(spec, rows)
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


def run_eval(cfg: EvalConfig, model=None) -> dict[str, Any]:
    """Run (or resume) every task of ``cfg``; returns the results dict also written to results.json
    (``results.shard-i-of-n.json`` for a shard). ``model`` defaults to ``VLMPipeline.load`` of cfg.model."""
    from kvtool import __version__

    specs = parse_tasks(cfg.tasks)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if model is None:
        model = load_model(cfg)
    results: dict[str, Any] = {"kvtool_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime()),
                               "config": cfg.to_json(), "pipeline": _pipeline_info(model),
                               "versions": library_versions(), "tasks": {}}
    for spec in specs:
        rows, record = generate_task(spec, model, cfg, out / spec.name)
        record["metrics"] = score_task(spec, rows, cfg.judge, out / spec.name)
        results["tasks"][spec.name] = record
    results["timing"] = {"total_s": time.perf_counter() - t0}
    name = f"results.shard-{cfg.shard[0]}-of-{cfg.shard[1]}.json" if cfg.shard else RESULTS
    _write_json(out / name, results)
    return results


def load_results(run_dir: str | Path) -> dict[str, Any]:
    p = Path(run_dir)
    p = p if p.is_file() else p / RESULTS
    if not p.is_file():
        raise FileNotFoundError(f"no {RESULTS} at {p} (run kvtool eval, or kvtool eval --merge for shards)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not valid JSON ({exc.msg})") from exc


def task_rows(run_dir: str | Path, task: str) -> list[dict]:
    """The saved prediction rows of one task of a run."""
    p = Path(run_dir) / task / "predictions.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no predictions for task {task} at {p}")
    return read_predictions(p)


def merge_shards(run_dir: str | Path, judge: JudgeConfig | None = None) -> dict[str, Any]:
    """Join ``predictions.shard-*`` files into ``predictions.jsonl`` (one row per id), score, write results.json."""
    run = Path(run_dir)
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
        with open(run / task / "predictions.jsonl", "w", encoding="utf-8") as fh:
            for r in ordered:
                fh.write(json.dumps(r) + "\n")
        record = {**base["tasks"][task], "n_samples": len(ordered), "predictions": f"{task}/predictions.jsonl"}
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
    run = Path(run_dir)
    results = load_results(run)
    for task in list(tasks or results["tasks"]):
        spec = get_task(task)
        results["tasks"].setdefault(task, {})["metrics"] = score_task(spec, task_rows(run, task), judge, run / task)
    results["rescored"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "judge": (judge or JudgeConfig()).public()}
    _write_json(run / RESULTS, results)
    return results
