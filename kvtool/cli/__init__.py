"""The ``kvtool`` command line (click), one module per family of commands.

``base`` holds the root group ``main`` and what every command shares (one-line errors with exit code 2,
bundled model names, quiet model loads, JSON output); ``kv_options`` the KV options, declared once;
``quant_cmds`` (``ls schemes``, ``kv-roundtrip``), ``model_cmds`` (``models make``, ``ls models``,
``export``), ``run_cmds`` (``run``, ``devices``), ``eval_cmds`` (``eval run|merge|rescore``) and ``study_cmds``
(``compare``, ``report``, ``sweep``, ``submission``, ``ls tasks``, ``demo``) the commands. Each command parses
its options, builds a config (a dataclass of the library), calls one library function and prints the result as
a table (or JSON with ``--json``); no logic lives here. Heavy libraries (torch, openvino, onnxruntime, nncf,
transformers) are imported inside the commands so that ``kvtool --help`` is instant.

Bad input raises ``kvtool.errors.InputError`` (a ``ValueError``) or ``FileNotFoundError`` in the library;
``KvtoolGroup`` turns both into a one-line ``error: ...`` on stderr and exit code 2, and so a missing extra's module
(naming the extra), an ``OSError`` on a path the user named, and click's own usage errors.
"""

from __future__ import annotations

from kvtool.cli import eval_cmds, model_cmds, quant_cmds, run_cmds, study_cmds  # noqa: F401  (register commands)
from kvtool.cli.base import FULL_ONLY_MODULES, KvtoolGroup, cli_flag_names, echo_json, main
from kvtool.cli.eval_cmds import _print_failures, _print_results
from kvtool.cli.model_cmds import REAL_SHAPE_NAMES

__all__ = ["FULL_ONLY_MODULES", "KvtoolGroup", "REAL_SHAPE_NAMES", "_print_failures", "_print_results",
           "cli_flag_names", "echo_json", "main"]
