"""The RoPE keys of a written ``config.json`` also spelled the transformers-4 way, so that older stacks (e.g.
optimum-cli's venv with transformers 4.57) read a checkpoint ``kvtool models make`` wrote with transformers 5.

transformers 5 writes a text config's RoPE as ``rope_parameters = {"rope_type", "rope_theta", "mrope_section"?}``;
transformers 4.x reads ``rope_theta`` (a top-level key of the text config, default 1e6 for Qwen2-VL's text config,
10000 for Llama's) and ``rope_scaling`` (None unless given; Qwen2-VL's attention reads
``rope_scaling["mrope_section"]``, and 4.x turns ``{"type": "mrope"}`` into the default rope type), and
ignores ``rope_parameters``. ``add_transformers4_rope_keys`` adds ``rope_theta`` beside every text config's
``rope_parameters`` and, where it has an ``mrope_section``, ``rope_scaling = {"type": "mrope", "mrope_section"}``
as the published Qwen2-VL ``config.json`` spells it (also at the top level, where that file has them).
transformers 5 reads the same values back: its Qwen2-VL text config takes ``rope_scaling`` (with ``rope_theta``)
in place of ``rope_parameters``, and its Llama config keeps ``rope_parameters``, whose theta is the same.
Other keys are left as transformers 5 wrote them; it does not convert anything else (e.g. ``dtype``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["add_transformers4_rope_keys", "transformers4_rope_keys"]


def transformers4_rope_keys(text: dict[str, Any]) -> dict[str, Any]:
    """The transformers-4 RoPE keys for a text config dict holding transformers 5's ``rope_parameters``: ``{}``
    when it has none or its rope type is not ``default`` (scaled RoPE: not converted), else ``{"rope_theta"}``
    plus, with an ``mrope_section``, ``{"rope_scaling": {"type": "mrope", "mrope_section": [...]}}``."""
    rope = text.get("rope_parameters")
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default" or "rope_theta" not in rope:
        return {}
    keys: dict[str, Any] = {"rope_theta": rope["rope_theta"]}
    if rope.get("mrope_section") is not None:
        keys["rope_scaling"] = {"type": "mrope", "mrope_section": list(rope["mrope_section"])}
    return keys


def add_transformers4_rope_keys(model_dir: str | Path) -> dict[str, Any]:
    """Rewrite ``model_dir/config.json`` with ``transformers4_rope_keys`` added to its ``text_config`` (and, for
    ``qwen2_vl``, to the top level, as the published file has them); keys already present are kept. Returns the
    keys added to the text config (``{}``: nothing to add). A config without ``text_config`` is read as the text
    config itself."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    keys = {k: v for k, v in transformers4_rope_keys(text).items() if k not in text}
    if not keys:
        return {}
    text.update(keys)
    if cfg.get("model_type") == "qwen2_vl" and text is not cfg:
        for k, v in keys.items():
            cfg.setdefault(k, v)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return keys
