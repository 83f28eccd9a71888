"""The torch engine's KV cache: a transformers ``Cache`` whose layers delegate to ``quant_ops.QuantizedKVStore``.

One layer class, one ``update`` (gpt-fast's shape): each layer holds one store, in the spec's mode, and
``update(k_new, v_new)`` returns the K/V the HF model's attention reads in this forward pass:

- ``packed``: the store's dequantized past plus the exact new tokens; the new tokens are then stored
  compressed (each group quantized once);
- ``simulate`` (the study's code): the store appends the new tokens and re-quantizes every held token but the
  newest (``keep_newest=1``), in every forward pass, the prefill included; ``QuantKVCache.set_quantize(False)``
  lets a prefill run at full precision (``first_token="fp"``).

This module imports transformers at the top (its classes subclass transformers' ``Cache`` / ``DynamicLayer``),
so only ``kv_cache.make_quant_cache`` imports it, inside the function, when the torch engine starts a prompt.
The quantizers and both modes are quant_ops'; this module only adapts the store to transformers' cache API.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvtool.quant_ops import QuantizedKVStore
from kvtool.runtime.kvspec import KVSpec


class StoreLayer(DynamicLayer):
    """One decoder layer's cache: a ``QuantizedKVStore`` (``store``) in ``spec.mode``."""

    def __init__(self, spec: KVSpec):
        super().__init__()
        self.spec = spec
        self.quantize = True  # simulate mode: False appends a prefill without re-quantizing
        self.store = QuantizedKVStore(spec.quant, k_bits=spec.k_bits, v_bits=spec.v_bits, mode=spec.mode,
                                      residual=spec.residual, keep_newest=1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Add the new tokens (``[B, H, t, D]``) and return ``(k, v)`` ``[B, H, N, D]`` for this pass's
        attention, in the new tokens' dtype (see the module docstring)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.spec.mode == "simulate":
            self.store.append(key_states, value_states, requantize=self.quantize)
            k, v = self.store.dequantize()
            return k.to(key_states.dtype), v.to(value_states.dtype)
        if self.store.n_tokens:
            pk, pv = self.store.dequantize()
            k = torch.cat([pk.to(key_states.dtype), key_states], dim=-2)
            v = torch.cat([pv.to(value_states.dtype), value_states], dim=-2)
        else:
            k, v = key_states, value_states
        self.store.append(key_states, value_states)
        return k, v

    def get_seq_length(self) -> int:
        return int(self.store.n_tokens)


class QuantKVCache(Cache):
    """``num_layers`` ``StoreLayer`` s applying ``spec`` (a quantizing scheme)."""

    def __init__(self, spec: KVSpec, num_layers: int):
        super().__init__(layers=[StoreLayer(spec) for _ in range(num_layers)])

    def set_quantize(self, enabled: bool) -> None:
        """Simulate mode only: ``False`` lets a prefill run at full precision (``first_token="fp"``); packed
        layers quantize each group once whatever this says."""
        for layer in self.layers:
            layer.quantize = enabled


def make_quant_cache(spec: KVSpec, num_layers: int):
    """A transformers ``Cache`` applying ``spec``: ``QuantKVCache`` for a quantizing scheme, ``DynamicCache``
    otherwise."""
    if not spec.quantizes:
        return DynamicCache()
    return QuantKVCache(spec, num_layers)
