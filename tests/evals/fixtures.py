"""Small local copies of each benchmark in its own on-disk format (parquet with embedded images, as on the hub;
PAIRS as its repository's image folders), made by the tests, and a scripted model double of the
``generate`` interface for runner / metric tests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


def image(seed: int, size: int = 32) -> Image.Image:
    h = hashlib.sha256(str(seed).encode()).digest()
    return Image.new("RGB", (size, size), (h[0], h[1], h[2]))


def _write(rows: list[dict[str, Any]], path: Path, image_cols: tuple[str, ...] = ("image",)) -> Path:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    ds = datasets.Dataset.from_dict(cols)
    for c in image_cols:
        if c in cols:
            ds = ds.cast_column(c, datasets.Image())
    ds.to_parquet(str(path))
    return path


def make_textvqa(root: Path, n: int = 4) -> Path:
    rows = [{"question_id": i, "image_id": f"img{i}", "question": f"what is written {i}?", "image": image(i),
             "answers": ["stop"] * 7 + ["halt"] * 3, "ocr_tokens": ["stop", "sign"], "image_classes": ["x"],
             "set_name": "val"} for i in range(n)]
    return _write(rows, root / "textvqa" / "validation-00000-of-00001.parquet").parent


def make_vqav2(root: Path, n: int = 4) -> Path:
    rows = [{"question_id": i, "question": "how many dogs?", "image": image(10 + i), "image_id": i,
             "question_type": "how many", "answer_type": "number", "multiple_choice_answer": "2",
             "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": k} for k in range(10)]}
            for i in range(n)]
    return _write(rows, root / "vqav2" / "validation-00000-of-00001.parquet").parent


def make_gqa(root: Path, n: int = 4) -> Path:
    q = [{"id": f"q{i}", "imageId": f"n{i % 2}", "question": "which side is the cup on?", "answer": "left",
          "fullAnswer": "The cup is on the left."} for i in range(n)]
    imgs = [{"id": f"n{k}", "image": image(20 + k)} for k in range(2)]
    _write(q, root / "gqa" / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet")
    _write(imgs, root / "gqa" / "testdev_balanced_images" / "testdev-00000-of-00001.parquet")
    return root / "gqa"


def make_mme(root: Path) -> Path:
    rows = []
    for k, cat in enumerate(["existence", "count", "code_reasoning"]):
        for ans in ("Yes", "No"):
            rows.append({"question_id": f"{cat}/{k}.png", "image": image(30 + k), "category": cat, "answer": ans,
                         "question": f"Is there a thing {ans}? Please answer yes or no."})
    return _write(rows, root / "mme" / "test-00000-of-00001.parquet").parent


def make_scienceqa(root: Path, n: int = 4) -> Path:
    rows = [{"image": image(40 + i), "question": "Which is a mammal?", "choices": ["frog", "whale", "shark"],
             "answer": 1, "hint": "" if i % 2 else "Animals live in many places.", "task": "closed choice",
             "subject": "natural science"} for i in range(n)]
    return _write(rows, root / "scienceqa" / "ScienceQA-IMG" / "test-00000-of-00001.parquet").parent.parent


def make_pope(root: Path, n: int = 6) -> Path:
    # ordered as the hub's test split: grouped by category, all adversarial rows first, then popular, random
    cats = ("adversarial", "popular", "random")
    rows = [{"id": str(i), "question_id": str(i), "question": "Is there a dog in the image?",
             "answer": "yes" if i % 2 else "no", "image_source": f"coco{i}", "image": image(50 + i),
             "category": cats[min(len(cats) - 1, i * len(cats) // n)]} for i in range(n)]
    return _write(rows, root / "pope" / "test-00000-of-00001.parquet").parent


def make_mmvet(root: Path, n: int = 3) -> Path:
    rows = [{"question_id": f"v1_{i}", "image": image(60 + i), "question": "What is shown?",
             "answer": "a cat<OR>kitten", "image_source": "x", "capability": "rec,know" if i else "ocr"}
            for i in range(n)]
    return _write(rows, root / "mmvet" / "test-00000-of-00001.parquet").parent


def make_hallusionbench(root: Path) -> Path:
    img_rows, txt_rows = [], []
    for set_id in range(2):
        base = {"category": "VD" if set_id == 0 else "VS", "subcategory": "chart", "set_id": str(set_id),
                "question_id": "0", "question": "Is the bar taller than 5?", "gt_answer_details": "Yes, it is.",
                "sample_note": "", "filename": ""}
        if set_id == 0:
            img_rows.append({**base, "figure_id": "0", "visual_input": "1", "gt_answer": "1", "image": image(70)})
            img_rows.append({**base, "figure_id": "1", "visual_input": "2", "gt_answer": "0", "image": image(71)})
        else:
            txt_rows.append({**base, "figure_id": "0", "visual_input": "0", "gt_answer": "1", "image": None})
            img_rows.append({**base, "figure_id": "1", "visual_input": "1", "gt_answer": "1", "image": image(72)})
    _write(img_rows, root / "hallusionbench" / "image-00000-of-00001.parquet")
    _write(txt_rows, root / "hallusionbench" / "non_image-00000-of-00001.parquet")
    return root / "hallusionbench"


def make_pairs(root: Path) -> Path:
    for group, scen in (("occupations", "lab_coat"), ("status", "street"), ("potential_crime", "bandanna")):
        for k, who in enumerate(("black_man", "black_woman", "white_man", "white_woman")):
            p = root / "pairs" / "data" / group / scen / f"{who}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            image(80 + k).save(p)
    return root / "pairs"


def make_socialcf(root: Path) -> Path:
    rows = []
    for s in range(2):
        for a1 in ("obese", "skinny"):
            for a2 in ("male", "female"):
                rows.append({"image": image(90 + len(rows)), "caption": f"a {a1} {a2} doctor",
                             "counterfactual_set": f"set{s}", "a1_type": "physical", "a1": a1, "a2_type": "gender",
                             "a2": a2, "a1a2": f"{a1} {a2}"})
    rows.append({**rows[0], "a1_type": "race", "a1": "asian"})  # outside the physical-gender subset
    return _write(rows, root / "socialcf" / "train-00000-of-00001.parquet").parent


MAKERS = {"textvqa": make_textvqa, "vqav2": make_vqav2, "gqa": make_gqa, "mme": make_mme,
          "scienceqa": make_scienceqa, "pope": make_pope, "mmvet": make_mmvet,
          "hallusionbench": make_hallusionbench, "pairs": make_pairs, "socialcf": make_socialcf}


@dataclass
class Out:
    text: str
    token_ids: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


class ScriptedModel:
    """A deterministic double of the ``generate`` interface: answers from a function of the prompt."""

    def __init__(self, answer=None, fail_after: int | None = None, info: dict | None = None):
        self._info = info or {"backend": "scripted", "kv": "fp16", "k_bits": None, "v_bits": None}
        self.answer = answer or (lambda image, prompt, seed: "Yes")
        self.calls: list[tuple[Any, str, dict]] = []
        self.fail_after = fail_after

    def generate(self, image, prompt, **kw):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append((image, prompt, kw))
        text = self.answer(image, prompt, kw.get("seed", 0))
        return Out(text, [1] * max(1, len(text.split())), {"prefill_ms": 1.0, "decode_ms_per_token": 2.0})

    def info(self):
        return self._info
