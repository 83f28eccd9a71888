"""The ``kvtool`` command line (click).

Each command parses its options, builds a config (a dataclass of the library), calls one library function and
prints the result as a table (or JSON with ``--json``). No logic lives here. Heavy libraries (torch, openvino,
onnxruntime, nncf, transformers) are imported inside the commands so that ``kvtool --help`` is instant.

Bad input raises ``kvtool.errors.InputError`` (a ``ValueError``) or ``FileNotFoundError`` in the library;
``KvtoolGroup`` turns both into a one-line ``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys

import click

from kvtool import __version__
from kvtool.errors import InputError


class KvtoolGroup(click.Group):
    """A click group that reports bad input as one line and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (InputError, FileNotFoundError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            click.echo(f"error: {msg}", err=True)
            sys.exit(2)


def echo_json(obj, path: str | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` (or stdout when path is ``-`` or None)."""
    text = json.dumps(obj, indent=2, default=str)
    if path in (None, "-"):
        click.echo(text)
    else:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


@click.group(cls=KvtoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvtool")
def main() -> None:
    """kvtool: compress a LLaVA-family VLM (int4/int8 weights, quantized KV cache), run it on an edge
    device, and measure what the compression changes against the PyTorch reference."""


@main.group(name="ls", cls=KvtoolGroup)
def ls_group() -> None:
    """List what kvtool knows: KV schemes, eval tasks, tiny models."""


# ---------------------------------------------------------------------------------------------------------
# quant_ops commands
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# models commands
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# export commands
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# runtime / devices commands
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# evals commands
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# demo command
# ---------------------------------------------------------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    main()
