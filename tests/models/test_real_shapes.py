"""Real-shape checkpoints: published config values field by field, published parameter counts, a written
checkpoint that loads in transformers, and writing that never holds the whole model."""

import json

import pytest
from click.testing import CliRunner

from kvtool.cli import REAL_SHAPE_NAMES, main
from kvtool.models.real_shapes import PUBLISHED, meta_model, mismatched_fields, real_shape_config


def test_cli_names_are_the_published_table():
    assert REAL_SHAPE_NAMES == list(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_config_carries_published_values_and_parameter_count(name):
    cfg = real_shape_config(name)
    assert mismatched_fields(name, cfg) == []
    # the meta model (shapes only) has the parameter count the hub card shows, so every width is right
    n = sum(p.numel() for p in meta_model(cfg).parameters())
    want = PUBLISHED[name]["params_b"]
    assert abs(n / 1e9 - want) < (0.05 if want >= 10 else 0.005), (n, want)
    truncated = real_shape_config(name, layers=2)
    assert truncated.get_text_config().num_hidden_layers == 2
    assert mismatched_fields(name, truncated, layers=2) == []
    # a wrong value is caught (the check can fail)
    truncated.get_text_config().hidden_size += 1
    assert any("hidden_size" in m for m in mismatched_fields(name, truncated, layers=2))


def test_bad_layers_and_size_options_are_refused(tmp_path):
    r = CliRunner().invoke(main, ["models", "make", "llava-1.5-7b", str(tmp_path / "x"), "--layers", "33"])
    assert r.exit_code == 2 and "--layers 33" in r.output
    r = CliRunner().invoke(main, ["models", "make", "qwen2-vl-2b", str(tmp_path / "x"), "--hidden", "64"])
    assert r.exit_code == 2 and "--hidden" in r.output
    r = CliRunner().invoke(main, ["models", "make", "tiny-llava", str(tmp_path / "x"), "--dtype", "float16"])
    assert r.exit_code == 2 and "--dtype" in r.output


@pytest.mark.slow
def test_make_llava_7b_two_layers_loads_with_published_config(tmp_path):
    """`models make llava-1.5-7b --layers 2` (real widths, 1.9 GiB fp16) in a subprocess: its peak RSS above
    the imports stays near two 512 MiB shards (no whole-model or fp32 copy), and the checkpoint loads in transformers with the
    published config and ids."""
    import subprocess
    import sys

    out = tmp_path / "l7b"
    code = ("import json, sys\nimport torch, transformers, safetensors.torch\nfrom kvtool.cli import main\n"
            "import kvtool.models.real_shapes\n"
            "base = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]\n"
            "try:\n    main(['models', 'make', 'llava-1.5-7b', sys.argv[1], '--layers', '2', '--json'])\n"
            "except SystemExit:\n    pass\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "print('HWM', (int(hwm) - int(base)) * 1024)\n")
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    info = json.loads(res.stdout[: res.stdout.rindex("}") + 1])
    hwm = int(res.stdout.split("HWM")[-1])
    assert info["layers"] == 2 and info["bytes"] > 1.8 * 2**30 and info["files"] >= 4
    assert hwm < info["bytes"] * 0.7, (hwm, info["bytes"])  # never the whole checkpoint in memory

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.dtype == torch.float16
    assert mismatched_fields("llava-1.5-7b", model.config, layers=2) == []
    proc = AutoProcessor.from_pretrained(out)
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index == 32000
    assert len(model.model.language_model.layers) == 2
