"""What the OpenVINO and ONNX Runtime engines share: building the prompt's ``inputs_embeds`` from the
text-embeddings and vision graphs, the language-model positions, and the step that hands the past K/V held by
``GraphKVCache`` to the stateless LM graph and stores the new K/V it returns. A generated token's embedding
row is computed by the text-embeddings graph once per token id and kept (``_token_embedding``).

Vision post-processing that the exported graphs leave to the caller is done here in numpy (no torch), with
``kvtool.runtime.vision_layout``'s ports of transformers' rules: LLaVA-NeXT's anyres packing with the image
newline (read from ``config.image_newline``, which the OpenVINO exporter writes), Qwen2-VL's vision rotary
embedding; and the block attention mask for the merger graph. Subclasses only run graphs (``_run``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvtool.errors import InputError
from kvtool.runtime.kv_cache import GraphKVCache
from kvtool.runtime.kvspec import KVSpec

# Generated tokens whose text-embeddings row run_token keeps (4096 rows of a 4096-wide f32 table: 64 MiB)
EMBED_CACHE_ROWS = 4096


class GraphEngine:
    """The graph engines' common part (answers ``protocol.Engine``): loads the manifest's geometry and the config,
    builds ``inputs_embeds`` and positions in ``start``, and runs the LM one step at a time against
    ``self.kv`` (``GraphKVCache``, preallocated for the prompt plus ``max_new_tokens``). Subclasses load and run
    the graphs (``_load_graphs``, ``_run``, ``_run_lm``)."""

    backend = "graph"  # each subclass names its runtime library

    def __init__(self, path: str | Path, spec: KVSpec, device: str, manifest):
        from kvtool.runtime.hfconfig import read_config

        self.path = Path(path)
        self.spec = spec
        self.device = device
        self.manifest = manifest
        self.config = read_config(self.path, manifest.architecture)  # JSON, no transformers/torch import
        lm = manifest.lm
        self.num_layers, self.num_kv_heads, self.head_dim = lm.num_layers, lm.num_kv_heads, lm.head_dim
        self.arch = manifest.architecture
        self.image_token_id = getattr(self.config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(self.config, "image_token_index", None)
        self.kv_dtype = np.float32
        self.token_major = False  # set by _load_graphs when it edits the LM to take the past as [N, H, D]
        self._embed_rows: dict[int, np.ndarray] = {}  # token id -> its text-embeddings row (run_token)
        self._load_graphs()
        self.kv = GraphKVCache(spec, self.num_layers, self.num_kv_heads, self.head_dim, dtype=self.kv_dtype,
                               token_major=self.token_major, head_major=getattr(self, "head_major", False))

    # -- subclass hooks ------------------------------------------------------------------------------
    def _load_graphs(self) -> None:
        raise NotImplementedError

    def _stateless_past_names(self, why: str) -> list[tuple[str, str]]:
        """The LM graph's ``past_key_values.{i}.key|value`` input names, per layer; an export without them (a
        stateful one) is refused with ``why`` appended to the message."""
        inputs = self.manifest.graphs["language_model"].inputs
        names = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(self.num_layers)]
        missing = [n for pair in names for n in pair if n not in inputs]
        if missing:
            raise InputError(f"{self.path}: the language model has no input {missing[0]} ({why})")
        return names

    def _run(self, role: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run graph ``role`` (manifest role name) on named inputs; outputs in the manifest's order."""
        raise NotImplementedError

    def _run_lm(self, embeds, mask, pos) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """One LM call with the past from ``self.kv``: (logits of the last position [V], new (K, V) per layer)."""
        raise NotImplementedError

    # -- the engine interface ------------------------------------------------------------------------
    def start(self, prepared, max_new_tokens: int = 64) -> None:
        """``Engine.start``: reset the cache for ``prepared.n_tokens + max_new_tokens`` tokens, build the prompt's
        ``inputs_embeds`` [1, T, hidden] (image features written at the image tokens) and its positions
        ([1, T], or Qwen2-VL's M-RoPE [3, 1, T]). ``InputError`` when image tokens and features disagree."""
        self.kv.reset(capacity=prepared.n_tokens + max_new_tokens)
        ids = prepared.input_ids
        embeds = self._text_embeddings(ids)
        if "pixel_values" in prepared.vision:  # (a text-only prompt may still carry mm_token_type_ids)
            feats = self._image_features(prepared)
            mask = ids[0] == self.image_token_id
            if int(mask.sum()) != feats.shape[0]:
                raise InputError(f"image: the prompt holds {int(mask.sum())} image tokens but the vision graph gave "
                                 f"{feats.shape[0]} features")
            if not (embeds.flags.writeable and embeds.flags.owndata):  # (the engines' _run returns a fresh copy)
                embeds = embeds.copy()
            embeds[0, mask] = feats.astype(embeds.dtype, copy=False)  # in place: no second [T, hidden] array
        self.embeds = np.ascontiguousarray(embeds)  # [1, T, hidden]
        if self.arch == "qwen2_vl":
            from kvtool.runtime.positions import mrope_positions

            v = prepared.vision
            self.positions, self.delta = mrope_positions(self.config, ids, v.get("mm_token_type_ids"),
                                                         v.get("image_grid_thw"))
        else:
            self.positions, self.delta = np.arange(ids.shape[1], dtype=np.int64)[None], 0

    def set_quantize(self, enabled: bool) -> None:
        """``Engine.set_quantize``: nothing to do, the graph engines' cache quantizes between calls only."""

    def run_prompt(self, start: int, end: int) -> np.ndarray:
        """``Engine.run_prompt``: prompt positions [start, end) through the LM; the last one's logits [V]."""
        pos = self.positions[..., start:end]
        return self._step(self.embeds[:, start:end], np.ascontiguousarray(pos))

    def _run_prompt_chunks(self, start: int, end: int, chunk: int) -> np.ndarray:
        """Prompt positions [start, end) through ``GraphEngine.run_prompt`` in calls of ``chunk`` tokens (0: one
        call), each attending to what the calls before it stored; the last position's logits [V]. The engines
        that prefill in chunks (stateful, paged, packed) share it; each decides when and how large."""
        step = chunk or (end - start)
        logits = None
        for s in range(start, end, step):
            logits = GraphEngine.run_prompt(self, s, min(s + step, end))
        return logits

    def _n_cached(self) -> int:
        return self.kv.n_tokens

    def run_token(self, token_id: int) -> np.ndarray:
        """``Engine.run_token``: one generated token at the next position (n cached, plus Qwen2-VL's rope
        delta); its logits [V]."""
        embeds = self._token_embedding(token_id)
        n = self._n_cached()
        if self.arch == "qwen2_vl":
            pos = np.full((3, 1, 1), n + self.delta, dtype=np.int64)
        else:
            pos = np.array([[n]], dtype=np.int64)
        return self._step(embeds, pos)

    def kv_nbytes(self) -> tuple[int, int]:
        """``Engine.kv_nbytes``: (bytes ``self.kv`` holds, the same tokens' bytes in fp16)."""
        return self.kv.nbytes, self.kv.fp16_nbytes

    def kv_work_nbytes(self) -> int:
        """``Engine.kv_work_nbytes``: for a quantizing scheme, kvtool's graph-input buffers
        (``GraphKVCache.work_nbytes``: all layers, K and V, at their allocated capacity, in the graph's KV
        dtype) — packed mode's dequantized working copy, or simulate mode's dense re-quantized cache itself (the
        memory a simulate run really holds; ``kv_bytes`` is then what packed storage would hold); 0 for fp16,
        whose buffers are the cache (``kv_bytes``)."""
        return int(self.kv.work_nbytes) if self.spec.quantizes else 0

    def kv_work_what(self) -> str | None:
        """What ``kv_work_nbytes`` counts on this engine for this load, one sentence (``kvtool run --json``:
        ``pipeline.engine.kv_work``); None where a subclass counts otherwise and does not say."""
        if type(self).kv_work_nbytes is not GraphEngine.kv_work_nbytes:
            return None
        if not self.spec.quantizes:
            return "0: fp16's buffers are the cache itself, counted in kv_bytes"
        return kv_buffers_what(self.spec.mode)

    def kv_dtype_name(self) -> str:
        """The element type kvtool holds the KV cache's unquantized values in (numpy name)."""
        return np.dtype(self.kv_dtype).name

    def info(self) -> dict:
        """``Engine.info``: the KV element type; subclasses add their compile settings."""
        return {"kv_dtype": self.kv_dtype_name()}

    # -- internals -----------------------------------------------------------------------------------
    def _step(self, embeds: np.ndarray, pos: np.ndarray) -> np.ndarray:
        t = embeds.shape[1]
        mask = np.ones((1, self.kv.n_tokens + t), dtype=np.int64)
        logits, new_kv = self._run_lm(embeds, mask, pos)
        for i, (k, v) in enumerate(new_kv):
            self.kv.append(i, k, v)
        self.kv.advance(t)
        return logits

    def _token_embedding(self, token_id: int) -> np.ndarray:
        """[1, 1, hidden] ``inputs_embeds`` of one generated token: the text-embeddings graph's output for
        ``[[token_id]]``, run once per distinct id and then kept (up to ``EMBED_CACHE_ROWS`` ids). The graph is a
        row lookup (Gather, plus the weight's decompression for a compressed table), so a kept row is the
        graph's own output bit for bit; a decode step then makes no second graph call (docs/BENCHMARKS.md,
        the decode-overhead subsection). The returned array is shared: callers must not write to it."""
        row = self._embed_rows.get(token_id)
        if row is None:
            row = np.ascontiguousarray(self._text_embeddings(np.array([[token_id]], dtype=np.int64)))
            if len(self._embed_rows) < EMBED_CACHE_ROWS:
                self._embed_rows[token_id] = row
        return row

    def _text_embeddings(self, ids: np.ndarray) -> np.ndarray:
        g = self.manifest.graphs["text_embeddings"]
        return self._run("text_embeddings", {g.inputs[0]: ids})[0]

    def _image_features(self, prepared) -> np.ndarray:
        """[n_image_tokens, hidden] in prompt order."""
        v = prepared.vision
        if self.arch == "llava":
            feats = self._vision(v["pixel_values"])
            return feats.reshape(-1, feats.shape[-1])
        if self.arch == "llava_next":
            return self._llava_next_features(v["pixel_values"], v["image_sizes"])
        if self.arch == "qwen2_vl":
            return self._qwen2_vl_features(v["pixel_values"], v["image_grid_thw"])
        raise InputError(f"architecture {self.arch!r} is not supported by the graph engines")

    def _vision(self, pixel_values: np.ndarray) -> np.ndarray:
        g = self.manifest.graphs["vision_embeddings"]
        return self._run("vision_embeddings", {g.inputs[0]: pixel_values.astype(np.float32)})[0]

    def _llava_next_features(self, pixel_values: np.ndarray, image_sizes: np.ndarray) -> np.ndarray:
        from kvtool.runtime.vision_layout import anyres_num_patches, pack_llava_next_features

        cfg = self.config
        tile = cfg.vision_config.image_size
        n_patches = [anyres_num_patches(s, cfg.image_grid_pinpoints, tile) for s in np.asarray(image_sizes)]
        # pixel_values: [n_images, max_patches, 3, H, W] -> the real patches of each image, stacked
        flat = np.concatenate([pv[:n] for pv, n in zip(pixel_values, n_patches, strict=True)], axis=0)
        feats = np.split(self._vision(flat), np.cumsum(n_patches)[:-1], axis=0)
        return pack_llava_next_features(feats, image_sizes, cfg.image_grid_pinpoints, tile,
                                        cfg.vision_config.patch_size, self._image_newline())

    def _image_newline(self) -> np.ndarray:
        """LLaVA-NeXT's learned newline embedding: ``config.image_newline`` (the OpenVINO exporter writes it),
        else the source checkpoint's weight named in the manifest, if that is still on disk."""
        if getattr(self.config, "image_newline", None) is not None:
            return np.asarray(self.config.image_newline, dtype=np.float32)
        src = Path(str(self.manifest.source.get("model", "")))
        if src.is_dir():
            from safetensors import safe_open

            for f in sorted(src.glob("*.safetensors")):
                with safe_open(str(f), "np") as st:
                    key = next((k for k in st.keys() if k.endswith("image_newline")), None)
                    if key:
                        return st.get_tensor(key).astype(np.float32)
        raise InputError(f"{self.path}: no image_newline in config.json and the source checkpoint is not available "
                         f"(LLaVA-NeXT exports must record it)")

    def _qwen2_vl_features(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
        from kvtool.runtime.vision_layout import qwen2_vl_vision_rotary

        vc = self.config.vision_config
        hidden = self._vision(pixel_values)
        grid = np.asarray(grid_thw, dtype=np.int64)
        rot = qwen2_vl_vision_rotary(grid, vc.embed_dim // vc.num_heads, vc.spatial_merge_size)
        # block-diagonal attention: patches attend within their own image (frame)
        n = hidden.shape[0]
        cu = np.concatenate([[0], np.cumsum(np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]))])
        mask = np.full((1, n, n), -np.inf, dtype=np.float32)
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            mask[0, a:b, a:b] = 0.0
        g = self.manifest.graphs["vision_embeddings_merger"]
        by_name = {"hidden_states": hidden, "attention_mask": mask, "rotary_pos_emb": rot.astype(np.float32)}
        inputs = {name: by_name[name] if name in by_name else None for name in g.inputs}
        if any(v is None for v in inputs.values()):
            raise InputError(f"{self.path}: merger graph inputs {g.inputs} are not the expected "
                             f"{sorted(by_name)}")
        return self._run("vision_embeddings_merger", inputs)[0]


def kv_buffers_what(mode: str) -> str:
    """The sentence for kvtool's graph-input buffers (``GraphKVCache.work_nbytes``) in ``mode``."""
    if mode == "simulate":
        return ("kvtool's graph-input buffers (all layers, K and V, at their allocated token capacity, in the "
                "graph's KV dtype), which hold simulate mode's dense re-quantized cache itself: the KV memory the "
                "run really holds (kv_bytes is what packed storage would hold)")
    return ("kvtool's graph-input buffers (all layers, K and V, at their allocated token capacity, in the graph's "
            "KV dtype) the packed codes are dequantized into before each step")

