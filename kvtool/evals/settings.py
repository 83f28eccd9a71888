"""What produced a run directory: the settings that change its predictions, their fingerprint, and the check
that refuses to add rows made under other settings to it.

A run directory holds ``settings.json``::

    {"format": 1,
     "run": {"model": "/abs/path", "model_hash": "…", "backend": "openvino", "weight_bits": 4, "kv": "uniform",
             "k_bits": 2, "v_bits": 2, "kv_mode": "packed", "first_token": "compressed", "kv_residual": null,
             "conversation": "vicuna_v1"},
     "tasks": {"pope": {"task_version": 1, "max_new_tokens": 128, "seeds": [0], "do_sample": false, ...,
                        "fingerprint": "3f2a…"}}}

and every prediction row carries its task's ``fingerprint`` (``settings``). Settings that do not change a
prediction (``--limit``, ``--offset``, ``--shard``, ``-o``, progress, judges) are not part of it, so
``--limit 1300`` after ``--limit 1200`` resumes and adds 100 rows. Settings that do not act for a scheme are
normalised away (bits, mode and first token of ``fp16``) so two spellings of one run are one run.

``model_hash`` is a cheap identity of the model directory, not a full content hash (a 7B checkpoint would
take a minute to read): sha256 over every file's relative name and size, the whole of each file under
1 MiB (configs, the manifest, tokenizer files) and the first and last MiB of larger ones (weights). It
changes when a model is re-exported, re-quantized or retrained.

It does not run anything or read predictions (``runner``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kvtool.errors import InputError

SETTINGS = "settings.json"
SETTINGS_FORMAT = 1
_SMALL = 1 << 20

# settings key -> how the CLI names it (for the one-line refusal)
FLAG_NAMES = {"model": "MODEL_OR_DIR", "model_hash": "the model's files (model_hash)", "backend": "--backend",
              "weight_bits": "weight bits (--wbits / the export's manifest)", "kv": "--kv", "k_bits": "--k-bits",
              "v_bits": "--v-bits", "kv_mode": "--kv-mode", "first_token": "--first-token",
              "kv_residual": "--kv-residual", "conversation": "--conversation", "task_version": "the task version",
              "max_new_tokens": "--max-new-tokens", "seeds": "--seeds / --seed", "do_sample": "sampling",
              "temperature": "temperature", "top_p": "top_p"}


def model_hash(path: str | Path | None) -> str | None:
    """The cheap identity of a model directory (see the module docstring); None when there is no such path."""
    if not path:
        return None
    root = Path(path)
    if not root.exists():
        return None
    files = [root] if root.is_file() else sorted(
        f for f in root.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(root).parts))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= _SMALL:
                h.update(fh.read())
            else:
                h.update(fh.read(_SMALL))
                fh.seek(size - _SMALL)
                h.update(fh.read(_SMALL))
    return h.hexdigest()


def _manifest(path: Path) -> dict[str, Any] | None:
    f = path / "kvtool.json"
    if f.is_file():
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None
    return None


def _backend(cfg: Any, manifest: dict[str, Any] | None) -> str:
    want = {"onnx": "onnxruntime"}.get(str(cfg.backend), str(cfg.backend))
    if want != "auto":
        return want
    if manifest is not None:
        return {"onnx": "onnxruntime"}.get(manifest.get("backend"), manifest.get("backend") or "auto")
    return "torch" if cfg.model and (Path(cfg.model) / "config.json").is_file() else "auto"


def run_settings(cfg: Any, conversation: str) -> dict[str, Any]:
    """The run-level settings of an ``EvalConfig`` that change predictions; ``conversation`` resolved."""
    path = Path(cfg.model).resolve() if cfg.model else None
    manifest = _manifest(path) if path is not None and path.is_dir() else None
    wbits = ((manifest or {}).get("weights") or {}).get("bits", cfg.wbits)
    kv = str(cfg.kv).strip().lower()
    quantizes = kv not in ("fp16", "ov-u8", "ov-u4")
    try:  # the canonical scheme name, so that two spellings of one scheme are one setting
        from kvtool.quant_ops import parse_scheme

        kv = str(parse_scheme(kv)) if quantizes else kv
    except ValueError:
        pass  # the pipeline refuses it with its own message
    return {"model": str(path) if path else None, "model_hash": model_hash(path), "backend": _backend(cfg, manifest),
            "weight_bits": wbits, "kv": kv,
            "k_bits": cfg.k_bits if quantizes else None, "v_bits": cfg.v_bits if quantizes else None,
            "kv_mode": cfg.kv_mode if kv != "fp16" else None,
            "first_token": cfg.first_token if kv != "fp16" else None,
            "kv_residual": (getattr(cfg, "kv_residual", None) or None) if kv != "fp16" else None,  # 0: no window
            "conversation": conversation}


def task_settings(spec: Any, generation: dict[str, Any]) -> dict[str, Any]:
    """A task's own settings: its version (``TaskSpec.version``, so a changed prompt or score never mixes with
    rows made before) and the generation settings the rows were made with."""
    return {"task_version": int(spec.version), "max_new_tokens": generation["max_new_tokens"],
            "seeds": list(generation["seeds"]), "do_sample": generation["do_sample"],
            "temperature": generation["temperature"] if generation["do_sample"] else None,
            "top_p": generation["top_p"] if generation["do_sample"] else None}


def fingerprint(run: dict[str, Any], task: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the non-null settings (a setting added later as null keeps old prints)."""
    both = {k: v for k, v in {**run, **{f"task.{k}": v for k, v in task.items()}}.items()
            if v is not None and k != "fingerprint"}
    return hashlib.sha256(json.dumps(both, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _shown(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, str) and len(v) > 16 and all(c in "0123456789abcdef" for c in v):
        return v[:12] + "…"
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first setting (in the new record's order) whose value differs; a missing key counts as null."""
    for key in list(new) + [k for k in old if k not in new]:
        if key != "fingerprint" and old.get(key) != new.get(key):
            return key, old.get(key), new.get(key)
    return None


def refusal(run_dir: Path, where: str, diff: tuple[str, Any, Any]) -> InputError:
    key, old, new = diff
    return InputError(f"{run_dir}: {where}was made with {FLAG_NAMES.get(key, key)} {_shown(old)}, this run asks for "
                      f"{_shown(new)}; use another -o (a run never mixes settings) or delete {run_dir}")


def read_settings(run_dir: str | Path) -> dict[str, Any] | None:
    p = Path(run_dir) / SETTINGS
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not valid JSON ({exc.msg}); expected the settings kvtool eval wrote") from None


def check_settings(run_dir: Path, run: dict[str, Any], tasks: dict[str, dict[str, Any]],
                   has_rows: dict[str, bool]) -> dict[str, Any] | None:
    """Refuse (``InputError`` naming the first differing setting) when ``run_dir`` was made under other
    settings; reads only. ``has_rows[task]``: the task dir already holds predictions, which a run dir without
    ``settings.json`` (an older kvtool, a copied folder) cannot vouch for. Returns the recorded settings."""
    old = read_settings(run_dir)
    if old is None:
        stale = [t for t, yes in has_rows.items() if yes]
        if stale:
            raise InputError(f"{run_dir}: {stale[0]} holds predictions without recorded settings (an older kvtool "
                             f"or a copied folder), so this run cannot tell whether they match; use another -o")
        return None
    diff = first_difference(old.get("run", {}), run)
    if diff:
        raise refusal(run_dir, "", diff)
    for name, ts in tasks.items():
        prev = old.get("tasks", {}).get(name)
        if prev is not None:
            diff = first_difference(prev, ts)
            if diff:
                raise refusal(run_dir, f"task {name} ", diff)
    return old


def check_and_record(run_dir: Path, run: dict[str, Any], tasks: dict[str, dict[str, Any]],
                     has_rows: dict[str, bool]) -> dict[str, Any]:
    """``check_settings``, then write (or extend with new tasks) ``run_dir/settings.json``."""
    old = check_settings(run_dir, run, tasks, has_rows) or {"tasks": {}}
    record = {"format": SETTINGS_FORMAT, "run": run, "tasks": {**old.get("tasks", {}), **tasks}}
    tmp = run_dir / f"{SETTINGS}.{os.getpid()}.tmp"  # shards of one run may write at the same time
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(run_dir / SETTINGS)
    return record


def check_row_prints(where: str, rows: list[dict], expected: str) -> None:
    """Refuse rows whose ``settings`` fingerprint is not ``expected`` (rows from another run)."""
    for r in rows:
        got = r.get("settings")
        if got != expected:
            raise InputError(f"{where}: row {r.get('id')!r} was made under settings {got or 'not recorded'}, "
                             f"the run's are {expected}; a run never mixes settings")
