"""Reports behind ``kvtool ls schemes`` and ``kvtool kv-roundtrip`` (plain data; the CLI only prints them).

``scheme_table`` lists every scheme with its meaning and storage cost; ``roundtrip`` quantizes a random
KV block with outlier channels (as trained LLMs' keys have) through a packed ``QuantizedKVStore`` and reports
the error and the bytes held per scheme. Nothing here is used by the runtime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from kvtool.errors import InputError
from kvtool.quant_ops.schemes import OV_SCHEMES, SCHEMES, check_bits, parse_scheme


def scheme_table(k_bits: int = 4, v_bits: int | None = None, n_tokens: int = 4096,
                 d_model: int = 4096) -> list[dict]:
    """One row per scheme (study schemes, then OpenVINO-internal ones): name, meaning, bits per value."""
    v_bits = k_bits if v_bits is None else v_bits
    check_bits(k_bits, "k_bits")
    check_bits(v_bits, "v_bits")
    if n_tokens < 1 or d_model < 1:
        raise InputError(f"tokens={n_tokens}, d_model={d_model}: expected positive sizes")
    rows = []
    for name, meaning in {**SCHEMES, **OV_SCHEMES}.items():
        spec = parse_scheme(name)
        kb, vb = {"fp16": (16, 16), "ov": (spec.ov_bits, spec.ov_bits)}.get(spec.kind, (k_bits, v_bits))
        rows.append({"scheme": name, "meaning": meaning, "k_bits": kb, "v_bits": vb,
                     "bits_per_value": round(spec.bits_per_value(kb, vb, n_tokens, d_model), 4),
                     "runs_in": "openvino-graph" if spec.kind == "ov" else "quant_ops"})
    return rows


def outlier_kv(batch: int = 1, heads: int = 8, tokens: int = 512, head_dim: int = 128, seed: int = 0,
               outlier_channels: int = 4, scale: float = 20.0, dtype=np.float16) -> tuple:
    """Random K, V ``[B, H, N, D]``: standard normal, K with a few channels scaled by ``scale`` (the
    per-channel outliers of trained keys) and shifted by per-channel offsets."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((batch, heads, tokens, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, heads, tokens, head_dim)).astype(np.float32)
    k += rng.standard_normal((1, heads, 1, head_dim)).astype(np.float32) * 2.0
    for h in range(heads):
        ch = rng.choice(head_dim, size=min(outlier_channels, head_dim), replace=False)
        k[:, h, :, ch] *= scale
    return k.astype(dtype), v.astype(dtype)


@dataclass
class RoundtripRow:
    scheme: str
    k_bits: int
    v_bits: int
    k_rel_err: float
    v_rel_err: float
    k_max_err: float
    v_max_err: float
    nbytes: int
    fp16_nbytes: int
    held_vs_fp16: float
    bits_per_value: float
    kernel: str  # "native" (the C++ kernels) or "portable" (numpy/torch), see quant_ops.native.info()


def roundtrip(schemes: list[str] | None = None, bits: list[int] | None = None, k_bits: int | None = None,
              v_bits: int | None = None, tokens: int = 512, heads: int = 8, head_dim: int = 128,
              seed: int = 0, progress: bool = False) -> list[dict]:
    """Quantize one random outlier-channel K/V block (fp16) per scheme and bit setting through a packed
    store; report relative L2 error, max abs error and bytes held vs fp16.

    Bit settings: ``k_bits``/``v_bits`` if either is given (the other defaults to the same), else each of
    ``bits`` (default 4 and 2) for both K and V. Default schemes: every study scheme."""
    from tqdm import tqdm

    from kvtool.quant_ops.fake import check_args
    from kvtool.quant_ops.store import QuantizedKVStore

    names = [str(parse_scheme(s)) for s in (schemes or list(SCHEMES))]
    if k_bits is not None or v_bits is not None:
        kb = k_bits if k_bits is not None else v_bits
        settings = [(check_bits(kb, "k_bits"), check_bits(v_bits if v_bits is not None else kb, "v_bits"))]
    else:
        settings = [(check_bits(b), b) for b in (bits or [4, 2])]
    if tokens < 1:
        raise InputError(f"tokens={tokens}: expected at least 1")
    k, v = outlier_kv(1, heads, tokens, head_dim, seed)
    k32, v32 = k.astype(np.float64), v.astype(np.float64)
    rows = []
    # fp16 ignores bits: one row for it
    jobs = [(n, s) for i, s in enumerate(settings) for n in names if not (n == "fp16" and i > 0)]
    for name, (kb, vb) in jobs:  # every bad input is reported before any work starts
        check_args(k, v, name, kb, vb)
        QuantizedKVStore(name, k_bits=kb, v_bits=vb).append(k[:, :, :1], v[:, :, :1])
    for name, (kb, vb) in tqdm(jobs, desc="kv-roundtrip", disable=not progress):
        if name == "fp16":
            kb = vb = 16
        store = QuantizedKVStore(name, k_bits=kb, v_bits=vb, mode="packed")
        store.append(k, v)
        kh, vh = store.dequantize()
        kh, vh = kh.astype(np.float64), vh.astype(np.float64)
        rows.append(asdict(RoundtripRow(
            scheme=name, k_bits=kb, v_bits=vb,
            k_rel_err=float(np.linalg.norm(kh - k32) / np.linalg.norm(k32)),
            v_rel_err=float(np.linalg.norm(vh - v32) / np.linalg.norm(v32)),
            k_max_err=float(np.abs(kh - k32).max()), v_max_err=float(np.abs(vh - v32).max()),
            nbytes=store.nbytes, fp16_nbytes=store.fp16_nbytes,
            held_vs_fp16=store.nbytes / store.fp16_nbytes, bits_per_value=store.bits_per_value,
            kernel=store.kernel_info()["path"])))
    return rows
