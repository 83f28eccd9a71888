"""One rule for what commands show besides their result (``kvtool --help`` states it): kvtool's own progress
bar on long work is on stderr by default and ``--no-progress`` hides it; the libraries' bars and log lines only
with ``--verbose``."""

import json

import click
from click.testing import CliRunner

from kvtool.cli import main

LONG_WORK = {"export", "eval run", "sweep", "demo", "kv-roundtrip", "models make"}
LIBRARY_WORK = (LONG_WORK - {"kv-roundtrip"}) | {"run"}  # they load or write a model through the libraries


def _commands(group: click.Group, prefix: str = ""):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", cmd


def _flags(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in getattr(p, "opts", [])}


def test_every_long_command_has_both_switches_and_help_states_the_rule():
    with_progress = {name for name, cmd in _commands(main) if "--no-progress" in _flags(cmd)}
    assert with_progress == LONG_WORK
    for name, cmd in _commands(main):
        if name in LIBRARY_WORK:
            assert "--verbose" in _flags(cmd), name
    text = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    assert "--no-progress hides it" in text and "shown only with --verbose" in text


def test_models_make_library_bar_only_with_verbose(tmp_path):
    quiet = CliRunner().invoke(main, ["models", "make", "tiny-llava", str(tmp_path / "a")])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""  # transformers' "Writing model shards" is a library's bar
    loud = CliRunner().invoke(main, ["models", "make", "tiny-llava", str(tmp_path / "b"), "--verbose"])
    assert loud.exit_code == 0 and "Writing model shards" in loud.stderr


def test_real_shape_shards_have_kvtools_bar(tmp_path, capsys):
    import torch

    from kvtool.models.real_shapes import write_random_weights

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    info = write_random_weights(model, tmp_path, torch.float16, shard_bytes=200, progress=True)
    assert info["files"] == 2 and "write 2 shard(s)" in capsys.readouterr().err
    write_random_weights(model, tmp_path, torch.float16, shard_bytes=200)
    assert capsys.readouterr().err == ""


def test_kv_roundtrip_bar_on_stderr_json_on_stdout():
    args = ["kv-roundtrip", "--scheme", "uniform", "--bits", "2", "--tokens", "8", "--heads", "2", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "kv-roundtrip" in r.stderr and json.loads(r.stdout)[0]["scheme"] == "uniform"
    r = CliRunner().invoke(main, [*args, "--no-progress"])
    assert r.exit_code == 0 and r.stderr == ""


def test_hub_retry_warnings_only_with_verbose():
    import logging

    from kvtool.cli.base import quiet_loading

    hub = logging.getLogger("huggingface_hub")
    before = hub.level
    with quiet_loading(False, datasets=True):
        assert not hub.isEnabledFor(logging.WARNING)
    assert hub.level == before
    with quiet_loading(True, datasets=True):
        assert hub.level == before


def test_option_help_names_only_options_the_command_has():
    """A new user read `kvtool run --help`'s --verbose text "kvtool's own bar is --no-progress's", and run has
    no --no-progress (kv-roundtrip's --no-progress named a --verbose it lacks): an option's help may point
    only at options of the same command (the rule across commands is `kvtool --help`'s)."""
    import re

    wrong = []
    for name, cmd in _commands(main):
        flags = {o for p in cmd.params for o in (*getattr(p, "opts", []), *getattr(p, "secondary_opts", []))}
        for p in cmd.params:
            for ref in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", getattr(p, "help", None) or ""):
                if ref not in flags:
                    wrong.append(f"kvtool {name} {p.opts[0]}: names {ref}")
    assert not wrong, wrong
