"""The ``kvtool`` root group and what every command shares: one-line errors (``KvtoolGroup``), a group with a
default subcommand (``DefaultCommandGroup``: ``kvtool eval MODEL`` is ``kvtool eval run MODEL``), the model
argument that takes a bundled model's name (``model_argument``), the libraries kept quiet while a model loads
(``quiet_loading``), and JSON output. No command is defined here, and nothing heavy is imported.
"""

from __future__ import annotations

import errno
import json
import re
import sys
from contextlib import contextmanager

import click

from kvtool import __version__
from kvtool.errors import InputError

# what the `full` extra adds to the runtime-only install (pyproject.toml)
FULL_ONLY_MODULES = ("torch", "torchvision", "accelerate", "nncf", "optimum", "onnx", "onnxscript")
# top-level module -> the pyproject extra that installs it (a missing one is a one-line error naming the extra)
OPTIONAL_MODULES = {**{m: "full" for m in FULL_ONLY_MODULES}, "ray": "sweep", "openvino_genai": "bench"}
# OSError kinds that mean "the path you named is wrong" rather than a fault of kvtool
USER_PATH_ERRNOS = (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EROFS, errno.ENOSPC)


class KvtoolGroup(click.Group):
    """A click group that reports bad input as one line and exit code 2, never a traceback. The library
    names its options as Python arguments (``text_only=True``, ``kv_mode: ...``); the line shown spells each
    one that is a CLI option as its flag (``--text-only``, ``--kv-mode: ...``): ``cli_flag_names`` (a value the
    user typed, such as a directory named ``data``, is left as typed). Also one line, exit 2: a module of an
    extra that is not installed (``OPTIONAL_MODULES``: which extra to install), and an ``OSError`` on a path
    the user named (``-o`` an existing file, a directory where a file was expected: ``USER_PATH_ERRNOS``)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """click's own usage errors (an unknown option, a value outside a choice, a missing argument) as one
        line ``error: ... (see 'kvtool CMD --help')``, exit 2, like kvtool's own (click prints a usage block)."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # bare `kvtool`: the help
                exc.show()
                sys.exit(exc.exit_code)
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context):
        typed = {a.rstrip("/") for a in [*ctx._protected_args, *ctx.args] if isinstance(a, str)}
        try:
            return super().invoke(ctx)
        except (InputError, FileNotFoundError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            click.echo(f"error: {cli_flag_names(msg, ctx.find_root().command, typed)}", err=True)
            sys.exit(2)
        except ModuleNotFoundError as exc:  # the runtime-only install has no torch / export libraries
            extra = OPTIONAL_MODULES.get((exc.name or "").split(".")[0])
            if extra is None:
                raise
            click.echo(f"error: this needs the {extra} extra (pip install \"kvtool[{extra}]\", or pip install -e "
                       f"\".[{extra}]\" in a source checkout): no module named {exc.name!r}", err=True)
            sys.exit(2)
        except OSError as exc:  # a path the user named is of the wrong kind or not writable
            if exc.errno not in USER_PATH_ERRNOS or not exc.filename:
                raise
            click.echo(f"error: {exc.filename}: {exc.strerror}", err=True)
            sys.exit(2)


class DefaultCommandGroup(KvtoolGroup):
    """A group whose arguments go to its ``default`` subcommand unless they start with a subcommand's name or a
    help option: ``kvtool eval MODEL --tasks t`` runs ``kvtool eval run MODEL --tasks t``; ``kvtool eval merge
    DIR`` runs ``merge``. (A model directory named like a subcommand needs the explicit ``eval run``.)"""

    def __init__(self, *args, default: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.default = default

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = [self.default, *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter) -> None:
        formatter.write_usage(ctx.command_path, f"[{self.default.upper()} ARGS]... | COMMAND [ARGS]...")


def _option_flags(command: click.Command) -> dict[str, str]:
    """{python name: --flag} for every long option of ``command`` and its subcommands (names of one letter
    and the JSON switch left out): both the parameter name and each flag spelt with underscores."""
    flags: dict[str, str] = {}
    for cmd in [command, *getattr(command, "commands", {}).values()]:
        if cmd is not command and isinstance(cmd, click.Group):
            flags.update(_option_flags(cmd))
            continue
        for p in cmd.params:
            longs = [o for o in getattr(p, "opts", []) if o.startswith("--")]
            if not isinstance(p, click.Option) or not longs or p.name in ("as_json",):
                continue
            for o in longs:
                flags.setdefault(o[2:].replace("-", "_"), o)
            flags.setdefault(p.name, longs[0])
    return {k: v for k, v in flags.items() if len(k) > 1}


def cli_flag_names(msg: str, command: click.Command | None = None, typed: set[str] | frozenset[str] = frozenset()) -> str:
    """``msg`` with the library's Python argument names of CLI options spelt as the flags: ``name=True`` ->
    ``--name``, ``name=False`` -> ``without --name``, ``name=X`` -> ``--name X``, and a leading ``name:`` ->
    ``--name:``. Names that are no option of the CLI (``kv_owner``) are left as they are, and so are the
    values in ``typed`` (what the user typed on the command line: ``kvtool run data/`` names the directory
    ``data``, not ``--data``)."""
    flags = _option_flags(command or main)
    for name in sorted(flags, key=len, reverse=True):
        if name in typed:
            continue
        flag = flags[name]
        pre = r"(?<![\w.\-])"
        msg = re.sub(pre + re.escape(name) + r"=True\b", flag, msg)
        msg = re.sub(pre + re.escape(name) + r"=False\b", "without " + flag, msg)
        msg = re.sub(pre + re.escape(name) + r"=(?=\S)", flag + " ", msg)
        msg = re.sub(r"^" + re.escape(name) + r"(?=:)", flag, msg)
    return msg


def echo_json(obj, path: str | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` (or stdout when path is ``-`` or None)."""
    text = json.dumps(obj, indent=2, default=str)
    if path in (None, "-"):
        click.echo(text)
    else:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


def resolve_model(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> str | None:
    """The click callback of every model argument: a bundled model's name (``kvtool-shapes``, ``kvtool ls
    models``) becomes its directory (``kvtool.models.bundled.model_path``: an existing path wins); anything
    else, and None, is passed on as given."""
    if not value:
        return value
    from kvtool.models.bundled import model_path

    return model_path(value)


def model_argument(name: str = "model", required: bool = True):
    """The MODEL argument of ``run``, ``eval run`` and ``export``: a path, or a bundled model's name
    (``resolve_model``), so that every command takes the same names."""
    return click.argument(name, required=required, callback=resolve_model)


# The rule for what a command shows on stderr besides its result (written in `kvtool --help` too):
#  - kvtool's own progress bar on work that takes a while (export steps, eval rows, sweep units, demo rows,
#    kv-roundtrip schemes, models make shards) is on by default, on stderr (so --json's stdout stays JSON);
#    --no-progress turns it off;
#  - the libraries' own progress bars and log lines (transformers' "Loading weights" / "Writing model shards",
#    datasets', NNCF's, OpenVINO's) are shown only with --verbose (quiet_loading; export: library_output).


def verbose_option(f):
    return click.option("--verbose", is_flag=True,
                        help="Also show the libraries' own progress bars and log lines (transformers' 'Loading "
                             "weights' / 'Writing model shards', datasets', NNCF's).")(f)


def progress_option(f):
    return click.option("--no-progress", is_flag=True,
                        help="Hide kvtool's own progress bar (on stderr).")(f)


@contextmanager
def quiet_loading(verbose: bool = False, datasets: bool = False):
    """Unless ``verbose``: transformers' progress bars (its "Loading weights" bar on torch loads) and, with
    ``datasets``, the datasets library's ("Generating train split" on a local copy's first read) and
    huggingface_hub's retry warnings ("Retrying in 1s" while a hub id is tried offline) are off for the
    duration and restored after. kvtool's own progress bar and results are not affected."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    restore = []
    if hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        restore.append(hf_logging.enable_progress_bar)
    if datasets:
        from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            restore.append(enable_progress_bars)
        import logging

        hub = logging.getLogger("huggingface_hub")  # its retry warnings while a hub id is tried offline
        level = hub.level
        hub.setLevel(logging.ERROR)
        restore.append(lambda: hub.setLevel(level))
    try:
        yield
    finally:
        for undo in restore:
            undo()


@click.group(cls=KvtoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvtool")
def main() -> None:
    """kvtool: compress a LLaVA-family VLM (int4/int8 weights, quantized KV cache), run it on an edge
    device, and measure what the compression changes against the PyTorch reference.

    Output: the result goes to stdout (JSON with --json). kvtool's own progress bar on long work (export,
    eval, sweep, demo, kv-roundtrip, models make) is shown on stderr; --no-progress hides it. The libraries'
    own progress bars and log lines (transformers, datasets, NNCF, OpenVINO) are shown only with --verbose."""


@main.group(name="ls", cls=KvtoolGroup)
def ls_group() -> None:
    """List what kvtool knows: KV schemes, eval tasks, tiny models."""
