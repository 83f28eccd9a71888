"""Tiny offline checkpoints: they load with the real classes, have the promised geometry, and are seeded."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from kvtool.cli import main
from kvtool.errors import InputError
from kvtool.models import make_tiny_model, tiny_size


def _image(h=60, w=80):
    return Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype("uint8"))


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"])
def test_tiny_model_loads_and_has_kv_geometry(tiny_model, name):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_model(name)
    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    text_cfg = model.config.text_config
    head_dim = text_cfg.hidden_size // text_cfg.num_attention_heads
    assert text_cfg.num_key_value_heads * head_dim % 128 == 0  # D_model a multiple of 128
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(images=_image(), text=prompt, return_tensors="pt")
    image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    assert int((inputs["input_ids"] == image_id).sum()) > 128  # KV groups of 128 are exercised
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    k = out.past_key_values.layers[0].keys
    assert k.shape == (1, text_cfg.num_key_value_heads, inputs["input_ids"].shape[1], head_dim)
    assert torch.isfinite(out.logits).all()


def test_chat_templates_render_the_family_conversation(tiny_model):
    from transformers import AutoProcessor

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    llava = AutoProcessor.from_pretrained(tiny_model("tiny-llava"))
    assert llava.apply_chat_template(msgs, add_generation_prompt=True) == "USER: <image>\nQ? ASSISTANT:"
    qwen = AutoProcessor.from_pretrained(tiny_model("tiny-qwen2-vl"))
    assert qwen.apply_chat_template(msgs, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_round_trips_any_text(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model("tiny-llava"))
    text = "Is there a ZEBRA (striped) near 3.5 km? Ünïcode ✓"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    from safetensors.numpy import load_file

    a = load_file(make_tiny_model("tiny-llava", tmp_path / "a", seed=1, layers=1) / "model.safetensors")
    b = load_file(make_tiny_model("tiny-llava", tmp_path / "b", seed=1, layers=1) / "model.safetensors")
    c = load_file(make_tiny_model("tiny-llava", tmp_path / "c", seed=2, layers=1) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a if a[k].ndim == 2)


def test_size_overrides_and_bad_sizes():
    assert tiny_size("tiny-llava", hidden=256, heads=8, kv_heads=8).hidden == 256
    with pytest.raises(InputError, match="multiple of heads"):
        tiny_size("tiny-llava", hidden=130)
    with pytest.raises(InputError, match="unknown tiny model"):
        tiny_size("tiny-gpt")
    with pytest.raises(InputError, match="unknown size option"):
        tiny_size("tiny-llava", depth=3)


def test_cli_models_make(tmp_path):
    r = CliRunner().invoke(main, ["models", "make", "tiny-llava", str(tmp_path / "m"), "--layers", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
    r = CliRunner().invoke(main, ["models", "make", "tiny-llava", str(tmp_path / "x"), "--hidden", "130"])
    assert r.exit_code == 2 and r.output.startswith("error: --hidden 130")
