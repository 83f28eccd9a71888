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
``--baseline-native SO`` also times another build of the native extension (``_native*.so`` of an earlier
revision) on every native row, interleaved with this one and the copy in the same repeats (before / after on a
shared machine: separate runs differ by up to 2x under load): ``baseline_*`` fields and two extra columns.
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

try:
    import resource
except ImportError:  # not on Windows: page faults are reported as 0 there
    resource = None


def _time(fn) -> tuple[float, float, int]:
    """(thread CPU seconds, wall seconds, minor page faults) of one call. On a shared machine the CPU time of
    this thread (torch runs single-threaded here) is what the code costs; wall time also counts time spent
    descheduled. Page faults: first touches of fresh memory (~2 us each on this VM), counted for the process."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0
    c0, w0 = time.thread_time(), time.perf_counter()
    fn()
    c1, w1 = time.thread_time(), time.perf_counter()
    f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0
    return c1 - c0, w1 - w0, f1 - f0


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
    args.baseline_mod = _load_so(args.baseline_native) if args.baseline_native else None
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
    if args.warmup and jobs:  # one untimed row first: see --warmup
        with contextlib.ExitStack() as stack:
            if jobs[0][0] == "portable":
                stack.enter_context(native.disabled("bench: portable rows"))
            _row(args, *jobs[0], (k_np, v_np, step_np), fp16_bytes)
    for kern, lib, scheme, bits in tqdm(jobs, desc="bench quant_ops"):
        with contextlib.ExitStack() as stack:
            if kern == "portable":
                stack.enter_context(native.disabled("bench: portable rows"))
            rows.append(_row(args, kern, lib, scheme, bits, (k_np, v_np, step_np), fp16_bytes))
    return {"shape": [b, h, n, d], "dtype": "float16", "repeats": args.repeats, "torch_threads": args.threads,
            "warmup": args.warmup,
            "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}",
            "native": native.info(), "load_average": list(os.getloadavg()),
            "torch": torch.__version__, "numpy": np.__version__, "rows": rows}


def _load_so(path: str):
    """Another build of kvtool.quant_ops._native (a ``_native*.so`` file), imported under its own name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_native", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline-native {path}: not an importable extension module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _using(mod):
    """Within the block, quant_ops runs the native kernels of ``mod`` (another build of the extension)."""
    from kvtool.quant_ops import native

    saved = native._load
    native._load = lambda: (mod, "baseline build")
    try:
        yield
    finally:
        native._load = saved


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

    base = args.baseline_mod if kern == "native" else None
    base_store = QuantizedKVStore(scheme, bits, bits, mode="packed")

    def quantize_base(store=base_store, k=k, v=v):
        with _using(base):
            store.reset()
            store.append(k, v)

    def dequantize_base(store=base_store, kb=kb, vb=vb):
        with _using(base):
            store.dequantize(out=(kb, vb), incremental=False)

    fns = [("copy", copy), ("q", quantize), ("dq", dequantize)]
    if base is not None:
        fns += [("q_base", quantize_base), ("dq_base", dequantize_base)]
    times: dict[str, list] = {name: [] for name, _ in fns}
    for _ in range(args.repeats):  # interleaved, so copy and ours see the same machine load
        for name, fn in fns:
            times[name].append(_time(fn))
    copy_t, q_t, dq_t = (statistics.median(c for c, _, _ in times[x]) for x in ("copy", "q", "dq"))
    extra = {}
    if base is not None:
        qb, dqb = (statistics.median(c for c, _, _ in times[x]) for x in ("q_base", "dq_base"))
        extra = {"baseline_quantize_vs_copy": copy_t / qb, "baseline_dequantize_vs_copy": copy_t / dqb,
                 "baseline_quantize_ms": qb * 1e3, "baseline_dequantize_ms": dqb * 1e3}
    wall = {x: statistics.median(w for _, w, _ in times[x]) for x in times}
    faults = statistics.median(f for _, _, f in times["q"])
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
        "quantize_page_faults": faults,
        "wall_ms": {"copy": wall["copy"] * 1e3, "quantize": wall["q"] * 1e3, "dequantize": wall["dq"] * 1e3},
        "quantize_vs_copy_wall": wall["copy"] / wall["q"], "dequantize_vs_copy_wall": wall["copy"] / wall["dq"],
        "held_vs_fp16": nbytes / fp16_nbytes, "bound_vs_fp16": _bound(spec, bits, n, h, d),
        "nbytes": nbytes, "fp16_nbytes": fp16_nbytes, **extra,
    }


def markdown(res: dict) -> str:
    base = any("baseline_quantize_vs_copy" in r for r in res["rows"])
    out = ["| kernel | backend | scheme | bits | quantize GB/s | vs copy | dequantize GB/s | vs copy | copy GB/s | "
           "wall: q / dq vs copy | decode step ms (max) | held / fp16 | bound | q page faults |"
           + (" baseline build: q / dq vs copy |" if base else ""),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if base else "")]
    for r in res["rows"]:
        w = r["wall_ms"]
        b = (f" {r['baseline_quantize_vs_copy']:.3f} / {r['baseline_dequantize_vs_copy']:.3f} |"
             if "baseline_quantize_vs_copy" in r else " |" if base else "")
        out.append(f"| {r.get('kernel', 'portable')} | {r['backend']} | {r['scheme']} | {r['bits']} | {r['quantize_gbps']:.2f} | "
                   f"{r['quantize_vs_copy']:.3f} | {r['dequantize_gbps']:.2f} | {r['dequantize_vs_copy']:.3f} | "
                   f"{r['copy_gbps']:.2f} | {w['copy'] / w['quantize']:.3f} / {w['copy'] / w['dequantize']:.3f} | "
                   f"{r['decode_step_ms']:.2f} ({r['decode_step_max_ms']:.1f}) | {r['held_vs_fp16']:.4f} | "
                   f"{r['bound_vs_fp16']:.4f} | {r.get('quantize_page_faults', float('nan')):.0f} |" + b)
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
    p.add_argument("--baseline-native", metavar="SO", help="another build's _native*.so, timed interleaved on "
                   "the native rows (before / after in one process)")
    p.add_argument("--warmup", action="store_true", help="run the first row once untimed: the first row of a "
                   "process otherwise pays ~1200 page faults per append (glibc returns the freed output pages to "
                   "the OS until the heap has grown), later rows none; the quantize_page_faults field says which")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="print the table of a saved --json run and exit")
    return run_and_report(p.parse_args(argv), run, markdown)


if __name__ == "__main__":
    sys.exit(main())
