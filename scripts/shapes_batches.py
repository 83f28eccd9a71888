"""Batches and losses of the kvtool-shapes training script (``scripts/train_shapes.py``).

The training samples beyond the eval's questions (``scene_caption``, ``extra_relations``), the tensors of a
batch (``encode_batch``: one prompt per image, optionally several LLaVA-v1 turns; ``encode_questions``: one row
per question, for ``packed_answer_loss``) and the answer losses, written by hand for speed where transformers
has no path that shares a prompt prefix (``answer_loss``, ``packed_answer_loss``; each tested against
``model(**enc).loss``). Research code beside the library; it does not build models or run the training loop.
"""

from __future__ import annotations

from typing import Any

from kvtool.evals.shapes import shapes_prompt
from kvtool.evals.tasks import SHORT_ANSWER

# A training-only question (LLaVA mixes descriptions into its instruction data the same way): naming every object
# in left-to-right order asks for each object's colour bound to its shape and for the objects' x order, the two
# skills exists and relation questions need, with one supervised token per attribute instead of one bit.
CAPTION_QUESTION = "Name every shape in the image from left to right."


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
                q = tok(f"USER: {t['question']}\n{SHORT_ANSWER} ASSISTANT:", add_special_tokens=False)["input_ids"]
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
