"""The OpenVINO paged engine: the stateful LM export turned into OpenVINO's PagedAttention form
(``paged_attention_transformation``, private API: called through ``ov_private.paged_attention``), whose K/V cache blocks are *caller-owned* tensors that the fused
attention op reads and appends to in place. kvtool allocates those blocks, reads each step's new K/V out of
them into its own cache (``GraphKVCache``: packed ``QuantizedKVStore`` per layer, or an fp mirror), and
writes back in place only the tokens whose stored value changed (tokens that became quantized), so a step
costs O(changed tokens) on kvtool's side instead of a rewrite of the whole cache.

Semantics are DESIGN.md's, as in the other graph engines: the graph attends to the dequantized past plus
the exact new tokens. Batch 1, one sequence; block tables are the identity (block j holds tokens
``j*B .. j*B+B-1``). For ``kv="fp16"`` the blocks *are* the cache: kvtool keeps no mirror of them
(``_BlockTokens`` only counts tokens), and the prompt goes through the graph in chunks of ``prefill_chunk``
tokens (each chunk's PagedAttention reads the blocks written before it, as openvino.genai's scheduler does), so
peak memory holds one chunk's activations. bf16 caches (CPU's default inference precision) are held as raw
uint16 bits and converted here (round to nearest even); kvtool's own cache then holds f16, as with the
stateless graphs. Qwen2-VL's M-RoPE positions ``[3, 1, t]`` go in as the ``[3, t]`` input the PagedAttention
pass gives that graph. It does not run OpenVINO's own KV compression.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvtool.errors import InputError
from kvtool.runtime.engines.graph_base import kv_buffers_what
from kvtool.runtime.engines.openvino_engine import _OpenVINOGraphs, check_prefill_chunk
from kvtool.runtime.engines.openvino_engine import bf16_bits_to_f32 as _bf16_to_f32
from kvtool.runtime.engines.openvino_engine import f32_to_bf16_bits as _f32_to_bf16
from kvtool.runtime.kvspec import KVSpec

# Prompt tokens per prefill call for kv="fp16" (0: one call). On the issue-13 model at 8k tokens
# (docs/BENCHMARKS.md, "fp16 on the paged engine"): one call holds the whole prompt's activations (peak 1,585
# MiB against openvino.genai f16's 884); chunks of 512 peaked at 761-767 MiB against genai's 851-899, with 256
# and 1024 at 848-851 MiB, all at 0.96-1.02x genai's prefill CPU seconds.
PREFILL_CHUNK = 512


class _BlockTokens:
    """fp16 on the paged engine: the caller-owned blocks hold the cache, this only counts its tokens and answers
    ``GraphKVCache``'s accounting (``nbytes``: the tokens in the blocks' element type, ``itemsize`` bytes each;
    no working copy)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int):
        self.num_layers, self.num_kv_heads, self.head_dim, self.itemsize = num_layers, num_kv_heads, head_dim, itemsize
        self.n_tokens = 0

    def reset(self, capacity: int = 0) -> None:
        """Forget every token (the blocks are sized by the engine)."""
        self.n_tokens = 0

    def advance(self, t: int) -> None:
        """``t`` more tokens were written into the blocks by the graph."""
        self.n_tokens += t

    def quantized_counts(self, i: int) -> tuple[int, int]:
        """(0, 0): nothing is quantized."""
        return 0, 0

    @property
    def fp16_nbytes(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.n_tokens * 2

    @property
    def nbytes(self) -> int:
        return self.fp16_nbytes // 2 * self.itemsize

    work_nbytes = 0


class OpenVINOPagedEngine(_OpenVINOGraphs):
    """PagedAttention LM with caller-owned cache blocks, KV contents owned by kvtool (see module doc)."""

    # One-token calls (decode) write their inputs into tensors bound to the infer request once (``_feed_bound``)
    # and call ``infer()`` without inputs, as openvino.genai's ModelRunner does, instead of ``infer(dict)``, which
    # re-binds all seven inputs (``set_tensor``) at every step. Same graph, same inputs: tokens and logits are
    # bit-identical. Measured on the long-context bench export (2,048 prompt tokens, 64 new, 2-core CPU shared
    # with other work), two engines in one process, steps alternated: per-step time bound/re-bound 0.970 wall
    # (rounds 0.952-1.002, 7 of 8 below 1) and 0.979 CPU (0.956-0.998, 8 of 8); loaded in the other order
    # re-bound/bound 1.037 wall (1.023-1.069, 10 of 10 above 1) and 1.036 CPU; ~0.5 ms of a ~16 ms step, where
    # the Python side of the seven calls is ~60 us. The LM graph alone (no pipeline) gave 0.96-0.97 in 3 runs.
    # Alternating whole generate calls instead (±15-50 % run to run here) could not resolve 3 %. False: the
    # ``infer(dict)`` path for every call (kept for A/B checks).
    bind_step_inputs = True

    def __init__(self, path: str | Path, spec: KVSpec, device: str = "CPU", manifest=None,
                 inference_precision: str | None = None, kv_precision: str | None = None,
                 prefill_chunk: int | None = None):
        """``kv_precision``: KV_CACHE_PRECISION (f32 or f16; the plugin may still pick its inference type).
        ``prefill_chunk``: prompt tokens per graph call for ``kv="fp16"`` (0: one call; default
        ``PREFILL_CHUNK``). kvtool's schemes prefill in one call, and asking them for chunks is an ``InputError``:
        a later chunk would attend to the earlier chunks' cache as kvtool quantized it (written back into the
        blocks; simulate mode re-quantizes all of it at every append), where DESIGN.md has the prompt minus its
        last token attend at full precision."""
        if kv_precision not in (None, "f16", "f32"):
            raise InputError(f"kv_precision: expected f16 or f32, got {kv_precision!r}")
        check_prefill_chunk(prefill_chunk)
        if prefill_chunk and spec.quantizes:
            raise InputError(f"prefill_chunk: kv={spec.scheme} prefills in one call on the paged engine (a chunk "
                             f"would attend to the earlier chunks' quantized cache); chunks are for kv=fp16")
        self.inference_precision = inference_precision
        self.kv_precision = kv_precision
        self.prefill_chunk = (PREFILL_CHUNK if prefill_chunk is None else prefill_chunk) if spec.is_fp else 0
        self.token_writes = 0  # token rows kvtool wrote back into the blocks (benchmarks report it)
        super().__init__(path, spec, device, manifest)
        if not spec.quantizes:  # fp16: the blocks are the cache, no mirror of them
            self.kv = _BlockTokens(self.num_layers, self.num_kv_heads, self.head_dim, np.dtype(self._np).itemsize)

    def _config(self) -> dict:
        cfg = self._base_config()
        cfg["KV_CACHE_PRECISION"] = self.kv_precision or (  # kv="fp16" is held in f16, as named
            "f32" if cfg.get("INFERENCE_PRECISION_HINT") == "f32" and not self.spec.is_fp else "f16")
        return cfg

    def _load_graphs(self) -> None:
        import openvino as ov

        from kvtool.runtime.engines.ov_private import paged_attention

        if self.spec.is_ov:
            raise InputError(f"kv: {self.spec.scheme} is OpenVINO's own compression; kvtool cannot own that cache")
        core = ov.Core()
        self._compile_aux_graphs(core)
        model = self._read_language_model(core, stateful_needed_by="the paged engine")
        paged_attention(model, self.num_layers)
        self.lm = self._compile(core, model, self._config(), "language_model (PagedAttention)")
        self.lm_req = self.lm.create_infer_request()
        self._cache_inputs = {}
        for port in self.lm.inputs:
            name = port.get_any_name()
            for side, prefix in ((0, "key_cache."), (1, "value_cache.")):
                if name.startswith(prefix):
                    self._cache_inputs[int(name[len(prefix):]), side] = port
        if len(self._cache_inputs) != 2 * self.num_layers:
            raise InputError(f"language model: {len(self._cache_inputs)} paged cache inputs for {self.num_layers} "
                             f"layers")
        port = self._cache_inputs[0, 0]
        shape = port.get_partial_shape()
        self.block = shape[2].get_length()
        if (shape[1].get_length(), shape[3].get_length()) != (self.num_kv_heads, self.head_dim):
            raise InputError(f"language model: paged cache shape {shape} does not match the manifest's "
                             f"{self.num_kv_heads} KV heads x {self.head_dim}")
        self.cache_type = port.get_element_type()
        self._bits = self.cache_type == ov.Type.bf16
        self._np = {ov.Type.f32: np.float32, ov.Type.f16: np.float16, ov.Type.bf16: np.uint16}.get(self.cache_type)
        if self._np is None:
            raise InputError(f"language model: paged cache element type {self.cache_type} is not f32/f16/bf16")
        # bf16 blocks: kvtool holds f16 (what the stateless engines hold; K/V beyond f16's range would overflow)
        self.kv_dtype = np.float16 if self._bits else self._np
        self.head_major = True
        self._blocks: dict = {}
        self._n_blocks = 0
        self._bound: dict | None = None  # _feed_bound's tensors, None when not bound to the request

    # -- cache blocks --------------------------------------------------------------------------------
    def _ensure_blocks(self, n_tokens: int) -> None:
        import openvino as ov

        need = -(-n_tokens // self.block)
        if need <= self._n_blocks:
            return
        nb = max(need, int(1.5 * self._n_blocks))
        for key, port in self._cache_inputs.items():
            shape = (nb, self.num_kv_heads, self.block, self.head_dim)
            new = np.zeros(shape, self._np)
            old = self._blocks.get(key)
            if old is not None:
                new[:old[0].shape[0]] = old[0]
            t = ov.Tensor(new, list(shape), self.cache_type) if self._bits else ov.Tensor(new, shared_memory=True)
            self.lm_req.set_tensor(port, t)
            self._blocks[key] = (new, t)
        self._n_blocks = nb

    def _read(self, key, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of one cache as ``[1, H, t, D]`` in ``kv_dtype``."""
        blocks = self._blocks[key][0]
        idx = np.arange(start, end)
        rows = blocks[idx // self.block, :, idx % self.block]  # [t, H, D]
        rows = _bf16_to_f32(rows) if self._bits else rows
        return rows.transpose(1, 0, 2)[None]

    def _write(self, key, start: int, values: np.ndarray) -> None:
        """Overwrite tokens [start, start + t) of one cache with ``values`` ``[1, H, t, D]``."""
        blocks = self._blocks[key][0]
        idx = np.arange(start, start + values.shape[2])
        rows = values[0].transpose(1, 0, 2)
        blocks[idx // self.block, :, idx % self.block] = _f32_to_bf16(rows) if self._bits else rows
        self.token_writes += values.shape[2]

    # -- the engine interface ------------------------------------------------------------------------
    def start(self, prepared, max_new_tokens: int = 64) -> None:
        """``Engine.start``: as ``GraphEngine``, then cache blocks for the prompt plus ``max_new_tokens``."""
        super().start(prepared, max_new_tokens)
        self._ensure_blocks(prepared.n_tokens + max_new_tokens)

    def run_prompt(self, start: int, end: int) -> np.ndarray:
        """``Engine.run_prompt``: prompt positions [start, end) through the graph in chunks of ``prefill_chunk``
        (0: one call), each attending to the blocks written before it; the last position's logits [V]."""
        return self._run_prompt_chunks(start, end, self.prefill_chunk)

    def _step(self, embeds: np.ndarray, pos: np.ndarray) -> np.ndarray:
        t = embeds.shape[1]
        n = self.kv.n_tokens
        self._ensure_blocks(n + t)
        nb = -(-(n + t) // self.block)
        positions = pos.reshape(3, -1) if pos.ndim == 3 else pos.reshape(-1)
        req = self.lm_req
        if t == 1 and self.bind_step_inputs:
            self._feed_bound(embeds[0], positions, n, nb)
            req.infer(share_outputs=True)
        else:
            self._bound = None  # the call below binds other tensors to these inputs
            feeds = {"inputs_embeds": embeds[0], "position_ids": np.ascontiguousarray(positions),
                     "past_lens": np.array([n], np.int32), "subsequence_begins": np.array([0, t], np.int32),
                     "block_indices": np.arange(nb, dtype=np.int32), "block_indices_begins": np.array([0, nb], np.int32),
                     "max_context_len": np.array(n + t, np.int32)}
            req.infer(feeds, share_inputs=True, share_outputs=True)
        out = req.get_tensor("logits").data
        logits = out.reshape(-1, out.shape[-1])[-1].copy()
        if not self.spec.quantizes:  # the graph appended the new tokens to the blocks, which are the cache
            self.kv.advance(t)
            return logits
        before = [self.kv.quantized_counts(i) for i in range(self.num_layers)]
        for i in range(self.num_layers):
            self.kv.append(i, self._read((i, 0), n, n + t), self._read((i, 1), n, n + t))
        self.kv.advance(t)
        self._write_back(before)
        return logits

    def _feed_bound(self, embeds: np.ndarray, positions: np.ndarray, n: int, nb: int) -> None:
        """One token's inputs (``bind_step_inputs``) written in place into tensors bound to the request once, as
        openvino.genai's ``ModelRunner`` does (src/cpp/src/continuous_batching/model_runner.hpp: its cached
        input tensors, then ``infer()``): a ``set_tensor`` per input and step costs the CPU plugin more inside
        ``infer`` than the ~60 us the calls take in Python (see ``bind_step_inputs``). The tensors are
        (re)bound after a multi-token call (which binds the prompt's arrays to the same inputs), when the
        positions' shape changes, and ``block_indices`` once per block (every ``block`` tokens). ``embeds``
        ``[1, hidden]``, ``positions`` ``[1]`` or Qwen2-VL's ``[3, 1]``, ``n`` tokens cached, ``nb`` blocks in
        use after this token."""
        import openvino as ov

        b = self._bound
        if b is None or b["position_ids"].shape != positions.shape:
            b = self._bind_inputs({"inputs_embeds": embeds.shape, "position_ids": positions.shape, "past_lens": (1,),
                                   "subsequence_begins": (2,), "block_indices_begins": (2,), "max_context_len": ()})
            b["subsequence_begins"][:] = (0, 1)
            b["block_indices_begins"][0] = 0
            b["nb"] = 0
            self._bound = b
        b["inputs_embeds"][...] = embeds
        b["position_ids"][...] = positions
        b["past_lens"][0] = n
        b["block_indices_begins"][1] = nb
        b["max_context_len"][...] = n + 1
        if b["nb"] != nb:
            self.lm_req.set_tensor("block_indices", ov.Tensor(np.arange(nb, dtype=np.int32)))
            b["nb"] = nb

    def _write_back(self, before: list[tuple[int, int]]) -> None:
        """Write into the blocks, in place, the tokens kvtool now holds differently from the exact append:
        those that became quantized since the last step (packed), or all of them (simulate)."""
        if not self.spec.quantizes:
            return
        n = self.kv.n_tokens
        for i in range(self.num_layers):
            after = self.kv.quantized_counts(i)
            starts = (0, 0) if self.spec.mode == "simulate" else before[i]
            ends = (n, n) if self.spec.mode == "simulate" else after
            if all(e <= s for s, e in zip(starts, ends, strict=True)):
                continue
            k, v = self.kv.dequantized(i)
            for side, arr in ((0, k), (1, v)):
                if ends[side] > starts[side]:
                    self._write((i, side), starts[side], arr[:, :, starts[side]:ends[side]])

    def kv_work_nbytes(self) -> int:
        """``Engine.kv_work_nbytes``: the caller-owned PagedAttention cache blocks (every allocated block, all
        layers, K and V, in the blocks' element type: the copy the attention reads) plus kvtool's graph-input
        buffers (``GraphEngine.kv_work_nbytes``: in simulate mode the dense re-quantized cache, in packed mode
        the dequantized copy written back into the blocks); 0 for ``kv="fp16"``, whose blocks are the cache
        itself (``kv_bytes`` counts their tokens)."""
        if not self.spec.quantizes:
            return 0
        blocks = sum(b[0].nbytes for b in self._blocks.values())
        return int(blocks + self.kv.work_nbytes)

    def kv_work_what(self) -> str:
        """``GraphEngine.kv_work_what`` for the paged engine."""
        blocks = ("OpenVINO PagedAttention's cache blocks, owned by kvtool (every allocated block of "
                  f"{self.block} tokens, all layers, K and V: the copy attention reads)")
        if not self.spec.quantizes:
            return "nothing: for fp16 the PagedAttention blocks are the cache itself, counted in kv_bytes"
        return f"{blocks} plus {kv_buffers_what(self.spec.mode)}"

    def info(self) -> dict:
        """``Engine.info``: compile config, kv_owner ``paged``, block element type and size, token rows written,
        the prefill chunk (0: one call), whether one-token calls use bound input tensors (``bind_step_inputs``)."""
        return {**super().info(), "config": self._config(), "stateful": True, "kv_owner": "paged",
                "cache_type": str(self.cache_type), "block_size": self.block, "token_writes": self.token_writes,
                "prefill_chunk": self.prefill_chunk, "bind_step_inputs": self.bind_step_inputs}
