"""Dataset loading for the eval tasks: from a hub id (both ``lmms-lab/`` and ``lmms-lab-encoder/``), from a
local copy in the hub's own format (a folder of parquet / arrow / jsonl files, or a ``save_to_disk`` folder)
(``load_rows``), or through the task's own ``TaskSpec.load`` hook where its data has another layout (PAIRS'
image folders, ``kvtool.evals.pairs``; shapes' seeded generator) — this module knows no task by name.

Rows are returned as an indexable, sized source (``datasets.Dataset`` or a thin wrapper) so images decode
lazily, one row at a time. A dataset without a task's required columns fails with an ``InputError`` naming
them. It does not build prompts or score anything (``tasks``), and never downloads at test time: hub ids are
only tried when no local copy is given, and a ``--data`` value that looks like a path (``looks_local``) or a
``--data-dir`` that does not exist fails at once as not found instead of being tried on the hub.
``read_columns`` / ``row_without_images`` read reference columns without decoding any image (strata, row
checks, the reference fields of a row whose image is unreadable).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.evals.tasks import TaskSpec

_DATA_EXTS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class ConcatRows:
    """Several row sources read as one, each row tagged with the name of the split it came from."""

    def __init__(self, parts: Sequence[tuple[str, Any]]):
        self.parts = list(parts)
        self.column_names = sorted(set().union(*[set(_columns(p)) for _, p in self.parts])) if parts else []

    def __len__(self) -> int:
        return sum(len(p) for _, p in self.parts)

    def __getitem__(self, i: int) -> dict:
        for name, part in self.parts:
            if i < len(part):
                return {**part[i], "split": name}
            i -= len(part)
        raise IndexError(i)


class JoinedImages:
    """GQA: question rows whose ``imageId`` refers to a row of a separate images table (``id``, ``image``)."""

    def __init__(self, questions: Any, images: Any):
        self.questions, self.images = questions, images
        self.index = {str(k): i for i, k in enumerate(images["id"])}
        self.column_names = list(_columns(questions))

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> dict:
        row = dict(self.questions[i])
        j = self.index.get(str(row["imageId"]))
        if j is None:
            raise InputError(f"gqa: image {row['imageId']!r} of question {row.get('id')!r} is not in the images table")
        row["image"] = self.images[j]["image"]
        return row


def _columns(source: Any) -> list[str]:
    if hasattr(source, "column_names"):
        return list(source.column_names)
    return list(source[0].keys()) if len(source) else []


def read_columns(source: Any, cols: Sequence[str], indices: Sequence[int]) -> dict[str, list]:
    """The values of ``cols`` at ``indices`` (in that order) of any row source, reading no image: a
    ``datasets.Dataset`` by column, ``ConcatRows`` part by part (its ``split`` column included), ``JoinedImages``
    from its questions table, a list of dicts row by row. A column the source lacks is left out."""
    indices = list(indices)
    if isinstance(source, ConcatRows):
        out: dict[str, list] = {c: [None] * len(indices) for c in cols if c in source.column_names or c == "split"}
        starts, pos = [], 0
        for name, part in source.parts:
            starts.append((pos, pos + len(part), name, part))
            pos += len(part)
        for lo, hi, name, part in starts:
            mine = [(k, i - lo) for k, i in enumerate(indices) if lo <= i < hi]
            if not mine:
                continue
            got = read_columns(part, [c for c in cols if c != "split"], [j for _, j in mine])
            for c in out:
                for (k, _), v in zip(mine, [name] * len(mine) if c == "split" else got.get(c, [None] * len(mine)),
                                     strict=True):
                    out[c][k] = v
        return out
    if isinstance(source, JoinedImages):
        return read_columns(source.questions, cols, indices)
    have = set(_columns(source))
    cols = [c for c in cols if c in have]
    if hasattr(source, "select_columns") and hasattr(source, "select"):
        sub = source.select_columns(cols).select(indices) if cols else None
        return {c: list(sub[c]) for c in cols}
    return {c: [source[i].get(c) for i in indices] for c in cols}


UNREADABLE = "<unreadable image>"  # stands for an image that failed to decode, in a row built for a failed sample


def _is_image_column(source: Any, col: str) -> bool:
    if col == "image":
        return True
    feat = (getattr(source, "features", None) or {}).get(col)
    return type(feat).__name__ == "Image"


def row_without_images(source: Any, idx: int) -> dict[str, Any]:
    """Row ``idx`` with its image columns left out (nothing decoded): what is left of a row whose image is
    unreadable, enough to build its prompt and reference fields."""
    if isinstance(source, ConcatRows):
        for name, part in source.parts:
            if idx < len(part):
                return {**row_without_images(part, idx), "split": name}
            idx -= len(part)
        raise IndexError(idx)
    base = source.questions if isinstance(source, JoinedImages) else source
    cols = [c for c in _columns(base) if not _is_image_column(base, c)]
    return {c: v[0] for c, v in read_columns(base, cols, [idx]).items()}


def check_columns(spec: TaskSpec, source: Any, where: str) -> None:
    have = set(_columns(source))
    optional = set(getattr(spec, "optional_columns", ()) or ())
    missing = [c for c in spec.columns if c not in have and c not in optional]
    if missing:
        raise InputError(f"{spec.name}: data at {where} lacks column(s) {', '.join(missing)}; "
                         f"expected {', '.join(spec.columns)} (has {', '.join(sorted(have)) or 'none'})")


def _split_files(files: list[Path], split: str) -> list[Path]:
    def matches(p: Path) -> bool:
        stem = p.name
        return any(stem.startswith(split + sep) for sep in "-._") or split in p.parent.parts[-1:]
    return [p for p in files if matches(p)]


def load_local(path: str | Path, split: str, config: str | None = None) -> Any:
    """One split of a local dataset copy: a ``save_to_disk`` folder or a folder/file of parquet/arrow/json."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset path {p} does not exist")
    if p.is_dir() and config and (p / config).is_dir():
        p = p / config
    if p.is_dir() and (p / "dataset_dict.json").exists():
        dd = datasets.load_from_disk(str(p))
        if split not in dd:
            raise InputError(f"dataset at {p} has splits {', '.join(dd)}; expected {split!r}")
        return dd[split]
    if p.is_dir() and (p / "state.json").exists():
        return datasets.load_from_disk(str(p))
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in _DATA_EXTS and
                                           not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise InputError(f"no dataset files (.parquet, .arrow, .jsonl, .json, .csv) under {p}")
    chosen = _split_files(files, split) or files
    kinds = {_DATA_EXTS[f.suffix] for f in chosen}
    if len(kinds) > 1:
        raise InputError(f"dataset at {p} mixes file types {sorted(kinds)}; expected one format")
    return datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in chosen], split="train")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_local(source: str) -> bool:
    """True when a ``--data`` value names a local path rather than a hub id (``owner/name``): it exists here,
    or it cannot be a hub id (not exactly one ``/``, a leading ``.``, ``/`` or ``~``, a backslash or drive
    letter, a data-file extension), or its first component is a folder that exists here."""
    if os.path.exists(os.path.expanduser(source)) or not _HUB_ID.match(source):
        return True
    owner, name = source.split("/")
    return Path(owner).is_dir() or Path(name).suffix.lower() in _DATA_EXTS


def hub_unreachable(exc: BaseException) -> str | None:
    """Why ``exc`` (from ``datasets.load_dataset`` of a hub id) means the hub could not be reached, or None when
    it does not: offline mode (``HF_HUB_OFFLINE``), or no connection — a ``ConnectionError`` / ``httpx``
    transport error anywhere in its chain, or huggingface_hub's httpx client found closed ("Cannot send a
    request, as the client has been closed", what surfaces once its retries on a failed name lookup are spent,
    the lookup itself only logged)."""
    seen: list[BaseException] = []
    while exc is not None and not any(exc is e for e in seen):
        seen.append(exc)
        msg = str(exc)
        if "OfflineModeIsEnabled" in msg or type(exc).__name__ == "OfflineModeIsEnabled":
            return "offline mode is on (HF_HUB_OFFLINE)"
        if isinstance(exc, ConnectionError) or "client has been closed" in msg or \
                type(exc).__module__.startswith("httpx") and type(exc).__name__.endswith(("ConnectError",
                                                                                          "TransportError",
                                                                                          "TimeoutException")):
            return "no connection to the Hugging Face hub"
        exc = exc.__cause__ or exc.__context__
    return None


def _load_hub(spec: TaskSpec, hub_ids: Sequence[str], split: str, config: str | None) -> tuple[Any, str]:
    import datasets

    errors, unreachable = [], []
    for hub_id in hub_ids:
        try:
            return datasets.load_dataset(hub_id, config, split=split), hub_id
        except Exception as exc:  # noqa: BLE001 - try the next id, report all at the end
            errors.append(f"{hub_id}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            unreachable.append(hub_unreachable(exc))
    hint = f"give a local copy with --data-dir DIR (holding {spec.name}/) or --data PATH"
    if all(unreachable):  # not the hub's answer about the data: say so, not the client's last words
        raise InputError(f"{spec.name}: could not load {' or '.join(hub_ids)}: the data is not local and the hub is "
                         f"unreachable ({unreachable[0]}); {hint}")
    raise InputError(f"{spec.name}: could not load {' or '.join(hub_ids)} ({'; '.join(errors)}); {hint}")


def load_rows(spec: TaskSpec, source: str | None, n_rows: int | None = None) -> tuple[Any, str]:
    """The generic loader (a task's ``load`` hook when it has none): ``source`` read as a local copy in the
    hub's format or a hub id (``looks_local`` decides; a missing local path raises ``FileNotFoundError`` at
    once), else the spec's hub ids; every split of ``spec.split`` (several are joined, each row tagged with its
    split) and GQA-style image tables (``spec.image_config``). ``n_rows`` is not used (the selection is the
    runner's)."""
    splits = spec.split if isinstance(spec.split, tuple) else (spec.split,)
    local = source is not None and looks_local(source)
    if local and not os.path.exists(os.path.expanduser(source)):
        raise FileNotFoundError(f"{spec.name}: data path {source} does not exist (a local path: no hub "
                                "download is tried; a hub id is owner/name)")
    parts = []
    for split in splits:
        if local:
            part, where = load_local(os.path.expanduser(source), split, spec.config), str(source)
        else:
            part, where = _load_hub(spec, (source,) if source else spec.hub_ids, split, spec.config)
        if spec.image_config:
            if local:
                images = load_local(os.path.expanduser(source), split, spec.image_config)
            else:
                images, _ = _load_hub(spec, (where,), split, spec.image_config)
            if "id" not in _columns(images) or "image" not in _columns(images):
                raise InputError(f"{spec.name}: images table at {where} lacks column(s) id, image")
            part = JoinedImages(part, images)
        parts.append((split, part))
    rows = parts[0][1] if len(parts) == 1 else ConcatRows(parts)
    return rows, where


def load_task_data(spec: TaskSpec, source: str | None = None, data_dir: str | None = None,
                   n_rows: int | None = None) -> tuple[Any, str]:
    """Rows of a task and a description of where they came from.

    ``source``: a local path or a hub id (``looks_local`` decides; a missing local path raises
    ``FileNotFoundError`` at once); else ``data_dir/<task>`` when it exists (a missing ``data_dir`` raises);
    else the spec's own ``load`` hook (PAIRS' folders, shapes' generator given ``n_rows``) or, without one,
    ``load_rows`` (the hub ids). Then the task's required columns are checked and its ``row_filter`` applied."""
    if source is None and data_dir is not None:
        if not Path(data_dir).expanduser().is_dir():
            raise FileNotFoundError(f"--data-dir {data_dir}: no such folder (expected a folder holding <task>/ "
                                    "local copies)")
        cand = Path(data_dir).expanduser() / spec.name
        if cand.exists():
            source = str(cand)
    rows, where = (spec.load or load_rows)(spec, source, n_rows)
    check_columns(spec, rows, where)
    if spec.row_filter and hasattr(rows, "select"):
        cols, keep = spec.row_filter
        values = zip(*(rows[c] for c in cols), strict=True)  # column reads: no image is decoded
        rows = rows.select([i for i, vals in enumerate(values) if keep(*vals)])
    return rows, where
