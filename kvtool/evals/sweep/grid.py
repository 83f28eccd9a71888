"""A sweep's grid file (TOML): parsed, checked in full, and expanded into cells and units.

A **cell** is one model setting x one KV setting (a run directory); a **unit** is one cell x one task x one
shard (one call of the eval runner). Everything is checked before any unit runs: every error is one line
``GRID: key: what was wrong; what was expected`` (an ``InputError``, exit code 2 on the command line).

Grid file, every key but ``tasks``, ``[models.*]`` and ``[reference]`` optional::

    tasks = ["shapes"]             # kvtool ls tasks
    limit = 300                    # dataset rows per task (default: all)
    limits = { vqav2 = 5000 }      # per-task limits over `limit`
    offset = 0
    shards = 2                     # units per cell and task (interleaved rows, kvtool eval --shard i/n)
    seed = 0                       # greedy tasks
    seeds = [0, 1, 2]              # sampled tasks (PAIRS, SocialCF)
    max_new_tokens = 16            # overrides every task's default
    data_dir = "data/"             # <task>/ local copies; relative paths are relative to this file
    data = { textvqa = "data/textvqa" }
    kv_mode = "packed"             # or a list: ["packed", "simulate"]
    first_token = "compressed"     # or ["compressed", "fp"]
    conversation = "auto"
    device = "auto"                # not part of a cell's identity
    cpus_per_unit = 1              # Ray resources of a unit
    gpus_per_torch_unit = 0        # 1: torch-reference units ask Ray for a GPU (run on a GPU node)

    [models.ref]                   # one entry per model x weight setting
    path = "llava-1.5-7b-hf/"      # HF checkpoint (backend torch: the reference), an exported dir, or a
                                   # bundled model's name (kvtool-shapes)
    backend = "torch"              # openvino | onnxruntime | torch | auto
    wbits = 16                     # label for reports (an export's manifest says it otherwise)

    [models.w4]
    path = "exports/llava-w4/"
    backend = "openvino"

    [reference]                    # the cell every other cell is compared with
    model = "ref"
    kv = "fp16"                    # default fp16

    [[kv]]                         # each [[kv]] block: schemes x bit settings, for its models
    models = ["w4"]                # default: every model
    schemes = ["fp16", "uniform", "or2", "g-KC128VT128"]
    bits = [4, 2]                  # K = V; or pairs = ["k4v2", "k3v2"]; or k_bits = [..] x v_bits = [..]

``fp16`` takes no bits (one cell); ``ov-u8`` / ``ov-u4`` only 8 / 4. The judge's API key never goes in a grid
(``KVTOOL_JUDGE_KEY`` in the environment); ``[judge]`` may name ``url``, ``model``, ``mmvet_runs`` and the
toxicity / word-list settings. This module runs nothing and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.quant_ops.schemes import QUANT_BITS

KV_BITS = QUANT_BITS  # the bits a run accepts (quant_ops.schemes, the one source)
TOP_KEYS = {"tasks", "limit", "limits", "offset", "shards", "seed", "seeds", "max_new_tokens", "data_dir", "data", "kv_mode",
            "first_token", "conversation", "device", "cpus_per_unit", "gpus_per_torch_unit", "models", "reference",
            "kv", "judge"}
MODEL_KEYS = {"path", "backend", "wbits"}
KV_KEYS = {"models", "schemes", "bits", "pairs", "k_bits", "v_bits"}
JUDGE_KEYS = {"url", "model", "mmvet_runs", "timeout_s", "toxicity_model", "toxicity_url", "competence_words",
              "stereotype_words"}
SECRET_KEYS = {"key", "api_key", "token", "password"}
BACKENDS = ("auto", "openvino", "onnxruntime", "torch")
# settings of a cell that decide its rows; a run directory holding other values is refused (never mixed)
IDENTITY = ("model", "path", "model_fingerprint", "backend", "wbits", "kv", "k_bits", "v_bits", "kv_mode",
            "first_token", "conversation", "limit", "limits", "offset", "seed", "seeds", "max_new_tokens", "shards",
            "data", "data_dir")
_PAIR = re.compile(r"k([0-9]+)v([0-9]+)")


@dataclass(frozen=True)
class Cell:
    """One run directory's settings (``IDENTITY`` fields) plus its name and the tasks it runs."""

    name: str
    model: str  # key in [models]
    path: str
    model_fingerprint: str
    backend: str
    wbits: int | None
    kv: str
    k_bits: int
    v_bits: int
    kv_mode: str
    first_token: str
    conversation: str
    limit: int | None
    limits: dict[str, int]  # per task, over ``limit``
    offset: int
    seed: int
    seeds: list[int] | None
    max_new_tokens: int | None
    shards: int
    data: dict[str, str]
    data_dir: str | None
    tasks: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in IDENTITY}


@dataclass(frozen=True)
class Unit:
    """One call of the eval runner: ``cell`` x ``task`` x shard ``shard`` of ``n_shards``."""

    cell: str
    task: str
    shard: int
    n_shards: int

    @property
    def key(self) -> str:
        return f"{self.cell}/{self.task}/{self.shard}-of-{self.n_shards}"


@dataclass
class Grid:
    """A checked grid: its cells (reference first), tasks and run options."""

    source: str
    cells: list[Cell]
    reference: str  # cell name
    tasks: list[str]
    device: str = "auto"
    cpus_per_unit: float = 1.0
    gpus_per_torch_unit: float = 0.0
    judge: dict[str, Any] = field(default_factory=dict)

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)

    def units(self) -> list[Unit]:
        return [Unit(c.name, t, i, c.shards) for c in self.cells for t in c.tasks for i in range(c.shards)]


def _err(src: str, key: str, msg: str) -> InputError:
    return InputError(f"{src}: {key}: {msg}")


def _int(src: str, key: str, v: Any, lo: int = 0, none_ok: bool = True) -> int | None:
    if v is None and none_ok:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _err(src, key, f"expected an integer >= {lo}, got {v!r}")
    return v


def _per_task_table(src: str, raw: dict, key: str, tasks: list[str], shape: str) -> dict:
    """``raw[key]`` (default empty): a table keyed by the grid's tasks, e.g. ``[limits]``; its values are the
    caller's to check. Raises InputError naming the key for another type or an unknown task."""
    table = raw.get(key, {})
    if not isinstance(table, dict):
        raise _err(src, key, f"expected a table {shape}")
    for t in table:
        if t not in tasks:
            raise _err(src, f"{key}.{t}", f"not one of the grid's tasks ({', '.join(tasks)})")
    return table


def _str_list(src: str, key: str, v: Any) -> list[str]:
    vals = [v] if isinstance(v, str) else v
    if not isinstance(vals, list) or not vals or not all(isinstance(x, str) and x.strip() for x in vals):
        raise _err(src, key, f"expected a string or a non-empty list of strings, got {v!r}")
    return [x.strip() for x in vals]


def _unknown(src: str, where: str, table: dict, allowed: set[str]) -> None:
    for k in table:
        if k in SECRET_KEYS:
            raise _err(src, f"{where}{k}", "secrets do not go in a grid file; set KVTOOL_JUDGE_KEY (or "
                                           "OPENAI_API_KEY) in the environment of the driver")
        if k not in allowed:
            raise _err(src, f"{where}{k}", f"unknown key; expected one of {', '.join(sorted(allowed))}")


def model_fingerprint(path: Path) -> str:
    """A cheap fingerprint of a model directory: its manifest / config files' bytes and its weight files'
    names and sizes (a re-export or other weights change it; hashing gigabytes of weights is avoided)."""
    h = hashlib.sha256()
    for name in ("kvtool.json", "config.json"):
        if (path / name).is_file():
            h.update(name.encode() + (path / name).read_bytes())
    for f in sorted(path.glob("*")):
        if f.suffix in (".safetensors", ".bin", ".onnx", ".data"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _bit_settings(src: str, where: str, block: dict) -> list[tuple[int, int]]:
    given = [k for k in ("bits", "pairs", "k_bits") if k in block]
    if "v_bits" in block and "k_bits" not in block:
        raise _err(src, f"{where}v_bits", "needs k_bits beside it (K x V bit product)")
    if len(given) > 1:
        raise _err(src, where.rstrip("."), f"give one of bits, pairs or k_bits/v_bits, not {' and '.join(given)}")
    if not given:
        return []

    def bit(key: str, b: Any) -> int:
        if isinstance(b, bool) or b not in KV_BITS:
            raise _err(src, f"{where}{key}", f"{b!r} is not a KV bit width; expected one of {', '.join(map(str, KV_BITS))}")
        return int(b)

    def blist(key: str) -> list[Any]:
        v = block[key]
        if not isinstance(v, list) or not v:
            raise _err(src, f"{where}{key}", f"expected a non-empty list, got {v!r}")
        return v

    if "bits" in block:
        return [(bit("bits", b), bit("bits", b)) for b in blist("bits")]
    if "pairs" in block:
        out = []
        for p in blist("pairs"):
            m = _PAIR.fullmatch(str(p).strip().lower())
            if not m:
                raise _err(src, f"{where}pairs", f"{p!r}: expected K/V bits written like k4v2")
            out.append((bit("pairs", int(m.group(1))), bit("pairs", int(m.group(2)))))
        return out
    ks = [bit("k_bits", b) for b in blist("k_bits")]
    vs = [bit("v_bits", b) for b in blist("v_bits")] if "v_bits" in block else ks
    return [(k, v) for k in ks for v in vs]


def _kv_settings(src: str, where: str, block: dict) -> list[tuple[str, int, int]]:
    """(canonical scheme, k_bits, v_bits) of one [[kv]] block; fp16 -> (fp16, 16, 16)."""
    from kvtool.quant_ops import parse_scheme

    schemes = _str_list(src, f"{where}schemes", block.get("schemes"))
    bits = _bit_settings(src, where, block)
    out: list[tuple[str, int, int]] = []
    for s in schemes:
        try:
            spec = parse_scheme(s)
        except ValueError as exc:
            raise _err(src, f"{where}schemes", str(exc).splitlines()[0]) from None
        name = str(spec)
        if spec.kind == "fp16":
            out.append((name, 16, 16))
            continue
        if not bits:
            raise _err(src, f"{where}bits", f"scheme {name} needs bits (bits = [4, 2], pairs = [\"k4v2\"] "
                                            "or k_bits/v_bits)")
        if spec.kind == "ov":
            if (spec.ov_bits, spec.ov_bits) not in bits:
                raise _err(src, f"{where}bits", f"scheme {name} stores {spec.ov_bits}-bit codes only; the block's "
                                                f"bits are {', '.join(f'k{k}v{v}' for k, v in bits)}")
            out.append((name, spec.ov_bits, spec.ov_bits))
            continue
        out.extend((name, k, v) for k, v in bits)
    return out


def cell_name(model: str, kv: str, k_bits: int, v_bits: int, kv_mode: str, first_token: str) -> str:
    """``<model>-<scheme>[-k<K>v<V>][-simulate][-fpfirst]``; defaults (packed, compressed) add nothing, so
    adding a mode to a grid later keeps the earlier cells' names."""
    name = f"{model}-{kv}" + ("" if kv == "fp16" else f"-k{k_bits}v{v_bits}")
    name += "" if kv_mode == "packed" else f"-{kv_mode}"
    name += "" if first_token == "compressed" else "-fpfirst"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def parse_grid(text: str, source: str = "GRID", base_dir: str | Path = ".",
               model_names: dict[str, str] | None = None) -> Grid:
    """Parse and check a grid file's text; relative paths resolve against ``base_dir``; ``model_names`` as
    ``check_grid``'s."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{source}: not valid TOML ({str(exc).splitlines()[0]})") from None
    return check_grid(raw, source, Path(base_dir), model_names)


def load_grid(path: str | Path, model_names: dict[str, str] | None = None) -> Grid:
    """``parse_grid`` of the file ``path``; InputError (one line) where it is missing or not text."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"GRID {p}: no such file; expected a TOML grid file (format: docs/SWEEP.md)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"GRID {p}: not a text file (not UTF-8); expected a TOML grid file (format: docs/SWEEP.md)") from None
    return parse_grid(text, str(p), p.parent, model_names)


def _resolve(base: Path, p: str) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


def check_grid(raw: dict[str, Any], src: str, base: Path, model_names: dict[str, str] | None = None) -> Grid:
    """Check a parsed grid (see the module docstring) and expand it into cells. ``model_names``: names a model's
    ``path`` may give instead of a directory (name -> directory; the CLI passes kvtool's bundled models)."""
    from kvtool.evals.tasks import parse_tasks

    _unknown(src, "", raw, TOP_KEYS)
    try:
        tasks = [t.name for t in parse_tasks(_str_list(src, "tasks", raw.get("tasks")))]
    except InputError as exc:
        raise _err(src, "tasks", str(exc).splitlines()[0]) from None
    run = {"limit": _int(src, "limit", raw.get("limit"), 1), "offset": _int(src, "offset", raw.get("offset", 0)),
           "shards": _int(src, "shards", raw.get("shards", 1), 1, none_ok=False),
           "seed": _int(src, "seed", raw.get("seed", 0)),
           "max_new_tokens": _int(src, "max_new_tokens", raw.get("max_new_tokens"), 1)}
    limits = _per_task_table(src, raw, "limits", tasks, "{ task = rows }")
    for t, v in limits.items():
        _int(src, f"limits.{t}", v, 1, none_ok=False)
    run["limits"] = dict(limits)
    seeds = raw.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise _err(src, "seeds", f"expected a list of integers, got {seeds!r}")
    data_dir = raw.get("data_dir")
    if data_dir is not None:
        if not isinstance(data_dir, str) or not Path(_resolve(base, data_dir)).is_dir():
            raise _err(src, "data_dir", f"{data_dir!r} is not a folder")
        data_dir = _resolve(base, data_dir)
    data = _per_task_table(src, raw, "data", tasks, "{ task = \"path or hub id\" }")
    for t, v in data.items():
        if not isinstance(v, str):
            raise _err(src, f"data.{t}", f"expected a path or hub id, got {v!r}")
    data = {t: (_resolve(base, v) if (base / v).exists() or Path(v).is_absolute() else v) for t, v in data.items()}
    modes = _str_list(src, "kv_mode", raw.get("kv_mode", "packed"))
    firsts = _str_list(src, "first_token", raw.get("first_token", "compressed"))
    for key, vals, allowed in (("kv_mode", modes, ("packed", "simulate")), ("first_token", firsts,
                                                                          ("compressed", "fp"))):
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise _err(src, key, f"{bad[0]!r}: expected one of {', '.join(allowed)}")
    conversation = raw.get("conversation", "auto")
    if conversation not in ("auto", "vicuna_v1", "chat_template"):
        raise _err(src, "conversation", f"{conversation!r}: expected auto, vicuna_v1 or chat_template")

    models = raw.get("models")
    if not isinstance(models, dict) or not models:
        raise _err(src, "models", "missing; expected [models.NAME] tables with path = \"...\"")
    model_info: dict[str, dict[str, Any]] = {}
    for key, m in models.items():
        where = f"models.{key}"
        if not isinstance(m, dict):
            raise _err(src, where, "expected a table with path, backend, wbits")
        _unknown(src, where + ".", m, MODEL_KEYS)
        if not isinstance(m.get("path"), str):
            raise _err(src, f"{where}.path", "missing; expected a model directory")
        p = Path(_resolve(base, m["path"]))
        if not p.is_dir() and m["path"] in (model_names or {}):  # a bundled model's name (kvtool ls models)
            p = Path(model_names[m["path"]])
        if not p.is_dir():
            raise _err(src, f"{where}.path", f"{p} does not exist; expected an exported dir or an HF checkpoint dir")
        if not ((p / "kvtool.json").is_file() or (p / "config.json").is_file()):
            raise _err(src, f"{where}.path", f"{p} holds neither kvtool.json (an export) nor config.json "
                                             "(a checkpoint)")
        backend = m.get("backend", "auto")
        if backend not in BACKENDS:
            raise _err(src, f"{where}.backend", f"{backend!r}: expected one of {', '.join(BACKENDS)}")
        if backend == "torch" and not (p / "config.json").is_file():
            raise _err(src, f"{where}.backend", f"torch needs an HF checkpoint (config.json) at {p}")
        model_info[key] = {"path": str(p), "backend": backend, "model_fingerprint": model_fingerprint(p),
                           "wbits": _int(src, f"{where}.wbits", m.get("wbits"), 1)}

    def make_cell(model: str, kv: str, kb: int, vb: int, mode: str, first: str) -> Cell:
        name = cell_name(model, kv, kb, vb, mode, first)
        return Cell(name=name, model=model, kv=kv, k_bits=kb, v_bits=vb, kv_mode=mode, first_token=first,
                    conversation=conversation, seeds=seeds, data=data, data_dir=data_dir, tasks=tuple(tasks),
                    **model_info[model], **run)  # type: ignore[arg-type]

    ref = raw.get("reference")
    if not isinstance(ref, dict) or "model" not in ref:
        raise _err(src, "reference", "missing; expected [reference] with model = \"<a [models] key>\"")
    _unknown(src, "reference.", ref, {"model", "kv", "bits", "pairs", "k_bits", "v_bits", "schemes"})
    if ref["model"] not in model_info:
        raise _err(src, "reference.model", f"{ref['model']!r} is not one of the models ({', '.join(model_info)})")
    ref_kv = _kv_settings(src, "reference.", {**ref, "schemes": [ref.get("kv", "fp16")]})
    if len(ref_kv) != 1:
        raise _err(src, "reference", "names one cell: one kv and (unless fp16) one bits setting")
    reference = make_cell(ref["model"], *ref_kv[0], modes[0], firsts[0])

    blocks = raw.get("kv", [])
    if isinstance(blocks, dict):
        blocks = [blocks]
    if not isinstance(blocks, list):
        raise _err(src, "kv", "expected [[kv]] blocks")
    cells: dict[str, Cell] = {reference.name: reference}
    for i, block in enumerate(blocks):
        where = f"kv[{i}]."
        if not isinstance(block, dict):
            raise _err(src, f"kv[{i}]", "expected a table")
        _unknown(src, where, block, KV_KEYS)
        names = _str_list(src, f"{where}models", block["models"]) if "models" in block else list(model_info)
        for n in names:
            if n not in model_info:
                raise _err(src, f"{where}models", f"{n!r} is not one of the models ({', '.join(model_info)})")
        for kv, kb, vb in _kv_settings(src, where, block):
            for n in names:
                for mode in modes:
                    for first in firsts:
                        c = make_cell(n, kv, kb, vb, mode, first)
                        cells.setdefault(c.name, c)
    judge = raw.get("judge", {})
    if not isinstance(judge, dict):
        raise _err(src, "judge", "expected a table")
    _unknown(src, "judge.", judge, JUDGE_KEYS)
    cpus = raw.get("cpus_per_unit", 1)
    gpus = raw.get("gpus_per_torch_unit", 0)
    for key, v in (("cpus_per_unit", cpus), ("gpus_per_torch_unit", gpus)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise _err(src, key, f"expected a number >= 0, got {v!r}")
    device = raw.get("device", "auto")
    if not isinstance(device, str):
        raise _err(src, "device", f"expected a device name, got {device!r}")
    return Grid(source=src, cells=list(cells.values()), reference=reference.name, tasks=tasks, device=device,
                cpus_per_unit=float(cpus), gpus_per_torch_unit=float(gpus), judge=dict(judge))


def grid_json(grid: Grid) -> dict[str, Any]:
    """The grid as recorded in ``sweep.json`` (no secrets exist in a grid: ``check_grid`` refuses them)."""
    return json.loads(json.dumps({"source": grid.source, "reference": grid.reference, "tasks": grid.tasks,
                                  "cells": [asdict(c) for c in grid.cells], "judge": grid.judge}))
