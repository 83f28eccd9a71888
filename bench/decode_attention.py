"""Benchmark: one decode step's attention for one layer, fused over packed codes vs an f16 cache + plain SDPA.

For N in ``--tokens`` (default 2k, 8k, 16k) on a layer of ``--kv-heads`` x ``--head-dim`` with ``--heads``
query heads, B = 1, all timed in the same run, interleaved, medians of ``--repeats`` steps x ``--rounds`` interleaved
rounds at ``--threads`` threads each, in process CPU time (all threads; the machine is shared) and wall time:

- ``fused <scheme> <bits>``: ``quant_ops.attention.decode_attention(q, store)`` — the native kernel reading the
  store's packed codes + params + fp16 residual (the store holds N tokens appended as a prefill block);
- ``torch sdpa f16``: ``torch.nn.functional.scaled_dot_product_attention`` on the f16 cache (what an
  uncompressed runtime reads), ``torch sdpa f32`` on a float32 copy of it (no conversion in the step);
- ``numpy sdpa f16``: ``attention.sdpa_reference`` (einsum + softmax in float32) on the f16 cache;
- ``dequantize + torch sdpa``: today's packed path — ``store.dequantize(out=bufs)`` into f16 buffers (the
  full rewrite; incremental rewrites are O(1) per step but need a full-precision copy held), then SDPA;
- ``python call``: ``decode_attention`` on a 16-token store: the fixed cost of one per-layer Python call.

Bytes read per step: the f16 cache (2 bytes x 2 x N x H x D) vs the store's ``nbytes``.
Run:  python bench/decode_attention.py [--json out.json]   (``--markdown out.json`` re-prints a saved run)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from benchio import run_and_report


def _times_ms(fn, repeats: int) -> tuple[list[float], list[float]]:
    """(process CPU ms, wall ms) of ``repeats`` calls after one warm-up call. Process CPU time counts every
    thread of this process (the kernel's and torch's), so on a shared machine it is what a step costs;
    wall time also counts time spent descheduled (its minimum is the closest to a quiet machine)."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    return cpu, wall


def _cases(n: int, args, rng) -> tuple[dict, dict, int]:
    """The timed callables for N = n tokens, the bytes each fused case reads, and the f16 cache's bytes."""
    import numpy as np
    import torch

    from kvtool.quant_ops import QuantizedKVStore
    from kvtool.quant_ops.attention import attention_path, decode_attention, sdpa_reference

    h, hq, d = args.kv_heads, args.heads, args.head_dim
    k = rng.standard_normal((1, h, n, d), dtype=np.float32)
    k[:, :, :, rng.choice(d, 4, replace=False)] *= 20.0
    k = k.astype(np.float16)
    v = rng.standard_normal((1, h, n, d), dtype=np.float32).astype(np.float16)
    q = rng.standard_normal((1, hq, d), dtype=np.float32)
    kt, vt = torch.from_numpy(k), torch.from_numpy(v)
    kt32, vt32 = kt.float(), vt.float()
    qt = torch.from_numpy(q).view(1, hq, 1, d)
    qt16 = qt.half()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = hq != h
    cases = {
        "torch sdpa f16": lambda: sdpa(qt16, kt, vt, enable_gqa=gqa),
        "torch sdpa f32": lambda: sdpa(qt, kt32, vt32, enable_gqa=gqa),
        "numpy sdpa f16": lambda: sdpa_reference(q, k, v, 1 / d**0.5),
    }
    held = {}
    for i, (scheme, bits) in enumerate(args.configs):
        store = QuantizedKVStore(scheme, bits, bits)
        store.append(k, v)
        assert attention_path(store)[0] == "native", attention_path(store)
        name = f"fused {scheme} {bits}-bit"
        held[name] = store.nbytes
        cases[name] = (lambda s=store: decode_attention(q, s, threads=args.threads))
        if i == 0:
            st_t = QuantizedKVStore(scheme, bits, bits)
            st_t.append(kt, vt)
            kb, vb = torch.empty_like(kt), torch.empty_like(vt)

            def deq_sdpa(st=st_t, kb=kb, vb=vb):
                kk, vv = st.dequantize(out=(kb, vb), incremental=False)
                return sdpa(qt16, kk, vv, enable_gqa=gqa)

            cases[f"dequantize + torch sdpa ({scheme} {bits}-bit)"] = deq_sdpa
    return cases, held, 2 * k.nbytes


def run(args) -> dict:
    import numpy as np
    import torch
    from tqdm import tqdm

    from kvtool.quant_ops import QuantizedKVStore, native
    from kvtool.quant_ops.attention import decode_attention

    torch.set_num_threads(args.threads)
    h, hq, d = args.kv_heads, args.heads, args.head_dim
    rng = np.random.default_rng(0)
    rows = []
    for n in tqdm(args.tokens, desc="bench decode attention"):
        cases, held, f16_bytes = _cases(n, args, rng)
        cpu: dict[str, list] = {name: [] for name in cases}
        wall: dict[str, list] = {name: [] for name in cases}
        for _ in range(args.rounds):  # interleaved rounds, so every case sees the same machine load
            for name, fn in cases.items():
                c, w = _times_ms(fn, args.repeats)
                cpu[name] += c
                wall[name] += w
        base = statistics.median(cpu["torch sdpa f16"])
        base32 = statistics.median(cpu["torch sdpa f32"])
        for name in cases:
            ms = statistics.median(cpu[name])
            rows.append({"tokens": n, "case": name, "cpu_ms": ms, "wall_ms": statistics.median(wall[name]),
                         "wall_min_ms": min(wall[name]), "vs_torch_f16": base / ms, "vs_torch_f32": base32 / ms,
                         "bytes_read": held.get(name, f16_bytes * (2 if "f32" in name else 1)),
                         "f16_bytes": f16_bytes})
    small = QuantizedKVStore(args.configs[0][0], args.configs[0][1], args.configs[0][1])
    small.append(np.zeros((1, h, 16, d), np.float16), np.zeros((1, h, 16, d), np.float16))
    q0 = np.zeros((1, hq, d), np.float32)
    call_ms = statistics.median(_times_ms(lambda: decode_attention(q0, small, threads=args.threads), 300)[1])
    return {"layer": {"kv_heads": h, "heads": hq, "head_dim": d}, "threads": args.threads,
            "repeats": args.repeats, "rounds": args.rounds, "python_call_ms_16_tokens": call_ms,
            "native": native.info(), "torch": torch.__version__, "numpy": np.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}",
            "load_average": list(os.getloadavg()), "rows": rows}


def markdown(res: dict) -> str:
    lay = res["layer"]
    out = [f"Layer: {lay['heads']} query heads, {lay['kv_heads']} KV heads x {lay['head_dim']}, B = 1, "
           f"{res['threads']} threads; one per-layer Python call on a 16-token store: "
           f"{res['python_call_ms_16_tokens']:.3f} ms",
           "", "| tokens | case | CPU ms / step | speed-up vs torch sdpa f16 / f32 | wall ms median (min) | "
           "bytes read (MiB) |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['tokens']} | {r['case']} | {r['cpu_ms']:.3f} | {r['vs_torch_f16']:.2f}x / "
                   f"{r['vs_torch_f32']:.2f}x | {r['wall_ms']:.2f} ({r['wall_min_ms']:.2f}) | "
                   f"{r['bytes_read'] / 2**20:.2f} |")
    return "\n".join(out)


def _config(s: str) -> tuple[str, int]:
    scheme, _, bits = s.partition(":")
    return scheme, int(bits or 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 16384])
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--configs", type=_config, nargs="+",
                   default=[("g-KC128VT128", 2), ("g-KC128VT128", 4), ("g-KT128VC128", 2)],
                   help="scheme:bits of the fused cases (the first also runs dequantize + sdpa)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15, help="steps per timing (median)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median of the medians)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="print the table of a saved --json run and exit")
    return run_and_report(p.parse_args(argv), run, markdown)


if __name__ == "__main__":
    sys.exit(main())
