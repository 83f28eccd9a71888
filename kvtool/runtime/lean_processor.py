"""A LLaVA-1.5 processor without transformers: the ``tokenizers`` library on the checkpoint's
``tokenizer.json``, the chat template rendered with jinja2, and CLIP's image preprocessing in PIL + numpy.

Why: with torch installed, importing any transformers tokenizer or processor class imports torch
(transformers 5.5: ``tokenization_utils_base`` / ``processing_utils`` -> ``generation`` -> torch), which cost
~850 MiB of resident memory and 15-30 s of load on the 2-core build machine before an OpenVINO run had compiled
anything (issue 13: kvtool at 3.4x openvino.genai's memory at 664 tokens). openvino.genai needs neither.

What it reproduces, and only that (``load_lean_processor`` returns None for anything else, and the runtime then
uses ``kvtool.runtime.processing.load_processor``): a ``LlavaProcessor`` export or checkpoint whose image
processor is ``CLIPImageProcessor`` (resize the shortest edge with the configured PIL filter, as transformers'
``get_resize_output_image_size(default_to_square=False)``; centre crop at ``(h - ch) // 2``; ``x * factor`` in
float64 then float32; ``(x - mean) / std`` in float32; channels first) and whose tokenizer is a plain
``tokenizers`` one (``tokenizer_class`` ``TokenizersBackend`` / ``PreTrainedTokenizerFast``, no
``add_bos_token`` / ``add_eos_token`` override, no clean-up of spaces): the ids and pixels equal transformers'
(``tests/runtime/test_lean_processor.py``). The chat template is rendered as transformers renders it
(sandboxed jinja2, ``trim_blocks``, ``lstrip_blocks``, the special tokens as variables, ``raise_exception``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

PLAIN_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken written as a dict
        value = value.get("content")
    return value if isinstance(value, str) else None


class LeanTokenizer:
    """The part of a transformers fast tokenizer the runtime uses, over ``tokenizers.Tokenizer``:
    ``__call__`` (a list of texts -> ``input_ids`` / ``attention_mask`` lists), ``decode``, ``eos_token_id``,
    ``added_tokens_decoder``, ``all_special_tokens`` and ``backend_tokenizer``."""

    def __init__(self, path: Path, cfg: dict):
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.init_kwargs = cfg
        self.special = {k: s for k in SPECIAL_KEYS if (s := _token_str(cfg.get(k))) is not None}
        extra = cfg.get("extra_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        extra += list((cfg.get("model_specific_special_tokens") or {}).values())
        self.all_special_tokens = list(dict.fromkeys([*self.special.values(), *(s for e in extra
                                                                                if (s := _token_str(e)))]))
        self.added_tokens_decoder = self.backend_tokenizer.get_added_tokens_decoder()
        for key, tok in self.special.items():
            setattr(self, key, tok)

    @property
    def eos_token_id(self) -> int | None:
        tok = self.special.get("eos_token")
        return None if tok is None else self.backend_tokenizer.token_to_id(tok)

    def __call__(self, texts: list[str] | str, add_special_tokens: bool = True) -> dict[str, list]:
        single = isinstance(texts, str)
        encs = self.backend_tokenizer.encode_batch([texts] if single else list(texts),
                                                   add_special_tokens=add_special_tokens)
        ids = [e.ids for e in encs]
        mask = [e.attention_mask for e in encs]
        return {"input_ids": ids[0] if single else ids, "attention_mask": mask[0] if single else mask}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _chat_template(path: Path, *configs: dict) -> str | None:
    f = path / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    for cfg in configs:
        t = cfg.get("chat_template")
        if isinstance(t, str):
            return t
    return None


def rescale_normalize(x: np.ndarray, c: dict) -> np.ndarray:
    """An image ``x`` [C, H, W] (uint8) rescaled and normalized as transformers' image processors do by the
    preprocessor config ``c`` (``do_rescale`` / ``rescale_factor``: the product in float64 then float32;
    ``do_normalize`` / ``image_mean`` / ``image_std`` per channel, float32) -> float32 [C, H, W]."""
    if c.get("do_rescale", True):
        x = (x.astype(np.float64) * float(c.get("rescale_factor", 1 / 255))).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if c.get("do_normalize", True):
        mean = np.asarray(c["image_mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(c["image_std"], dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return x


def call_images(processor: str, images, text, kwargs: dict) -> list:
    """The lean processors' ``__call__`` arguments checked as transformers' processors take them for one prompt:
    ``text`` one string, no keyword but ``add_special_tokens``; ``images`` None, one image or a list/tuple of
    them -> the list of images. Raises ValueError naming ``processor`` and the argument."""
    if not isinstance(text, str):
        raise ValueError(f"{processor}: text must be one string")
    unknown = set(kwargs) - {"add_special_tokens"}
    if unknown:
        raise ValueError(f"{processor}: unsupported keyword(s) {sorted(unknown)}")
    return [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]


class LeanLlavaProcessor:
    """``processor(images=..., text=..., return_tensors="np")`` -> ``input_ids`` [1, T] int64, ``attention_mask``
    [1, T], ``pixel_values`` [n, 3, H, W] float32; ``apply_chat_template``; ``tokenizer``; ``image_token``."""

    kind = "LeanLlavaProcessor"

    def __init__(self, path: Path, proc_cfg: dict, image_cfg: dict, tok_cfg: dict):
        self.tokenizer = LeanTokenizer(path, tok_cfg)
        self.image_token = proc_cfg.get("image_token") or "<image>"
        self.patch_size = int(proc_cfg["patch_size"])
        self.num_additional_image_tokens = int(proc_cfg.get("num_additional_image_tokens", 0))
        self.vision_feature_select_strategy = proc_cfg.get("vision_feature_select_strategy", "default")
        self.chat_template = _chat_template(path, proc_cfg, tok_cfg)
        self.image_cfg = image_cfg
        self._template = None

    # -- prompt ------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs) -> str:
        if tokenize:
            raise ValueError("LeanLlavaProcessor.apply_chat_template renders text only (tokenize=False)")
        if self.chat_template is None:
            raise ValueError("the checkpoint has no chat template")
        if self._template is None:
            from jinja2 import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=conversation, add_generation_prompt=add_generation_prompt,
                                     **self.tokenizer.special, **kwargs)

    # -- pixels ------------------------------------------------------------------------------------------
    def _pixels(self, image) -> np.ndarray:
        """One PIL image -> [3, H, W] float32, as transformers' CLIPImageProcessor (PIL backend) computes it."""
        c = self.image_cfg
        if c.get("do_convert_rgb", True) and image.mode != "RGB":
            image = image.convert("RGB")
        if c.get("do_resize", True):
            short = int(c["size"]["shortest_edge"])
            w, h = image.size
            lo, hi = (w, h) if w <= h else (h, w)
            new_lo, new_hi = short, int(short * hi / lo)
            new_w, new_h = (new_lo, new_hi) if w <= h else (new_hi, new_lo)
            image = image.resize((new_w, new_h), resample=int(c.get("resample", 3)))
        x = np.asarray(image)  # [H, W, 3] uint8
        if c.get("do_center_crop", True):
            ch, cw = int(c["crop_size"]["height"]), int(c["crop_size"]["width"])
            top, left = (x.shape[0] - ch) // 2, (x.shape[1] - cw) // 2
            x = x[top:top + ch, left:left + cw]
        x = x.transpose(2, 0, 1)
        x = rescale_normalize(x, c)
        return np.ascontiguousarray(x, dtype=np.float32)

    def __call__(self, images=None, text: str | None = None, return_tensors: str | None = "np", **kwargs):
        imgs = call_images("LeanLlavaProcessor", images, text, kwargs)
        out: dict[str, np.ndarray] = {}
        n_tokens = text.count(self.image_token)
        if imgs:
            pv = np.stack([self._pixels(im) for im in imgs])
            out["pixel_values"] = pv
            h, w = pv.shape[-2:]
            n = (h // self.patch_size) * (w // self.patch_size) + self.num_additional_image_tokens
            n -= self.vision_feature_select_strategy == "default"
            if n_tokens != len(imgs):
                raise ValueError(f"prompt holds {n_tokens} image tokens for {len(imgs)} image(s)")
            text = text.replace(self.image_token, self.image_token * int(n))
        enc = self.tokenizer([text], add_special_tokens=kwargs.get("add_special_tokens", True))
        out["input_ids"] = np.asarray(enc["input_ids"], dtype=np.int64)
        out["attention_mask"] = np.asarray(enc["attention_mask"], dtype=np.int64)
        return out


def load_lean_processor(path: str | Path) -> LeanLlavaProcessor | None:
    """The transformers-free processor for ``path`` where it reproduces transformers' (module doc), else None."""
    path = Path(path)
    proc_cfg = _json(path / "processor_config.json")
    image_cfg = proc_cfg.get("image_processor") or _json(path / "preprocessor_config.json")
    tok_cfg = _json(path / "tokenizer_config.json")
    if proc_cfg.get("processor_class") != "LlavaProcessor" or "patch_size" not in proc_cfg:
        return None
    if image_cfg.get("image_processor_type") not in ("CLIPImageProcessor", "CLIPImageProcessorPil"):
        return None
    size, crop = image_cfg.get("size") or {}, image_cfg.get("crop_size") or {}
    if set(size) != {"shortest_edge"} or (image_cfg.get("do_center_crop", True) and set(crop) != {"height", "width"}):
        return None
    if image_cfg.get("do_center_crop", True) and size["shortest_edge"] < max(crop["height"], crop["width"]):
        return None  # transformers pads there; not reproduced
    if image_cfg.get("do_normalize", True) and not (image_cfg.get("image_mean") and image_cfg.get("image_std")):
        return None
    if image_cfg.get("do_pad"):
        return None
    if tok_cfg.get("tokenizer_class") not in PLAIN_TOKENIZERS or not (path / "tokenizer.json").is_file():
        return None
    if any(k in tok_cfg for k in ("add_bos_token", "add_eos_token")) or tok_cfg.get("clean_up_tokenization_spaces"):
        return None
    try:
        return LeanLlavaProcessor(path, proc_cfg, image_cfg, tok_cfg)
    except ImportError:  # tokenizers or jinja2 missing: transformers' processor is the way
        return None
