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
