"""The KV cache the runtime holds outside the graph, for the graph engines and for the torch engine.

``GraphKVCache`` (numpy, graph engines): per layer, the past K/V handed to the language-model graph and the
new K/V taken from it. ``fp16`` keeps them in preallocated buffers of the graph's KV element type; ``packed``
keeps a ``quant_ops.QuantizedKVStore`` per layer (each group quantized once, dequantized for the next step);
``simulate`` keeps the dequantized cache and re-quantizes all of it (statistics over the current cache) before
every step, as the study's code does.

``QuantKVCache`` (torch engine): a transformers ``Cache`` whose layers do the same inside the HF model's
attention: ``packed`` returns the dequantized past plus the exact new tokens and stores the new tokens
compressed; ``simulate`` appends and then replaces every cached token but the newest by its
quantize-dequantize, in every forward pass, the prefill included.

The quantizers themselves live in ``kvtool.quant_ops``; this module only decides what is quantized when.
It does not run graphs or models.
"""

from __future__ import annotations

import numpy as np

from kvtool.runtime.kvspec import KVSpec


class GraphKVCache:
    """Per-layer KV for a stateless LM graph. Tensors are [B, H, N, D]; ``past(i)`` is contiguous."""

    def __init__(self, spec: KVSpec, num_layers: int, num_kv_heads: int, head_dim: int, dtype=np.float32,
                 capacity: int = 256):
        self.spec = spec
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype = np.dtype(dtype)
        self._capacity = capacity
        self.reset()

    def reset(self) -> None:
        self.n_tokens = 0
        if self.spec.mode == "packed" and self.spec.quantizes:
            from kvtool.quant_ops import QuantizedKVStore

            self._stores = [QuantizedKVStore(self.spec.scheme, k_bits=self.spec.k_bits, v_bits=self.spec.v_bits,
                                             mode="packed") for _ in range(self.num_layers)]
        else:
            self._stores = None
        # fp16 / simulate: one contiguous [2, B, H, cap, D] buffer per layer would make past views strided;
        # instead K and V each live in their own buffer of layout [cap, ...] and are re-laid when handed out
        self._k: list[np.ndarray] = []
        self._v: list[np.ndarray] = []

    # -- what the graph sees -------------------------------------------------------------------------
    def past(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Past K, V of layer ``i`` as the graph takes them: [1, H, N, D] in the graph's KV dtype."""
        if self.n_tokens == 0:
            empty = np.zeros((1, self.num_kv_heads, 0, self.head_dim), self.dtype)
            return empty, empty
        if self._stores is not None:
            k, v = self._stores[i].dequantize()
            return (np.ascontiguousarray(k, dtype=self.dtype), np.ascontiguousarray(v, dtype=self.dtype))
        k, v = self._k[i], self._v[i]
        if self.spec.mode == "simulate" and self.spec.quantizes:
            from kvtool.quant_ops import fake_quant_kv

            # the study re-quantizes the whole cache before it is attended to (error accumulates)
            k, v = fake_quant_kv(k, v, self.spec.scheme, k_bits=self.spec.k_bits, v_bits=self.spec.v_bits)
            self._k[i], self._v[i] = k.astype(self.dtype, copy=False), v.astype(self.dtype, copy=False)
        return self._k[i], self._v[i]

    def append(self, i: int, k_new: np.ndarray, v_new: np.ndarray) -> None:
        """Store the new tokens' K, V ([1, H, t, D]) of layer ``i``; call for every layer, then ``advance``."""
        if self._stores is not None:
            self._stores[i].append(k_new, v_new)
            return
        if len(self._k) <= i:
            self._k.append(np.ascontiguousarray(k_new, dtype=self.dtype))
            self._v.append(np.ascontiguousarray(v_new, dtype=self.dtype))
        else:
            self._k[i] = np.concatenate([self._k[i], k_new.astype(self.dtype, copy=False)], axis=2)
            self._v[i] = np.concatenate([self._v[i], v_new.astype(self.dtype, copy=False)], axis=2)

    def advance(self, t: int) -> None:
        self.n_tokens += t

    # -- accounting ----------------------------------------------------------------------------------
    @property
    def fp16_nbytes(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.n_tokens * 2

    @property
    def nbytes(self) -> int:
        if self._stores is not None:
            return int(sum(s.nbytes for s in self._stores))
        if self.spec.quantizes:  # simulate: what packed storage would hold for the same tokens
            return simulated_nbytes(self.spec, self.num_layers, self.num_kv_heads, self.head_dim, self.n_tokens)
        return self.fp16_nbytes


def simulated_nbytes(spec: KVSpec, num_layers: int, num_kv_heads: int, head_dim: int, n_tokens: int) -> int:
    """Bytes a packed store would hold for ``n_tokens`` (measured on a store fed zeros, so the accounting is
    quant_ops' own)."""
    if n_tokens == 0:
        return 0
    from kvtool.quant_ops import QuantizedKVStore

    store = QuantizedKVStore(spec.scheme, k_bits=spec.k_bits, v_bits=spec.v_bits, mode="packed")
    z = np.random.default_rng(0).standard_normal((1, num_kv_heads, n_tokens, head_dim)).astype(np.float32)
    store.append(z, z)
    return int(store.nbytes) * num_layers


# ----------------------------------------------------------------------------------------------------------
# torch: a transformers Cache backed by quant_ops
# ----------------------------------------------------------------------------------------------------------


def make_quant_cache(spec: KVSpec, num_layers: int):
    """A transformers ``Cache`` applying ``spec`` (``DynamicCache`` for fp16)."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    if not spec.quantizes:
        return DynamicCache()

    class PackedLayer(DynamicLayer):
        """Stores new K/V compressed; attention sees the dequantized past plus the exact new tokens."""

        def __init__(self):
            super().__init__()
            from kvtool.quant_ops import QuantizedKVStore

            self.store = QuantizedKVStore(spec.scheme, k_bits=spec.k_bits, v_bits=spec.v_bits, mode="packed")

        def update(self, key_states, value_states, *args, **kwargs):
            import torch

            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            # key_states: [B, H, t, D]
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

    class SimulateLayer(DynamicLayer):
        """The study's semantics: after appending, every cached token but the newest is re-quantized."""

        enabled = True

        def update(self, key_states, value_states, *args, **kwargs):
            import torch

            from kvtool.quant_ops import fake_quant_kv

            keys, values = super().update(key_states, value_states)
            if self.enabled and keys.shape[-2] > 1:
                kq, vq = fake_quant_kv(keys[..., :-1, :], values[..., :-1, :], spec.scheme,
                                       k_bits=spec.k_bits, v_bits=spec.v_bits)
                self.keys = torch.cat([kq.to(keys.dtype), keys[..., -1:, :]], dim=-2)
                self.values = torch.cat([vq.to(values.dtype), values[..., -1:, :]], dim=-2)
            return self.keys, self.values

    layer_cls = PackedLayer if spec.mode == "packed" else SimulateLayer

    class QuantKVCache(Cache):
        def __init__(self):
            super().__init__(layers=[layer_cls() for _ in range(num_layers)])

        def set_quantize(self, enabled: bool) -> None:
            """Simulate mode only: ``False`` lets a prefill run at full precision (``first_token="fp"``)."""
            for layer in self.layers:
                layer.enabled = enabled

    return QuantKVCache()


def torch_cache_nbytes(cache, spec: KVSpec, num_layers: int, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(kv_bytes, kv_fp16_bytes) of a torch-engine cache."""
    n = int(cache.get_seq_length())
    fp16 = 2 * num_layers * num_kv_heads * head_dim * n * 2
    if not spec.quantizes:
        return fp16, fp16
    if spec.mode == "packed":
        return int(sum(layer.store.nbytes for layer in cache.layers)), fp16
    return simulated_nbytes(spec, num_layers, num_kv_heads, head_dim, n), fp16
