"""``kvtool run`` and ``kvtool devices``: streamed answer + stats, JSON, one-line errors with exit code 2."""

from __future__ import annotations

import json

from click.testing import CliRunner

from kvtool.cli import main
from tests.runtime.helpers import random_image


def test_devices_lists_and_picks():
    res = CliRunner().invoke(main, ["devices", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert any(x["device"] == "CPU" for x in d["openvino"]) and "CPUExecutionProvider" in d["onnxruntime"]
    assert d["auto"]["torch"] in {x["device"] for x in d["torch"]}
    res = CliRunner().invoke(main, ["devices"])
    assert res.exit_code == 0 and "auto picks" in res.output


def test_run_streams_answer_and_stats(exported, tmp_path):
    out = exported("tiny-llava", "openvino", 16, "fp32")
    img = tmp_path / "img.png"
    random_image().save(img)
    args = ["run", str(out), "--image", str(img), "--prompt", "What is this?", "--kv", "g-KC128VT128",
            "--kv-bits", "2", "--k-bits", "3", "--max-new-tokens", "4"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "ms/token" in res.output and "K3V2" in res.output and "g-KC128VT128" in res.output
    res = CliRunner().invoke(main, args + ["--json"])
    d = json.loads(res.output)
    assert d["pipeline"]["k_bits"] == 3 and d["pipeline"]["v_bits"] == 2 and len(d["token_ids"]) <= 4
    assert 0 < d["stats"]["kv_bytes"] < d["stats"]["kv_fp16_bytes"]


def test_run_bad_input_exits_2_with_one_line(exported, tmp_path):
    out = exported("tiny-llava", "openvino", 16, "fp32")
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    cases = [
        ["run", str(out), "--image", str(bad), "--prompt", "q"],
        ["run", str(tmp_path), "--image", str(bad), "--prompt", "q"],
        ["run", str(out), "--prompt", "q"],
        ["run", str(out), "--image", str(bad), "--prompt", "q", "--kv", "g-T96", "--kv-bits", "2"],
    ]
    for args in cases:
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, (args, res.output)
        assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output


# --- issue 16: prompts, images, the bundled model by name ------------------------------------------------------

def _red_circle(tmp_path):
    """A red circle alone, drawn by the shapes generator (the first such test-split sample)."""
    from kvtool.evals.shapes import make_shapes_split

    row = next(r for r in make_shapes_split("test", 200) if r["question"] == "What color is the circle?"
               and r["answer"] == "red" and len(r["objects"]) == 1)
    path = tmp_path / "red_circle.png"
    row["image"].save(path)
    return path


def _one_line_error(args) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, (args, res.output)
    assert res.output.count("\n") == 1 and res.output.startswith("error: "), res.output
    return res.output.strip()


def test_run_bundled_model_by_name_answers_red(tmp_path):
    img = _red_circle(tmp_path)
    res = CliRunner().invoke(main, ["run", "kvtool-shapes", "--image", str(img), "--prompt",
                                    "What color is the circle?", "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output[res.output.index("{"):])
    assert d["text"].split()[0].strip(".").lower() == "red"
    assert d["pipeline"]["conversation"] == "chat_template"  # auto: the template is its training format
    assert "Loading weights" not in res.stderr  # transformers' bar only with --verbose


def test_run_refuses_empty_prompt_and_directory_image_before_loading(tmp_path, monkeypatch):
    from kvtool.runtime import VLMPipeline

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(VLMPipeline, "load", no_load)
    img = _red_circle(tmp_path)
    for prompt in ("", "   "):
        assert _one_line_error(["run", "kvtool-shapes", "--image", str(img), "--prompt", prompt]) == (
            f"error: --prompt: {prompt!r} is empty; expected a question")
    assert _one_line_error(["run", "kvtool-shapes", "--image", str(tmp_path), "--prompt", "q"]) == (
        f"error: image {tmp_path}: is a directory; expected an image file")
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    assert _one_line_error(["run", "kvtool-shapes", "--image", str(bad), "--prompt", "q"]) == (
        f"error: image {bad}: not a readable image (UnidentifiedImageError)")


def test_run_export_with_backend_torch_is_one_line(exported, tmp_path):
    out = exported("tiny-llava", "openvino", 16, "fp32")
    img = _red_circle(tmp_path)
    assert _one_line_error(["run", str(out), "--backend", "torch", "--image", str(img), "--prompt", "q"]) == (
        f"error: --backend torch: {out} is a kvtool export (openvino graphs); torch runs an HF checkpoint "
        "(use --backend openvino or auto, or pass the source checkpoint)")


def test_run_prompt_longer_than_the_model_names_both_numbers(tmp_path):
    from transformers import AutoProcessor

    from kvtool.models.bundled import SHAPES_MODEL_DIR
    from kvtool.runtime.preprocess import load_images, prepare_inputs

    img = _red_circle(tmp_path)
    prompt = "word " * 5000
    n = prepare_inputs(AutoProcessor.from_pretrained(SHAPES_MODEL_DIR), load_images(img), prompt,
                       "chat_template").n_tokens
    res = CliRunner().invoke(main, ["run", "kvtool-shapes", "--image", str(img), "--prompt", prompt])
    assert res.exit_code == 2, res.output
    # the last line (transformers' weight-loading bar before it is library chatter, issue 16 item 18)
    assert res.output.strip().splitlines()[-1] == (
        f"error: --prompt: {n} tokens + 64 new tokens = {n + 64}, more than the model's 1024 positions "
        "(max_position_embeddings); shorten the prompt or lower --max-new-tokens")
