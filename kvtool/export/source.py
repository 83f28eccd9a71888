"""The model an export starts from: locate the checkpoint, check its architecture, hash it, load it.

Resolves a local Hugging Face checkpoint directory (or a hub id when online) to a directory, maps its
``config.model_type`` to one of kvtool's architectures, hashes the weight files for the manifest, reads the
language model's KV geometry, and loads the PyTorch model (in its own dtype for both backends). It does not convert or quantize anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.manifest import LMInfo

# config.model_type -> kvtool architecture name (DESIGN.md; manifest.ARCHITECTURES)
SUPPORTED_MODEL_TYPES = {"llava": "llava", "llava_next": "llava_next", "qwen2_vl": "qwen2_vl"}


def resolve_model_dir(model: str) -> Path:
    """A local checkpoint directory for ``model``; a hub id is downloaded only when the hub is reachable."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "kvtool.json").is_file():
            raise InputError(f"model {model}: is a kvtool export (kvtool.json), not a checkpoint; export from the "
                             "Hugging Face checkpoint it was made from")
        if not (path / "config.json").is_file():
            raise InputError(f"model {model}: directory has no config.json (expected a Hugging Face checkpoint)")
        return path
    looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") != 1 or path.exists()
    if looks_like_path:
        raise InputError(f"model {model}: no such directory (expected a Hugging Face checkpoint directory)")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0"):
        raise InputError(f"model {model}: not a local directory and the hub is offline (HF_HUB_OFFLINE is set)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # network errors come in many types; the user only needs one line
        raise InputError(f"model {model}: not a local directory and the hub could not be reached "
                         f"({type(exc).__name__})") from None


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"model {model_dir}: config.json is not valid JSON ({exc.msg})") from None


def architecture_of(config: dict[str, Any], where: str) -> str:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"model {where}: unsupported architecture {model_type!r} "
                         f"(supported model types: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return SUPPORTED_MODEL_TYPES[model_type]


def lm_linear_widths(config: dict[str, Any]) -> set[int]:
    """Input widths of the language model's linears, from a raw config.json (empty if not stated)."""
    tc = config.get("text_config") or config
    widths = {tc.get("hidden_size"), tc.get("intermediate_size")}
    heads, head_dim = tc.get("num_attention_heads"), tc.get("head_dim")
    if heads and head_dim:
        widths.add(heads * head_dim)
    return {int(w) for w in widths if w}


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files, sorted: its safetensors shards, else its ``*.bin`` files."""
    return sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))


def check_weights(model_dir: Path, where: str) -> None:
    """Raise ``InputError`` unless ``model_dir`` holds a checkpoint's weights (``*.safetensors`` or
    ``pytorch_model*.bin``): a folder with a config.json and nothing to load is refused in one line, before
    transformers' loader fails deep inside."""
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("pytorch_model*.bin")):
        raise InputError(f"model {where}: no weight files (expected *.safetensors or pytorch_model*.bin of a "
                         "Hugging Face checkpoint)")


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the weight files (name and bytes, in sorted order) of a checkpoint."""
    files = weight_files(model_dir)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def lm_info(hf_config: Any) -> LMInfo:
    """KV geometry of the language model of a loaded transformers config."""
    tc = hf_config.get_text_config()
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return LMInfo(num_layers=tc.num_hidden_layers, num_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
                  head_dim=int(head_dim), hidden_size=tc.hidden_size, vocab_size=tc.vocab_size)


def load_torch_model(model_dir: Path, trust_remote_code: bool = False, own_dtype: bool = False):
    """The PyTorch model (eval mode) of a checkpoint, loaded from safetensors without any download: in the
    checkpoint's own dtype (``config.json``'s ``dtype``/``torch_dtype``: a 16-bit checkpoint is never
    up-cast) when ``own_dtype`` (what the exporters use), else in fp32 (reference models in tests)."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype="auto" if own_dtype else torch.float32, trust_remote_code=trust_remote_code,
        use_safetensors=True, low_cpu_mem_usage=True,
    )
    return model.eval()


def save_processor_files(model_dir: Path, out: Path, model: Any) -> None:
    """Write config.json and the processor/tokenizer files so ``AutoProcessor.from_pretrained(out)`` works."""
    from transformers import AutoProcessor

    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    try:
        AutoProcessor.from_pretrained(model_dir).save_pretrained(out)
    except (OSError, ValueError) as exc:
        raise InputError(f"model {model_dir}: its processor/tokenizer could not be loaded ({exc})") from None
