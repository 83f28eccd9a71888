"""A new user's wrong inputs, found by trying the README on a clean clone: each is one line ``error: ...`` and
exit code 2, never a traceback (a missing extra, a path of the wrong kind, a grid that is no text, an export
given where a checkpoint is expected, a directory whose name is also an option's name); and the grid example
of docs/SWEEP.md parses as it is written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kvtool.cli import main
from kvtool.cli.base import KvtoolGroup, cli_flag_names

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _one_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (res.exit_code, res.output)
    return lines[0]


def _group_raising(exc: BaseException) -> click.Group:
    @click.group(cls=KvtoolGroup)
    def g():
        pass

    @g.command()
    def go():
        raise exc

    return g


@pytest.mark.parametrize("module,extra", [("ray", "sweep"), ("torch", "full"), ("nncf.quantization", "full"),
                                          ("openvino_genai", "bench")])
def test_missing_extra_names_it(module, extra):
    line = _one_line(CliRunner().invoke(_group_raising(ModuleNotFoundError(f"No module named '{module}'",
                                                                          name=module)), ["go"]))
    assert f'kvtool[{extra}]' in line and repr(module) in line


def test_other_missing_module_is_not_hidden():
    res = CliRunner().invoke(_group_raising(ModuleNotFoundError("x", name="kvtool_nonexistent")), ["go"])
    assert res.exit_code == 1 and isinstance(res.exception, ModuleNotFoundError)


def test_sweep_ray_without_ray_is_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray / find_spec -> not installed, as without the extra
    grid = tmp_path / "grid.toml"
    grid.write_text('tasks = ["shapes"]\nlimit = 2\n[models.ref]\npath = "kvtool-shapes"\nbackend = "torch"\n'
                    '[reference]\nmodel = "ref"\n')
    line = _one_line(CliRunner().invoke(main, ["sweep", str(grid), "-o", str(tmp_path / "sw"), "--executor", "ray"]))
    assert "kvtool[sweep]" in line and "'ray'" in line


def test_os_error_on_a_user_path_is_one_line(tmp_path):
    f = tmp_path / "afile"
    line = _one_line(CliRunner().invoke(_group_raising(NotADirectoryError(20, "Not a directory", str(f / "x"))),
                                        ["go"]))
    assert line == f"error: {f / 'x'}: Not a directory"


def test_sweep_output_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    grid = tmp_path / "grid.toml"
    grid.write_text('tasks = ["shapes"]\nlimit = 2\n[models.ref]\npath = "kvtool-shapes"\nbackend = "torch"\n'
                    '[reference]\nmodel = "ref"\n')
    line = _one_line(CliRunner().invoke(main, ["sweep", str(grid), "-o", str(tmp_path / "afile"), "--no-progress"]))
    assert str(tmp_path / "afile") in line and "Not a directory" in line


def test_grid_that_is_not_text(tmp_path):
    png = tmp_path / "cat.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    line = _one_line(CliRunner().invoke(main, ["sweep", str(png), "-o", str(tmp_path / "sw")]))
    assert line == f"error: GRID {png}: not a text file (not UTF-8); expected a TOML grid file (format: docs/SWEEP.md)"


def test_export_of_an_export_or_of_a_folder_without_weights(tmp_path):
    exp = tmp_path / "out"
    exp.mkdir()
    (exp / "kvtool.json").write_text("{}")
    (exp / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (exp / "openvino_language_model.bin").write_bytes(b"\0")
    line = _one_line(CliRunner().invoke(main, ["export", str(exp), "-o", str(tmp_path / "o")]))
    assert "is a kvtool export (kvtool.json), not a checkpoint" in line
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "llava"}))
    line = _one_line(CliRunner().invoke(main, ["export", str(bare), "-o", str(tmp_path / "o"), "--backend", "onnx"]))
    assert line == f"error: model {bare}: no weight files (expected *.safetensors or pytorch_model*.bin of a " \
                   "Hugging Face checkpoint)"


def test_a_directory_named_like_an_option_keeps_its_name(tmp_path, monkeypatch):
    # `kvtool run data/` once said "error: --data: no kvtool.json manifest": the folder is not the option
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    line = _one_line(CliRunner().invoke(main, ["run", "data/", "--prompt", "hi", "--text-only"]))
    assert line.startswith("error: data: no kvtool.json manifest"), line
    # the library's own argument names are still spelt as flags when the user did not type them
    assert cli_flag_names("data: bad", main) == "--data: bad"
    assert cli_flag_names("data: bad", main, {"data"}) == "data: bad"


def test_sweep_doc_example_parses(tmp_path):
    from kvtool.evals.sweep.grid import parse_grid
    from kvtool.models.bundled import SHAPES_MODEL_DIR

    text = re.search(r"```toml\n(.*?)```", (DOCS / "SWEEP.md").read_text(encoding="utf-8"), re.S).group(1)
    (tmp_path / "shapes-w4").mkdir()
    (tmp_path / "shapes-w4" / "kvtool.json").write_text("{}")
    grid = parse_grid(text, "grid.toml", tmp_path, {"kvtool-shapes": str(SHAPES_MODEL_DIR)})
    paths = {c.model: c.path for c in grid.cells}
    assert paths == {"ref": str(SHAPES_MODEL_DIR), "w4": str(tmp_path / "shapes-w4")}
    assert len(grid.cells) == 4  # ref fp16, w4 fp16, w4 g-KC128VT128 at 4 and at 2 bits


@pytest.mark.parametrize("args,says", [
    (["run", "x", "--backend", "foo", "--prompt", "p"], "Invalid value for '--backend': 'foo' is not one of"),
    (["models", "make", "nosuch", "x"], "Invalid value for 'NAME': 'nosuch' is not one of 'tiny-llava'"),
    (["kv-roundtrip", "--schemes", "x"], "No such option '--schemes'"),
    (["eval", "merge"], "Missing argument 'RUN_DIR'"),
])
def test_click_usage_errors_are_one_line(args, says, capfd):
    # click's usage block (Usage: / Try ... / Error: ...) becomes kvtool's one line, through main() as the
    # console script calls it (CliRunner would not go through KvtoolGroup.main's standalone handling)
    with pytest.raises(SystemExit) as ex:
        main.main(args, prog_name="kvtool")
    err = capfd.readouterr().err
    assert ex.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and says in err, err
    assert err.rstrip().endswith(" --help')"), err


def test_help_and_version_still_exit_0(capfd):
    for args in (["--version"], ["run", "--help"]):
        with pytest.raises(SystemExit) as ex:
            main.main(args, prog_name="kvtool")
        assert ex.value.code == 0, args
