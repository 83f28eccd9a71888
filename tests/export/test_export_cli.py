"""`kvtool export` bad input: one-line errors, exit code 2, before any heavy work."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvtool.cli import main


def run(*args):
    res = CliRunner().invoke(main, ["export", *args], env={"HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    return res.exit_code, lines


@pytest.fixture(scope="module")
def fake_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert_ckpt")
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    return d


@pytest.mark.parametrize("args,needle", [
    (["{missing}", "-o", "{out}"], "no such directory"),
    (["some-org/some-model", "-o", "{out}"], "hub is offline"),
    (["{bert}", "-o", "{out}"], "supported model types: llava, llava_next, qwen2_vl"),
    (["{bert}", "-o", "{out}", "--wbits", "5"], "--wbits 5: expected one of 16, 8, 4, 3"),
    (["{bert}", "-o", "{out}", "--backend", "tflite"], "--backend 'tflite'"),
    (["{bert}", "-o", "{out}", "--wbits", "3", "--awq"], "needs --calibration"),
    (["{bert}", "-o", "{out}", "--backend", "onnx", "--wbits", "4", "--awq"], "needs --calibration"),
    (["{bert}", "-o", "{out}", "--wbits", "4", "--group-size", "96"], "--group-size 96"),
    (["{bert}", "-o", "{out}", "--wbits", "4", "--awq", "--calibration", "{missing}.jsonl"], "no such file"),
    (["{bert}", "-o", "{out}", "--scale-estimation"], "needs --awq"),
    (["{bert}", "-o", "{out}", "--stateful", "--backend", "onnx"], "only the openvino backend"),
])
def test_bad_input_is_one_line_exit_2(args, needle, fake_ckpt, tmp_path):
    subst = {"missing": str(tmp_path / "nope"), "out": str(tmp_path / "out"), "bert": str(fake_ckpt)}
    code, lines = run(*[a.format(**subst) for a in args])
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_bad_calibration_rows(fake_ckpt, tmp_path):
    bad = tmp_path / "cal.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    from kvtool.errors import InputError
    from kvtool.export.calibration import load_calibration

    with pytest.raises(InputError, match="line 1 needs"):
        load_calibration(str(bad), 4)
    bad.write_text("not json\n")
    with pytest.raises(InputError, match="line 1 is not JSON"):
        load_calibration(str(bad), 4)


def test_group_size_not_dividing_the_model_is_refused(tiny_model, tmp_path):
    # tiny-llava's layers are 128 / 256 wide: 256 does not divide 128
    code, lines = run(str(tiny_model("tiny-llava")), "-o", str(tmp_path / "o"), "--wbits", "4", "--group-size", "256")
    assert code == 2 and "does not divide" in lines[-1] and lines[-1].startswith("error: "), lines


@pytest.mark.slow
def test_json_output_is_pure_json(tiny_model, tmp_path):
    """Libraries' progress output (NNCF's rich bars) must not leak into stdout under --json."""
    res = CliRunner().invoke(main, ["export", str(tiny_model("tiny-llava")), "-o", str(tmp_path / "o"), "--wbits", "4",
                                    "--json"], env={"HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["manifest"]["weights"]["bits"] == 4 and {g["role"] for g in d["graphs"]} >= {"language_model"}


def test_export_into_another_export_is_refused_without_force(fake_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # any other file is no export: allowed
    code, lines = run(str(fake_ckpt), "-o", str(out))
    assert code == 2 and "supported model types" in lines[0]  # past the check: refused for the model
    (out / "kvtool.json").write_text("{}")
    (out / "openvino_language_model.xml").write_text("<net/>")
    code, lines = run(str(fake_ckpt), "-o", str(out))
    assert code == 2 and lines == [f"error: --output {out}: holds another export (kvtool.json); pass --force to "
                                   f"replace it, or choose another directory"]
    code, lines = run(str(fake_ckpt), "-o", str(out), "--force")  # past the check: refused for the model
    assert code == 2 and len(lines) == 1 and "supported model types" in lines[0]


def test_onnxruntime_is_the_onnx_backend(fake_ckpt, tmp_path):
    from kvtool.export import ExportConfig

    cfg = ExportConfig(model=str(fake_ckpt), output=str(tmp_path / "o"), backend="onnxruntime")
    cfg.validate()
    assert cfg.backend == "onnx"
    code, lines = run(str(fake_ckpt), "-o", str(tmp_path / "o"), "--backend", "onnxruntime", "--stateful")
    assert lines == ["error: --stateful: only the openvino backend has a stateful export"]


def test_library_chatter_only_with_verbose(capfd, caplog):
    """The lines optimum-intel, OpenVINO's frontend, transformers and torch log during an export (their own
    loggers, even after optimum's converter resets ``logging.disable``), warnings and prints are dropped
    unless verbose; kvtool's own stream stays the real stderr."""
    import logging
    import warnings

    from kvtool.export.pipeline import library_output

    lines = ("may have potential accuracy issues", "Failed to build model wrapper.", "loss_type=None",
             "No CUDA runtime is found")

    def chatter():
        logging.disable(logging.NOTSET)  # what optimum's convert does half-way
        logging.getLogger("optimum.exporters.openvino.model_configs").warning(
            "Model type 'llava' may have potential accuracy issues with OpenVINO >= 2026.1.0.")
        logging.getLogger("openvino.frontend.pytorch.utils").error("Failed to build model wrapper.")
        logging.getLogger("transformers.modeling_utils").warning("`loss_type=None` was set in the config")
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found")
        warnings.warn("a tracer warning", UserWarning, stacklevel=1)
        print("library print")

    capfd.readouterr()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with library_output(verbose=False) as own:
            chatter()
            print("kvtool bar", file=own)
    out, err = capfd.readouterr()
    assert out == "" and err == "kvtool bar\n" and not seen
    assert not [r for r in caplog.records if any(x in r.getMessage() for x in lines)]
    names = ("optimum.exporters.openvino.model_configs", "openvino.frontend.pytorch.utils",
             "transformers.modeling_utils", "torch.utils.cpp_extension")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with library_output(verbose=True):
            chatter()
            assert all(logging.getLogger(n).isEnabledFor(logging.WARNING) for n in names)
    out, err = capfd.readouterr()
    assert out == "" and "library print" in err  # stdout stays kvtool's (--json)
    assert [str(w.message) for w in seen] == ["a tracer warning"]
    assert logging.getLogger("optimum").level != logging.CRITICAL + 1  # levels restored
