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
