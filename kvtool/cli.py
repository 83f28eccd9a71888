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


@main.group(name="models", cls=KvtoolGroup)
def models_group() -> None:
    """Build checkpoints offline: tiny random ones for tests and benchmarks, the trained demo model."""


@models_group.command(name="make")
@click.argument("name", type=click.Choice(["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"]))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Weight initialisation seed.")
@click.option("--hidden", type=int, help="Text hidden size (default 128).")
@click.option("--layers", type=int, help="Text decoder layers (default 2).")
@click.option("--heads", type=int, help="Attention heads (default 4).")
@click.option("--kv-heads", type=int, help="KV heads (default 4; 2 for Qwen2-VL).")
@click.option("--intermediate", type=int, help="MLP intermediate size (default 256).")
@click.option("--vision-hidden", type=int, help="Vision tower hidden size (default 64).")
@click.option("--vision-layers", type=int, help="Vision tower layers (default 2).")
@click.option("--image-size", type=int, help="Vision input side in pixels (default 48).")
@click.option("--json", "as_json", is_flag=True, help="Print the sizes as JSON.")
def models_make(name, out_dir, seed, as_json, **sizes) -> None:
    """Build the tiny random checkpoint NAME into OUT_DIR (no hub access)."""
    from dataclasses import asdict

    from kvtool.models import make_tiny_model, tiny_size

    size = tiny_size(name, **sizes)  # validates before any heavy import
    path = make_tiny_model(name, out_dir, seed=seed, **{k: v for k, v in sizes.items() if v is not None})
    info = {"name": name, "path": str(path), "seed": seed, "sizes": asdict(size)}
    if as_json:
        echo_json(info)
    else:
        click.echo(f"{name} -> {path}")
        click.echo("  " + ", ".join(f"{k}={v}" for k, v in asdict(size).items()))


@ls_group.command(name="models")
@click.option("--json", "as_json", is_flag=True)
def ls_models(as_json) -> None:
    """List the tiny model architectures `kvtool models make` builds."""
    from kvtool.models.tiny import TINY_MODELS

    if as_json:
        echo_json(TINY_MODELS)
        return
    width = max(map(len, TINY_MODELS))
    for name, what in TINY_MODELS.items():
        click.echo(f"{name:<{width}}  {what}")


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
