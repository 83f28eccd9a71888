"""Turning an image (or several) and a question into the model's prompt tokens and pixel inputs.

Images: PIL images or paths, one or a list; a missing file, a directory or an unreadable file is an
``InputError``; 16-bit images (Pillow modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I``) are scaled to 8
bits (value / 257, rounded, as 65535 -> 255) instead of being clipped to 255. Prompts: the checkpoint's own chat
template (``conversation="chat_template"``) or LLaVA's own eval conversation (``"vicuna_v1"``: its system
prompt, ``USER: <image>\\n{q} ASSISTANT:``); ``"auto"`` picks one from the checkpoint's files
(``resolve_conversation``), the same rule for ``kvtool run`` and ``kvtool eval``.

The question is user text and only text: no special token of the tokenizer can come from it (``literal_text``),
whatever the architecture; an ``<image>`` in it places the image there, marked up as the chat template marks an
image (``image_markup``: Qwen2-VL's ``<|vision_start|><|image_pad|><|vision_end|>``). An empty question is an
``InputError``. Tokenising, resizing, anyres tiling (LLaVA-NeXT) and patchifying (Qwen2-VL) are the
checkpoint's HF processor's work; this module only builds the prompt text, calls the processor, and returns
numpy arrays. It does not run any model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvtool.errors import InputError

CONVERSATIONS = ("chat_template", "vicuna_v1")  # what "auto" resolves to (resolve_conversation)
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


# Pillow modes of 16-bit single-channel images (``I``: 32-bit ints, how some Pillow versions open 16-bit PNG
# and TIFF). ``convert("RGB")`` clips their values to 255; they are scaled instead. Pillow itself reads 16-bit
# RGB(A) PNGs as 8-bit RGB(A) (it keeps the high byte), so those need nothing here.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb8(im):
    """A PIL image as 8-bit RGB. 16-bit modes (``SIXTEEN_BIT_MODES``) map v -> round(v / 257) (0..65535 onto
    0..255, the inverse of 8 -> 16 bit's v * 257), clipped to 0..255; other modes go through ``convert("RGB")``."""
    from PIL import Image

    if im.mode in SIXTEEN_BIT_MODES:
        a = np.asarray(im).astype(np.float64)  # [H, W]; I;16B is big-endian uint16, numpy reads it right
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    return im.convert("RGB")


def check_image_path(item: Any) -> Path:
    """``item`` as a path to an existing image file; ``InputError`` naming it otherwise."""
    if not isinstance(item, (str, Path)):
        raise InputError(f"image: expected a PIL image or a path, got {type(item).__name__}")
    path = Path(item)
    if path.is_dir():
        raise InputError(f"image {path}: is a directory; expected an image file")
    if not path.is_file():
        raise InputError(f"image {path}: no such file")
    return path


def load_images(image: Any) -> list:
    """One or several PIL images or paths -> list of 8-bit RGB PIL images (``[]`` for None), see ``to_rgb8``."""
    from PIL import Image, UnidentifiedImageError

    if image is None:
        return []
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            out.append(to_rgb8(item))
            continue
        path = check_image_path(item)
        try:
            with Image.open(path) as im:
                out.append(to_rgb8(im))
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"image {path}: not a readable image ({type(exc).__name__})") from None
    return out


def check_question(question: Any) -> str:
    """The question if it is a non-empty string; ``InputError`` for anything else (empty or blank included)."""
    if not isinstance(question, str):
        raise InputError(f"prompt: expected a string, got {type(question).__name__}")
    if not question.strip():
        raise InputError(f"prompt: {question!r} is empty; expected a question")
    return question


IMAGE_PLACEHOLDER = "<image>"

# --- user text is text ------------------------------------------------------------------------------------
# A private-use character put inside every added-token string the user typed (after its first character), so
# neither the processor (which counts image tokens in the string) nor the tokenizer (which matches added tokens
# in the raw string before normalising) finds the token there; a normaliser step installed on the tokenizer
# (``_install_literal_normalizer``) deletes the character again, so the text tokenises exactly as plain text
# (as ``split_special_tokens=True`` would tokenise it). Where a tokenizer has no ``tokenizers`` backend the
# character stays in the text: the token is still broken, at the cost of one extra character. (A U+E000 the user
# typed is dropped too: a private-use code point has no meaning in text.)
LITERAL_MARK = "\ue000"


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _added_strings(processor) -> list[str]:
    """Every added token of the tokenizer (all special tokens among them) and the processor's image/video
    tokens, longest first."""
    tok = _tokenizer(processor)
    found = {t.content for t in getattr(tok, "added_tokens_decoder", {}).values()}
    found.update(getattr(tok, "all_special_tokens", []) or [])
    for attr in ("image_token", "video_token"):
        for obj in (processor, tok):
            if isinstance(getattr(obj, attr, None), str):
                found.add(getattr(obj, attr))
    return sorted((t for t in found if len(t) > 1), key=len, reverse=True)


def _install_literal_normalizer(processor) -> None:
    tok = _tokenizer(processor)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or getattr(tok, "_kvtool_literal", False):
        return
    from tokenizers import normalizers

    drop = normalizers.Replace(LITERAL_MARK, "")
    backend.normalizer = drop if backend.normalizer is None else normalizers.Sequence([drop, backend.normalizer])
    tok._kvtool_literal = True


def literal_text(processor, text: str) -> str:
    """``text`` with every added/special token string of ``processor``'s tokenizer broken by ``LITERAL_MARK``, so
    the prompt built from it gets none of those tokens from the user's text (it tokenises as plain text)."""
    specials = [t for t in _added_strings(processor) if t in text]
    if not specials:
        return text
    _install_literal_normalizer(processor)
    out, i = [], 0
    while i < len(text):
        hit = next((t for t in specials if text.startswith(t, i)), None)
        if hit is None:
            out.append(text[i])
            i += 1
        else:
            out.append(hit[0] + LITERAL_MARK + hit[1:])
            i += len(hit)
    return "".join(out)


def image_markup(processor) -> str:
    """What the checkpoint's chat template writes for one image: the image token with the special tokens the
    template puts right around it (Qwen2-VL: ``<|vision_start|><|image_pad|><|vision_end|>``; LLaVA:
    ``<image>``). Found by rendering a user turn with and without an image; the image token alone where the
    checkpoint has no chat template. Cached on the processor (per template)."""
    template = getattr(processor, "chat_template", None)
    cached = getattr(processor, "_kvtool_image_markup", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    markup = _image_markup(processor)
    try:
        processor._kvtool_image_markup = (template, markup)
    except AttributeError:  # an object that takes no new attributes: no cache
        pass
    return markup


def _image_markup(processor) -> str:
    token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
    if getattr(processor, "chat_template", None) is None:
        return token
    text = {"type": "text", "text": "Q"}
    try:
        with_image = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, text]}],
                                                   add_generation_prompt=True, tokenize=False)
        without = processor.apply_chat_template([{"role": "user", "content": [text]}], add_generation_prompt=True,
                                                tokenize=False)
    except Exception:  # a template that cannot render an image item: fall back to the bare token
        return token
    start = with_image.find(token)
    if start < 0:
        return token
    a, b = start, start + len(token)
    specials = _added_strings(processor)
    prefix = len(_common_prefix(with_image, without))  # never extend into text both renderings share
    grown = True
    while grown:
        grown = False
        for t in specials:
            if a - len(t) >= prefix and with_image.startswith(t, a - len(t)):
                a, grown = a - len(t), True
            if with_image.startswith(t, b):
                b, grown = b + len(t), True
    return with_image[a:b]


def _common_prefix(x: str, y: str) -> str:
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return x[:n]


# --- which conversation ----------------------------------------------------------------------------------------
def _chat_template_source(model_dir: Path) -> str:
    import json

    parts = [f.read_text(encoding="utf-8") for f in (model_dir / "chat_template.jinja",) if f.is_file()]
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        f = model_dir / name
        if f.is_file():
            try:
                t = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
            except (json.JSONDecodeError, AttributeError):
                continue
            parts.extend([t] if isinstance(t, str) else [x.get("template", "") for x in t or [] if
                                                           isinstance(x, dict)])
    return "\n".join(parts)


def resolve_conversation(model_dir: str | Path | None, conversation: str, model_type: str | None = None) -> str:
    """The conversation ``"auto"`` stands for with the checkpoint (or export) in ``model_dir``; other values
    are checked and returned as they are. ``model_type``: the model's type (``llava``, ``llava_next`` ...) when
    the caller already holds it (a loaded pipeline: its engine's config), so that no config is read again;
    None reads it from ``kvtool.json`` (an export's architecture), else ``config.json``. One rule for
    ``kvtool run`` and ``kvtool eval``:

    - LLaVA-1.5 (``model_type``/architecture ``llava``): ``vicuna_v1``, the conversation LLaVA's own eval scripts
      use for the study's tasks (the HF checkpoints' chat templates leave out its system prompt) — unless the
      checkpoint's chat template itself holds vicuna_v1's system prompt (``kvtool-shapes``): then that
      template is the format the model was trained on, and it is used;
    - every other model (LLaVA-NeXT, Qwen2-VL, ...): the checkpoint's chat template.
    """
    import json

    if conversation != "auto":
        if conversation not in CONVERSATIONS:
            raise InputError(f"conversation: expected auto or one of {', '.join(CONVERSATIONS)}, "
                             f"got {conversation!r}")
        return conversation
    root = Path(model_dir or "")
    if model_type is not None:
        llava = model_type == "llava"
        return "vicuna_v1" if llava and VICUNA_V1_SYSTEM not in _chat_template_source(root) else "chat_template"
    for name, key in (("kvtool.json", "architecture"), ("config.json", "model_type")):
        f = root / name
        if f.is_file():
            try:
                llava = json.loads(f.read_text(encoding="utf-8")).get(key) == "llava"
            except (json.JSONDecodeError, AttributeError):
                llava = False
            if llava and VICUNA_V1_SYSTEM not in _chat_template_source(root):
                return "vicuna_v1"
            return "chat_template"
    return "chat_template"


# --- the prompt ------------------------------------------------------------------------------------------------
def build_prompt(processor, question: str, n_images: int, conversation: str = "chat_template") -> str:
    """The prompt text for ``question`` with ``n_images`` images.

    As in LLaVA's own scripts, the images go before the question unless the question already holds them: a
    question with ``<image>`` in it (exactly ``n_images`` times) keeps them where they are (e.g. question
    first, then the image), each ``<image>`` becoming the image as the chat template marks it up
    (``image_markup``). The rest of the question is literal text (``literal_text``). ``conversation`` is
    ``chat_template`` or ``vicuna_v1`` (resolve ``auto`` first with ``resolve_conversation``).
    Raises ``InputError`` for an empty question, a wrong number of placeholders or an unknown conversation.
    """
    check_question(question)
    parts = question.split(IMAGE_PLACEHOLDER)
    inline = len(parts) - 1
    if inline and inline != n_images:
        raise InputError(f"prompt: holds {inline} {IMAGE_PLACEHOLDER} placeholder(s) for {n_images} image(s); "
                         "expected one per image, or none")
    if conversation not in CONVERSATIONS:
        raise InputError(f"conversation: expected one of {', '.join(CONVERSATIONS)}, got {conversation!r}")
    if conversation == "chat_template" and getattr(processor, "chat_template", None) is None:
        raise InputError("conversation: the checkpoint has no chat template (use conversation='vicuna_v1')")
    parts = [literal_text(processor, p) for p in parts]
    markup = image_markup(processor) if (inline or conversation == "vicuna_v1") and n_images else ""
    text = markup.join(parts)
    if conversation == "vicuna_v1":
        images = "" if inline else "".join(f"{markup}\n" for _ in range(n_images))
        return f"{VICUNA_V1_SYSTEM} USER: {images}{text} ASSISTANT:"
    if inline:  # one text item holding the image where the question put it (the templates render text verbatim
        # and the processor expands the image token)
        content: list[dict] = [{"type": "text", "text": text}]
    else:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def prepare_inputs(processor, images: list, question: str, conversation: str = "chat_template") -> PreparedInputs:
    """Run the checkpoint's processor on the prompt and images; numpy out."""
    prompt = build_prompt(processor, question, len(images), conversation)
    kwargs: dict[str, Any] = {"text": prompt, "return_tensors": "np"}
    if images:
        kwargs["images"] = images if len(images) > 1 else images[0]
    import sys

    if "transformers" not in sys.modules:  # a transformers-free processor (lean_processor): nothing to silence,
        enc = processor(**kwargs)  # and importing transformers here would cost seconds
    else:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()  # the tokenizer's "longer than the maximum" warning: the pipeline's
        hf_logging.set_verbosity_error()  # own check (PromptTooLong) says it in one line, naming both numbers
        try:
            enc = processor(**kwargs)
        finally:
            hf_logging.set_verbosity(level)
    input_ids = np.asarray(enc["input_ids"], dtype=np.int64)
    vision = {k: np.asarray(v) for k, v in enc.items() if k not in ("input_ids", "attention_mask", "token_type_ids")}
    return PreparedInputs(prompt=prompt, input_ids=input_ids, vision=vision)
