"""Commands over run directories answer a missing or wrong path with one line naming it and exit code 2:
eval merge / rescore, compare, report, submission, and the output paths of eval run, report and submission."""

import pytest
from click.testing import CliRunner

from kvtool.cli import main


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    return tmp_path


@pytest.mark.parametrize("args", [["eval", "merge", "{p}"], ["eval", "rescore", "{p}"], ["compare", "{p}", "{p}"],
                                  ["report", "{p}", "-o", "{out}"], ["submission", "{p}", "-o", "{out}/s.json"]])
@pytest.mark.parametrize("which,says", [("missing", "does not exist"), ("afile", "is a file, not a directory")])
def test_run_dir_missing_or_a_file(paths, args, which, says):
    p = str(paths / which)
    r = CliRunner().invoke(main, [a.format(p=p, out=paths / "out") for a in args])
    assert r.exit_code == 2, r.output
    if which == "afile" and args[0] in ("compare", "report"):  # these also take a results.json file itself
        assert r.output.strip() == f"error: {p}: not valid JSON (Expecting value)"
        return
    assert r.output.strip() == f"error: run directory {p}: {says} (expected a run directory written by kvtool eval -o)"


@pytest.mark.parametrize("args,says", [
    (["eval", "run", "kvtool-shapes", "--tasks", "shapes", "-o", "{afile}"], "is a file"),
    (["submission", "{adir}", "-o", "{adir}"], "is a directory"),
])
def test_output_paths(paths, args, says):
    r = CliRunner().invoke(main, [a.format(afile=paths / "afile", adir=paths / "adir") for a in args])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and says in r.output, r.output
