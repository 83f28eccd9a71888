"""``RunConfig`` and ``run_once``: what ``kvtool run`` does — check the question and read the images (before the
model loads, so bad input fails at once), load a pipeline, answer one question about one image (or several),
return the answer, its stats and the pipeline's description. No printing here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from kvtool.errors import InputError


@dataclass
class RunConfig:
    model: str
    prompt: str
    images: list[str] = field(default_factory=list)
    backend: str = "auto"
    device: str = "auto"
    kv: str = "fp16"
    kv_bits: int | None = None
    k_bits: int | None = None
    v_bits: int | None = None
    kv_mode: str = "packed"
    first_token: str = "compressed"
    conversation: str = "auto"  # the rule kvtool eval uses too (preprocess.resolve_conversation)
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    text_only: bool = False
    ov_group_size: int | None = None
    ov_key_by_channel: bool = False
    kv_residual: int | None = None

    def bits(self) -> tuple[int | None, int | None]:
        """K and V bits: ``--k-bits`` / ``--v-bits`` override ``--kv-bits`` (default 4); None for fp16 and
        ov-* (which refuse any bit option: ``kvspec.resolve_bits``)."""
        from kvtool.runtime.kvspec import resolve_bits

        return resolve_bits(self.kv, self.kv_bits, self.k_bits, self.v_bits)


def run_once(cfg: RunConfig, on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    from kvtool.runtime import VLMPipeline
    from kvtool.runtime.preprocess import check_question, load_images

    if cfg.temperature < 0:
        raise InputError(f"--temperature: expected >= 0, got {cfg.temperature}")
    if cfg.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens: expected a positive integer, got {cfg.max_new_tokens}")
    check_question(cfg.prompt)
    if cfg.text_only and cfg.images:
        raise InputError("--image: --text-only takes no image")
    if not cfg.text_only and not cfg.images:
        raise InputError("--image: missing; this is an image model (pass --text-only for a text-only question)")
    loaded = load_images(cfg.images)
    k_bits, v_bits = cfg.bits()
    pipe = VLMPipeline.load(cfg.model, backend=cfg.backend, device=cfg.device, kv=cfg.kv, k_bits=k_bits,
                            v_bits=v_bits, kv_mode=cfg.kv_mode, first_token=cfg.first_token,
                            conversation=cfg.conversation, ov_group_size=cfg.ov_group_size,
                            ov_key_by_channel=cfg.ov_key_by_channel, kv_residual=cfg.kv_residual)
    images = loaded if len(loaded) != 1 else loaded[0]
    try:
        out = pipe.generate(images or None, cfg.prompt, max_new_tokens=cfg.max_new_tokens,
                            do_sample=cfg.temperature > 0, temperature=cfg.temperature or 1.0, top_p=cfg.top_p,
                            seed=cfg.seed, text_only=cfg.text_only, on_text=on_text)
    except InputError:
        raise
    except ValueError as exc:  # a processor refusing this input (Qwen2-VL: aspect ratio over 200), as eval's failed row
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"input refused by the model's processor: {type(exc).__name__}: {msg}") from None
    return {"text": out.text, "token_ids": out.token_ids, "stats": out.stats, "pipeline": pipe.info(),
            "config": asdict(cfg)}
