"""Position ids for the language model: plain ``arange`` for LLaVA / NeXT, and Qwen2-VL's 3-D multimodal
rotary positions ``[3, B, T]`` (temporal, height, width) for the prompt plus the offset ``delta`` that later
tokens add to their 1-D position.

The Qwen2-VL rule is transformers' ``Qwen2VLModel.get_rope_index`` ported to numpy (so the graph engines run
without torch; tests/runtime/test_torch_free.py checks it against transformers' function), used by the graph
engines and the torch engine alike so they place tokens identically. Nothing here runs a model.
"""

from __future__ import annotations

import numpy as np


def mrope_positions(config, input_ids: np.ndarray, mm_token_type_ids: np.ndarray | None,
                    image_grid_thw: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Qwen2-VL prompt positions: ([3, 1, T] int64, delta) with decode position of token n = n + delta.

    ``input_ids``: [1, T]; ``mm_token_type_ids``: [1, T] (0 text, 1 image); ``image_grid_thw``: [n_images, 3]
    patches before the ``config.vision_config.spatial_merge_size`` merge. Text runs count on from the last
    position on all three axes; an image run of ``t*h*w`` tokens (merged grid) takes (temporal, row, column)
    positions offset by the position it starts at, and the next text starts ``max(h, w)`` after that start —
    as transformers' ``get_rope_index`` (one grid per run of consecutive image tokens, as there)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    T = ids.shape[1]
    if image_grid_thw is None or mm_token_type_ids is None:  # text only: 1-D positions on all three axes
        return np.broadcast_to(np.arange(T, dtype=np.int64), (3, 1, T)).copy(), 0
    merge = int(config.vision_config.spatial_merge_size)
    types_ = np.asarray(mm_token_type_ids).reshape(-1)
    grids = iter(np.asarray(image_grid_thw, dtype=np.int64))
    # runs of equal token type: [start, end)
    cuts = np.flatnonzero(np.diff(types_)) + 1
    bounds = zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [T]]), strict=True)
    parts, cur = [], 0
    for a, b in bounds:
        if types_[a] == 0:
            parts.append(np.broadcast_to(np.arange(cur, cur + b - a, dtype=np.int64), (3, b - a)))
            cur += int(b - a)
            continue
        if types_[a] != 1:
            raise ValueError(f"mm_token_type_ids: only text (0) and image (1) tokens are supported, got {types_[a]}")
        t, h, w = (int(x) for x in next(grids))
        h, w = h // merge, w // merge
        n = t * h * w
        parts.append(np.stack([np.full(n, cur, dtype=np.int64),
                               np.repeat(np.arange(cur, cur + h, dtype=np.int64), w * t),
                               np.tile(np.arange(cur, cur + w, dtype=np.int64), h * t)]))
        cur += max(h, w)
    pos = np.concatenate(parts, axis=1)
    return pos[:, None, :].copy(), int(pos.max() + 1 - T)
