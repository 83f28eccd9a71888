"""bench/export.py's --optimum-cli option: the given executable is the one the optimum-cli rows run (a
recording stand-in, no export), and a path that is not an executable file is refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "export.py"


def _fake_checkpoint(work: Path) -> Path:
    model = work / "qwen2-vl-2b-lall"  # the name vs_optimum looks for: no checkpoint is made
    model.mkdir(parents=True)
    (model / "model.safetensors.index.json").write_text("{}")
    (model / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 4096)
    return model


def _run(work: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(BENCH.parents[1]))
    return subprocess.run([sys.executable, str(BENCH), "--vs-optimum", "qwen2-vl-2b", "--workdir", str(work),
                           "--rows", "optimum-cli:int4", *extra], capture_output=True, text=True, env=env,
                          timeout=120)


def test_optimum_cli_option_runs_that_executable(tmp_path):
    work = tmp_path / "work"
    model = _fake_checkpoint(work)
    argv_file = tmp_path / "argv.txt"
    fake = tmp_path / "venv" / "bin" / "optimum-cli"
    fake.parent.mkdir(parents=True)
    # records its arguments and writes a 4 MiB "export" into its last argument (the output folder)
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv_file}\nfor a in "$@"; do out="$a"; done\n'
                    'mkdir -p "$out" && head -c 4194304 /dev/zero > "$out/openvino_language_model.bin"\n')
    fake.chmod(0o755)
    res = _run(work, "--optimum-cli", str(fake), "--json", str(tmp_path / "out.json"))
    assert res.returncode == 0, res.stderr
    assert argv_file.read_text().split("\n")[:-1] == [
        "export", "openvino", "--model", str(model), "--task", "image-text-to-text", "--weight-format", "int4",
        str(work / "optimum-cli-int4")]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["optimum_cli"]["path"] == str(fake)
    assert out["model"]["checkpoint_bytes"] == 4096
    (row,) = out["rows"]
    assert row["tool"] == "optimum-cli" and row["output_gib"] == round(4 / 1024, 3) == 0.004
    assert not (work / "optimum-cli-int4").exists()  # deleted after measuring (no --keep)


def test_optimum_cli_option_refuses_a_non_executable(tmp_path):
    work = tmp_path / "work"
    _fake_checkpoint(work)
    missing = tmp_path / "nope" / "optimum-cli"
    res = _run(work, "--optimum-cli", str(missing))
    assert res.returncode != 0
    assert f"--optimum-cli {missing}: expected an executable optimum-cli file" in res.stderr
