"""The KV cache the runtime holds outside the graph, for the graph engines and for the torch engine.

``GraphKVCache`` (numpy, graph engines): per layer, the past K/V handed to the language-model graph and the
new K/V taken from it. ``fp16`` keeps them in preallocated buffers of the graph's KV element type; a quantizing
scheme keeps a ``quant_ops.QuantizedKVStore`` per layer in the spec's mode, which the cache delegates to:
``packed`` quantizes each group once and dequantizes into those buffers for the next step (only the tokens
that changed); ``simulate`` re-quantizes everything held (statistics over the current cache) at every append,
as the study's code does before every step, in the buffers themselves. ``spec.residual`` = R (KIVI's window)
leaves the newest tokens of the past exact in every mode (``quant_ops.fake.residual_window``): the graph then
attends to that window plus the exact new tokens, as KIVI's attention does.

The torch engine's cache (``make_quant_cache``; the classes are in ``torch_cache``, which imports
transformers) is a transformers ``Cache`` whose layers delegate to the same store inside the HF model's
attention. ``simulated_nbytes`` gives what packed stores would hold, for simulate mode's byte counts.

Both modes are quant_ops' (``QuantizedKVStore``); this module only decides where the buffers live and what
the graph sees. It does not run graphs or models.
"""

from __future__ import annotations

import numpy as np

from kvtool.runtime.kvspec import KVSpec


class GraphKVCache:
    """Per-layer KV for a stateless LM graph, batch 1.

    K and V of each layer live in caller-owned, preallocated buffers laid out token-major, ``[cap, H, D]``,
    so the first N tokens are one contiguous block: with ``token_major=True`` (graphs edited to take the past
    as ``[N, H, D]``) ``past(i)`` hands that block to the graph without a copy; otherwise it returns a
    contiguous ``[1, H, N, D]`` copy. The packed stores dequantize into the same buffers (through a
    ``[1, H, cap, D]`` view) and rewrite only the tokens that changed since the previous step.
    ``head_major=True`` lays the buffers out ``[1, H, cap, D]`` instead (the state-owned OpenVINO engine hands
    their first N tokens to OpenVINO's states as a strided region)."""

    def __init__(self, spec: KVSpec, num_layers: int, num_kv_heads: int, head_dim: int, dtype=np.float32,
                 token_major: bool = False, head_major: bool = False):
        self.spec = spec
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype = np.dtype(dtype)
        self.token_major = token_major
        self.head_major = head_major and not token_major
        self._cap = 0
        self.reset()

    def reset(self, capacity: int = 256) -> None:
        """Forget every token; preallocate room for ``capacity`` tokens (it grows when needed)."""
        self.n_tokens = 0
        if self.spec.quantizes:  # packed or simulate: quant_ops' store holds each layer
            from kvtool.quant_ops import QuantizedKVStore

            # keep_newest=0 (simulate): the graph attends to its new tokens itself and reads the store as the
            # next step's past, so an append re-quantizes every token held
            self._stores = [QuantizedKVStore(self.spec.quant, k_bits=self.spec.k_bits, v_bits=self.spec.v_bits,
                                             mode=self.spec.mode, residual=self.spec.residual, keep_newest=0)
                            for _ in range(self.num_layers)]
        else:
            self._stores = None
        if capacity > self._cap:
            self._alloc(capacity)

    def _alloc(self, cap: int) -> None:
        shape = (1, self.num_kv_heads, cap, self.head_dim) if self.head_major else (cap, self.num_kv_heads,
                                                                                   self.head_dim)
        old_k, old_v, n = getattr(self, "_k4", None), getattr(self, "_v4", None), self.n_tokens
        self._kbuf = [np.zeros(shape, self.dtype) for _ in range(self.num_layers)]
        self._vbuf = [np.zeros(shape, self.dtype) for _ in range(self.num_layers)]
        # [1, H, cap, D] views of the same memory, the layout the stores and fake_quant_kv work in
        if self.head_major:
            self._k4, self._v4 = list(self._kbuf), list(self._vbuf)
        else:
            self._k4 = [b.transpose(1, 0, 2)[None] for b in self._kbuf]
            self._v4 = [b.transpose(1, 0, 2)[None] for b in self._vbuf]
        if old_k is not None and n and self._stores is None:
            for i in range(self.num_layers):
                self._k4[i][:, :, :n], self._v4[i][:, :, :n] = old_k[i][:, :, :n], old_v[i][:, :, :n]
        self._cap = cap

    def reserve(self, n: int) -> None:
        """Make room for ``n`` tokens in all."""
        if n > self._cap:
            self._alloc(max(n, int(1.5 * self._cap)))

    # -- what the graph sees -------------------------------------------------------------------------
    def past(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Past K, V of layer ``i`` in the graph's KV dtype: ``[N, H, D]`` views (token-major graphs) or
        contiguous ``[1, H, N, D]`` arrays."""
        k, v = self.dequantized(i)
        if self.token_major:
            return self._kbuf[i][:self.n_tokens], self._vbuf[i][:self.n_tokens]
        return np.ascontiguousarray(k), np.ascontiguousarray(v)

    def dequantized(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``[1, H, N, D]`` views of layer ``i``'s cache as attention must see it, from its store: the packed
        dequantization (only tokens changed since the last call are rewritten) or, in simulate mode, the
        dense cache the store re-quantized at the last append (held in these buffers themselves)."""
        n = self.n_tokens
        if n and self._stores is not None:
            self._stores[i].dequantize(out=(self._k4[i], self._v4[i]))
        return self._k4[i][:, :, :n], self._v4[i][:, :, :n]

    def quantized_counts(self, i: int) -> tuple[int, int]:
        """Tokens of layer ``i``'s K and V held quantized (packed stores, ``QuantizedKVStore.quantized_counts``);
        (0, 0) otherwise. A count that grew across an ``append`` means tokens the graph last saw exact are now
        held as their quantization."""
        return (0, 0) if self._stores is None else self._stores[i].quantized_counts

    def append(self, i: int, k_new: np.ndarray, v_new: np.ndarray) -> None:
        """Store the new tokens' K, V (``[1, H, t, D]``) of layer ``i``; call for every layer, then ``advance``."""
        t = k_new.shape[2]
        if self._stores is not None:
            self._stores[i].append(k_new.astype(self.dtype, copy=False), v_new.astype(self.dtype, copy=False))
            return
        self.reserve(self.n_tokens + t)
        n = self.n_tokens
        self._k4[i][:, :, n:n + t] = k_new
        self._v4[i][:, :, n:n + t] = v_new

    def advance(self, t: int) -> None:
        self.n_tokens += t
        if self._stores is not None:
            self.reserve(self.n_tokens)

    # -- accounting ----------------------------------------------------------------------------------
    @property
    def fp16_nbytes(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.n_tokens * 2

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: the stores' codes (packed), or the fp16 size (fp16), or what packed storage
        would hold (simulate: ``simulated_nbytes``, as the torch engine's ``torch_cache_nbytes`` reports; the
        simulate store's own dense cache lives in the graph-input buffers, ``work_nbytes``). The packed stores'
        dequantized working copy is not counted (see ``work_nbytes``)."""
        if self.spec.quantizes and self.spec.mode == "simulate":
            return simulated_nbytes(self.spec, self.num_layers, self.num_kv_heads, self.head_dim, self.n_tokens)
        if self._stores is not None:
            return int(sum(s.nbytes for s in self._stores))
        return self.fp16_nbytes // 2 * self.dtype.itemsize  # unquantized: held in the graph's KV dtype

    @property
    def work_nbytes(self) -> int:
        """Bytes of the preallocated graph-input buffers, all layers, K and V, at their allocated capacity (tokens
        reserved for the prompt plus the new tokens, grown 1.5x when exceeded) in the graph's KV dtype: in packed
        mode the dequantized working copy of the codes; in simulate mode the store's dense, re-quantized cache
        itself (adopted by ``dequantize(out=...)``: the memory a simulate run really holds); for fp16 the cache
        itself."""
        return int(sum(b.nbytes for b in self._kbuf) + sum(b.nbytes for b in self._vbuf))


def simulated_nbytes(spec: KVSpec, num_layers: int, num_kv_heads: int, head_dim: int, n_tokens: int) -> int:
    """Bytes a packed store would hold for ``n_tokens`` of ``spec``: measured on one packed store fed
    ``n_tokens`` of standard normal noise (seed 0; ``[1, H, n, D]`` float32, the same array as K and V) and
    multiplied by ``num_layers``, so the accounting is quant_ops' own. Only or<s>'s outlier count depends on the
    values (ties at its thresholds), which noise does not produce."""
    if n_tokens == 0:
        return 0
    from kvtool.quant_ops import QuantizedKVStore

    store = QuantizedKVStore(spec.quant, k_bits=spec.k_bits, v_bits=spec.v_bits, mode="packed",
                             residual=spec.residual)
    z = np.random.default_rng(0).standard_normal((1, num_kv_heads, n_tokens, head_dim)).astype(np.float32)
    store.append(z, z)
    return int(store.nbytes) * num_layers


def make_quant_cache(spec: KVSpec, num_layers: int):
    """A transformers ``Cache`` applying ``spec`` for the torch engine (``DynamicCache`` for an unquantized
    scheme); see ``torch_cache``, where it lives (it imports transformers)."""
    from kvtool.runtime.torch_cache import make_quant_cache as make

    return make(spec, num_layers)


def torch_cache_nbytes(cache, spec: KVSpec, num_layers: int, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(kv_bytes, kv_fp16_bytes) of a torch-engine cache: the stores' bytes (packed), what packed stores
    would hold (simulate, ``simulated_nbytes``), or the tensors held (unquantized, in the model's dtype)."""
    n = int(cache.get_seq_length())
    fp16 = 2 * num_layers * num_kv_heads * head_dim * n * 2
    if not spec.quantizes:  # held in the model's dtype
        return sum(int(layer.keys.nbytes + layer.values.nbytes) for layer in cache.layers if layer.is_initialized), fp16
    if spec.mode == "packed":
        return int(sum(layer.store.nbytes for layer in cache.layers)), fp16
    return simulated_nbytes(spec, num_layers, num_kv_heads, head_dim, n), fp16
