"""The ``shapes`` benchmark: a synthetic VQA task generated deterministically from a seed.

Each sample is a small RGB image (``IMAGE_SIZE`` px, dark noisy background, a few grey clutter dots) holding
1-4 coloured shapes that do not overlap, and one question with a one-word answer:

=============  ==========================================================  ======================
question_type  example question                                            answers
=============  ==========================================================  ======================
color          What color is the circle?                                   red, green, ...
shape          What shape is the blue object?                              circle, square, ...
count          How many shapes are in the image?                           one .. four
exists         Is there a red square in the image?                         yes / no
relation       Is the red circle to the left or to the right of the ...?   left / right
=============  ==========================================================  ======================

``exists`` questions follow POPE: half are positives (an object in the image), half negatives drawn one of
three ways, recorded in ``pope_split``: ``random`` (any absent colour-shape pair), ``popular`` (the absent
pair that is most frequent under the generator's prior — colours and shapes are drawn with fixed unequal
weights, so some pairs are more common, as objects are in COCO) and ``adversarial`` (an absent pair that
shares its colour or its shape with an object in the image). Positives are spread over the three splits too,
so each POPE split has balanced yes/no.

Public API::

    make_shapes_split(split, n, seed=None) -> list[dict]   # keys: id, image (PIL), question, answer,
                                                           #       question_type, pope_split (or None),
                                                           #       objects (ground truth: colour, shape, x, y, r)
    make_shapes_sample(seed, index) -> dict                # one sample; sample i never depends on n
    make_shapes_scene(seed, index) -> dict                 # one image, several questions (training turns), each
                                                           #       with ``refers``: indices of the objects it names
    relation_pairs(objs, xs), relation_question(objs, xs, a, b)   # the left/right question rules, for training
    write_shapes_dataset(out_dir, splits={"test": 500}) -> Path   # parquet files, ``datasets.load_dataset(dir)``
    TRAIN_SEED, TEST_SEED, QUESTION_TYPES, COLORS, SHAPES, COUNT_WORDS, ANSWER_WORDS, QUESTION_WORDS

Question types cycle with the index (sample ``i`` has type ``QUESTION_TYPES[i % 5]``), so any prefix of a
split is balanced to within one sample per type; yes/no, left/right and count answers cycle too.

The prompt the bundled ``kvtool-shapes`` model was trained on, and the task's answer rule, live here too, so
the eval task (``kvtool.evals.tasks``) and the training script (``scripts/train_shapes.py``) share one
definition::

    SHAPES_CONTEXT, shapes_user_text(question), shapes_messages(question), shapes_prompt(processor, question)
    SHAPES_CHAT_TEMPLATE                                   # the chat template shipped with kvtool-shapes
    first_word(text) -> str                                # the answer rule: first word, lower-cased, unpunctuated

The system prompt is LLaVA's vicuna_v1 one (``kvtool.runtime.preprocess.VICUNA_V1_SYSTEM``) and the answer line
LLaVA-1.5's short-answer instruction (``kvtool.evals.tasks.SHORT_ANSWER``). This module does not score or
aggregate a run (the ``shapes`` task spec does) and does not train or load models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kvtool.errors import InputError
from kvtool.evals.tasks import SHORT_ANSWER
from kvtool.runtime.preprocess import VICUNA_V1_SYSTEM

TRAIN_SEED = 1_000_003
TEST_SEED = 2_000_003
IMAGE_SIZE = 90
QUESTION_TYPES = ("color", "shape", "count", "exists", "relation")
POPE_SPLITS = ("random", "popular", "adversarial")

# Unequal priors: they make "popular" negatives meaningful (POPE's popular = most frequent absent objects).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (50, 90, 230),
    "green": (40, 190, 60),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
}
COLOR_WEIGHTS = (0.3, 0.25, 0.2, 0.15, 0.1)
SHAPES = ("circle", "square", "triangle", "diamond")
SHAPE_WEIGHTS = (0.35, 0.3, 0.2, 0.15)
COUNT_WORDS = ("one", "two", "three", "four")
MAX_OBJECTS = 4
RELATION_MIN_DX = 9.0  # px between the centres of two objects a left/right question compares
ANSWER_WORDS = (*COLORS, *SHAPES, *COUNT_WORDS, "yes", "no", "left", "right")
# Every word a question can contain (besides colour/shape names); the model's tokenizer is built from these.
QUESTION_WORDS = ("what", "color", "is", "the", "shape", "object", "how", "many", "shapes", "are", "in",
                  "image", "there", "a", "to", "left", "or", "right", "of", "?")

_PAIRS = [(c, s) for c in COLORS for s in SHAPES]
_PAIR_PRIOR = {(c, s): cw * sw for c, cw in zip(COLORS, COLOR_WEIGHTS, strict=True) for s, sw in zip(SHAPES, SHAPE_WEIGHTS, strict=True)}
_POPULARITY = sorted(_PAIRS, key=lambda p: -_PAIR_PRIOR[p])  # most frequent pair first


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise AssertionError(shape)


def _place(rng: np.random.Generator, n: int, min_dx: float = 0.0) -> list[tuple[float, float, float]]:
    """Centres and radii of ``n`` non-overlapping shapes (rejection sampling; restarts if stuck)."""
    while True:
        out: list[tuple[float, float, float]] = []
        for _ in range(200):
            r = float(rng.uniform(8.0, 13.0))
            cx, cy = (float(v) for v in rng.uniform(r + 1, IMAGE_SIZE - r - 1, size=2))
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 3) ** 2 and abs(cx - x) >= min_dx for x, y, q in out):
                out.append((cx, cy, r))
                if len(out) == n:
                    return out


def _pick_objects(rng: np.random.Generator, n: int, distinct: bool) -> list[tuple[str, str]]:
    """``n`` (colour, shape) pairs drawn from the prior; all pairs distinct when ``distinct``."""
    objs: list[tuple[str, str]] = []
    while len(objs) < n:
        pair = (str(rng.choice(list(COLORS), p=COLOR_WEIGHTS)), str(rng.choice(SHAPES, p=SHAPE_WEIGHTS)))
        if distinct and pair in objs:
            continue
        objs.append(pair)
    return objs


def _render(rng: np.random.Generator, objs: list[tuple[str, str]], min_dx: float = 0.0):
    from PIL import Image, ImageDraw

    base = rng.integers(20, 60, size=3)
    noise = rng.integers(-12, 13, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    bg = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):  # clutter: small grey dots, never shape-sized
        x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - 2, size=2))
        g = int(rng.integers(90, 170))
        draw.rectangle([x, y, x + 1, y + 1], fill=(g, g, g))
    places = _place(rng, len(objs), min_dx)
    for (color, shape), (cx, cy, r) in zip(objs, places, strict=True):
        jitter = rng.integers(-15, 16, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))
        _draw_shape(draw, shape, cx, cy, r, fill)
    return img, places


def _pope_negative(rng: np.random.Generator, objs: list[tuple[str, str]], pope_split: str) -> tuple[str, str]:
    """An absent colour-shape pair drawn as POPE's ``pope_split`` draws negatives (see the module docstring)."""
    if pope_split == "popular":
        return next(p for p in _POPULARITY if p not in objs)
    absent = [p for p in _PAIRS if p not in objs]
    if pope_split == "adversarial":
        absent = [p for p in absent if any(p[0] == c or p[1] == s for c, s in objs)]
    return absent[int(rng.integers(len(absent)))]


def _objects_record(objs: list[tuple[str, str]], places: list[tuple[float, float, float]]) -> list[dict[str, Any]]:
    """The ground truth stored with a sample: colour, shape, centre and radius of each object (2 decimals)."""
    return [{"color": c, "shape": s, "x": round(x, 2), "y": round(y, 2), "r": round(r, 2)}
            for (c, s), (x, y, r) in zip(objs, places, strict=True)]


def make_shapes_sample(seed: int, index: int) -> dict[str, Any]:
    """Sample ``index`` of the stream seeded by ``seed`` (depends only on both, never on the split size)."""
    rng = np.random.default_rng([int(seed), int(index)])
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    j = index // len(QUESTION_TYPES)  # position among the samples of this type
    pope_split = None
    if qtype == "count":
        n = j % MAX_OBJECTS + 1
        objs = _pick_objects(rng, n, distinct=False)
        img, places = _render(rng, objs)
        question, answer = "How many shapes are in the image?", COUNT_WORDS[n - 1]
    elif qtype == "color":
        objs = _pick_objects(rng, int(rng.integers(1, MAX_OBJECTS + 1)), distinct=False)
        unique = [s for s in SHAPES if sum(o[1] == s for o in objs) == 1]
        target = str(rng.choice(unique)) if unique else None
        if target is None:  # every shape repeated: make the first object's shape unique
            objs = [objs[0]] + [o for o in objs[1:] if o[1] != objs[0][1]]
            target = objs[0][1]
        img, places = _render(rng, objs)
        question, answer = f"What color is the {target}?", next(c for c, s in objs if s == target)
    elif qtype == "shape":
        objs = _pick_objects(rng, int(rng.integers(1, MAX_OBJECTS + 1)), distinct=False)
        unique = [c for c in COLORS if sum(o[0] == c for o in objs) == 1]
        if not unique:
            objs = [objs[0]] + [o for o in objs[1:] if o[0] != objs[0][0]]
            unique = [objs[0][0]]
        target = str(rng.choice(unique))
        img, places = _render(rng, objs)
        question, answer = f"What shape is the {target} object?", next(s for c, s in objs if c == target)
    elif qtype == "exists":
        objs = _pick_objects(rng, int(rng.integers(1, MAX_OBJECTS + 1)), distinct=False)
        img, places = _render(rng, objs)
        pope_split = POPE_SPLITS[(j // 2) % len(POPE_SPLITS)]
        if j % 2 == 0:
            color, shape = objs[int(rng.integers(len(objs)))]
            answer = "yes"
        else:
            (color, shape), answer = _pope_negative(rng, objs, pope_split), "no"
        question = f"Is there a {color} {shape} in the image?"
    else:  # relation
        objs = _pick_objects(rng, int(rng.integers(2, MAX_OBJECTS + 1)), distinct=True)
        img, places = _render(rng, objs, min_dx=RELATION_MIN_DX)
        a, b = (int(v) for v in rng.choice(len(objs), size=2, replace=False))
        want_left = j % 2 == 0
        if (places[a][0] < places[b][0]) != want_left:
            a, b = b, a
        rel = relation_question(objs, [p[0] for p in places], a, b)
        question, answer = rel["question"], rel["answer"]
    return {"id": f"shapes-{seed}-{index}", "image": img, "question": question, "answer": answer,
            "question_type": qtype, "pope_split": pope_split, "objects": _objects_record(objs, places)}


def _scene_question(rng: np.random.Generator, qtype: str, objs: list[tuple[str, str]],
                    places: list[tuple[float, float, float]]) -> dict[str, Any] | None:
    """One ``qtype`` question about a rendered scene, by the rules of ``make_shapes_sample``; None if the scene
    cannot pose it (no shape or colour held by exactly one object, no pair of singly-described objects far
    enough apart for left/right). ``refers`` lists the indices of the objects the question names, in the order
    it names them (empty for count and for an absent object); training uses it to supervise each mention."""
    pope_split, refers = None, []
    if qtype == "count":
        question, answer = "How many shapes are in the image?", COUNT_WORDS[len(objs) - 1]
    elif qtype == "color":
        unique = [s for s in SHAPES if sum(o[1] == s for o in objs) == 1]
        if not unique:
            return None
        target = str(rng.choice(unique))
        refers = [next(i for i, o in enumerate(objs) if o[1] == target)]
        question, answer = f"What color is the {target}?", objs[refers[0]][0]
    elif qtype == "shape":
        unique = [c for c in COLORS if sum(o[0] == c for o in objs) == 1]
        if not unique:
            return None
        target = str(rng.choice(unique))
        refers = [next(i for i, o in enumerate(objs) if o[0] == target)]
        question, answer = f"What shape is the {target} object?", objs[refers[0]][1]
    elif qtype == "exists":
        pope_split = POPE_SPLITS[int(rng.integers(len(POPE_SPLITS)))]
        if rng.random() < 0.5:
            refers = [int(rng.integers(len(objs)))]
            (color, shape), answer = objs[refers[0]], "yes"
        else:
            (color, shape), answer = _pope_negative(rng, objs, pope_split), "no"
        question = f"Is there a {color} {shape} in the image?"
    elif qtype == "relation":
        xs = [p[0] for p in places]
        pairs = relation_pairs(objs, xs)
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        return relation_question(objs, xs, a, b)
    else:  # pragma: no cover - QUESTION_TYPES is closed
        raise AssertionError(qtype)
    return {"question": question, "answer": answer, "question_type": qtype, "pope_split": pope_split, "refers": refers}


def relation_pairs(objs: list[tuple[str, str]], xs: list[float]) -> list[tuple[int, int]]:
    """Ordered pairs (a, b) of objects a left/right question may compare: each held by exactly one object (so
    its colour and shape name it) and centres at least ``RELATION_MIN_DX`` apart in x."""
    single = [i for i, o in enumerate(objs) if objs.count(o) == 1]
    return [(a, b) for a in single for b in single if a != b and abs(xs[a] - xs[b]) >= RELATION_MIN_DX]


def relation_question(objs: list[tuple[str, str]], xs: list[float], a: int, b: int) -> dict[str, Any]:
    """The left/right question comparing object ``a`` with object ``b`` (centre x ``xs``), as a scene question."""
    (ca, sa), (cb, sb) = objs[a], objs[b]
    return {"question": f"Is the {ca} {sa} to the left or to the right of the {cb} {sb}?",
            "answer": "left" if xs[a] < xs[b] else "right", "question_type": "relation", "pope_split": None,
            "refers": [a, b]}


def make_shapes_scene(seed: int, index: int) -> dict[str, Any]:
    """Scene ``index`` of the stream seeded by ``seed``: one image (1-4 objects, drawn as ``make_shapes_sample``
    draws them) and one question of every type the scene can pose, in random order (``qa``: list of dicts with
    question, answer, question_type, pope_split). Training asks each as its own prompt while encoding the image
    once for all of them; the eval splits stay one question per image.
    """
    rng = np.random.default_rng([int(seed), int(index), 1])
    objs = _pick_objects(rng, int(rng.integers(1, MAX_OBJECTS + 1)), distinct=False)
    img, places = _render(rng, objs)
    qa = [q for t in rng.permutation(QUESTION_TYPES) if (q := _scene_question(rng, str(t), objs, places))]
    return {"id": f"shapes-scene-{seed}-{index}", "image": img, "qa": qa, "objects": _objects_record(objs, places)}


def make_shapes_split(split: str, n: int, seed: int | None = None) -> list[dict[str, Any]]:
    """The first ``n`` samples of the ``train`` or ``test`` split (seeds ``TRAIN_SEED`` / ``TEST_SEED``)."""
    if split not in ("train", "test"):
        raise InputError(f"shapes split {split!r}: expected 'train' or 'test'")
    if not isinstance(n, int) or n < 1:
        raise InputError(f"shapes sample count {n!r}: expected a positive integer")
    if seed is None:
        seed = TRAIN_SEED if split == "train" else TEST_SEED
    return [make_shapes_sample(seed, i) for i in range(n)]


def write_shapes_dataset(out_dir: str | Path, splits: dict[str, int] | None = None) -> Path:
    """Write splits as ``out_dir/data/{split}-00000-of-00001.parquet`` (hub layout, images as PNG bytes).

    ``datasets.load_dataset(str(out_dir))`` then gives a ``DatasetDict`` with an ``Image`` column; ``objects``
    is stored as a JSON string.
    """
    import datasets

    splits = splits or {"test": 500}
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    features = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "question_type": datasets.Value("string"),
        "pope_split": datasets.Value("string"), "objects": datasets.Value("string"),
    })
    for split, n in splits.items():
        rows = [dict(r, objects=json.dumps(r["objects"])) for r in make_shapes_split(split, n)]
        ds = datasets.Dataset.from_list(rows, features=features)
        ds.to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    return out


# --- the prompt kvtool-shapes was trained on --------------------------------------------------------------

# An instruction said before the picture, the same for every question (see docs/SHAPES_TRAINING.md for why it
# avoids the task's words); with 36 image tokens it brings every prompt past 128 tokens.
SHAPES_CONTEXT = ("Look carefully at the picture below before you reply. It was drawn on a dark background, and "
                  "the small grey dots scattered over it are only noise, so please ignore them when you answer.")


def shapes_user_text(question: str) -> str:
    """The first user turn of a question, with the image where the ``<image>`` placeholder stands: the fixed
    instruction, the image, the question, LLaVA-1.5's short-answer line. The ``shapes`` eval task sends this
    text, so the harness prompts exactly as training did."""
    return f"{SHAPES_CONTEXT}\n<image>\n{question}\n{SHORT_ANSWER}"


def shapes_messages(question: str) -> list[dict]:
    """The chat of one question (vicuna_v1 system prompt + user turn with the image), for ``apply_chat_template``
    (the LLaVA template renders the text verbatim and the processor expands its ``<image>``)."""
    return [
        {"role": "system", "content": VICUNA_V1_SYSTEM},
        {"role": "user", "content": [{"type": "text", "text": shapes_user_text(question)}]},
    ]


def shapes_prompt(processor, question: str) -> str:
    """The prompt text (with one ``<image>`` placeholder) the model was trained on, through ``processor``'s chat
    template."""
    return processor.apply_chat_template(shapes_messages(question), add_generation_prompt=True, tokenize=False)


def first_word(text: str) -> str:
    """The shapes task's answer rule: the first word of a generated answer, lower-cased, without punctuation
    (``" Red."`` -> ``"red"``; empty text -> ``""``)."""
    words = text.strip().lower().split()
    return words[0].strip(".,!?;:'\"") if words else ""


def _jinja_str(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a Jinja string literal (\\n, \\", \\uXXXX escapes)


# The chat template shipped with kvtool-shapes: it renders exactly the training format, so every client that
# applies it (transformers, optimum-intel, openvino.genai) prompts the model as it was trained:
# ``{VICUNA_V1_SYSTEM} USER: {SHAPES_CONTEXT}\n<image>\n{question}\n{SHORT_ANSWER} ASSISTANT:`` for a user turn
# of an image and a question; vicuna_v1's ``ASSISTANT: {answer}</s>`` and ``USER: {question}\n{SHORT_ANSWER}
# ASSISTANT:`` for later turns (turn_mode="conversation"). The default system prompt is vicuna_v1's. The
# instruction line goes before an image and the answer line after the question unless the text already has
# them, so a turn that is already in the training format (the ``shapes`` task's prompt, or the image inline as
# ``<image>``) renders unchanged. The training loop itself prompts through ``shapes_prompt``.
SHAPES_CHAT_TEMPLATE = (
    "{%- set system = " + _jinja_str(VICUNA_V1_SYSTEM) + " -%}"
    "{%- set context = " + _jinja_str(SHAPES_CONTEXT) + " -%}"
    "{%- set suffix = " + _jinja_str(SHORT_ANSWER) + " -%}"
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
