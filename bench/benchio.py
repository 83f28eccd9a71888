"""The JSON-in / Markdown-out tail shared by the benchmark scripts: `--markdown FILE` re-prints a saved run,
otherwise the run is measured, saved with `--json FILE` when asked, and printed as a Markdown table.

Imported by the scripts in this folder as a sibling module (`python bench/NAME.py` puts `bench/` on the path);
it does no measuring itself."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def run_and_report(args: Any, run: Callable[[Any], dict], markdown: Callable[[dict], str]) -> int:
    """``args`` needs ``.markdown`` and ``.json`` (paths or None); returns the process exit code (0)."""
    if args.markdown:
        with open(args.markdown, encoding="utf-8") as fh:
            print(markdown(json.load(fh)))
        return 0
    res = run(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=2)
    print(markdown(res))
    return 0
