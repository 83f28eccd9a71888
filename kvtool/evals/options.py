"""The eval run's options as text (what ``kvtool eval`` and scripts pass) turned into ``EvalConfig``'s values.

``parse_tasks`` (``"pope,mme"``), ``parse_data`` (``TASK=PATH_OR_HUB_ID`` items), ``parse_seeds`` (``"0,1,2"``)
and ``parse_shard`` (``"i/n"``, from ``runner``) each raise ``InputError`` naming the option and what was
expected. It does not check that tasks exist or data paths are readable (``tasks.parse_tasks`` and the
loaders do), and builds no config itself.
"""

from __future__ import annotations

from typing import Iterable

from kvtool.errors import InputError


def parse_tasks(text: str | None) -> list[str]:
    """``"pope, mme"`` -> ``["pope", "mme"]`` (empty names dropped); ``InputError`` when none is left."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not names:
        raise InputError("--tasks: missing; expected e.g. --tasks textvqa,pope (kvtool ls tasks)")
    return names


def parse_data(items: Iterable[str]) -> dict[str, str]:
    """``["pope=/data/pope", "MME = lmms-lab/MME"]`` -> ``{"pope": "/data/pope", "mme": "lmms-lab/MME"}``: the task
    name lower-cased, both sides stripped; a later item for one task wins. ``InputError`` for an item without
    ``=`` or with an empty side."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, val = str(item).partition("=")
        if not sep or not key.strip() or not val.strip():
            raise InputError(f"--data {item!r}: expected TASK=PATH_OR_HUB_ID")
        out[key.strip().lower()] = val.strip()
    return out


def parse_seeds(text: str | None) -> list[int] | None:
    """``"0,1,2"`` -> ``[0, 1, 2]``; None for None or an empty string. ``InputError`` for anything that is not
    comma-separated integers."""
    if text is None or not str(text).strip():
        return None
    try:
        return [int(s) for s in str(text).split(",")]
    except ValueError:
        raise InputError(f"--seeds {text!r}: expected comma-separated integers") from None
