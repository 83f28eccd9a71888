"""Turning an image (or several) and a question into the model's prompt tokens and pixel inputs.

Images: PIL images or paths, one or a list; an unreadable file is an ``InputError``. Prompts: the
checkpoint's own chat template (``conversation="chat_template"``) or LLaVA's own eval conversation
(``"vicuna_v1"``: its system prompt, ``USER: <image>\\n{q} ASSISTANT:``). Tokenising, resizing, anyres tiling
(LLaVA-NeXT) and patchifying (Qwen2-VL) are the checkpoint's HF processor's work; this module only builds
the prompt text, calls the processor, and returns numpy arrays. It does not run any model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtool.errors import InputError

CONVERSATIONS = ("chat_template", "vicuna_v1")
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclass
class PreparedInputs:
    """A tokenised prompt with its vision inputs (numpy): ``input_ids`` [1, T]; ``vision`` holds the processor's
    other outputs (pixel_values, image_sizes, image_grid_thw, ...), empty for a text-only prompt."""

    prompt: str
    input_ids: np.ndarray
    vision: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def load_images(image: Any) -> list:
    """One or several PIL images or paths -> list of RGB PIL images (``[]`` for None)."""
    from PIL import Image, UnidentifiedImageError

    if image is None:
        return []
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            out.append(item.convert("RGB"))
            continue
        if not isinstance(item, (str, Path)):
            raise InputError(f"image: expected a PIL image or a path, got {type(item).__name__}")
        path = Path(item)
        if not path.is_file():
            raise InputError(f"image {path}: no such file")
        try:
            with Image.open(path) as im:
                out.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"image {path}: not a readable image ({type(exc).__name__})") from None
    return out


IMAGE_PLACEHOLDER = "<image>"


def build_prompt(processor, question: str, n_images: int, conversation: str = "chat_template") -> str:
    """The prompt text for ``question`` with ``n_images`` image placeholders.

    As in LLaVA's own scripts, the images go before the question unless the question already holds them: a
    question with ``<image>`` in it (exactly ``n_images`` times) keeps them where they are (e.g. question
    first, then the image), each ``<image>`` becoming the checkpoint's image token.
    """
    if not isinstance(question, str):
        raise InputError(f"prompt: expected a string, got {type(question).__name__}")
    inline = question.count(IMAGE_PLACEHOLDER)
    if inline and inline != n_images:
        raise InputError(f"prompt: holds {inline} {IMAGE_PLACEHOLDER} placeholder(s) for {n_images} image(s); "
                         "expected one per image, or none")
    if conversation == "vicuna_v1":
        token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
        if inline:
            return f"{VICUNA_V1_SYSTEM} USER: {question.replace(IMAGE_PLACEHOLDER, token)} ASSISTANT:"
        images = "".join(f"{token}\n" for _ in range(n_images))
        return f"{VICUNA_V1_SYSTEM} USER: {images}{question} ASSISTANT:"
    if conversation != "chat_template":
        raise InputError(f"conversation: expected one of {', '.join(CONVERSATIONS)}, got {conversation!r}")
    if getattr(processor, "chat_template", None) is None:
        raise InputError("conversation: the checkpoint has no chat template (use conversation='vicuna_v1')")
    if inline:  # one text item holding the checkpoint's image token where the question put it (LLaVA templates
        # render text verbatim and the processor expands the token)
        token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
        content: list[dict] = [{"type": "text", "text": question.replace(IMAGE_PLACEHOLDER, token)}]
    else:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def prepare_inputs(processor, images: list, question: str, conversation: str = "chat_template") -> PreparedInputs:
    """Run the checkpoint's processor on the prompt and images; numpy out."""
    prompt = build_prompt(processor, question, len(images), conversation)
    kwargs: dict[str, Any] = {"text": prompt, "return_tensors": "np"}
    if images:
        kwargs["images"] = images if len(images) > 1 else images[0]
    enc = processor(**kwargs)
    input_ids = np.asarray(enc["input_ids"], dtype=np.int64)
    vision = {k: np.asarray(v) for k, v in enc.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
    return PreparedInputs(prompt=prompt, input_ids=input_ids, vision=vision)
