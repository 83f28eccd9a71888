"""Benchmark: KV quantize+pack and unpack+dequantize throughput of kvtool.quant_ops, and bytes held.

On a ``[1, 32, 4096, 128]`` float16 K and V (one LLaVA-7B layer at 4k tokens), for every study scheme at
2 and 4 bits, with numpy arrays and torch-CPU tensors, through the native C++ kernels (``--kernels native``,
when built) and the portable torch / numpy code (``portable``):

- quantize: ``QuantizedKVStore.append(k, v)`` of the whole block into a fresh packed store;
- dequantize: a full ``dequantize(out=bufs, incremental=False)`` into preallocated buffers;
- copy: ``k_buf[...] = k; v_buf[...] = v`` on the same backend, timed in the same run, interleaved;
- throughput in GB/s of fp16 input (K and V bytes / time) and the ratio ours / copy;
- bytes held vs fp16 and the bound ``(bits + 32/g)/16`` (+ per-channel residual);
- decode step: after the block, ``append`` one token + incremental ``dequantize(out=bufs)``, median and max
  (the max includes a per-channel group flush) over ``--steps`` steps (ms).

Times are thread CPU time (torch pinned to ``--threads`` = 1), medians of ``--repeats`` interleaved runs;
the wall-clock medians' ratios to the copy are a column too (all wall times in the JSON).
Run:  python bench/quant_ops.py [--json out.json]   (``--markdown out.json`` re-prints a saved run)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

from benchio import run_and_report


def _time(fn) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) of one call. On a shared machine the CPU time of this thread
    (torch runs single-threaded here) is what the code costs; wall time also counts time spent descheduled."""
    c0, w0 = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - c0, time.perf_counter() - w0


def _bound(spec, bits: int, n: int, h: int, d: int) -> float:
    """(bits + 32/g)/16 of fp16 for each side, plus the fp16 residual of per-channel sides (as a fraction)."""
    tot = 0.0
    for which in ("k", "v"):
        axis, group = spec.side(which)
        if spec.kind in ("uniform", "outlier"):
            cost = spec.side_bits_per_value(which, bits, n, h * d)
        else:
            g = n if group is None else group
            cost = bits + 32 / g
            if axis == "channel" and group is not None:
                cost += 16 * (n % group) / n
        tot += cost / 16 / 2
    return tot


def run(args) -> dict:
    import numpy as np
    import torch
    from tqdm import tqdm

    from kvtool.quant_ops import SCHEMES, native

    torch.set_num_threads(args.threads)
    b, h, n, d = 1, args.heads, args.tokens, args.head_dim
    rng = np.random.default_rng(0)
    k_np = rng.standard_normal((b, h, n, d), dtype=np.float32)
    k_np[:, :, :, rng.choice(d, 4, replace=False)] *= 20.0  # outlier channels, as trained keys have
    k_np = k_np.astype(np.float16)
    v_np = rng.standard_normal((b, h, n, d), dtype=np.float32).astype(np.float16)
    step_np = rng.standard_normal((b, h, 1, d), dtype=np.float32).astype(np.float16)
    fp16_bytes = 2 * k_np.nbytes
    schemes = args.schemes or [s for s in SCHEMES if s != "fp16"]
    rows = []
    jobs = [(kern, lib, s, bits) for kern in args.kernels for lib in args.backends for s in schemes
            for bits in args.bits]
    for kern, lib, scheme, bits in tqdm(jobs, desc="bench quant_ops"):
        with contextlib.ExitStack() as stack:
            if kern == "portable":
                stack.enter_context(native.disabled("bench: portable rows"))
            rows.append(_row(args, kern, lib, scheme, bits, (k_np, v_np, step_np), fp16_bytes))
    return {"shape": [b, h, n, d], "dtype": "float16", "repeats": args.repeats, "torch_threads": args.threads,
            "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}",
            "native": native.info(), "load_average": list(os.getloadavg()),
            "torch": torch.__version__, "numpy": np.__version__, "rows": rows}


def _row(args, kern, lib, scheme, bits, arrays, fp16_bytes) -> dict:
    import numpy as np
    import torch

    from kvtool.quant_ops import QuantizedKVStore, parse_scheme

    k_np, v_np, step_np = arrays
    b, h, n, d = k_np.shape
    if lib == "torch":
        k, v, step = (torch.from_numpy(a) for a in (k_np, v_np, step_np))
        kb = torch.empty(b, h, n + args.steps, d, dtype=torch.float16)
        vb = torch.empty(b, h, n + args.steps, d, dtype=torch.float16)
    else:
        k, v, step = k_np, v_np, step_np
        kb, vb = np.empty((b, h, n + args.steps, d), np.float16), np.empty((b, h, n + args.steps, d), np.float16)
    kb_n, vb_n = kb[:, :, :n], vb[:, :, :n]

    def copy(k=k, v=v, kb_n=kb_n, vb_n=vb_n):
        kb_n[...] = k
        vb_n[...] = v

    store = QuantizedKVStore(scheme, bits, bits, mode="packed")

    def quantize(store=store, k=k, v=v):
        store.reset()
        store.append(k, v)

    def dequantize(store=store, kb=kb, vb=vb):
        store.dequantize(out=(kb, vb), incremental=False)

    times: dict[str, list] = {"copy": [], "q": [], "dq": []}
    for _ in range(args.repeats):  # interleaved, so copy and ours see the same machine load
        for name, fn in (("copy", copy), ("q", quantize), ("dq", dequantize)):
            times[name].append(_time(fn))
    copy_t, q_t, dq_t = (statistics.median(c for c, _ in times[x]) for x in ("copy", "q", "dq"))
    wall = {x: statistics.median(w for _, w in times[x]) for x in times}
    nbytes, fp16_nbytes = store.nbytes, store.fp16_nbytes
    store.dequantize(out=(kb, vb))

    def decode_step(store=store, step=step, kb=kb, vb=vb):
        store.append(step, step)
        store.dequantize(out=(kb, vb))

    steps = sorted(_time(decode_step)[0] for _ in range(args.steps))  # the buffers hold n + steps tokens
    spec = parse_scheme(scheme)
    assert store.kernel_info()["path"] == kern, store.kernel_info()
    return {
        "kernel": kern, "backend": lib, "scheme": scheme, "bits": bits,
        "copy_gbps": fp16_bytes / copy_t / 1e9,
        "quantize_gbps": fp16_bytes / q_t / 1e9, "quantize_vs_copy": copy_t / q_t,
        "dequantize_gbps": fp16_bytes / dq_t / 1e9, "dequantize_vs_copy": copy_t / dq_t,
        "quantize_ms": q_t * 1e3, "dequantize_ms": dq_t * 1e3, "copy_ms": copy_t * 1e3,
        "decode_step_ms": statistics.median(steps) * 1e3, "decode_step_max_ms": steps[-1] * 1e3,
        "wall_ms": {"copy": wall["copy"] * 1e3, "quantize": wall["q"] * 1e3, "dequantize": wall["dq"] * 1e3},
        "quantize_vs_copy_wall": wall["copy"] / wall["q"], "dequantize_vs_copy_wall": wall["copy"] / wall["dq"],
        "held_vs_fp16": nbytes / fp16_nbytes, "bound_vs_fp16": _bound(spec, bits, n, h, d),
        "nbytes": nbytes, "fp16_nbytes": fp16_nbytes,
    }


def markdown(res: dict) -> str:
    out = ["| kernel | backend | scheme | bits | quantize GB/s | vs copy | dequantize GB/s | vs copy | copy GB/s | "
           "wall: q / dq vs copy | decode step ms (max) | held / fp16 | bound |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        w = r["wall_ms"]
        out.append(f"| {r.get('kernel', 'portable')} | {r['backend']} | {r['scheme']} | {r['bits']} | {r['quantize_gbps']:.2f} | "
                   f"{r['quantize_vs_copy']:.3f} | {r['dequantize_gbps']:.2f} | {r['dequantize_vs_copy']:.3f} | "
                   f"{r['copy_gbps']:.2f} | {w['copy'] / w['quantize']:.3f} / {w['copy'] / w['dequantize']:.3f} | "
                   f"{r['decode_step_ms']:.2f} ({r['decode_step_max_ms']:.1f}) | {r['held_vs_fp16']:.4f} | "
                   f"{r['bound_vs_fp16']:.4f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    p.add_argument("--schemes", nargs="+", default=None, help="default: every study scheme but fp16")
    p.add_argument("--backends", nargs="+", default=["torch", "numpy"], choices=["torch", "numpy"])
    p.add_argument("--kernels", nargs="+", default=["native", "portable"], choices=["native", "portable"],
                   help="native: the C++ kernels (when built); portable: the torch / numpy code")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=128, help="decode steps timed after the block")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see BENCHMARKS.md)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="print the table of a saved --json run and exit")
    return run_and_report(p.parse_args(argv), run, markdown)


if __name__ == "__main__":
    sys.exit(main())
