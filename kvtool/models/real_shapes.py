"""Random checkpoints with the real shapes of the study's models, written shard by shard, offline.

``make_real_shape_model(name, out_dir, layers=N)`` writes a Hugging Face checkpoint directory whose
``config.json`` carries the published ``config.json`` values of one of the study's models (vocabulary, widths,
heads, image size, patch, anyres grid, special-token ids; table ``PUBLISHED``), with random weights and the
decoder optionally truncated to ``N`` layers. It exists for scale tests and for users who want to see what
their machine can hold before downloading 14 GB.

Memory: the model is built on torch's ``meta`` device (no storage), and each parameter is drawn in the
checkpoint dtype (fp16 for LLaVA, bf16 for Qwen2-VL, as published) and appended to the current safetensors
shard; a shard is written and freed once it reaches ``shard_bytes`` (default 512 MiB). Peak RSS is about
two shards (safetensors serialises a shard to bytes before writing) plus the largest tensor, whatever the model size: a full 32-layer LLaVA-1.5-7B (13.5 GB of fp16) is
written on a 24 GB machine. No fp32 copy of the model ever exists.

Weights: Linear/Embedding/conv weights ~ N(0, initializer_range) (0.02 in every published config), norm
weights 1, biases 0, CLIP's class embedding N(0, 0.02); seeded per tensor name, so the same name, layers and
seed give the same weights. The tokenizer is kvtool's offline byte-level BPE padded with unreachable filler
entries so that the special tokens sit at the published ids (``<image>`` = 32000 for LLaVA, ``<|image_pad|>``
= 151655 for Qwen2-VL); it is not the model's real tokenizer, and the random weights answer nonsense.
This module does not export or run models.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

from kvtool.errors import InputError

# ---------------------------------------------------------------------------------------------------------
# Published config.json values. Sources (the hub model cards' config.json, read 2026-11):
#   llava-1.5-7b          https://huggingface.co/llava-hf/llava-1.5-7b-hf/blob/main/config.json
#   llava-1.5-13b         https://huggingface.co/llava-hf/llava-1.5-13b-hf/blob/main/config.json
#   llava-v1.6-vicuna-7b  https://huggingface.co/llava-hf/llava-v1.6-vicuna-7b-hf/blob/main/config.json
#   qwen2-vl-2b           https://huggingface.co/Qwen/Qwen2-VL-2B-Instruct/blob/main/config.json
#   qwen2-vl-7b           https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct/blob/main/config.json
# The llava-hf configs leave Llama-7B's widths at LlamaConfig's defaults (hidden 4096, intermediate 11008,
# 32 layers, 32 heads, rope_theta 10000, which equal lmsys/vicuna-7b-v1.5's config.json); they are written
# out here. Qwen2-VL's vision_config lists hidden_size/in_chans/spatial_patch_size and leaves depth 32,
# embed_dim 1280, num_heads 16, mlp_ratio 4, patch 14, spatial_merge_size 2, temporal_patch_size 2 at the
# Qwen2-VL defaults, written out too. Keys: "text" (text_config), "vision" (vision_config), "top" (the rest).
# ---------------------------------------------------------------------------------------------------------

_CLIP_L_336 = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "num_attention_heads": 16,
               "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}
_LLAVA_TOP = {"image_token_index": 32000, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
              "vision_feature_select_strategy": "default", "tie_word_embeddings": False}
_VICUNA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "vocab_size": 32064, "rope_theta": 10000.0, "hidden_act": "silu"}
_QWEN2_VL_VISION = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_channels": 3,
                    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
_QWEN2_VL_TOKENS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                    "vision_end_token_id": 151653}
_QWEN2_VL_TEXT = {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                  "mrope_section": [16, 24, 24], "hidden_act": "silu", "bos_token_id": 151643,
                  "eos_token_id": 151645, "num_hidden_layers": 28, "max_window_layers": 28,
                  "use_sliding_window": False}

PUBLISHED: dict[str, dict[str, Any]] = {
    "llava-1.5-7b": {
        "hub_id": "llava-hf/llava-1.5-7b-hf", "model_type": "llava", "dtype": "float16",
        "top": {**_LLAVA_TOP, "pad_token_id": 32001},
        "text": dict(_VICUNA_7B),
        "vision": dict(_CLIP_L_336),
        "params_b": 7.06,  # parameter count the hub card shows (billions, rounded)
    },
    "llava-1.5-13b": {
        "hub_id": "llava-hf/llava-1.5-13b-hf", "model_type": "llava", "dtype": "float16",
        "top": {**_LLAVA_TOP, "pad_token_id": 32001},
        "text": {**_VICUNA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                 "num_attention_heads": 40, "num_key_value_heads": 40},
        "vision": dict(_CLIP_L_336),
        "params_b": 13.4,
    },
    "llava-v1.6-vicuna-7b": {
        "hub_id": "llava-hf/llava-v1.6-vicuna-7b-hf", "model_type": "llava_next", "dtype": "float16",
        "top": {**_LLAVA_TOP, "use_image_newline_parameter": True,
                "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]},
        "text": {**_VICUNA_7B, "pad_token_id": 0},
        "vision": dict(_CLIP_L_336),
        "params_b": 7.06,
    },
    "qwen2-vl-2b": {
        "hub_id": "Qwen/Qwen2-VL-2B-Instruct", "model_type": "qwen2_vl", "dtype": "bfloat16",
        "top": {**_QWEN2_VL_TOKENS, "tie_word_embeddings": True},
        "text": {**_QWEN2_VL_TEXT, "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
                 "num_key_value_heads": 2, "vocab_size": 151936},
        "vision": {**_QWEN2_VL_VISION, "hidden_size": 1536},
        "params_b": 2.21,
    },
    "qwen2-vl-7b": {
        "hub_id": "Qwen/Qwen2-VL-7B-Instruct", "model_type": "qwen2_vl", "dtype": "bfloat16",
        "top": {**_QWEN2_VL_TOKENS, "tie_word_embeddings": False},
        "text": {**_QWEN2_VL_TEXT, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "vocab_size": 152064},
        "vision": {**_QWEN2_VL_VISION, "hidden_size": 3584},
        "params_b": 8.29,
    },
}

REAL_SHAPE_MODELS = {name: f"{p['hub_id']} shapes ({p['model_type']}, {p['dtype']}), random weights"
                     for name, p in PUBLISHED.items()}

def config_field(config: Any, where: str, key: str) -> Any:
    """The value of a published field (``where`` in text | vision | top) read back from a transformers
    config; rope fields are read from ``rope_parameters`` as transformers 5 stores them."""
    obj = {"text": config.get_text_config(), "vision": getattr(config, "vision_config", None), "top": config}[where]
    if key in ("rope_theta", "mrope_section"):
        return (getattr(obj, "rope_parameters", None) or {}).get(key)
    if where == "text" and key in ("bos_token_id", "eos_token_id", "pad_token_id") and getattr(obj, key, None) is None:
        return getattr(config, key, None)
    return getattr(obj, key)


def mismatched_fields(name: str, config: Any, layers: int | None = None) -> list[str]:
    """Published fields of ``name`` that ``config`` does not carry (``layers``: the expected truncation)."""
    p = PUBLISHED[name]
    bad = []
    for where in ("top", "text", "vision"):
        for key, want in p[where].items():
            if where == "text" and key in ("num_hidden_layers", "max_window_layers") and layers is not None:
                want = layers
            got = config_field(config, where, key)
            if isinstance(want, list):
                got = [list(x) if isinstance(x, (list, tuple)) else x for x in (got or [])]
            if got != want:
                bad.append(f"{where}.{key}: {got!r} != published {want!r}")
    return bad


def real_shape_config(name: str, layers: int | None = None):
    """The transformers config of ``name`` (published values; decoder truncated to ``layers`` if given)."""
    if name not in PUBLISHED:
        raise InputError(f"unknown model shape {name!r}; expected one of {', '.join(PUBLISHED)}")
    p = PUBLISHED[name]
    full = p["text"]["num_hidden_layers"]
    if layers is not None and not 1 <= layers <= full:
        raise InputError(f"--layers {layers}: expected 1..{full} for {name}")
    text = {k: v for k, v in p["text"].items() if k not in ("rope_theta", "mrope_section")}
    rope = {"rope_type": "default", "rope_theta": p["text"]["rope_theta"]}
    if "mrope_section" in p["text"]:
        rope["mrope_section"] = list(p["text"]["mrope_section"])
    text["rope_parameters"] = rope
    if layers is not None:
        text["num_hidden_layers"] = layers
        if "max_window_layers" in text:
            text["max_window_layers"] = layers
    top = dict(p["top"])
    if p["model_type"] == "qwen2_vl":
        from transformers import Qwen2VLConfig

        text["tie_word_embeddings"] = top["tie_word_embeddings"]
        cfg = Qwen2VLConfig(text_config=text, vision_config=dict(p["vision"]), **top)
    else:
        from transformers import LlavaConfig, LlavaNextConfig

        cls = LlavaNextConfig if p["model_type"] == "llava_next" else LlavaConfig
        side, patch = p["vision"]["image_size"], p["vision"]["patch_size"]
        cfg = cls(text_config={"model_type": "llama", **text},
                  vision_config={"model_type": "clip_vision_model", **p["vision"]},
                  image_seq_length=(side // patch) ** 2, **top)
    cfg.dtype = p["dtype"]
    return cfg


def _filled_tokenizer(base_specials: list[str], filler_to: int, late_specials: list[str], **kwargs):
    """kvtool's offline BPE (``base_specials`` at ids 0..), its vocabulary padded with unreachable filler
    entries up to ``filler_to``, then ``late_specials`` at ``filler_to``, ``filler_to + 1``, ..."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    from kvtool.models.tokenizer import build_tokenizer

    extra_attrs = kwargs.pop("extra_attrs", None) or {}
    pad = kwargs.pop("pad_token", None)
    base = build_tokenizer(base_specials, vocab_size=1024, **kwargs)
    spec = json.loads(base.backend_tokenizer.to_str())
    # keep only the base specials: the late ones must take the published ids
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in base_specials]
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), filler_to):  # never produced: no merge builds them
        vocab[f"<|kvtool_filler_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in late_specials])
    for i, t in enumerate(late_specials):
        assert tok.token_to_id(t) == filler_to + i, t
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=base.bos_token, eos_token=base.eos_token, unk_token=base.unk_token,
        pad_token=pad or base.eos_token, model_max_length=base.model_max_length, clean_up_tokenization_spaces=False,
        extra_special_tokens=extra_attrs,
    )


def _processor(name: str):
    """Tokenizer + image processor with the published ids and preprocessing of ``name``."""
    from kvtool.models.tiny import LLAVA_CHAT_TEMPLATE, QWEN2_VL_CHAT_TEMPLATE

    p = PUBLISHED[name]
    if p["model_type"] == "qwen2_vl":
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        late = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
        tok = _filled_tokenizer(["<|kvtool_unused|>"], 151643, late, bos_token=None, eos_token="<|im_end|>",
                                pad_token="<|endoftext|>", add_bos=False, model_max_length=32768,
                                extra_attrs={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                             "vision_start_token": "<|vision_start|>",
                                             "vision_end_token": "<|vision_end|>"})
        pix = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2,
               "temporal_patch_size": 2}
        return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pix), tokenizer=tok,
                                video_processor=Qwen2VLVideoProcessor(**pix), chat_template=QWEN2_VL_CHAT_TEMPLATE)
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    tok = _filled_tokenizer(["<unk>", "<s>", "</s>"], 32000, ["<image>", "<pad>"], unk_token="<unk>",
                            pad_token="<pad>", extra_attrs={"image_token": "<image>"})
    img = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
               resample=3, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True)
    kw = dict(tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
              chat_template=LLAVA_CHAT_TEMPLATE)
    if p["model_type"] == "llava_next":
        ip = LlavaNextImageProcessor(image_grid_pinpoints=p["top"]["image_grid_pinpoints"], **img)
        return LlavaNextProcessor(image_processor=ip, **kw)
    return LlavaProcessor(image_processor=CLIPImageProcessor(**img), **kw)


def _model_class(model_type: str):
    import transformers

    return {"llava": transformers.LlavaForConditionalGeneration,
            "llava_next": transformers.LlavaNextForConditionalGeneration,
            "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}[model_type]


def meta_model(config: Any):
    """The model of ``config`` on the meta device (shapes only, no storage)."""
    import torch

    with torch.device("meta"):
        return _model_class(config.model_type)(config)


def _random_tensor(name: str, shape: tuple, dtype: Any, seed: int, std: float):
    import torch

    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF)
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    if leaf == "weight" and len(shape) == 1 and ("norm" in owner or "ln" in owner or "layrnorm" in owner):
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=g)


def write_random_weights(model: Any, out: Path, dtype: Any, seed: int = 0, shard_bytes: int = 512 << 20,
                         std: float = 0.02, progress: bool = False) -> dict[str, Any]:
    """Write random weights for every (untied) parameter of meta ``model`` as safetensors shards in ``out``
    (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``); at most one shard is held.
    ``progress``: kvtool's progress bar of the shards (in bytes) on stderr. Returns ``{"files": n, "bytes":
    total, "params": count}``."""
    import os

    from safetensors.torch import save_file
    from tqdm import tqdm

    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # tied weights appear once
    sizes = [dtype.itemsize * _numel(s) for _, s in params]
    groups: list[list[int]] = [[]]
    acc = 0
    for i, nbytes in enumerate(sizes):
        if groups[-1] and acc + nbytes > shard_bytes:
            groups.append([])
            acc = 0
        groups[-1].append(i)
        acc += nbytes
    weight_map: dict[str, str] = {}
    bar = tqdm(total=sum(sizes), desc=f"write {len(groups)} shard(s)", unit="B", unit_scale=True,
               unit_divisor=1024, disable=not progress)
    for k, idxs in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        shard = {params[i][0]: _random_tensor(params[i][0], params[i][1], dtype, seed, std) for i in idxs}
        tmp = out / (fname + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / fname)
        weight_map.update({params[i][0]: fname for i in idxs})
        del shard
        bar.update(sum(sizes[i] for i in idxs))
    bar.close()
    total = sum(sizes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return {"files": len(groups), "bytes": total, "params": sum(_numel(s) for _, s in params)}


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_real_shape_model(name: str, out_dir: str | Path, *, layers: int | None = None, seed: int = 0,
                          dtype: str | None = None, shard_bytes: int = 512 << 20,
                          progress: bool = False) -> dict[str, Any]:
    """Write the random checkpoint of ``name`` (a ``PUBLISHED`` key) into ``out_dir``.

    ``layers``: decoder layers kept (default: all, as published); ``dtype``: ``float16`` | ``bfloat16``
    (default: the published one); ``progress``: a progress bar of the shards on stderr. Returns ``{"path", "name", "hub_id", "layers", "dtype", "files", "bytes",
    "params"}``. Raises ``InputError`` for an unknown name, a bad layer count or dtype.
    """
    import torch

    cfg = real_shape_config(name, layers)
    dtype = dtype or PUBLISHED[name]["dtype"]
    if dtype not in ("float16", "bfloat16"):
        raise InputError(f"--dtype {dtype!r}: expected float16 or bfloat16 (checkpoints are written in 16 bits)")
    cfg.dtype = dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    model = meta_model(cfg)
    info = write_random_weights(model, out, getattr(torch, dtype), seed=seed, shard_bytes=shard_bytes,
                                progress=progress)
    cfg.save_pretrained(out)
    from kvtool.models.legacy_config import add_transformers4_rope_keys

    add_transformers4_rope_keys(out)  # older stacks (transformers 4.x) read the same RoPE (legacy_config)
    gen = model.generation_config
    gen.do_sample = False
    gen.save_pretrained(out)
    _processor(name).save_pretrained(out)
    return {"path": str(out), "name": name, "hub_id": PUBLISHED[name]["hub_id"],
            "layers": cfg.get_text_config().num_hidden_layers, "dtype": dtype, **info}
