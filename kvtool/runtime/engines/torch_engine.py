"""The PyTorch reference engine: the HF checkpoint itself, with the KV quantization applied through a
transformers ``Cache`` (``kvtool.runtime.kv_cache.make_quant_cache``), on CPU or CUDA.

It feeds the HF model input ids and the processor's vision inputs, so image features, LLaVA-NeXT packing and
Qwen2-VL's 3-D rope positions are the model's own. It does not sample or decode text (the pipeline does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvtool.errors import InputError
from kvtool.runtime.kv_cache import make_quant_cache, torch_cache_nbytes
from kvtool.runtime.kvspec import KVSpec


class TorchEngine:
    """The HF checkpoint in transformers (answers ``protocol.Engine``), KV in ``make_quant_cache``'s ``Cache``."""

    backend = "torch"

    def __init__(self, path: str | Path, spec: KVSpec, device: str = "cpu", dtype: str | None = None):
        """``dtype``: ``fp32`` | ``fp16`` | ``bf16`` weights and activations (None: fp16 on CUDA, fp32 on CPU)."""
        import torch
        from transformers import AutoModelForImageTextToText

        if spec.is_ov:
            raise InputError(f"kv: {spec.scheme} is OpenVINO's own KV compression; use backend='openvino'")
        self.spec = spec
        self.device = device
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}[dtype]
        if torch_dtype is None:
            torch_dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.dtype = torch_dtype
        self.model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch_dtype).to(device).eval()
        tc = self.model.config.get_text_config(decoder=True)
        self.num_layers = tc.num_hidden_layers
        self.num_kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.cache = None
        self.mrope = self.model.config.model_type in ("qwen2_vl",)

    def start(self, prepared, max_new_tokens: int = 64) -> None:
        """``Engine.start``: a fresh quantizing ``Cache`` for ``spec`` and, for Qwen2-VL, the prompt's M-RoPE
        positions (``max_new_tokens`` is not needed: the cache grows)."""
        self.prepared = prepared
        self.cache = make_quant_cache(self.spec, self.num_layers)
        self.n = 0
        if self.mrope:
            from kvtool.runtime.positions import mrope_positions

            v = prepared.vision
            self.positions, self.delta = mrope_positions(self.model.config, prepared.input_ids,
                                                         v.get("mm_token_type_ids"), v.get("image_grid_thw"))

    def set_quantize(self, enabled: bool) -> None:
        """``Engine.set_quantize``: switch the simulate cache's in-call quantization (``first_token="fp"``)."""
        if hasattr(self.cache, "set_quantize"):
            self.cache.set_quantize(enabled)

    def _forward(self, ids: np.ndarray, extra: dict) -> np.ndarray:
        import torch

        t = ids.shape[1]
        if self.mrope:  # 3-D rope positions [3, 1, t]: the prompt's own, then n + delta
            if self.n + t <= self.positions.shape[-1]:
                pos = self.positions[:, :, self.n:self.n + t]
            else:
                pos = np.broadcast_to(np.arange(self.n, self.n + t) + self.delta, (3, 1, t))
            extra = {**extra, "position_ids": torch.from_numpy(np.ascontiguousarray(pos)).to(self.device)}
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(ids).to(self.device),
                attention_mask=torch.ones((1, self.n + t), dtype=torch.long, device=self.device),
                past_key_values=self.cache,
                cache_position=torch.arange(self.n, self.n + t, device=self.device),
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
        self.n += t
        # logits: [1, 1, V]
        return out.logits[0, -1].float().cpu().numpy()

    def run_prompt(self, start: int, end: int) -> np.ndarray:
        """``Engine.run_prompt``: prompt ids [start, end) through the HF model (vision inputs with the first
        call); the last position's logits [V] as float32."""
        import torch

        extra = {}
        if start == 0:
            for k, v in self.prepared.vision.items():
                tv = torch.from_numpy(np.ascontiguousarray(v)).to(self.device)
                extra[k] = tv.to(self.dtype) if tv.is_floating_point() else tv
        return self._forward(self.prepared.input_ids[:, start:end], extra)

    def run_token(self, token_id: int) -> np.ndarray:
        """``Engine.run_token``: one generated token; its logits [V] as float32."""
        return self._forward(np.array([[token_id]], dtype=np.int64), {})

    def kv_nbytes(self) -> tuple[int, int]:
        """``Engine.kv_nbytes``: (bytes the cache holds, fp16 bytes of the same tokens): ``torch_cache_nbytes``."""
        return torch_cache_nbytes(self.cache, self.spec, self.num_layers, self.num_kv_heads, self.head_dim)

    def kv_dtype_name(self) -> str:
        """The cache holds K/V in the model's dtype (float32 on CPU: the fp32 reference), whatever ``kv``."""
        return str(self.dtype).replace("torch.", "")

    def kv_work_nbytes(self) -> int:
        """``Engine.kv_work_nbytes``: in simulate mode the stores' dense, re-quantized cache (the model's dtype, at
        the stores' allocated capacity: the memory a simulate run really holds, where ``kv_bytes`` is what packed
        storage would hold); 0 otherwise (packed mode dequantizes per layer and frees it; unquantized K/V are
        ``kv_bytes`` themselves)."""
        if not (self.spec.quantizes and self.spec.mode == "simulate") or self.cache is None:
            return 0
        return int(sum(layer.store.capacity_nbytes for layer in getattr(self.cache, "layers", [])))

    def kv_work_what(self) -> str:
        """What ``kv_work_nbytes`` counts for this load, one sentence (``kvtool run --json``)."""
        if self.spec.quantizes and self.spec.mode == "simulate":
            return ("the stores' dense re-quantized cache (all layers, K and V, at the stores' allocated capacity, "
                    "in the model's dtype): the KV memory the run really holds (kv_bytes is what packed storage "
                    "would hold)")
        return "0: packed mode dequantizes per layer and frees it; unquantized K/V are counted in kv_bytes"

    def info(self) -> dict:
        """``Engine.info``: the model's dtype and the KV element type."""
        return {"dtype": str(self.dtype).replace("torch.", ""), "kv_dtype": self.kv_dtype_name()}
