"""Calibration data for data-aware weight compression (AWQ, scale estimation): local files only.

Reads a ``.jsonl`` file of either text rows (``{"text": ...}``, e.g. a small Pile subset as the study used)
or image+question rows (``{"image": "relative/or/absolute.png", "question": ...}``) — or the image+question
samples of a kvtool eval task (``shapes``, generated offline, or ``TASK=LOCAL_PATH``) with the task's own
prompts — and turns each row into
the language model's real inputs: the processor builds the prompt (the checkpoint's chat template for
image rows), and the PyTorch model's own embedding path — the same modules the vision/text-embedding graphs
are exported from — produces ``inputs_embeds`` with the image features merged in and the model's
``position_ids`` (3-D mRoPE for Qwen2-VL). These are captured at the language model's entry with a forward
hook. Nothing is ever downloaded; a hub dataset name is refused with a one-line error. This module does not
compress anything (``openvino_backend`` / ``awq`` do).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtool.errors import InputError


@dataclass
class CalibrationSet:
    source: str
    kind: str  # "text" | "image-question"
    rows: list[dict[str, Any]]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "num_samples": len(self.rows)}


def load_task_calibration(spec: str, num_samples: int) -> CalibrationSet:
    """Image+question rows from a kvtool eval task: ``TASK`` (only ``shapes``, generated offline) or
    ``TASK=LOCAL_PATH`` (a local copy in the task's format; never a hub download)."""
    from kvtool.evals.loaders import load_task_data
    from kvtool.evals.tasks import get_task

    name, _, local = spec.partition("=")
    task = get_task(name)
    if not local and task.name != "shapes":
        raise InputError(f"--calibration {spec}: give a local copy of the task as {task.name}=PATH "
                         "(kvtool never downloads calibration data)")
    data, where = load_task_data(task, source=local or None, n_rows=num_samples)
    rows: list[dict[str, Any]] = []
    for row in data:
        for sample in task.build(row):
            if sample.image is not None:
                rows.append({"image": sample.image, "question": sample.prompt})
        if len(rows) >= num_samples:
            break
    if not rows:
        raise InputError(f"--calibration {spec}: the task gave no image+question samples")
    return CalibrationSet(source=f"task:{task.name} ({where})", kind="image-question", rows=rows[:num_samples])


def load_calibration(spec: str, num_samples: int) -> CalibrationSet:
    """The first ``num_samples`` rows of a local .jsonl calibration file, or of a kvtool eval task."""
    path = Path(spec).expanduser()
    if not path.is_file():
        from kvtool.evals.tasks import TASKS

        if spec.partition("=")[0].strip().lower() in TASKS:
            return load_task_calibration(spec, num_samples)
        raise InputError(f"--calibration {spec}: no such file (expected a local .jsonl of {{\"text\": ...}} or "
                         "{\"image\": ..., \"question\": ...} rows, or an eval task: shapes, TASK=LOCAL_PATH; kvtool never downloads calibration data)")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"--calibration {spec}: line {lineno} is not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not ({"text"} <= row.keys() or {"image", "question"} <= row.keys()):
                raise InputError(f"--calibration {spec}: line {lineno} needs a \"text\" field or "
                                 "\"image\" and \"question\" fields")
            if "image" in row:
                img = Path(row["image"])
                row = dict(row, image=str(img if img.is_absolute() else path.parent / img))
            rows.append(row)
            if len(rows) >= num_samples:
                break
    if not rows:
        raise InputError(f"--calibration {spec}: file has no rows")
    kinds = {"image-question" if "image" in r else "text" for r in rows}
    kind = "image-question" if kinds == {"image-question"} else "text" if kinds == {"text"} else "mixed"
    return CalibrationSet(source=str(path), kind=kind, rows=rows)


def _language_model(model: Any) -> Any:
    return model.model.language_model


def lm_inputs(model: Any, processor: Any, calib: CalibrationSet, max_tokens: int = 512,
              progress: Any = None) -> list[dict[str, Any]]:
    """Run each calibration row through the PyTorch model's embedding path; return the language model's
    inputs as numpy arrays: ``inputs_embeds`` [1, T, hidden], ``position_ids`` [1, T] (or [3, 1, T]),
    ``attention_mask`` [1, T]."""
    import torch
    from PIL import Image

    from kvtool.runtime.preprocess import build_prompt, to_rgb8

    captured: list[dict[str, Any]] = []

    def hook(_module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        pos = kwargs.get("position_ids")
        captured.append({"inputs_embeds": emb.detach().float().numpy().copy(),
                         "position_ids": None if pos is None else pos.detach().numpy().copy()})
        raise _Captured

    handle = _language_model(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in calib.rows:
            if "image" in row:
                try:
                    image = row["image"] if isinstance(row["image"], Image.Image) else Image.open(row["image"])
                    image = to_rgb8(image)  # 16-bit images scaled, not clipped
                except OSError as exc:
                    raise InputError(f"--calibration {calib.source}: image {row['image']} unreadable ({exc})") from None
                # the runtime's prompt builder: the image leads the turn unless the question places an <image>
                prompt = build_prompt(processor, str(row["question"]), 1)
                inputs = processor(images=image, text=prompt, return_tensors="pt")
            else:
                inputs = processor.tokenizer(row["text"], return_tensors="pt", truncation=True, max_length=max_tokens)
            try:
                with torch.no_grad():
                    model(**inputs, use_cache=False)
            except _Captured:
                pass
            if progress is not None:
                progress.update(1)
    finally:
        handle.remove()
    out = []
    import numpy as np

    for c in captured:
        t = c["inputs_embeds"].shape[1]
        pos = c["position_ids"]
        if pos is None:
            pos = np.arange(t, dtype=np.int64)[None]
        if pos.ndim == 3 and pos.shape[0] == 4:  # transformers >= 5 prepends text positions for Qwen2-VL
            pos = pos[1:]
        out.append({"inputs_embeds": c["inputs_embeds"], "position_ids": pos.astype(np.int64),
                    "attention_mask": np.ones((1, t), dtype=np.int64)})
    return out


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the LM inputs are known."""


def ov_lm_feeds(samples: list[dict[str, Any]], input_names: list[str], num_kv_heads: int, head_dim: int
                ) -> list[dict[str, Any]]:
    """Calibration samples as input dicts of the OpenVINO language model (stateless: empty past K/V;
    stateful: ``beam_idx``)."""
    import numpy as np

    feeds = []
    for s in samples:
        feed: dict[str, Any] = {}
        for name in input_names:
            if name in s:
                feed[name] = s[name]
            elif name.startswith("past_key_values."):
                feed[name] = np.zeros((1, num_kv_heads, 0, head_dim), dtype=np.float32)
            elif name == "beam_idx":
                feed[name] = np.zeros((1,), dtype=np.int32)
            else:
                raise RuntimeError(f"no calibration value for language-model input {name!r}")
        feeds.append(feed)
    return feeds
