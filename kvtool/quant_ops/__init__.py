"""kvtool.quant_ops — the KV-cache quantizers of LVLM-Compress-Bench, on numpy and torch (CPU/CUDA).

Public API (stable; other packages code against it)::

    from kvtool.quant_ops import parse_scheme, KVQuantSpec, fake_quant_kv, QuantizedKVStore, SCHEMES
    spec = parse_scheme("g-KC128VT128")                  # frozen; str(spec) canonical; to_dict / from_dict
    k_hat, v_hat = fake_quant_kv(k, v, spec, k_bits=2, v_bits=2)   # [B, H, N, D] numpy or torch
    store = QuantizedKVStore(spec, k_bits=2, v_bits=2, mode="packed")  # or "simulate"
    store.append(k_new, v_new); k, v = store.dequantize()

Modules: ``schemes`` (grammar, costs), ``affine`` (the one quantize/dequantize primitive family, block sizes),
``packing`` (2/3/4/8-bit packing in token tiles), ``kernels`` (the chunked torch fast path, bit-identical
to numpy), ``outliers`` (or<s> split), ``block`` (``QuantizedBlock`` container), ``fake`` (``fake_quant_kv``),
``store`` (``QuantizedKVStore``), ``demo`` (reports for the CLI). Nothing here knows about models, graphs or files.
"""

from kvtool.quant_ops.block import QuantizedBlock
from kvtool.quant_ops.fake import fake_quant_kv
from kvtool.quant_ops.schemes import OV_SCHEMES, SCHEMES, VALID_BITS, KVQuantSpec, parse_scheme
from kvtool.quant_ops.store import QuantizedKVStore

__all__ = ["parse_scheme", "KVQuantSpec", "fake_quant_kv", "QuantizedKVStore", "QuantizedBlock", "SCHEMES",
           "OV_SCHEMES", "VALID_BITS"]
