"""kvtool.quant_ops — the KV-cache quantizers of LVLM-Compress-Bench, on numpy and torch (CPU/CUDA).

Public API (stable; other packages code against it)::

    from kvtool.quant_ops import parse_scheme, KVQuantSpec, fake_quant_kv, QuantizedKVStore, SCHEMES
    spec = parse_scheme("g-KC128VT128")                  # frozen; str(spec) canonical; to_dict / from_dict
    spec.k, spec.v                                       # PerChannel(tokens=128), PerToken(channels=128)
    k_hat, v_hat = fake_quant_kv(k, v, spec, k_bits=2, v_bits=2)   # [B, H, N, D] numpy or torch
    store = QuantizedKVStore(spec, k_bits=2, v_bits=2, mode="packed")  # or "simulate"
    store.append(k_new, v_new); k, v = store.dequantize()
    store.quantized_counts, store.side_layout("k")       # what callers read of the store

Parse a name once and pass the spec on: every function here takes a ``KVQuantSpec`` (a name is parsed again).

Modules: ``schemes`` (grammar, costs, the bits / modes / scheme-name constants), ``granularity``
(``PerTensor``, ``PerChannel``, ``PerToken`` and the one mapping to block sizes), ``affine`` (the one
quantize/dequantize primitive family), ``packing`` (2/3/4/8-bit packing in token tiles), ``kernels`` (the chunked torch fast path, bit-identical
to numpy), ``outliers`` (or<s> split), ``block`` (``QuantizedBlock`` container), ``fake`` (``fake_quant_kv``),
``store`` (``QuantizedKVStore``), ``demo`` (reports for the CLI). Nothing here knows about models, graphs or files.
"""

from kvtool.quant_ops.block import QuantizedBlock
from kvtool.quant_ops.fake import fake_quant_kv
from kvtool.quant_ops.granularity import Granularity, PerChannel, PerTensor, PerToken
from kvtool.quant_ops.schemes import (
    KV_MODES,
    OV_SCHEMES,
    QUANT_BITS,
    SCHEMES,
    VALID_BITS,
    KVQuantSpec,
    SchemeKind,
    parse_scheme,
)
from kvtool.quant_ops.store import QuantizedKVStore

__all__ = ["parse_scheme", "KVQuantSpec", "SchemeKind", "fake_quant_kv", "QuantizedKVStore", "QuantizedBlock",
           "SCHEMES", "OV_SCHEMES", "VALID_BITS", "QUANT_BITS", "KV_MODES", "Granularity", "PerTensor",
           "PerChannel", "PerToken"]
