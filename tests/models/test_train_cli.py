"""`kvtool models train-shapes` wires its options into TrainConfig and writes a loadable checkpoint."""

import json

from click.testing import CliRunner

from kvtool.cli import main


def test_train_shapes_cli_short_run(tmp_path):
    out = tmp_path / "shapes"
    r = CliRunner().invoke(main, ["models", "train-shapes", "--out", str(out), "--steps", "2", "--batch-size", "2",
                                  "--eval-samples", "0", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    record = json.loads(r.output[r.output.index("{"):])
    assert record["steps"] == 2 and record["samples_seen"] == 4
    assert record["config"]["threads"] == 1 and record["config"]["out_dir"] == str(out)
    assert (out / "model.safetensors").is_file() and (out / "TRAINING.json").is_file()


def test_train_shapes_cli_bad_steps(tmp_path):
    r = CliRunner().invoke(main, ["models", "train-shapes", "--out", str(tmp_path), "--steps", "0"])
    assert r.exit_code == 2 and r.output.startswith("error: steps=0")
