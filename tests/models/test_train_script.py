"""`python scripts/train_shapes.py` wires its options into TrainConfig and writes a loadable checkpoint; the
library's CLI no longer trains."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvtool.cli import main as kvtool_main

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_shapes.py"


def test_train_shapes_script_short_run(tmp_path, capsys):
    from train_shapes import main

    out = tmp_path / "shapes"
    rc = main(["--out", str(out), "--steps", "2", "--batch-size", "2", "--vision-steps", "3", "--vision-batch", "2",
               "--layers", "1", "--eval-samples", "0", "--threads", "1", "--caption", "false", "--json"])
    assert rc == 0
    record = json.loads(capsys.readouterr().out)  # progress and training logs go to stderr
    assert record["steps"] == 2 and record["samples_seen"] == 4
    assert record["config"]["threads"] == 1 and record["config"]["out_dir"] == str(out)
    assert record["config"]["layers"] == 1 and len(record["vision_history"]) == 3
    assert record["config"]["caption"] is False
    # the recorded command reproduces the config: every non-default option appears in it
    assert record["command"].startswith(f"python scripts/train_shapes.py --out {out}")
    for opt in ("--steps 2", "--batch-size 2", "--vision-steps 3", "--vision-batch 2", "--layers 1", "--threads 1",
                "--caption False"):
        assert opt in record["command"], (opt, record["command"])
    assert (out / "model.safetensors").is_file() and (out / "TRAINING.json").is_file()


def test_train_shapes_script_help_lists_every_config_field():
    """Run as a file from another directory (the README's way), so the script finds its sibling modules."""
    from train_shapes import CLI_FIELDS

    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    for field in ("out", *CLI_FIELDS):
        assert f"--{field.replace('_', '-')}" in r.stdout, field


def test_train_shapes_script_needs_out(capsys):
    """No default output directory: the installed package's data directory is never overwritten by accident."""
    from train_shapes import main

    with pytest.raises(SystemExit) as e:
        main(["--steps", "2"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_train_shapes_script_bad_steps(tmp_path, capsys):
    from train_shapes import main

    assert main(["--out", str(tmp_path), "--steps", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: steps=0")


def test_kvtool_models_no_longer_trains():
    r = CliRunner().invoke(kvtool_main, ["models", "train-shapes", "--out", "x"])
    assert r.exit_code == 2 and "train-shapes" in r.output
