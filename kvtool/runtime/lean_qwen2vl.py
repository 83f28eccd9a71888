"""A Qwen2-VL processor without transformers (and so without torch): ``lean_processor``'s tokenizer and chat
template over the ``tokenizers`` library and jinja2, and Qwen2-VL's image preprocessing in PIL + numpy.

Why: the runtime's other Qwen2-VL processor is transformers' ``Qwen2VLProcessor``, whose import pulls in torch:
on the long-context bench model it raised the process's resident memory from 127 to 928 MiB and took ~10 CPU s
before the first image was read (docs/BENCHMARKS.md, "lean Qwen2-VL processor"); openvino.genai needs neither.

What it reproduces, and only that (``load_lean_qwen2vl_processor`` returns None for anything else; the runtime
then uses ``kvtool.runtime.processing.load_processor``): a ``Qwen2VLProcessor`` export or checkpoint whose image
processor is ``Qwen2VLImageProcessor`` (transformers 5.5's PIL backend, ``Qwen2VLImageProcessorPil``): convert to
RGB; ``smart_resize`` of (height, width) to multiples of ``patch_size * merge_size`` with the pixel count within
``[min_pixels, max_pixels]`` (``size.shortest_edge`` / ``size.longest_edge``, or the ``min_pixels`` /
``max_pixels`` keys); a PIL resize with the configured filter (always, as transformers does, even to the same
size); ``x * factor`` in float64 then float32; ``(x - mean) / std`` in float32; the frame repeated to
``temporal_patch_size``; patches flattened to ``pixel_values`` [n_patches, C * T * P * P] in the order
(t, h-block, w-block, h-in-merge, w-in-merge | channel, temporal, row, column) and ``image_grid_thw``
[n_images, 3] int64 — plus the prompt's image tokens expanded to ``t * h * w / merge_size**2`` per image and
``mm_token_type_ids`` (1 at image tokens, 2 at video tokens, else 0), as ``Qwen2VLProcessor.__call__``
returns them by default. The tokenizer must be a plain ``tokenizers`` one (``lean_processor``'s rule). Outputs
are bit-identical to transformers' (``tests/runtime/test_lean_qwen2vl.py``). Videos are not handled.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kvtool.runtime.lean_processor import (
    PLAIN_TOKENIZERS,
    LeanLlavaProcessor,
    LeanTokenizer,
    _chat_template,
    _json,
    call_images,
    rescale_normalize,
)

IMAGE_PROCESSORS = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorPil", "Qwen2VLImageProcessorFast")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with height*width within [min_pixels, max_pixels] and
    the aspect ratio kept as closely as it can be (Qwen2-VL's rule, as transformers' ``smart_resize``).
    ``ValueError`` for an aspect ratio above 200."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image: aspect ratio {max(height, width) / min(height, width):.1f} is above Qwen2-VL's "
                         "limit of 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class LeanQwen2VLProcessor:
    """``processor(images=..., text=..., return_tensors="np")`` -> ``input_ids`` [1, T] int64, ``attention_mask``
    [1, T], ``mm_token_type_ids`` [1, T] int64, ``pixel_values`` [n_patches, C*T*P*P] float32, ``image_grid_thw``
    [n_images, 3] int64; ``apply_chat_template``; ``tokenizer``; ``image_token`` (module doc)."""

    kind = "LeanQwen2VLProcessor"
    apply_chat_template = LeanLlavaProcessor.apply_chat_template

    def __init__(self, path: Path, proc_cfg: dict, image_cfg: dict, tok_cfg: dict):
        self.tokenizer = LeanTokenizer(path, tok_cfg)
        backend = self.tokenizer.backend_tokenizer
        self.image_token = tok_cfg.get("image_token") or "<|image_pad|>"
        self.video_token = tok_cfg.get("video_token") or "<|video_pad|>"
        self.image_token_id = backend.token_to_id(self.image_token)
        self.video_token_id = backend.token_to_id(self.video_token)
        if self.image_token_id is None:
            raise ValueError(f"the tokenizer has no image token {self.image_token!r}")
        self.chat_template = _chat_template(path, proc_cfg, tok_cfg)
        self._template = None
        c = image_cfg
        size = c.get("size") or {}
        self.min_pixels = int(c.get("min_pixels") or size["shortest_edge"])
        self.max_pixels = int(c.get("max_pixels") or size["longest_edge"])
        self.patch_size = int(c.get("patch_size", 14))
        self.temporal_patch_size = int(c.get("temporal_patch_size", 2))
        self.merge_size = int(c.get("merge_size", 2))
        self.image_cfg = c

    # -- pixels ------------------------------------------------------------------------------------------
    def _patches(self, image) -> tuple[np.ndarray, list[int]]:
        """One PIL image -> ([grid_t*grid_h*grid_w, C*T*P*P] float32, [grid_t, grid_h, grid_w])."""
        c = self.image_cfg
        if c.get("do_convert_rgb", True) and image.mode != "RGB":
            image = image.convert("RGB")
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        if c.get("do_resize", True):
            h, w = smart_resize(image.height, image.width, p * m, self.min_pixels, self.max_pixels)
            image = image.resize((w, h), resample=int(c.get("resample", 3)))
        x = np.asarray(image)
        if x.ndim == 2:
            x = x[:, :, None]
        x = x.transpose(2, 0, 1)  # [C, H, W]
        x = rescale_normalize(x, c)
        ch, h, w = x.shape
        gh, gw = h // p, w // p
        if gh * p != h or gw * p != w or gh % m or gw % m:
            raise ValueError(f"image: {h}x{w} px is not a grid of {m}x{m} merged {p} px patches (do_resize off)")
        # one frame repeated to the temporal patch: [T, C, H, W] -> blocks, in transformers' order
        frames = np.broadcast_to(x[None], (tp, ch, h, w))
        blocks = frames.reshape(tp, ch, gh // m, m, p, gw // m, m, p).transpose(2, 5, 3, 6, 1, 0, 4, 7)
        return np.ascontiguousarray(blocks.reshape(gh * gw, ch * tp * p * p), dtype=np.float32), [1, gh, gw]

    def __call__(self, images=None, text: str | None = None, return_tensors: str | None = "np", **kwargs):
        imgs = call_images("LeanQwen2VLProcessor", images, text, kwargs)
        out: dict[str, np.ndarray] = {}
        if imgs:
            done = [self._patches(im) for im in imgs]
            out["pixel_values"] = np.concatenate([d[0] for d in done], axis=0)
            grids = np.asarray([d[1] for d in done], dtype=np.int64)
            out["image_grid_thw"] = grids
            parts = text.split(self.image_token)
            if len(parts) - 1 != len(imgs):
                raise ValueError(f"prompt holds {len(parts) - 1} image tokens for {len(imgs)} image(s)")
            counts = [int(np.prod(g)) // self.merge_size ** 2 for g in grids]
            text = parts[0] + "".join(self.image_token * n + part for n, part in zip(counts, parts[1:], strict=True))
        enc = self.tokenizer([text], add_special_tokens=kwargs.get("add_special_tokens", True))
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        out["input_ids"] = ids
        out["attention_mask"] = np.asarray(enc["attention_mask"], dtype=np.int64)
        types = np.zeros_like(ids)
        types[ids == self.image_token_id] = 1
        if self.video_token_id is not None:
            types[ids == self.video_token_id] = 2
        out["mm_token_type_ids"] = types
        return out


def load_lean_qwen2vl_processor(path: str | Path) -> LeanQwen2VLProcessor | None:
    """The transformers-free Qwen2-VL processor for ``path`` where it reproduces transformers' (module doc),
    else None."""
    path = Path(path)
    proc_cfg = _json(path / "processor_config.json")
    image_cfg = proc_cfg.get("image_processor") or _json(path / "preprocessor_config.json")
    tok_cfg = _json(path / "tokenizer_config.json")
    if proc_cfg.get("processor_class", tok_cfg.get("processor_class")) != "Qwen2VLProcessor":
        return None
    if image_cfg.get("image_processor_type") not in IMAGE_PROCESSORS:
        return None
    size = image_cfg.get("size") or {}
    if not ((image_cfg.get("min_pixels") or size.get("shortest_edge"))
            and (image_cfg.get("max_pixels") or size.get("longest_edge"))):
        return None
    if image_cfg.get("do_normalize", True) and not (image_cfg.get("image_mean") and image_cfg.get("image_std")):
        return None
    if tok_cfg.get("tokenizer_class") not in PLAIN_TOKENIZERS or not (path / "tokenizer.json").is_file():
        return None
    if any(k in tok_cfg for k in ("add_bos_token", "add_eos_token")) or tok_cfg.get("clean_up_tokenization_spaces"):
        return None
    try:
        return LeanQwen2VLProcessor(path, proc_cfg, image_cfg, tok_cfg)
    except (ImportError, ValueError):  # tokenizers / jinja2 missing, or no image token: transformers' processor
        return None
