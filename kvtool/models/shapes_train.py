"""Train ``kvtool-shapes``: a small LLaVA-1.5-architecture model that answers the ``shapes`` benchmark.

``train_shapes(TrainConfig(out_dir=...))`` builds a ``LlavaForConditionalGeneration`` (CLIP vision tower, MLP
projector, Llama decoder) with the builders of ``kvtool.models.tiny`` (byte-level BPE tokenizer trained offline
on the task's words, CLIP image processor, LLaVA chat template), trains it from scratch and writes a checkpoint
directory (safetensors, config, tokenizer, processor) plus ``TRAINING.json`` (config, the command that
reproduces it, seeds, wall and CPU time, learning curves, test accuracy). Two stages, both on generated data:

1. vision tower alone (``vision_steps`` at ``vision_lr``; the role CLIP pre-training plays for LLaVA): on scenes
   of the ``TRAIN_SEED`` stream, every patch feature must give the colour, shape and coarse position of the
   object the patch belongs to (or "background") through a linear head; the generator's ground truth is the label;
2. the whole model on VQA: each training image comes with up to ``turns`` questions about it
   (``make_shapes_scene``), each prompted exactly as the eval prompts it; ``packed_answer_loss`` runs the
   prompt up to the question once per image, so extra questions are cheap, and no question sees another's
   answer (``turn_mode="conversation"`` asks them as LLaVA-v1 turns of one chat instead);
   cross-entropy on the answer tokens and ``</s>`` only, plus ``aux_weight`` x the stage-1 loss so the tower
   keeps its per-patch object features, plus ``mention_weight`` x the mention probe's loss (``_MentionProbe``:
   where a question names an object, a middle language-model layer must hold that object's x there — the
   step left/right questions could not learn from their one-bit answer). ``relation_turns`` adds left/right
   questions on other pairs of the scene's objects. The auxiliary heads are dropped at save time: the checkpoint
   is a plain LLaVA.

The prompt is LLaVA-1.5's (vicuna_v1 system prompt, ``USER: {context}\n<image>\n{question}\nAnswer the question
using a single word or phrase. ASSISTANT:``, where the context is one fixed instruction sentence, ``SHAPES_CONTEXT``): 36 image
tokens (90 px, patch 15) plus ~100 text tokens, so prompts exceed 128 tokens and KV groups of 128 are exercised.
D_model = kv heads x head dim = 4 x 32 = 128.

Determinism: same config (seed, threads) on the same torch build gives the same weights (training runs with
``torch.use_deterministic_algorithms``); the thread count is part of the config because CPU reductions depend on it. ``evaluate_shapes`` scores a model with plain
transformers greedy ``generate`` at batch 1 (the reference behaviour). This module does not export, quantize
or run the kvtool runtime; the eval harness does that through the ``shapes`` task.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvtool.errors import InputError

SHAPES_MODEL_DIR = Path(__file__).parent / "data" / "kvtool-shapes"
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
ANSWER_SUFFIX = "Answer the question using a single word or phrase."
# An instruction said before the picture (the same for every question, so it is part of the prompt prefix the
# batch shares); it brings the prompt past 128 tokens with 36 image tokens. It avoids the task's words (colours,
# shape names, "object", ...): a run whose instruction listed them learnt nothing in 2000 steps, its answer
# lookup presumably matching those text tokens instead of the image's.
SHAPES_CONTEXT = ("Look carefully at the picture below before you reply. It was drawn on a dark background, and "
                  "the small grey dots scattered over it are only noise, so please ignore them when you answer.")
# A training-only question (LLaVA mixes descriptions into its instruction data the same way): naming every object
# in left-to-right order asks for each object's colour bound to its shape and for the objects' x order, the two
# skills exists and relation questions need, with one supervised token per attribute instead of one bit.
CAPTION_QUESTION = "Name every shape in the image from left to right."
CHECK_SAMPLES = 150

def _jinja_str(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a Jinja string literal (\\n, \\", \\uXXXX escapes)


# The chat template shipped with kvtool-shapes: it renders exactly the training format, so every client that
# applies it (transformers, optimum-intel, openvino.genai) prompts the model as it was trained:
# ``{SYSTEM_PROMPT} USER: {SHAPES_CONTEXT}\n<image>\n{question}\n{ANSWER_SUFFIX} ASSISTANT:`` for a user turn of an
# image and a question; vicuna_v1's ``ASSISTANT: {answer}</s>`` and ``USER: {question}\n{ANSWER_SUFFIX}
# ASSISTANT:`` for later turns (turn_mode="conversation"). The default system prompt is vicuna_v1's. The
# instruction line goes before an image and the answer line after the question unless the text already has
# them, so a turn that is already in the training format (the ``shapes`` task's prompt, or the image inline as
# ``<image>``) renders unchanged. The training loop itself prompts through ``shapes_prompt``.
SHAPES_CHAT_TEMPLATE = (
    "{%- set system = " + _jinja_str(SYSTEM_PROMPT) + " -%}"
    "{%- set context = " + _jinja_str(SHAPES_CONTEXT) + " -%}"
    "{%- set suffix = " + _jinja_str(ANSWER_SUFFIX) + " -%}"
    "{%- set ns = namespace(system=system) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
    "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- endif -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set n = 0 -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') -%}"
    "{%- set n = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- if (n > 0 or '<image>' in text) and not text.startswith(context) -%}{{- context + '\\n' -}}{%- endif -%}"
    "{{- '<image>\\n' * n -}}{{- text -}}"
    "{%- if not text.endswith(suffix) -%}{{- '\\n' + suffix -}}{%- endif -%}"
    "{{- ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' + text + '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

VISION_STREAM = 10**8  # stage-1 scenes come from this offset of the training stream (disjoint from stage 2)


@dataclass
class TrainConfig:
    """Settings of one ``train_shapes`` run (stored in TRAINING.json beside the weights)."""

    out_dir: str = str(SHAPES_MODEL_DIR)
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
    vision_lr: float = 3e-3  # stage 1 peak learning rate (per-patch shape needs it: at 1e-3 it stays at the prior)
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
    """The ``kvtool models train-shapes`` command line that reproduces ``cfg`` (defaults left out)."""
    default = TrainConfig()
    opts = [f"--{f.replace('_', '-')} {getattr(cfg, f)}" for f in CLI_FIELDS if getattr(cfg, f) != getattr(default, f)]
    return " ".join(["kvtool models train-shapes --out", cfg.out_dir, *opts])


def shapes_user_text(question: str) -> str:
    """The first user turn of a question, with the image where the ``<image>`` placeholder stands: the fixed
    instruction, the image, the question, LLaVA-1.5's short-answer line. The ``shapes`` eval task sends this
    text, so the harness prompts exactly as training did."""
    return f"{SHAPES_CONTEXT}\n<image>\n{question}\n{ANSWER_SUFFIX}"


def shapes_messages(question: str) -> list[dict]:
    """The chat of one question (system prompt + user turn with the image), for ``apply_chat_template`` (the LLaVA
    template renders the text verbatim and the processor expands its ``<image>``)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "text", "text": shapes_user_text(question)}]},
    ]


def shapes_prompt(processor, question: str) -> str:
    """The prompt text (with one ``<image>`` placeholder) the model was trained on."""
    return processor.apply_chat_template(shapes_messages(question), add_generation_prompt=True, tokenize=False)


def normalize_answer(text: str) -> str:
    """First word of a generated answer, lower-cased, without punctuation."""
    words = text.strip().lower().split()
    return words[0].strip(".,!?;:'\"") if words else ""


def _build(cfg: TrainConfig):
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
    words = [*QUESTION_WORDS, *ANSWER_WORDS, *COLORS, *SHAPES, SYSTEM_PROMPT, SHAPES_CONTEXT, ANSWER_SUFFIX,
             CAPTION_QUESTION]
    extra = [" ".join(words)] * 4
    model, processor = tiny.build_llava(size, extra_corpus=extra)
    # All vision layers feed the projector: a trained-from-scratch tower gains nothing from an unused last layer.
    model.config.vision_feature_layer = -1
    return model, processor


def scene_caption(scene: dict) -> dict:
    """The training-only caption turn of a scene: CAPTION_QUESTION, answered by every object's colour and shape
    in order of x (``red circle blue square``)."""
    objs = sorted(scene["objects"], key=lambda o: o["x"])
    return {"question": CAPTION_QUESTION, "answer": " ".join(f"{o['color']} {o['shape']}" for o in objs),
            "question_type": "caption", "pope_split": None}


def extra_relations(scene: dict, n: int, rng) -> list[dict]:
    """Up to ``n`` training-only left/right questions about ``scene``, on pairs of its objects its own
    relation question (if any) does not already compare, drawn with ``rng``."""
    from kvtool.evals.shapes import relation_pairs, relation_question

    objs = [(o["color"], o["shape"]) for o in scene["objects"]]
    xs = [o["x"] for o in scene["objects"]]
    asked = {tuple(t["refers"]) for t in scene["qa"] if t["question_type"] == "relation"}
    pairs = [p for p in relation_pairs(objs, xs) if p not in asked]
    pick = rng.permutation(len(pairs))[:n] if pairs else []
    return [relation_question(objs, xs, *pairs[int(i)]) for i in pick]


def _turns(sample: dict) -> list[dict]:
    return sample["qa"] if "qa" in sample else [sample]


def _right_padded(rows: list[list[int]], labels: list[list[int]], pad: int) -> dict[str, Any]:
    """``input_ids`` (``pad`` after each row), ``attention_mask`` and ``labels`` (-100 on the padding) tensors."""
    import torch

    width = max(len(r) for r in rows)
    return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([la + [-100] * (width - len(la)) for la in labels])}


def encode_batch(processor, samples: list[dict], with_answers: bool = True) -> dict[str, Any]:
    """Tensors for a batch: prompt ids (+ answer ids and ``</s>`` when ``with_answers``), right-padded.

    A sample is one question (``question``, ``answer``, ``image``: the eval prompt, exactly) or a scene of
    several (``qa`` list, ``image``): its first question is prompted exactly as at eval time and each later one
    follows the previous answer's ``</s>`` as a LLaVA-v1 turn, ``USER: {question}\n{suffix} ASSISTANT:``
    (needs ``with_answers``). ``labels`` are -100 everywhere except the answer tokens and their ``</s>``.
    """
    import numpy as np
    import torch

    tok = processor.tokenizer
    prompts = [shapes_prompt(processor, _turns(s)[0]["question"]) for s in samples]
    enc = processor(text=prompts, images=[s["image"] for s in samples], return_tensors=None)
    rows, labels = [], []
    for ids, s in zip(enc["input_ids"], samples, strict=True):
        ids = list(ids)
        lab = [-100] * len(ids)
        turns = _turns(s)
        if not with_answers and len(turns) > 1:
            raise ValueError("encode_batch: a multi-turn sample needs with_answers=True")
        for i, t in enumerate(turns if with_answers else []):
            if i:
                q = tok(f"USER: {t['question']}\n{ANSWER_SUFFIX} ASSISTANT:", add_special_tokens=False)["input_ids"]
                ids, lab = ids + q, lab + [-100] * len(q)
            ans = tok(" " + t["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids, lab = ids + ans, lab + ans
        rows.append(ids)
        labels.append(lab)
    pix = torch.from_numpy(np.asarray(enc["pixel_values"], dtype=np.float32))
    return {**_right_padded(rows, labels, tok.pad_token_id), "pixel_values": pix}


def shared_prefix_len(input_ids, image_token_id: int) -> int:
    """Length of the token prefix every row shares (``<s>`` + system prompt + ``USER:`` ...), stopping before the
    first image token (image features differ per row even where the placeholder ids agree)."""
    import torch

    same = (input_ids == input_ids[:1]).all(dim=0)
    same &= ~(input_ids == image_token_id).any(dim=0)
    diff = torch.nonzero(~same)
    return int(diff[0, 0]) if len(diff) else 0


def answer_loss(model, enc: dict[str, Any], shared_prefix: int = 0):
    """Mean cross-entropy over the labelled (answer) tokens — the value ``model(**enc).loss`` gives.

    Written by hand for speed, as transformers has no such path: the first ``shared_prefix`` tokens (identical
    in every row) are run once at batch 1 and their K/V broadcast to the batch, and the LM head is applied
    only at the positions that predict a label. Exact up to float rounding (tested against ``.loss``).
    """
    ids, mask, labels = enc["input_ids"], enc["attention_mask"], enc["labels"]
    p = shared_prefix
    if p and not bool((ids[:, :p] == ids[:1, :p]).all()):
        raise ValueError("answer_loss: the first shared_prefix tokens differ between rows")
    cache = _prefix_cache(model, ids, p, ids.shape[0]) if p else None
    out = model.model(input_ids=ids[:, p:], pixel_values=enc["pixel_values"], attention_mask=mask,
                      past_key_values=cache, use_cache=cache is not None)
    return _label_loss(model, out.last_hidden_state, labels[:, p:])


def _prefix_cache(model, ids, p: int, batch: int):
    """A ``DynamicCache`` of the language model over ``ids[0, :p]`` (run once at batch 1), its K/V broadcast
    to ``batch`` rows: [1, H, p, D] -> [batch, H, p, D] (empty when ``p`` is 0)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.text_config)
    if p:
        model.model.language_model(input_ids=ids[:1, :p], past_key_values=cache, use_cache=True)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1)
    return cache


def _label_loss(model, hidden, labels):
    """Mean cross-entropy of the LM head applied only where a label is predicted: ``hidden[:, t]`` predicts
    ``labels[:, t + 1]`` (-100: no label)."""
    import torch

    b_idx, t_idx = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
    logits = model.lm_head(hidden[b_idx, t_idx])  # [n_labels, vocab]
    return torch.nn.functional.cross_entropy(logits.float(), labels[b_idx, t_idx + 1])


def encode_questions(processor, scenes: list[dict]) -> dict[str, Any]:
    """Tensors for scenes asked as independent questions: one row per (scene, question), each row exactly the
    eval's one-question prompt plus the answer ids and ``</s>`` (right-padded; ``labels`` -100 but on the answer),
    ``pixel_values`` one per scene and ``image_index`` [rows] the scene of each row. ``packed_answer_loss`` runs
    the rows' common prefix once per scene, so several questions about one image cost little more than one; no
    question sees another's answer (a multi-turn conversation would let later turns copy earlier answers, a
    shortcut the one-question eval never offers).

    For the mention probe, ``mention_pos`` [n, 2] (row, token) holds the last token of each object a question
    names (its shape word, or ``object`` in "the red object"), ``mention_x`` [n] that object's centre x, from
    the turn's ``refers``, and ``mention_sign`` [n] -1 for the object a left/right question compares against
    (its second), +1 otherwise; turns without ``refers`` (captions, absent objects, counts) add none."""
    import numpy as np
    import torch

    from kvtool.evals.shapes import SHAPES

    tok = processor.tokenizer
    pix = processor.image_processor([sc["image"] for sc in scenes], return_tensors="np")["pixel_values"]
    # The processor expands <image> to one placeholder per image token; running it once tells how many, and
    # the rows are then tokenized as text in one call instead of re-processing the image for every question.
    qa = [(i, t) for i, sc in enumerate(scenes) for t in _turns(sc)]
    first = processor(text=shapes_prompt(processor, qa[0][1]["question"]), images=scenes[qa[0][0]]["image"],
                      return_tensors=None)["input_ids"][0]
    n_image = sum(int(t == processor.image_token_id) for t in first)
    texts = [shapes_prompt(processor, t["question"]).replace(processor.image_token, processor.image_token * n_image)
             for _, t in qa]
    prompt_ids = tok(texts)["input_ids"]
    answer_ids = tok([" " + t["answer"] for _, t in qa], add_special_tokens=False)["input_ids"]
    mention_ids = {tok(" " + w, add_special_tokens=False)["input_ids"][-1] for w in (*SHAPES, "object")}
    rows, labels, index, pos, xs, sign = [], [], [], [], [], []
    for r, ((i, t), ids, ans) in enumerate(zip(qa, prompt_ids, answer_ids, strict=True)):
        ans = list(ans) + [tok.eos_token_id]
        rows.append(list(ids) + ans)
        labels.append([-100] * len(ids) + ans)
        index.append(i)
        if t.get("refers"):
            start = max(k for k, v in enumerate(ids) if v == processor.image_token_id) + 1
            hits = [k for k in range(start, len(ids)) if ids[k] in mention_ids]
            if len(hits) != len(t["refers"]):
                raise ValueError(f"encode_questions: {t['question']!r} names {len(t['refers'])} objects, found "
                                 f"{len(hits)} mention tokens")
            pos += [(r, k) for k in hits]
            xs += [scenes[i]["objects"][o]["x"] for o in t["refers"]]
            sign += [-1.0 if t["question_type"] == "relation" and j == 1 else 1.0 for j in range(len(hits))]
    return {**_right_padded(rows, labels, tok.pad_token_id),
            "pixel_values": torch.from_numpy(np.asarray(pix, dtype=np.float32)), "image_index": torch.tensor(index),
            "mention_pos": torch.tensor(pos, dtype=torch.long).reshape(-1, 2),
            "mention_x": torch.tensor(xs, dtype=torch.float32), "mention_sign": torch.tensor(sign, dtype=torch.float32)}


def packed_answer_loss(model, enc: dict[str, Any], hidden_layer: int | None = None):
    """Mean cross-entropy over the answer tokens of ``encode_questions`` rows — what ``model(**row).loss`` gives
    on the rows one by one, pooled over their label tokens — computed in three stages written by hand (no
    transformers path shares a prefix this way): the text every row shares before the image runs once at
    batch 1; the image and what follows it up to the first token where rows differ runs once per scene on that
    cache; each row's question and answer run on its scene's cache. Right padding needs no mask: a padded
    token comes after every real one, so causal attention never lets a real token see it.

    With ``hidden_layer`` it returns ``(loss, hidden, start)``: the output of that language-model layer over the
    rows' tails, ``hidden[:, t - start]`` being token ``t`` (the tail starts at or before every ``mention_pos``)."""
    import torch

    ids, labels, img = enc["input_ids"], enc["labels"], enc["image_index"]
    image_token = model.config.image_token_id
    p0 = shared_prefix_len(ids, image_token)
    same = (ids == ids[:1]).all(dim=0)
    p1 = int(torch.nonzero(~same)[0, 0]) if bool((~same).any()) else ids.shape[1] - 1
    p1 = min(p1, int(torch.nonzero((labels != -100).any(dim=0))[0, 0]) - 1)  # the earliest answer is predicted in the tail
    if hidden_layer is not None and len(enc.get("mention_pos", ())):
        p1 = min(p1, int(enc["mention_pos"][:, 1].min()))
    if not bool((ids[:, p0:p1] == image_token).any()):
        raise ValueError("packed_answer_loss: expected the image inside the shared part of every row")
    n_img = enc["pixel_values"].shape[0]
    first = torch.tensor([int(torch.nonzero(img == i)[0, 0]) for i in range(n_img)])
    cache = _prefix_cache(model, ids, p0, n_img)
    model.model(input_ids=ids[first, p0:p1], pixel_values=enc["pixel_values"], past_key_values=cache, use_cache=True)
    for layer in cache.layers:  # [scenes, H, p1, D] -> [rows, H, p1, D]
        layer.keys, layer.values = layer.keys[img], layer.values[img]
    out = model.model.language_model(input_ids=ids[:, p1:], past_key_values=cache, use_cache=True,
                                     output_hidden_states=hidden_layer is not None)
    loss = _label_loss(model, out.last_hidden_state, labels[:, p1:])
    return loss if hidden_layer is None else (loss, out.hidden_states[hidden_layer], p1)


POSITION_BINS = 10  # object centre x and y, each in 10 bins of 9 px (= RELATION_MIN_DX: left/right pairs differ)


def patch_targets(samples: list[dict], grid: int):
    """Per-patch classes for the auxiliary vision objective: ``[len(samples), grid*grid, 4]`` int64 (patches
    row-major, like the tower's patch tokens) holding colour, shape, x bin and y bin of the object the patch
    belongs to. A patch belongs to an object when its centre lies within the object's radius + half a patch;
    where two objects claim it, to the one whose outline is nearer. Other patches are background: colour
    ``len(COLORS)``, shape ``len(SHAPES)``, position ``-100`` (ignored)."""
    import numpy as np
    import torch

    from kvtool.evals.shapes import COLORS, IMAGE_SIZE, SHAPES

    colors, shapes = list(COLORS), list(SHAPES)
    step = IMAGE_SIZE / grid
    centre = (np.arange(grid) + 0.5) * step
    cy, cx = (a.reshape(-1) for a in np.meshgrid(centre, centre, indexing="ij"))
    out = np.empty((len(samples), grid * grid, 4), dtype=np.int64)
    out[...] = (len(colors), len(shapes), -100, -100)
    for b, s in enumerate(samples):
        best = np.full(grid * grid, np.inf)
        for o in s["objects"]:
            gap = np.hypot(cx - o["x"], cy - o["y"]) - o["r"]  # distance from the patch centre to the outline
            m = (gap < step / 2) & (gap < best)
            best[m] = gap[m]
            out[b, m] = (colors.index(o["color"]), shapes.index(o["shape"]),
                         min(int(o["x"] * POSITION_BINS / IMAGE_SIZE), POSITION_BINS - 1),
                         min(int(o["y"] * POSITION_BINS / IMAGE_SIZE), POSITION_BINS - 1))
    return torch.from_numpy(out)


class _PatchProbe:
    """Training-only auxiliary objective on the vision tower (the role CLIP pre-training plays for LLaVA): every
    patch feature the projector reads (the tower's last hidden state, CLS dropped) must give, through one linear
    head, the colour, shape and coarse x/y position of the object the patch belongs to, or "background"
    (``patch_targets``; the generator's ground truth is the label). Per patch rather than pooled over the object:
    the language model finds "the triangle" by matching its question against image tokens, so each token of an
    object must carry the whole object's description, which only the tower's attention can gather. Features are
    captured with a forward hook, so the model's forward is unchanged; the head is not saved with the checkpoint.
    """

    def __init__(self, model):
        import torch

        from kvtool.evals.shapes import COLORS, SHAPES

        vc = model.config.vision_config
        self.grid = vc.image_size // vc.patch_size
        self.sizes = (len(COLORS) + 1, len(SHAPES) + 1, POSITION_BINS, POSITION_BINS)
        self.head = torch.nn.Linear(vc.hidden_size, sum(self.sizes))
        self.features = None
        self.handle = model.model.vision_tower.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.features = output.hidden_states[-1][:, 1:] if output.hidden_states is not None else None

    def _logits(self, samples: list[dict]):
        """Head logits (colour, shape, x, y) of every patch of the last tower call, and the targets."""
        import torch

        return torch.split(self.head(self.features), self.sizes, dim=-1), patch_targets(samples, self.grid).unbind(-1)

    def loss(self, samples: list[dict]):
        """Sum of the four cross-entropies, each the mean over the patches it labels; the last tower call."""
        import torch

        logits, targets = self._logits(samples)
        return sum(torch.nn.functional.cross_entropy(lg.flatten(0, 1), t.flatten(), ignore_index=-100)
                   for lg, t in zip(logits, targets, strict=True))

    def accuracy(self, samples: list[dict]) -> list[float]:
        """Per-target accuracy (colour, shape, x, y) over the patches that belong to an object, for the log."""
        import torch

        with torch.no_grad():
            logits, targets = self._logits(samples)
            on = targets[2] != -100
            return [round(float((lg.argmax(-1)[on] == t[on]).float().mean()), 3)
                    for lg, t in zip(logits, targets, strict=True)]


class _MentionProbe:
    """Training-only auxiliary objective on the language model: where a question names an object ("the red
    circle"), the output of layer ``layer`` at the name's last token must give that object's centre x through
    one linear head (regression on x scaled to [-1, 1]; ``encode_questions`` gives positions and targets), with
    the sign flipped for the object a left/right question compares against.

    Why: a left/right question is symmetric in its two objects until each name has fetched its own object's
    position, and nothing but the final answer supervises that fetch; a lookup keyed on the question's words as
    a bag (what exists questions teach) returns both objects at once and carries no left/right signal, so the
    relation loss stayed at log 2 in every run without this probe, even 1500 relation-only steps from a model
    that answers the other types. With each name holding its object's x, relation-only fine-tuning reached 84%
    in 500 steps, but among the other question types it stayed at chance for 1250 steps: the last layer must also
    tell the two names apart by position. The sign makes that unnecessary — the mean over a question's two names
    is half of x(A) - x(B), which an attention head that reads every name alike (as exists and colour questions
    already do) turns into the answer. Written by hand (no library trains such probes); not saved.
    """

    def __init__(self, model, layer: int):
        import torch

        self.layer = layer
        self.head = torch.nn.Linear(model.config.text_config.hidden_size, 1)

    def loss(self, hidden, start: int, enc: dict[str, Any]):
        """Mean squared error over the batch's mentions (0 when it has none)."""
        import torch

        from kvtool.evals.shapes import IMAGE_SIZE

        pos = enc["mention_pos"]
        if not len(pos):
            return hidden.sum() * 0.0
        pred = self.head(hidden[pos[:, 0], pos[:, 1] - start]).squeeze(-1)
        return torch.nn.functional.mse_loss(pred, enc["mention_sign"] * (enc["mention_x"] * (2.0 / IMAGE_SIZE) - 1.0))


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
            pred = normalize_answer(text)
            preds.append(pred)
            per.setdefault(s["question_type"], []).append(int(pred == s["answer"]))
    allc = [c for v in per.values() for c in v]
    return {"accuracy": sum(allc) / max(len(allc), 1), "n": len(allc), "predictions": preds,
            "per_type": {k: sum(v) / len(v) for k, v in sorted(per.items())}}


def train_shapes(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train kvtool-shapes as ``cfg`` says, save it to ``cfg.out_dir``, return the TRAINING.json record."""
    import numpy as np
    import torch
    import transformers
    from tqdm import tqdm

    from kvtool.evals.shapes import (
        TEST_SEED,
        TRAIN_SEED,
        make_shapes_sample,
        make_shapes_scene,
        make_shapes_split,
    )

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
    independent = cfg.turns > 1 and cfg.turn_mode == "independent"
    if cfg.relation_turns < 0 or (cfg.relation_turns and not independent):
        raise InputError(f"relation_turns={cfg.relation_turns}: expected 0, or a positive count with turns > 1 and "
                         "turn_mode independent")
    if cfg.mention_weight < 0 or (cfg.mention_weight and not (independent and 0 <= cfg.mention_layer <= cfg.layers)):
        raise InputError(f"mention_weight={cfg.mention_weight}, mention_layer={cfg.mention_layer}: expected weight 0, or "
                         f"a positive weight with turns > 1, turn_mode independent and 0 <= mention_layer <= {cfg.layers}")
    t0, cpu0 = time.time(), time.process_time()
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    # Some CPU kernel this loop uses takes a run-to-run-varying path at 2 threads by default: two runs of one config
    # diverged within 20 steps while the machine was loaded. The deterministic ones make them give the same weights.
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(cfg.seed)
        model, processor = _build(cfg)
        model.train()
        probe = _PatchProbe(model) if (cfg.aux_weight or cfg.vision_steps) else None
        probe_named = list(probe.head.named_parameters(prefix="probe")) if probe else []
        vision_log = []
        if cfg.vision_steps:
            # Stage 1: the vision tower alone learns colour, shape and position of objects (cheap: no LM).
            vnamed = list(model.model.vision_tower.named_parameters()) + probe_named
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
        mention = (_MentionProbe(model, cfg.mention_layer or max(1, cfg.layers - 1)) if cfg.mention_weight else None)
        named = (list(model.named_parameters()) + (probe_named if cfg.aux_weight else [])
                 + (list(mention.head.named_parameters(prefix="mention")) if mention else []))
        opt = _adamw(named, cfg.lr, cfg.weight_decay)
        lr_at = _cosine(cfg.lr, cfg.warmup, cfg.steps)

        quick = make_shapes_split("test", 100, seed=TEST_SEED + 1) if cfg.eval_every else []  # a validation stream
        history = []
        ema = aux_ema = mention_ema = None
        bar = tqdm(range(cfg.steps), desc="train kvtool-shapes", disable=not progress)
        for step in bar:
            first = step * cfg.batch_size
            if cfg.turns > 1:
                batch = [make_shapes_scene(TRAIN_SEED + cfg.seed, first + k) for k in range(cfg.batch_size)]
                batch = [dict(b, qa=b["qa"][:cfg.turns] + ([scene_caption(b)] if cfg.caption else [])
                              + extra_relations(b, cfg.relation_turns, np.random.default_rng([TRAIN_SEED + cfg.seed, first + k, 2])))
                         for k, b in enumerate(batch)]
            else:
                batch = [make_shapes_sample(TRAIN_SEED + cfg.seed, first + k) for k in range(cfg.batch_size)]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            if independent:  # (the mention probe is only allowed here; its layer comes out of the same forward)
                enc = encode_questions(processor, batch)
                loss = packed_answer_loss(model, enc, hidden_layer=mention.layer if mention else None)
                if mention is not None:
                    loss, hidden, start = loss
                    mention_loss = mention.loss(hidden, start, enc)
                    mention_ema = _ema(mention_ema, mention_loss.item())
            else:
                enc = encode_batch(processor, batch)
                loss = answer_loss(model, enc, shared_prefix_len(enc["input_ids"], model.config.image_token_id))
            if cfg.aux_weight:
                aux = probe.loss(batch)
                aux_ema = _ema(aux_ema, aux.item())
                total = loss + cfg.aux_weight * aux
            else:
                total = loss
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
        train_s, train_cpu_s = time.time() - t0, time.process_time() - cpu0
        if probe is not None:
            probe.handle.remove()
        model.eval()
        model.generation_config.do_sample = False
        model.generation_config.max_new_tokens = 4
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        # the checkpoint's chat template is its training format (training prompted through shapes_prompt)
        processor.chat_template = processor.tokenizer.chat_template = SHAPES_CHAT_TEMPLATE
        processor.save_pretrained(out)
        result = None
        if cfg.eval_samples:
            result = evaluate_shapes(model, processor, make_shapes_split("test", cfg.eval_samples), progress)
            # Accuracy on the first CHECK_SAMPLES test questions (a prefix of the same split), which the test
            # suite re-measures on the shipped checkpoint.
            rows = make_shapes_split("test", min(CHECK_SAMPLES, cfg.eval_samples))
            check = sum(p == r["answer"] for p, r in zip(result["predictions"], rows, strict=False)) / len(rows)
        record = {
            "command": train_command(cfg),
            "config": asdict(cfg),
            "train_seed": TRAIN_SEED + cfg.seed, "test_seed": TEST_SEED,
            "steps": cfg.steps, "samples_seen": cfg.steps * cfg.batch_size,
            "train_wall_s": round(train_s, 1), "train_cpu_s": round(train_cpu_s, 1), "final_loss_ema": round(ema or 0.0, 4),
            "test_samples": result["n"] if result else 0,
            "test_accuracy": result["accuracy"] if result else None,
            "test_accuracy_per_type": result["per_type"] if result else None,
            "check_samples": min(CHECK_SAMPLES, cfg.eval_samples), "check_accuracy": check if result else None,
            "prompt": {"system": SYSTEM_PROMPT, "suffix": ANSWER_SUFFIX, "eval": "greedy generate, batch 1, fp32"},
            "vision_history": vision_log,
            "history": history,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version(), "machine": platform.machine()},
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
        return record
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
