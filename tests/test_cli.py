"""The CLI answers --help fast and without heavy imports; every command takes bundled model names, the KV options
and the eval subcommands the same way; library progress bars only with --verbose."""

import subprocess
import sys
import time

import pytest


def test_help_is_fast_and_light():
    code = (
        "import sys, time; t=time.perf_counter();"
        "from click.testing import CliRunner; from kvtool.cli import main;"
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output;"
        "heavy = [m for m in ('torch', 'openvino', 'onnxruntime', 'nncf', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy; print(time.perf_counter() - t)"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) < 1.0
    assert time.perf_counter() - t0 < 10


def test_ls_models_lists_the_bundled_model_with_its_path():
    import json

    from click.testing import CliRunner

    from kvtool.cli import main
    from kvtool.models.bundled import SHAPES_MODEL_DIR, model_path

    res = CliRunner().invoke(main, ["ls", "models"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "kvtool-shapes" in x)
    assert line.split() == ["kvtool-shapes", str(SHAPES_MODEL_DIR)]
    d = json.loads(CliRunner().invoke(main, ["ls", "models", "--json"]).output)
    assert d["bundled"]["kvtool-shapes"]["path"] == str(SHAPES_MODEL_DIR) and "tiny-llava" in d["tiny"]
    assert model_path("kvtool-shapes") == str(SHAPES_MODEL_DIR) and model_path("some/dir") == "some/dir"


def test_eval_summary_line_is_whole_and_on_one_scale(capsys):
    """One line per task: the headline on the task's own scale and n, never a cut-off list mixing 0-1 shares
    with 0-100 accuracies (those are in results.json)."""
    from kvtool.cli import _print_results

    results = {"tasks": {
        "shapes": {"n_samples": 8, "metrics": {"accuracy": 87.5, "unparsed_share": 0.05, "n": 8}},
        "pope": {"n_samples": 6, "metrics": {"random_f1": None, "adversarial": {"f1": 0.8, "accuracy": 0.75,
                                                                               "precision": 0.66666, "recall": 1.0}}},
    }}
    _print_results(results)
    from kvtool.evals.tasks import get_task, headline_value

    expect = []
    for task, rec in results["tasks"].items():  # (headline names from the task specs, which own them)
        spec = get_task(task)
        val = headline_value(spec, rec["metrics"])
        shown = "missing" if val is None else f"{val:.2f}"
        beside = "".join(f" {k}=–" for k in spec.beside)  # (POPE: mean_f1 beside random_f1; undefined here)
        expect.append(f"{task:<15} {spec.headline}={shown:<10}{beside} n={rec['n_samples']}")
    assert capsys.readouterr().out.splitlines() == expect + [
        "(every metric: results.json in the run directory, or --json)"]
    assert expect[0] == "shapes          accuracy=87.50      n=8"
    # a shard's summary points at the file a shard writes (from a fresh-user trial: it named results.json)
    _print_results({**results, "config": {"shard": [1, 3]}})
    assert capsys.readouterr().out.splitlines()[-1] == (
        "(every metric: results.shard-1-of-3.json in the run directory, or --json)")


def test_models_make_reports_the_checkpoints_vocab(tmp_path):
    """The tokenizer is trained up to --vocab-size entries and may end smaller: `models make` reports the saved
    config's vocab_size (a fresh-user trial saw 1024 printed for a 646-entry checkpoint)."""
    import json

    from click.testing import CliRunner

    from kvtool.cli import main

    r = CliRunner().invoke(main, ["models", "make", "tiny-llava", str(tmp_path / "m"), "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output[r.output.index("{"):])["sizes"]["vocab_size"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert got == cfg["text_config"]["vocab_size"] < 1024


# --- one rule per option family, for every command -------------------------------------------------------------

def _commands(group, prefix=()):
    """(path, command) of every leaf command under ``group``."""
    import click

    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_model_argument_takes_bundled_names():
    """Every command taking a model takes it through the one resolver (a bundled name -> its directory)."""
    from kvtool.cli import main
    from kvtool.cli.base import resolve_model

    takers = {" ".join(path): p for path, cmd in _commands(main) for p in cmd.params
              if p.name in ("model", "model_or_dir")}
    assert set(takers) == {"run", "eval run", "export"}, sorted(takers)
    assert all(p.callback is resolve_model for p in takers.values())


@pytest.mark.parametrize("args,target", [
    (["run", "kvtool-shapes", "--text-only", "--prompt", "q"], "kvtool.runtime.run.run_once"),
    (["eval", "kvtool-shapes", "--tasks", "shapes", "-o", "RUN"], "kvtool.evals.runner.run_eval"),
    (["eval", "run", "kvtool-shapes", "--tasks", "shapes", "-o", "RUN"], "kvtool.evals.runner.run_eval"),
    (["export", "kvtool-shapes", "-o", "OUT"], "kvtool.export.export_model"),
])
def test_bundled_model_name_reaches_each_command_as_its_directory(args, target, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from kvtool.cli import main
    from kvtool.errors import InputError
    from kvtool.models.bundled import SHAPES_MODEL_DIR

    seen = []

    def capture(cfg, *a, **k):
        seen.append(cfg.model)
        raise InputError("stopped by the test")

    mod, name = target.rsplit(".", 1)
    monkeypatch.setattr(__import__(mod, fromlist=[name]), name, capture)
    args = [str(tmp_path / a) if a in ("RUN", "OUT") else a for a in args]
    res = CliRunner().invoke(main, args)
    assert res.output == "error: stopped by the test\n" and res.exit_code == 2, res.output
    assert seen == [str(SHAPES_MODEL_DIR)]


def test_kv_bits_without_kv_names_the_fp16_default_and_the_option():
    from click.testing import CliRunner

    from kvtool.cli import main

    for cmd in (["run", "m", "--text-only", "--prompt", "q"], ["eval", "m", "--tasks", "shapes", "-o", "r"]):
        res = CliRunner().invoke(main, [*cmd, "--kv-bits", "2"])
        assert res.exit_code == 2
        assert res.output == ("error: --kv-bits 2: the default KV scheme is fp16, which quantizes nothing; pass --kv "
                              "SCHEME to quantize, e.g. --kv g-KC128VT128 --kv-bits 2 (kvtool ls schemes)\n")
        res = CliRunner().invoke(main, [*cmd, "--k-bits", "4", "--kv-residual", "128"])
        assert res.output.startswith("error: --k-bits 4 --kv-residual 128: the default KV scheme is fp16"), res.output
        # named explicitly, fp16's own refusal (tests/runtime/test_kv_options.py)
        res = CliRunner().invoke(main, [*cmd, "--kv", "fp16", "--kv-bits", "2"])
        assert res.output.startswith("error: --kv fp16 keeps K and V unquantized: --kv-bits 2 does not apply")


def test_kv_options_resolve_bits_once_into_the_config(monkeypatch):
    """run and eval get the spec's resolved bits (--k-bits overrides --kv-bits, default 4), none for fp16 / ov-*."""
    from click.testing import CliRunner

    from kvtool.cli import main
    from kvtool.errors import InputError

    seen = []

    def capture(cfg, *a, **k):
        seen.append((cfg.kv, cfg.k_bits, cfg.v_bits, cfg.kv_mode, cfg.kv_residual))
        raise InputError("stopped")

    monkeypatch.setattr("kvtool.runtime.run.run_once", capture)
    monkeypatch.setattr("kvtool.evals.runner.run_eval", capture)
    for cmd in (["run", "m", "--text-only", "--prompt", "q"], ["eval", "m", "--tasks", "shapes", "-o", "r"]):
        for kv_args, want in [([], ("fp16", None, None, "packed", None)),
                              (["--kv", "G-T128"], ("g-T128", 4, 4, "packed", None)),
                              (["--kv", "g-KC128VT128", "--kv-bits", "2", "--v-bits", "4", "--kv-residual", "128",
                                "--kv-mode", "simulate"], ("g-KC128VT128", 2, 4, "simulate", 128)),
                              (["--kv", "ov-u8"], ("ov-u8", None, None, "packed", None))]:
            seen.clear()
            res = CliRunner().invoke(main, cmd + kv_args)
            assert res.output == "error: stopped\n", res.output
            assert seen == [want], (cmd, kv_args)


def test_eval_group_routes_to_run_by_default():
    from click.testing import CliRunner

    from kvtool.cli import main

    res = CliRunner().invoke(main, ["eval", "--help"])
    assert res.exit_code == 0 and all(c in res.output for c in ("merge", "rescore", "run"))
    res = CliRunner().invoke(main, ["eval"])  # no arguments: eval run's own message
    assert res.exit_code == 2 and res.output.startswith("error: MODEL_OR_DIR: missing"), res.output
    res = CliRunner().invoke(main, ["eval", "some/model", "-o", "x"])
    assert res.output.startswith("error: --tasks: missing"), res.output
    res = CliRunner().invoke(main, ["eval", "run", "some/model", "--tasks", "shapes"])
    assert res.output.startswith("error: -o/--output: missing"), res.output


def test_library_progress_bars_only_with_verbose(monkeypatch):
    """A model load's transformers progress bar ("Loading weights") is shown by run and eval only with --verbose,
    and eval's datasets bars likewise; the bars' state is restored after."""
    from click.testing import CliRunner
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from datasets.utils.tqdm import tqdm as datasets_tqdm
    from transformers.utils import logging as hf_logging

    from kvtool.cli import main

    def fake_load(cfg, *a, **k):
        for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
            pass
        if hasattr(cfg, "tasks"):  # eval: a local copy read through datasets
            for _ in datasets_tqdm(range(3), desc="Generating train split"):
                pass
        raise SystemExit(0)

    monkeypatch.setattr("kvtool.runtime.run.run_once", fake_load)
    monkeypatch.setattr("kvtool.evals.runner.run_eval", fake_load)
    was_on, ds_was_off = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.enable_progress_bar()
    enable_progress_bars()
    try:
        for cmd, bars in ((["run", "m", "--text-only", "--prompt", "q"], ["Loading weights"]),
                          (["eval", "m", "--tasks", "shapes", "-o", "r"], ["Loading weights", "Generating train"])):
            res = CliRunner().invoke(main, cmd)
            assert res.exit_code == 0 and not any(b in res.output for b in bars), res.output
            assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
            res = CliRunner().invoke(main, [*cmd, "--verbose"])
            assert res.exit_code == 0 and all(b in res.stderr for b in bars), res.output
    finally:
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()
        (disable_progress_bars if ds_was_off else enable_progress_bars)()
