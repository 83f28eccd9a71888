"""Position ids for the language model: plain ``arange`` for LLaVA / NeXT, and Qwen2-VL's 3-D multimodal
rotary positions ``[3, B, T]`` (temporal, height, width) for the prompt plus the offset ``delta`` that later
tokens add to their 1-D position.

The Qwen2-VL rule is transformers' own ``Qwen2VLModel.get_rope_index``, called on a stand-in holding only the
config (it needs no weights), so graph engines and the torch engine place tokens identically. Nothing here
runs a model.
"""

from __future__ import annotations

import numpy as np


def mrope_positions(config, input_ids: np.ndarray, mm_token_type_ids: np.ndarray | None,
                    image_grid_thw: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Qwen2-VL prompt positions: ([3, 1, T] int64, delta) with decode position of token n = n + delta."""
    import functools
    import types

    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
    if image_grid_thw is None or mm_token_type_ids is None:  # text only: 1-D positions on all three axes
        T = ids.shape[1]
        return np.broadcast_to(np.arange(T, dtype=np.int64), (3, 1, T)).copy(), 0
    stand_in = types.SimpleNamespace(config=config)
    stand_in.get_vision_position_ids = functools.partial(Qwen2VLModel.get_vision_position_ids, stand_in)
    pos, delta = Qwen2VLModel.get_rope_index(
        stand_in, ids, mm_token_type_ids=torch.from_numpy(np.asarray(mm_token_type_ids)),
        image_grid_thw=torch.from_numpy(np.asarray(image_grid_thw, dtype=np.int64)),
        attention_mask=torch.ones_like(ids))
    return pos.numpy().astype(np.int64), int(delta.reshape(-1)[0])
