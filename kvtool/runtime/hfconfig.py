"""A checkpoint's (or export's) ``config.json`` read as plain JSON, for the graph engines.

With torch installed, ``transformers.AutoConfig`` imports torch (``transformers.configuration_utils`` ->
``generation`` -> ``logits_process``) and the model's configuration module: measured on the 2-core build machine
(transformers 5.5, torch 2.14), ~850 MiB of resident memory and 15-30 s before any graph is compiled — more
than an OpenVINO or ONNX Runtime run needs for its whole model at 2k tokens (issue 13). The graph engines only
read a few fields, so ``read_config`` answers from the JSON itself when every field the architecture needs is
written there, and falls back to ``AutoConfig`` (whose class defaults fill fields ``save_pretrained`` left
out) when one is missing. It does not validate a config beyond that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvtool.errors import InputError

# dotted fields each architecture's graph engine reads; "a|b" means either of them
REQUIRED: dict[str, tuple[str, ...]] = {
    "llava": ("image_token_id|image_token_index",),
    "llava_next": ("image_token_id|image_token_index", "image_grid_pinpoints", "vision_config.image_size",
                   "vision_config.patch_size"),
    "qwen2_vl": ("image_token_id|image_token_index", "vision_config.spatial_merge_size", "vision_config.embed_dim",
                 "vision_config.num_heads"),
}


class JsonConfig:
    """Attribute access over a config dict (nested dicts are ``JsonConfig`` too); a field the JSON does not
    hold raises ``AttributeError``, so ``getattr(cfg, name, default)`` works as on a transformers config."""

    def __init__(self, data: dict[str, Any]):
        self._data = data

    def __getattr__(self, name: str) -> Any:
        data = self.__dict__.get("_data", {})
        if name not in data:
            raise AttributeError(name)
        value = data[name]
        return JsonConfig(value) if isinstance(value, dict) else value

    def to_dict(self) -> dict[str, Any]:
        return dict(self._data)


def _has(data: dict, dotted: str) -> bool:
    for alt in dotted.split("|"):
        node: Any = data
        for part in alt.split("."):
            if not isinstance(node, dict) or node.get(part) is None:
                node = None
                break
            node = node[part]
        if node is not None:
            return True
    return False


def read_config(path: str | Path, architecture: str):
    """``config.json`` of ``path`` as a ``JsonConfig`` when it holds every field ``REQUIRED[architecture]``
    names, else ``transformers.AutoConfig.from_pretrained(path)`` (an architecture not listed also takes
    AutoConfig). Raises ``InputError`` for a missing or unreadable config.json."""
    f = Path(path) / "config.json"
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no config.json (a kvtool export keeps its source checkpoint's)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{f}: not valid JSON ({exc})") from None
    need = REQUIRED.get(architecture)
    if isinstance(data, dict) and need is not None and all(_has(data, k) for k in need):
        return JsonConfig(data)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))
