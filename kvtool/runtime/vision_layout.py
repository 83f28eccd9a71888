"""Where the vision features go, in numpy: LLaVA-NeXT's anyres packing (unpad + image-newline) and Qwen2-VL's
vision rotary embedding — the graph engines' share of the models' forward passes that is not inside a graph.

These are numpy ports of transformers' own rules, so an exported model runs without torch installed:
``LlavaNextModel.pack_image_features`` with ``unpad_image`` / ``get_anyres_image_grid_shape`` /
``image_size_to_num_patches`` (transformers/models/llava_next/modeling_llava_next.py) and
``Qwen2VisionTransformerPretrainedModel.rot_pos_emb`` with ``VisionRotaryEmbedding``
(transformers/models/qwen2_vl/modeling_qwen2_vl.py). ``tests/runtime/test_torch_free.py`` checks each against
the transformers function on random inputs. The best-resolution choice is transformers' own
``select_best_resolution`` (torch-free). Nothing here runs a graph or reads files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _best_resolution(image_size: Sequence[int], grid_pinpoints: list) -> tuple[int, int]:
    from transformers.image_processing_utils import select_best_resolution

    return select_best_resolution([int(x) for x in image_size], grid_pinpoints)


def anyres_num_patches(image_size: Sequence[int], grid_pinpoints: list, tile: int) -> int:
    """Tiles (plus the base image) the LLaVA-NeXT processor makes of an image of ``(height, width)`` px:
    ``ceil(H/tile) * ceil(W/tile) + 1`` for the best-fitting pinpoint ``(H, W)``."""
    height, width = _best_resolution(image_size, grid_pinpoints)
    return -(-height // tile) * -(-width // tile) + 1


def unpad_features(feat: np.ndarray, original_size: Sequence[int]) -> np.ndarray:
    """Crop the padding the anyres resize added: ``feat`` [C, h, w] -> [C, h', w'] for an image of
    ``(height, width)`` px (the rounding is transformers' ``unpad_image``)."""
    orig_h, orig_w = (int(x) for x in original_size)
    cur_h, cur_w = feat.shape[1:]
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return feat[:, pad:cur_h - pad, :]
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return feat[:, :, pad:cur_w - pad]


def pack_llava_next_features(features: Sequence[np.ndarray], image_sizes: np.ndarray, grid_pinpoints: list,
                             image_size: int, patch_size: int, newline: np.ndarray | None) -> np.ndarray:
    """LLaVA-NeXT's feature layout for a prompt's images, concatenated in prompt order.

    ``features``: per image, [n_tiles, tokens_per_tile, D] (tile 0 the base image, the rest the anyres grid
    row-major; ``tokens_per_tile = (image_size // patch_size)^2``); ``image_sizes``: [n_images, 2] original
    (height, width) px; ``newline``: [D] learned ``image_newline`` or None. Returns [n_tokens, D]: per image
    the base tile's tokens, then the grid's feature map unpadded to the image's aspect with a newline
    embedding closing each row.
    """
    out = []
    side = image_size // patch_size
    for feat, size in zip(features, np.asarray(image_sizes), strict=True):
        if feat.shape[0] > 1:
            base, grid = feat[0], feat[1:]
            rows, cols = _best_resolution(size, grid_pinpoints)
            rows, cols = rows // image_size, cols // image_size
            d = grid.shape[-1]
            # [rows, cols, side, side, D] -> [D, rows*side, cols*side]
            fmap = grid.reshape(rows, cols, side, side, d).transpose(4, 0, 2, 1, 3).reshape(d, rows * side,
                                                                                             cols * side)
            fmap = unpad_features(fmap, size)
            if newline is not None:
                nl = np.broadcast_to(np.asarray(newline, dtype=fmap.dtype)[:, None, None], (d, fmap.shape[1], 1))
                fmap = np.concatenate([fmap, nl], axis=-1)
            out.append(np.concatenate([base, fmap.reshape(d, -1).T], axis=0))
        else:
            tokens = feat[0]
            if newline is not None:
                tokens = np.concatenate([tokens, np.asarray(newline, dtype=tokens.dtype)[None]], axis=0)
            out.append(tokens)
    return np.concatenate(out, axis=0)


def qwen2_vl_vision_rotary(grid_thw: np.ndarray, head_dim: int, merge_size: int,
                           theta: float = 10000.0) -> np.ndarray:
    """Qwen2-VL's vision rotary angles per patch, in the processor's patch order (merge windows of
    ``merge_size`` x ``merge_size`` patches kept together): [n_patches, head_dim // 2] float32.

    ``grid_thw``: [n_images, 3] int (temporal, height, width patches). Angles: position (row for the first
    half of the columns, column for the second) times ``theta^(-2i / (head_dim // 2))``, computed in float32
    as transformers' ``VisionRotaryEmbedding`` does."""
    dim = head_dim // 2
    inv_freq = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)
    pos = []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64):
        m = merge_size
        hpos = np.broadcast_to(np.arange(h)[:, None], (h, w)).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3)
        wpos = np.broadcast_to(np.arange(w)[None, :], (h, w)).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3)
        pos.append(np.tile(np.stack([hpos.reshape(-1), wpos.reshape(-1)], axis=-1), (int(t), 1)))
    pos_ids = np.concatenate(pos, axis=0)  # [n_patches, 2]
    max_grid = int(np.asarray(grid_thw)[:, 1:].max())
    table = np.outer(np.arange(max_grid, dtype=np.float32), inv_freq).astype(np.float32)  # [max_grid, dim/2]
    return table[pos_ids].reshape(pos_ids.shape[0], -1)
