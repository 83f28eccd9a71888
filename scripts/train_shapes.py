"""Train ``kvtool-shapes``, the small LLaVA-1.5-architecture model bundled with kvtool for the ``shapes`` task.

Research code beside the library, not part of it (the library keeps what loads and describes the bundled
model: ``kvtool.models.bundled``; the prompt and answer rule: ``kvtool.evals.shapes``). Run from a clone::

    python scripts/train_shapes.py --out DIR [--eval-every 1000] [--steps N ...]   # --help lists every option

It builds a ``LlavaForConditionalGeneration`` (CLIP vision tower, MLP projector, Llama decoder) with the
builders of ``kvtool.models.tiny`` (byte-level BPE tokenizer trained offline on the task's words, CLIP image
processor), trains it from scratch on generated data and writes a checkpoint directory (safetensors, config,
tokenizer, processor, the training format as chat template) plus ``TRAINING.json`` (config, the command that
reproduces it, seeds, wall and CPU time, learning curves, test accuracy). One function per stage:

1. ``check_config`` — every setting checked before anything is built (``InputError``: exit code 2);
2. ``build_model`` — the model, processor and tokenizer at the config's sizes;
3. ``train_vision_stage`` — the vision tower alone (``vision_steps`` at ``vision_lr``): every patch feature must
   give colour, shape and coarse position of its object through a linear head (``_PatchProbe``);
4. ``train_vqa_stage`` — the whole model on VQA: up to ``turns`` questions per image, each prompted exactly as the
   eval prompts it (``encode_questions`` + ``packed_answer_loss``, or one LLaVA-v1 ``conversation``), cross-
   entropy on the answer tokens and ``</s>``, plus ``aux_weight`` x the patch loss and ``mention_weight`` x the
   mention probe's (``_MentionProbe``); the auxiliary heads are not saved: the checkpoint is a plain LLaVA;
5. ``save_checkpoint`` and ``evaluate_final`` — weights, processor and chat template; test accuracy;
   ``training_record`` writes TRAINING.json.

Prompts: 36 image tokens (90 px, patch 15) plus ~100 text tokens, so every prompt exceeds 128 tokens and KV
groups of 128 are exercised; D_model = kv heads x head dim = 4 x 32 = 128. Determinism: the same config (seed,
threads) on the same torch build gives the same weights (``torch.use_deterministic_algorithms`` while training;
the thread count is part of the config because CPU reductions depend on it). ``evaluate_shapes`` scores with
plain transformers greedy ``generate`` at batch 1 (the reference behaviour). What was tried, and why the
defaults are what they are: docs/SHAPES_TRAINING.md. This script does not export, quantize or run the kvtool
runtime; ``kvtool eval --tasks shapes`` does that.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from kvtool.errors import InputError
from kvtool.evals.shapes import SHAPES_CHAT_TEMPLATE, SHAPES_CONTEXT, first_word, shapes_prompt
from kvtool.evals.tasks import SHORT_ANSWER
from kvtool.runtime.preprocess import VICUNA_V1_SYSTEM

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however the script is started
from shapes_batches import (  # noqa: E402
    CAPTION_QUESTION,
    answer_loss,
    encode_batch,
    encode_questions,
    extra_relations,
    packed_answer_loss,
    scene_caption,
    shared_prefix_len,
)
from shapes_probes import _MentionProbe, _PatchProbe  # noqa: E402

CHECK_SAMPLES = 150

VISION_STREAM = 10**8  # stage-1 scenes come from this offset of the training stream (disjoint from stage 2)


@dataclass
class TrainConfig:
    """Settings of one ``train_shapes`` run (stored in TRAINING.json beside the weights)."""

    out_dir: str  # where the checkpoint goes (required: never the installed package's data directory)
    steps: int = 3600
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 60
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2
    eval_samples: int = 500  # test-split questions scored at the end (0: skip)
    eval_every: int = 0  # also score 100 validation questions (seed TEST_SEED + 1) every N steps (0: never)
    # model sizes (passed to kvtool.models.tiny.TinySize)
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 256
    vision_hidden: int = 64
    vision_layers: int = 3
    vocab_size: int = 512
    patch_size: int = 15
    vision_heads: int = 4
    aux_weight: float = 1.0  # weight of the auxiliary object loss on the vision tower during VQA training
    vision_steps: int = 3000  # stage 1: steps of the vision tower alone on the auxiliary patch loss (0: none)
    vision_batch: int = 32
    vision_lr: float = 3e-3  # stage 1 peak learning rate
    turns: int = 5  # questions per training image; 1: the eval's one-question samples
    turn_mode: str = "independent"  # several questions of an image: "independent" prompts or one "conversation"
    caption: bool = True  # also ask each training scene CAPTION_QUESTION (answer: scene_caption); turns > 1 only
    relation_turns: int = 2  # extra left/right questions per training scene (other pairs of its objects)
    mention_weight: float = 1.0  # weight of the mention probe (x of each named object at its last word); 0: off
    mention_layer: int = 0  # language-model layer whose output the mention probe reads (1..layers; 0: layers - 1,
    # leaving the last layer to compare what the mentions fetched)


TURN_MODES = ("independent", "conversation")
CLI_FIELDS = ("steps", "batch_size", "lr", "seed", "threads", "eval_samples", "eval_every", "turns", "turn_mode", "caption", "relation_turns",
              "mention_weight", "mention_layer", "aux_weight",
              "vision_steps", "vision_batch", "vision_lr", "hidden", "layers", "heads", "kv_heads", "intermediate",
              "vision_hidden", "vision_layers", "vision_heads", "patch_size")


def train_command(cfg: TrainConfig) -> str:
    """The command line that reproduces ``cfg`` (defaults left out)."""
    default = TrainConfig(out_dir=cfg.out_dir)
    opts = [f"--{f.replace('_', '-')} {getattr(cfg, f)}" for f in CLI_FIELDS if getattr(cfg, f) != getattr(default, f)]
    return " ".join(["python scripts/train_shapes.py --out", cfg.out_dir, *opts])

def build_model(cfg: TrainConfig):
    """A fresh (model, processor) at ``cfg``'s sizes; the tokenizer is trained on the task's words and prompt lines."""
    from kvtool.evals.shapes import ANSWER_WORDS, COLORS, IMAGE_SIZE, QUESTION_WORDS, SHAPES
    from kvtool.models import tiny

    size = tiny.tiny_size(
        "tiny-llava", hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads,
        intermediate=cfg.intermediate, vocab_size=cfg.vocab_size, vision_hidden=cfg.vision_hidden,
        vision_layers=cfg.vision_layers, vision_heads=cfg.vision_heads, image_size=IMAGE_SIZE, patch_size=cfg.patch_size,
        max_positions=1024,
    )
    if (size.hidden // size.heads) * size.kv_heads % 128:
        raise InputError(f"kv_heads x head_dim = {(size.hidden // size.heads) * size.kv_heads}: expected a multiple "
                         "of 128 so KV groups of 128 channels fit")
    # The task's language: every question and answer word and the prompt lines, so each word gets its own token.
    words = [*QUESTION_WORDS, *ANSWER_WORDS, *COLORS, *SHAPES, VICUNA_V1_SYSTEM, SHAPES_CONTEXT, SHORT_ANSWER,
             CAPTION_QUESTION]
    extra = [" ".join(words)] * 4
    model, processor = tiny.build_llava(size, extra_corpus=extra)
    # All vision layers feed the projector: a trained-from-scratch tower gains nothing from an unused last layer.
    model.config.vision_feature_layer = -1
    return model, processor


def _ema(prev: float | None, value: float) -> float:
    """The training log's running mean: ``value`` at the first step, then 0.95 x previous + 0.05 x value."""
    return value if prev is None else 0.95 * prev + 0.05 * value


def _cosine(base: float, warmup: int, steps: int):
    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 5 %
        if step < warmup:
            return base * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))
    return lr_at


def _adamw(named, lr: float, weight_decay: float):
    import torch

    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def evaluate_shapes(model, processor, samples: list[dict], progress: bool = False) -> dict[str, Any]:
    """Exact-match accuracy of greedy ``generate`` (batch 1) on ``samples``, overall and per question type."""
    import torch
    from tqdm import tqdm

    model.eval()
    per: dict[str, list[int]] = {}
    preds = []
    with torch.inference_mode():
        for s in tqdm(samples, desc="eval shapes", disable=not progress):
            enc = processor(text=shapes_prompt(processor, s["question"]), images=s["image"], return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=4, do_sample=False)
            text = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            pred = first_word(text)
            preds.append(pred)
            per.setdefault(s["question_type"], []).append(int(pred == s["answer"]))
    allc = [c for v in per.values() for c in v]
    return {"accuracy": sum(allc) / max(len(allc), 1), "n": len(allc), "predictions": preds,
            "per_type": {k: sum(v) / len(v) for k, v in sorted(per.items())}}



def check_config(cfg: TrainConfig) -> None:
    """Stage 0: raise ``InputError`` naming the first setting of ``cfg`` that cannot train."""
    if not cfg.out_dir:
        raise InputError("out_dir: expected a directory for the checkpoint, got an empty string")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise InputError(f"steps={cfg.steps}, batch_size={cfg.batch_size}: expected positive integers")
    if cfg.vision_steps < 0 or cfg.vision_batch < 1 or cfg.aux_weight < 0 or cfg.vision_lr <= 0:
        raise InputError(f"vision_steps={cfg.vision_steps}, vision_batch={cfg.vision_batch}, aux_weight="
                         f"{cfg.aux_weight}, vision_lr={cfg.vision_lr}: expected vision_steps >= 0, vision_batch >= 1, aux_weight >= 0, "
                         "vision_lr > 0")
    if cfg.turns < 1:
        raise InputError(f"turns={cfg.turns}: expected a positive integer")
    if cfg.turn_mode not in TURN_MODES:
        raise InputError(f"turn_mode={cfg.turn_mode!r}: expected one of {', '.join(TURN_MODES)}")
    if cfg.threads < 1:
        raise InputError(f"threads={cfg.threads}: expected a positive integer")
    if cfg.relation_turns < 0 or (cfg.relation_turns and not _independent(cfg)):
        raise InputError(f"relation_turns={cfg.relation_turns}: expected 0, or a positive count with turns > 1 and "
                         "turn_mode independent")
    if cfg.mention_weight < 0 or (cfg.mention_weight and not (_independent(cfg) and 0 <= cfg.mention_layer <= cfg.layers)):
        raise InputError(f"mention_weight={cfg.mention_weight}, mention_layer={cfg.mention_layer}: expected weight 0, or "
                         f"a positive weight with turns > 1, turn_mode independent and 0 <= mention_layer <= {cfg.layers}")


def _independent(cfg: TrainConfig) -> bool:
    """Whether an image's several questions are asked as independent eval prompts (``encode_questions``)."""
    return cfg.turns > 1 and cfg.turn_mode == "independent"


def train_vision_stage(model, processor, probe, cfg: TrainConfig, progress: bool) -> list[dict]:
    """Stage 1: the vision tower alone learns colour, shape and position of objects through ``probe`` (cheap: no
    LM), ``cfg.vision_steps`` steps of ``cfg.vision_batch`` scenes from the training stream's ``VISION_STREAM``
    offset. Returns the log: four entries (step, loss, per-target accuracy)."""
    import torch
    from tqdm import tqdm

    from kvtool.evals.shapes import TRAIN_SEED, make_shapes_scene

    vision_log: list[dict] = []
    vnamed = list(model.model.vision_tower.named_parameters()) + list(probe.head.named_parameters(prefix="probe"))
    vopt, vlr = _adamw(vnamed, cfg.vision_lr, cfg.weight_decay), _cosine(cfg.vision_lr, cfg.warmup, cfg.vision_steps)
    for step in tqdm(range(cfg.vision_steps), desc="train vision tower", disable=not progress):
        scenes = [make_shapes_scene(TRAIN_SEED + cfg.seed, VISION_STREAM + step * cfg.vision_batch + k)
                  for k in range(cfg.vision_batch)]
        px = processor.image_processor([sc["image"] for sc in scenes], return_tensors="pt")["pixel_values"]
        model.model.vision_tower(px, output_hidden_states=True)
        for g in vopt.param_groups:
            g["lr"] = vlr(step)
        vloss = probe.loss(scenes)
        vopt.zero_grad(set_to_none=True)
        vloss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in vnamed], 1.0)
        vopt.step()
        if (step + 1) % max(1, cfg.vision_steps // 4) == 0:
            vision_log.append({"step": step + 1, "loss": round(vloss.item(), 4),
                               "accuracy_color_shape_x_y": probe.accuracy(scenes)})
            tqdm.write(json.dumps(vision_log[-1]), file=sys.stderr)
    return vision_log


def vqa_batch(cfg: TrainConfig, step: int) -> list[dict]:
    """The training samples of VQA step ``step``: ``cfg.batch_size`` scenes of the training stream, each with up
    to ``cfg.turns`` questions, the caption turn and ``cfg.relation_turns`` extra left/right questions (or, with
    ``turns`` 1, one eval-format question each)."""
    import numpy as np

    from kvtool.evals.shapes import TRAIN_SEED, make_shapes_sample, make_shapes_scene

    first = step * cfg.batch_size
    if cfg.turns == 1:
        return [make_shapes_sample(TRAIN_SEED + cfg.seed, first + k) for k in range(cfg.batch_size)]
    batch = [make_shapes_scene(TRAIN_SEED + cfg.seed, first + k) for k in range(cfg.batch_size)]
    return [dict(b, qa=b["qa"][:cfg.turns] + ([scene_caption(b)] if cfg.caption else [])
                 + extra_relations(b, cfg.relation_turns, np.random.default_rng([TRAIN_SEED + cfg.seed, first + k, 2])))
            for k, b in enumerate(batch)]


def train_vqa_stage(model, processor, probe, cfg: TrainConfig, progress: bool, t0: float) -> tuple[list[dict], float]:
    """Stage 2: the whole model on VQA for ``cfg.steps`` steps (answer loss + ``aux_weight`` x the patch probe's
    + ``mention_weight`` x the mention probe's). Returns the validation history (every ``cfg.eval_every`` steps:
    100 questions of seed ``TEST_SEED + 1``) and the final running mean of the answer loss (``_ema``)."""
    import torch
    from tqdm import tqdm

    from kvtool.evals.shapes import TEST_SEED, make_shapes_split

    mention = (_MentionProbe(model, cfg.mention_layer or max(1, cfg.layers - 1)) if cfg.mention_weight else None)
    named = (list(model.named_parameters())
             + (list(probe.head.named_parameters(prefix="probe")) if cfg.aux_weight else [])
             + (list(mention.head.named_parameters(prefix="mention")) if mention else []))
    opt = _adamw(named, cfg.lr, cfg.weight_decay)
    lr_at = _cosine(cfg.lr, cfg.warmup, cfg.steps)
    quick = make_shapes_split("test", 100, seed=TEST_SEED + 1) if cfg.eval_every else []  # a validation stream
    history: list[dict] = []
    ema = aux_ema = mention_ema = None
    bar = tqdm(range(cfg.steps), desc="train kvtool-shapes", disable=not progress)
    for step in bar:
        batch = vqa_batch(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if _independent(cfg):  # (the mention probe is only allowed here; its layer comes out of the same forward)
            enc = encode_questions(processor, batch)
            loss = packed_answer_loss(model, enc, hidden_layer=mention.layer if mention else None)
            if mention is not None:
                loss, hidden, start = loss
                mention_loss = mention.loss(hidden, start, enc)
                mention_ema = _ema(mention_ema, mention_loss.item())
        else:
            enc = encode_batch(processor, batch)
            loss = answer_loss(model, enc, shared_prefix_len(enc["input_ids"], model.config.image_token_id))
        total = loss
        if cfg.aux_weight:
            aux = probe.loss(batch)
            aux_ema = _ema(aux_ema, aux.item())
            total = loss + cfg.aux_weight * aux
        if mention is not None:
            total = total + cfg.mention_weight * mention_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        ema = _ema(ema, loss.item())
        bar.set_postfix(loss=f"{ema:.3f}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            acc = evaluate_shapes(model, processor, quick)
            history.append({"step": step + 1, "loss_ema": round(ema, 4),
                            **({"aux_loss_ema": round(aux_ema, 4)} if cfg.aux_weight else {}),
                            **({"mention_mse_ema": round(mention_ema, 4)} if mention is not None else {}),
                            "quick_accuracy": acc["accuracy"],
                            "per_type": acc["per_type"], "elapsed_s": round(time.time() - t0, 1)})
            tqdm.write(json.dumps(history[-1]), file=sys.stderr)
            model.train()
    return history, ema or 0.0


def save_checkpoint(model, processor, out_dir: str) -> Path:
    """Write the trained model (greedy, 4 new tokens by default) and its processor to ``out_dir``, with the
    training format as chat template (training prompted through ``shapes_prompt``). Returns the directory."""
    model.eval()
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 4
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.chat_template = processor.tokenizer.chat_template = SHAPES_CHAT_TEMPLATE
    processor.save_pretrained(out)
    return out


def evaluate_final(model, processor, cfg: TrainConfig, progress: bool) -> tuple[dict | None, float | None]:
    """Test accuracy on ``cfg.eval_samples`` questions (None when 0), and the accuracy on the first
    ``CHECK_SAMPLES`` of them (a prefix of the same split), which the test suite re-measures on the shipped
    checkpoint."""
    from kvtool.evals.shapes import make_shapes_split

    if not cfg.eval_samples:
        return None, None
    result = evaluate_shapes(model, processor, make_shapes_split("test", cfg.eval_samples), progress)
    rows = make_shapes_split("test", min(CHECK_SAMPLES, cfg.eval_samples))
    check = sum(p == r["answer"] for p, r in zip(result["predictions"], rows, strict=False)) / len(rows)
    return result, check


def training_record(cfg: TrainConfig, model, result: dict | None, check: float | None, vision_log: list[dict],
                    history: list[dict], final_loss_ema: float, train_s: float, train_cpu_s: float) -> dict[str, Any]:
    """The TRAINING.json record of a finished run (seeds, times in seconds, curves, test accuracy 0-1)."""
    import torch
    import transformers

    from kvtool.evals.shapes import TEST_SEED, TRAIN_SEED

    return {
        "command": train_command(cfg),
        "config": asdict(cfg),
        "train_seed": TRAIN_SEED + cfg.seed, "test_seed": TEST_SEED,
        "steps": cfg.steps, "samples_seen": cfg.steps * cfg.batch_size,
        "train_wall_s": round(train_s, 1), "train_cpu_s": round(train_cpu_s, 1),
        "final_loss_ema": round(final_loss_ema, 4),
        "test_samples": result["n"] if result else 0,
        "test_accuracy": result["accuracy"] if result else None,
        "test_accuracy_per_type": result["per_type"] if result else None,
        "check_samples": min(CHECK_SAMPLES, cfg.eval_samples), "check_accuracy": check if result else None,
        "prompt": {"system": VICUNA_V1_SYSTEM, "suffix": SHORT_ANSWER, "eval": "greedy generate, batch 1, fp32"},
        "vision_history": vision_log,
        "history": history,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "machine": platform.machine()},
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def train_shapes(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train kvtool-shapes as ``cfg`` says, save it to ``cfg.out_dir``, return the TRAINING.json record.

    Runs the stages in order with ``cfg.threads`` torch threads and deterministic algorithms on (both restored
    afterwards). Raises ``InputError`` for a config ``check_config`` rejects."""
    import torch

    check_config(cfg)
    t0, cpu0 = time.time(), time.process_time()
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)  # run-to-run identical weights (docs/SHAPES_TRAINING.md)
    try:
        torch.manual_seed(cfg.seed)
        model, processor = build_model(cfg)
        model.train()
        probe = _PatchProbe(model) if (cfg.aux_weight or cfg.vision_steps) else None
        vision_log = train_vision_stage(model, processor, probe, cfg, progress) if cfg.vision_steps else []
        history, ema = train_vqa_stage(model, processor, probe, cfg, progress, t0)
        train_s, train_cpu_s = time.time() - t0, time.process_time() - cpu0
        if probe is not None:
            probe.handle.remove()
        out = save_checkpoint(model, processor, cfg.out_dir)
        result, check = evaluate_final(model, processor, cfg, progress)
        record = training_record(cfg, model, result, check, vision_log, history, ema, train_s, train_cpu_s)
        (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
        return record
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


_HELP = {"steps": "Optimizer steps of the VQA stage.", "lr": "Peak learning rate (warm-up, then cosine).",
         "threads": "torch CPU threads (part of the determinism).",
         "eval_samples": "Test questions scored at the end (0: skip).",
         "eval_every": "Score 100 validation questions every N steps (0: never).",
         "turns": "Questions per training image (1: the eval's one-question samples).",
         "turn_mode": "How an image's questions are asked: 'independent' eval prompts sharing the image's "
                      "prefix computation, or turns of one 'conversation'.",
         "caption": "Also ask each training image to name its objects left to right (training only).",
         "relation_turns": "Extra left/right questions per training image, on other pairs of its objects.",
         "mention_weight": "Weight of the mention probe: where a question names an object, a middle LM layer "
                           "must hold that object's x (0: off; needs independent turns).",
         "mention_layer": "LM layer the mention probe reads (0: the one before the last).",
         "aux_weight": "Weight of the auxiliary per-patch object loss on the vision tower in the VQA stage.",
         "vision_steps": "Steps of the vision-tower stage before VQA training (0: none).",
         "vision_lr": "Peak learning rate of the vision-tower stage.",
         "patch_size": "Vision patch size in pixels (must divide the 90-px image)."}


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """The ``TrainConfig`` and the ``--json`` flag of a command line (one option per ``CLI_FIELDS`` entry,
    defaults from ``TrainConfig``; ``--out`` is required)."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    ap = argparse.ArgumentParser(prog="python scripts/train_shapes.py", description="Train the kvtool-shapes model "
                                 "(LLaVA-1.5 architecture) from scratch on the synthetic shapes task.")
    ap.add_argument("--out", dest="out_dir", required=True, help="Directory to write the checkpoint to.")
    default = TrainConfig(out_dir="")
    for name in CLI_FIELDS:
        value = getattr(default, name)
        kind = {"int": int, "float": float, "str": str, "bool": _bool}[types[name]]
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=value,
                        help=f"{_HELP.get(name, '')} (default: {value})".strip())
    ap.add_argument("--json", dest="as_json", action="store_true", help="Print the training record as JSON.")
    ns = vars(ap.parse_args(argv))
    as_json = ns.pop("as_json")
    return TrainConfig(**ns), as_json


def main(argv: list[str] | None = None) -> int:
    """Train from a command line; print the record (``--json``) or a summary. Exit code 2 on bad settings."""
    cfg, as_json = parse_args(argv)
    try:
        record = train_shapes(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(record, indent=2))
    else:
        acc = record["test_accuracy"]
        print(f"wrote {cfg.out_dir} (test accuracy {'-' if acc is None else f'{acc:.3f}'}, "
              f"{record['train_wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
