"""The runtime's processor: the checkpoint's transformers processor, loaded without torch and called fast.

``load_processor(path)`` builds the processor class named in the checkpoint's ``processor_config.json`` (or
``preprocessor_config.json`` / ``tokenizer_config.json``) from its parts: the tokenizer, and the image
processor with transformers' PIL/numpy backend (``backend="pil"``), whatever is installed — so an install
without torch (``pip install kvtool``) and the full one compute the same pixels and the same answers. (The
torchvision backend, transformers' default when torch is present, differs from it by up to one 8-bit level
per pixel; the PIL one is also what LLaVA's own eval scripts used, and the faster here: docs/BENCHMARKS.md.)
Video sub-processors are left out: they need torch and kvtool asks about images only.

``FastProcessor`` wraps that processor and answers ``processor(text=..., images=..., return_tensors="np")``
with the same outputs as its ``__call__``, without the per-call keyword validation that costs ~15 ms a call
in transformers 5.5 (about 30x the image processing and tokenisation it wraps on the bundled model). It runs
the image processor and the tokenizer with the keyword defaults the processor itself resolves (once, at load)
and expands each image token by the architecture's own count: LLaVA-1.5 (patches of the processed image),
LLaVA-NeXT (the processor's ``_get_number_of_features`` for the anyres grid) and Qwen2-VL
(``image_grid_thw`` / merge_size²). Anything else — another processor class, videos, other keywords — goes to
the wrapped processor unchanged. Every other attribute (``tokenizer``, ``apply_chat_template``,
``image_token`` ...) is the wrapped processor's. ``tests/runtime/test_torch_free.py`` checks the outputs equal
the processor's own on every tiny architecture. It does not build prompts (``kvtool.runtime.preprocess`` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kvtool.errors import InputError

FAST_CLASSES = ("LlavaProcessor", "LlavaNextProcessor", "Qwen2VLProcessor")
# call-time keywords the fast path hands to the tokenizer; any other keyword takes the processor's own path
TOKENIZER_KWARGS = ("add_special_tokens", "padding", "truncation", "max_length")
_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def processor_class_name(path: str | Path) -> str | None:
    """The ``processor_class`` a checkpoint dir names in its processor/preprocessor/tokenizer config."""
    for name in _CONFIG_FILES:
        f = Path(path) / name
        if f.is_file():
            try:
                value = json.loads(f.read_text()).get("processor_class")
            except (json.JSONDecodeError, AttributeError):
                raise InputError(f"{f}: not a JSON object") from None
            if value:
                return str(value)
    return None


def _without_video(cls):
    """``cls`` with its video sub-processor dropped from the attributes it requires (videos need torch)."""
    attrs = [a for a in cls.get_attributes() if "video" not in a]
    if len(attrs) == len(cls.get_attributes()):
        return cls
    return type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda _cls: list(attrs)),
                                       "__module__": cls.__module__, "__doc__": cls.__doc__})


def load_hf_processor(path: str | Path):
    """The checkpoint's transformers processor with PIL image processing and no video processor; falls back to
    ``AutoProcessor.from_pretrained`` for a dir that names no processor class."""
    from transformers.models.auto.processing_auto import processor_class_from_name

    path = str(path)
    name = processor_class_name(path)
    cls = processor_class_from_name(name) if name else None
    if cls is None:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)
    cls = _without_video(cls)
    processor_dict, init_kwargs = cls.get_processor_dict(path)
    args = []
    for attr in cls.get_attributes():
        if attr == "image_processor":
            from transformers.models.auto.image_processing_auto import AutoImageProcessor

            args.append(AutoImageProcessor.from_pretrained(path, backend="pil"))
        elif attr == "tokenizer":
            from transformers import AutoTokenizer

            args.append(AutoTokenizer.from_pretrained(path))
        else:  # a sub-processor kvtool does not know: let transformers build the whole processor
            from transformers import AutoProcessor

            return AutoProcessor.from_pretrained(path)
    return cls.from_args_and_dict(args, processor_dict, **init_kwargs)


def load_processor(path: str | Path) -> FastProcessor:
    """The runtime's processor for a checkpoint or export dir (``FastProcessor`` over ``load_hf_processor``)."""
    return FastProcessor(load_hf_processor(path))


class FastProcessor:
    """A transformers processor with a fast ``__call__`` for LLaVA-1.5, LLaVA-NeXT and Qwen2-VL (module doc)."""

    def __init__(self, processor):
        self.processor = processor
        self.kind = type(processor).__name__
        self._kwargs = self._resolve_kwargs() if self.kind in FAST_CLASSES else None

    def __getattr__(self, name: str) -> Any:  # everything else is the wrapped processor's
        if name == "processor":
            raise AttributeError(name)
        return getattr(self.processor, name)

    def _resolve_kwargs(self) -> tuple[dict, dict, bool] | None:
        """The image-processor and tokenizer keywords the processor's ``__call__`` would pass (its
        ``<Class>Kwargs`` defaults merged with the tokenizer's init keywords), resolved once."""
        import sys

        cls = type(self.processor)
        module = sys.modules.get(cls.__module__)
        kwargs_cls = getattr(module, f"{cls.__name__}Kwargs", None)
        if kwargs_cls is None:
            return None
        merged = self.processor._merge_kwargs(kwargs_cls, tokenizer_init_kwargs=self.processor.tokenizer.init_kwargs)
        text = dict(merged["text_kwargs"])
        mm_types = bool(text.pop("return_mm_token_type_ids", False))
        text.pop("return_tensors", None)
        images = dict(merged["images_kwargs"])
        images.pop("return_tensors", None)
        return images, text, mm_types

    def __call__(self, images=None, text=None, return_tensors: str | None = None, **kwargs):
        fast = (self._kwargs is not None and isinstance(text, str) and return_tensors == "np"
                and set(kwargs) <= set(TOKENIZER_KWARGS))
        if not fast:
            return self.processor(images=images, text=text, return_tensors=return_tensors, **kwargs)
        from transformers import BatchFeature

        proc = self.processor
        images_kwargs, text_kwargs, mm_types = self._kwargs
        image_inputs: dict[str, Any] = {}
        if images is not None:
            image_inputs = dict(proc.image_processor(images, return_tensors="np", **images_kwargs))
        prompt = self._expand(text, image_inputs) if image_inputs else text
        enc = proc.tokenizer([prompt], **{**text_kwargs, **kwargs})
        if image_inputs:
            proc._check_special_mm_tokens([prompt], enc, modalities=["image"])
        data = dict(enc)
        if mm_types:
            data["mm_token_type_ids"] = proc.create_mm_token_type_ids(enc["input_ids"])
        return BatchFeature(data={**data, **image_inputs}, tensor_type="np")

    def _expand(self, text: str, image_inputs: dict[str, Any]) -> str:
        """``text`` with each image token repeated as many times as that image has feature tokens."""
        proc = self.processor
        token = proc.image_token
        if self.kind == "LlavaProcessor":
            h, w = np.asarray(image_inputs["pixel_values"]).shape[-2:]
            n = (h // proc.patch_size) * (w // proc.patch_size) + proc.num_additional_image_tokens
            n -= proc.vision_feature_select_strategy == "default"
            return text.replace(token, token * int(n))
        if self.kind == "LlavaNextProcessor":
            h, w = np.asarray(image_inputs["pixel_values"]).shape[-2:]
            counts = []
            for oh, ow in np.asarray(image_inputs["image_sizes"]).tolist():
                n = proc._get_number_of_features(oh, ow, h, w)
                counts.append(n - (proc.vision_feature_select_strategy == "default"))
        else:  # Qwen2VLProcessor
            merge = proc.image_processor.merge_size ** 2
            counts = [int(np.prod(g)) // merge for g in np.asarray(image_inputs["image_grid_thw"])]
        parts = text.split(token)
        if len(parts) - 1 > len(counts):
            raise ValueError(f"prompt holds {len(parts) - 1} image tokens for {len(counts)} image(s)")
        out = [parts[0]]
        for i, part in enumerate(parts[1:]):
            out.append(token * int(counts[i]))
            out.append(part)
        return "".join(out)
