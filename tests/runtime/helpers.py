"""Test helpers for the runtime: a fixed random image and transformers' own greedy ``generate`` as reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

QUESTION = "Describe the image in detail."


def random_image(seed: int = 0, size=(60, 90)):
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype("uint8"))


def hf_greedy(model_dir: Path, image, question: str = QUESTION, max_new_tokens: int = 8):
    """(generated ids, first-step logits, all steps' logits) from transformers' ``generate`` on the checkpoint.

    The processor is transformers' own, built as the runtime builds it (PIL image processing, as without
    torch: ``kvtool.runtime.processing.load_hf_processor``), so both sides see the same pixels."""
    import torch
    from transformers import AutoModelForImageTextToText

    from kvtool.runtime.processing import load_hf_processor

    proc = load_hf_processor(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inp = proc(images=image, text=proc.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    ids = out.sequences[0, inp["input_ids"].shape[1]:].tolist()
    return ids, out.logits[0][0].numpy(), [x[0].numpy() for x in out.logits]


def assert_lean_run_matches_transformers(out: Path, lean_name: str, hf_name: str | None, max_new_tokens: int):
    """An OpenVINO run of export ``out`` in a fresh process uses the lean processor ``lean_name`` and imports
    neither torch nor transformers, and its tokens equal this process's run with transformers' processor
    (named ``hf_name`` in ``info()`` where given)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    code = (
        "import sys\nfrom PIL import Image\nimport numpy as np\nfrom kvtool.runtime import VLMPipeline\n"
        f"p = VLMPipeline.load({str(out)!r})\n"
        "img = Image.fromarray((np.random.default_rng(0).random((60, 90, 3)) * 255).astype('uint8'))\n"
        f"o = p.generate(img, 'What is this?', max_new_tokens={max_new_tokens})\n"
        f"assert p.info()['processor'] == {lean_name!r}, p.info()['processor']\n"
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not bad, bad\nprint(o.token_ids)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    from kvtool.runtime import VLMPipeline
    from kvtool.runtime.processing import load_processor

    pipe = VLMPipeline.load(out)
    pipe.processor = load_processor(out)
    pipe.tokenizer = pipe.processor.tokenizer
    if hf_name is not None:
        assert pipe.info()["processor"] == hf_name
    want = pipe.generate(random_image(0, (60, 90)), "What is this?", max_new_tokens=max_new_tokens).token_ids
    assert res.stdout.strip().splitlines()[-1] == str(want)


def assert_declines_tokenizer_edits(load, src: Path, tmp_path: Path, tokenizer_class: str) -> None:
    """A lean processor loader ``load`` returns None (transformers' processor then serves) for a copy of the
    checkpoint ``src`` whose tokenizer config asks what the lean tokenizer does not reproduce: no BOS token,
    a slow ``tokenizer_class``, clean-up of tokenization spaces."""
    import json
    import shutil

    for key, value in (("add_bos_token", False), ("tokenizer_class", tokenizer_class),
                       ("clean_up_tokenization_spaces", True)):
        d = tmp_path / key
        shutil.copytree(src, d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg[key] = value
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        assert load(d) is None, key
