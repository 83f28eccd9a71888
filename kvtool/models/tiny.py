"""Tiny random checkpoints of the three architectures kvtool supports, built offline.

``make_tiny_model(name, out_dir)`` writes a Hugging Face checkpoint directory (config.json, model.safetensors,
tokenizer, image processor, processor with the model family's chat template) that loads with
``AutoProcessor.from_pretrained`` and the model class, with no hub access:

| name              | model class                            | text model             | image tokens (default) |
|-------------------|----------------------------------------|------------------------|------------------------|
| `tiny-llava`      | LlavaForConditionalGeneration          | Llama, 4 heads x 32    | 144 (48 px, patch 4)   |
| `tiny-llava-next` | LlavaNextForConditionalGeneration      | Llama, 4 heads x 32    | 144 x (1 + tiles) + newlines |
| `tiny-qwen2-vl`   | Qwen2VLForConditionalGeneration        | Qwen2, 4 q / 2 kv heads x 64 | ~144 (~96x96 px, patch 4, merge 2) |

D_model (kv heads x head dim) is 128 by default and one image gives more than 128 tokens, so KV groups of 128
are exercised. Sizes can be raised (``hidden``, ``layers``, ``heads``, ``kv_heads``, ...) to build mid-size
models for benchmarks. Weights are random (seeded): these models answer nonsense; they exist to test graphs,
runtimes and pipelines. The trained demo model is ``kvtool.models.shapes_*``. This module does not export or
run models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from kvtool.errors import InputError

TINY_MODELS = {
    "tiny-llava": "LLaVA-1.5 style: CLIP vision tower + MLP projector + Llama decoder",
    "tiny-llava-next": "LLaVA-1.6/NeXT style: anyres tiling with image newline tokens, Llama decoder",
    "tiny-qwen2-vl": "Qwen2-VL style: windowless ViT with 2x2 patch merger, Qwen2 decoder with 3-D mRoPE",
}

# The chat templates below are written for kvtool to render the conversations these model families use
# (LLaVA-1.5 / LLaVA-1.6-vicuna: "USER: <image>\n{q} ASSISTANT:"; Qwen2-VL: ChatML with vision markers).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN2_VL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySize:
    """Sizes of a tiny checkpoint; every field can be overridden through ``make_tiny_model(**overrides)``."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 256
    vocab_size: int = 1024
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 48  # LLaVA / NeXT tile side; Qwen2-VL images are resized to <= (2*image_size)^2 pixels
    patch_size: int = 4
    max_positions: int = 4096


_DEFAULTS = {
    "tiny-llava": TinySize(),
    "tiny-llava-next": TinySize(),
    "tiny-qwen2-vl": TinySize(hidden=256, intermediate=512, kv_heads=2),
}


def _lm_dims(s: TinySize, tok) -> dict:
    """The language model's sizes of ``s`` as transformers' text configs name them (vocabulary: ``tok``'s)."""
    return dict(vocab_size=len(tok), hidden_size=s.hidden, intermediate_size=s.intermediate,
                num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                max_position_embeddings=s.max_positions)


def _llama_text_config(s: TinySize, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        **_lm_dims(s, tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _clip_vision_config(s: TinySize):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=s.vision_hidden,
        intermediate_size=s.vision_hidden * 2,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        image_size=s.image_size,
        patch_size=s.patch_size,
        projection_dim=s.vision_hidden,
    )


def _llava_tokenizer(s: TinySize, extra_corpus=()):
    from kvtool.models.tokenizer import build_tokenizer

    return build_tokenizer(
        ["<unk>", "<s>", "</s>", "<image>"],
        vocab_size=s.vocab_size,
        unk_token="<unk>",
        extra_corpus=extra_corpus,
        extra_attrs={"image_token": "<image>"},
    )


def _clip_image_processor_kwargs(s: TinySize) -> dict:
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return dict(
        size={"shortest_edge": s.image_size},
        crop_size={"height": s.image_size, "width": s.image_size},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


def _image_seq_length(s: TinySize) -> int:
    """Image tokens of one LLaVA tile (CLS dropped), recorded in the config as LLaVA checkpoints do."""
    return (s.image_size // s.patch_size) ** 2


def _llava_family(s: TinySize, config_cls, model_cls, processor_cls, image_processor, tok, **config_extra):
    """Model + processor of the LLaVA family (CLIP tower, MLP projector, Llama decoder, ``<image>`` token)."""
    config = config_cls(
        image_seq_length=_image_seq_length(s),
        vision_config=_clip_vision_config(s),
        text_config=_llama_text_config(s, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        **config_extra,
    )
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=s.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model_cls(config), processor


def build_llava(s: TinySize, extra_corpus=()):
    """A random ``LlavaForConditionalGeneration`` of sizes ``s`` and its processor (tokenizer trained offline,
    with ``extra_corpus`` lines added to its training text so a task's words get their own tokens)."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    return _llava_family(s, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                         CLIPImageProcessor(**_clip_image_processor_kwargs(s)), _llava_tokenizer(s, extra_corpus))


def _build_llava_next(s: TinySize):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    side = s.image_size
    pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    image_processor = LlavaNextImageProcessor(image_grid_pinpoints=pinpoints, **_clip_image_processor_kwargs(s))
    return _llava_family(s, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, image_processor,
                         _llava_tokenizer(s), image_grid_pinpoints=pinpoints)


def _build_qwen2_vl(s: TinySize):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from kvtool.models.tokenizer import build_tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = build_tokenizer(
        specials,
        vocab_size=s.vocab_size,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        add_bos=False,
        extra_attrs={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                     "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )
    head_dim = s.hidden // s.heads
    if head_dim % 4:
        raise InputError(f"tiny-qwen2-vl: head dim {head_dim} must be a multiple of 4 for 3-D mRoPE")
    half = head_dim // 2
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    mrope_section = [t_sec, h_sec, half - t_sec - h_sec]
    text = dict(
        **_lm_dims(s, tok),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    vision = dict(
        depth=s.vision_layers,
        embed_dim=s.vision_hidden,
        hidden_size=s.hidden,
        num_heads=s.vision_heads,
        mlp_ratio=2,
        patch_size=s.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config)
    side = 2 * s.image_size
    # min = max pixels: every image is resized to about side x side, i.e. ~(side/patch/2)^2 = 144 tokens.
    image_processor = Qwen2VLImageProcessor(
        min_pixels=side * side,
        max_pixels=side * side,
        patch_size=s.patch_size,
        merge_size=2,
        temporal_patch_size=2,
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=side * side, max_pixels=side * side, patch_size=s.patch_size, merge_size=2,
        temporal_patch_size=2,
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    return model, processor


_BUILDERS = {"tiny-llava": build_llava, "tiny-llava-next": _build_llava_next, "tiny-qwen2-vl": _build_qwen2_vl}


def tiny_size(name: str, **overrides) -> TinySize:
    """The sizes ``make_tiny_model(name, **overrides)`` would use (validated)."""
    if name not in _DEFAULTS:
        raise InputError(f"unknown tiny model {name!r}; expected one of {', '.join(TINY_MODELS)}")
    fields = set(asdict(_DEFAULTS[name]))
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InputError(f"unknown size option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(fields))}")
    bad = {k: v for k, v in overrides.items() if v is not None and int(v) < 1}
    if bad:  # a size of 0 built a model without layers/heads; negative ones fail deep in torch
        k, v = next(iter(bad.items()))
        raise InputError(f"{k}={v}: expected a positive integer")
    s = replace(_DEFAULTS[name], **{k: int(v) for k, v in overrides.items() if v is not None})
    if s.hidden % s.heads:
        raise InputError(f"hidden={s.hidden} is not a multiple of heads={s.heads}")
    if s.heads % s.kv_heads:
        raise InputError(f"heads={s.heads} is not a multiple of kv_heads={s.kv_heads}")
    if s.vision_hidden % s.vision_heads:
        raise InputError(f"vision_hidden={s.vision_hidden} is not a multiple of vision_heads={s.vision_heads}")
    if s.image_size % s.patch_size:
        raise InputError(f"image_size={s.image_size} is not a multiple of patch_size={s.patch_size}")
    return s


def make_tiny_model(name: str, out_dir: str | Path, *, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    """Build the tiny random checkpoint ``name`` (see the module table) into ``out_dir`` and return it.

    ``overrides`` change the sizes of :class:`TinySize` (e.g. ``hidden=1024, layers=8, heads=8``).
    The same name, sizes and seed always give the same weights.
    """
    import torch

    s = tiny_size(name, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model, processor = _BUILDERS[name](s)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    from kvtool.models.legacy_config import add_transformers4_rope_keys

    add_transformers4_rope_keys(out)  # older stacks (transformers 4.x) read the same RoPE (legacy_config)
    return out
