"""`kvtool models train-shapes` wires its options into TrainConfig and writes a loadable checkpoint."""

import json

from click.testing import CliRunner

from kvtool.cli import main


def test_train_shapes_cli_short_run(tmp_path):
    out = tmp_path / "shapes"
    r = CliRunner().invoke(main, ["models", "train-shapes", "--out", str(out), "--steps", "2", "--batch-size", "2",
                                  "--vision-steps", "3", "--vision-batch", "2", "--layers", "1", "--eval-samples", "0",
                                  "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)  # progress and training logs go to stderr
    assert record["steps"] == 2 and record["samples_seen"] == 4
    assert record["config"]["threads"] == 1 and record["config"]["out_dir"] == str(out)
    assert record["config"]["layers"] == 1 and len(record["vision_history"]) == 3
    # the recorded command reproduces the config: every non-default option appears in it
    for opt in ("--steps 2", "--batch-size 2", "--vision-steps 3", "--vision-batch 2", "--layers 1", "--threads 1"):
        assert opt in record["command"], (opt, record["command"])
    assert (out / "model.safetensors").is_file() and (out / "TRAINING.json").is_file()


def test_train_shapes_cli_help_lists_every_config_field():
    from kvtool.models.shapes_train import CLI_FIELDS

    r = CliRunner().invoke(main, ["models", "train-shapes", "--help"])
    assert r.exit_code == 0
    for field in CLI_FIELDS:
        assert f"--{field.replace('_', '-')}" in r.output, field


def test_train_shapes_cli_bad_steps(tmp_path):
    r = CliRunner().invoke(main, ["models", "train-shapes", "--out", str(tmp_path), "--steps", "0"])
    assert r.exit_code == 2 and r.output.startswith("error: steps=0")
