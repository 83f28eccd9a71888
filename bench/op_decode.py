"""Benchmark: the packed engine's decode step under settings of its C++ op, A/B in one process.

Loads the long-context bench export (``bench/long_context.py``'s model) with a 2/4-bit kvtool scheme, prefills one
prompt of ``--tokens`` tokens, then runs ``run_token`` steps, alternating blocks of ``--steps`` steps between the
arms over the same stores (each step appends one token, so every arm sees the same cache length to within a
block). Arms (``--arms``, comma-separated; ratios are against the first):

- ``op``: the defaults (``ov_packed_ext``: the op writes the token into the store's buffers where
  ``QuantizedKVStore.inplace_targets`` gives room and advances its slot; ``commit`` only accounts for it, and the
  next ``sync`` has nothing to refresh);
- ``python-append``: ``KVTOOL_NO_OP_APPEND=1`` (the op leaves the token in the slot's pending buffers, ``commit``
  appends it with the store's own ``append``, and ``sync`` re-describes every layer's store before each step);
- ``threads-from-<N>``: the defaults with the kernel's second thread used from N multiply-adds of q.K per call
  on OpenVINO's TBB pool (``ov_packed_ext.kernel_min_work("tbb", N)``).

Every arm gives the same tokens and stores bit for bit (tests/runtime/test_ov_packed_ext.py). Reports medians of
wall ms, process CPU ms (all threads) and main-thread CPU ms per step, and the Python time of ``sync`` +
``commit`` per step. The machine is shared: the CPU columns and the ratios of the arms in one process are the
figures to read.
Run:  python bench/op_decode.py [--tokens 2048] [--kv g-KC128VT128] [--bits 2] [--arms op,python-append]
      [--blocks 16] [--steps 5] [--json out.json]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from long_context import bench_pipeline, decode_ab_parser, image, report_ab

    from kvtool.runtime.engines import ov_packed_ext as ext

    ap = decode_ab_parser(__doc__.splitlines()[0], "g-KC128VT128")
    ap.add_argument("--arms", default="op,python-append", help="comma-separated: op, python-append, threads-from-<N>")
    a = ap.parse_args()
    arms = a.arms.split(",")
    bad = [x for x in arms if x not in ("op", "python-append") and not (x.startswith("threads-from-")
                                                                          and x[13:].isdigit())]
    if bad or len(set(arms)) != len(arms):
        print(f"--arms {a.arms!r}: expected distinct op, python-append, threads-from-<N>", file=sys.stderr)
        return 2
    found = bench_pipeline(a)
    if found is None:
        return 2
    pipe, question = found
    eng = pipe.engine
    if eng.info().get("route") != ext.CPP_ROUTE:
        print(f"route {eng.info().get('route')!r}: this compares settings of the C++ op", file=sys.stderr)
        return 2
    out = pipe.generate(image(0), question, max_new_tokens=2, ignore_eos=True)
    tok = out.token_ids[-1]
    glue = {"s": 0.0}
    sync, commit = ext.sync, ext.commit

    def timed(f):
        def g(layers):
            t = time.perf_counter()
            f(layers)
            glue["s"] += time.perf_counter() - t
        return g

    ext.sync, ext.commit = timed(sync), timed(commit)
    res: dict[str, list] = {arm: [] for arm in arms}
    keep = os.environ.get(ext.ENV_NO_OP_APPEND), ext.kernel_min_work("tbb")
    try:
        for _ in range(a.blocks):
            for arm in res:
                if arm == "python-append":
                    os.environ[ext.ENV_NO_OP_APPEND] = "1"
                else:
                    os.environ.pop(ext.ENV_NO_OP_APPEND, None)
                ext.kernel_min_work("tbb", int(arm[13:]) if arm.startswith("threads-from-") else keep[1])
                for layer in eng.layers:  # re-described from the store under this arm's setting at the next sync
                    if getattr(layer, "slot", None) is not None:
                        layer.slot.synced = (None, -1)
                for _ in range(a.steps):
                    glue["s"] = 0.0
                    w0, c0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
                    eng.run_token(tok)
                    res[arm].append((time.perf_counter() - w0, time.process_time() - c0, time.thread_time() - t0,
                                     glue["s"]))
    finally:
        ext.sync, ext.commit = sync, commit
        ext.kernel_min_work("tbb", keep[1])
        if keep[0] is None:
            os.environ.pop(ext.ENV_NO_OP_APPEND, None)
        else:
            os.environ[ext.ENV_NO_OP_APPEND] = keep[0]
    # the first step of each block re-syncs every layer in both arms: left out of the medians
    cols = ("wall_ms", "cpu_ms", "main_ms", "glue_ms")
    summary = {arm: {k: 1e3 * statistics.median(r[j] for i, r in enumerate(v) if i % a.steps)
                     for j, k in enumerate(cols)} for arm, v in res.items()}
    result = {"tokens": eng.kv.n_tokens, "kv": a.kv, "bits": a.bits, "load": os.getloadavg()[0],
              "blocks": a.blocks, "steps": a.steps, **summary,
              "ratios": {arm: {k: summary[arm][k] / summary[arms[0]][k] for k in cols[:3]} for arm in arms[1:]}}
    for arm, r in result["ratios"].items():
        print(f"{arm} / {arms[0]}: wall {r['wall_ms']:.3f}x, process CPU {r['cpu_ms']:.3f}x, main-thread CPU "
              f"{r['main_ms']:.3f}x")
    return report_ab(a, result, list(res), {"wall_ms": "wall ms / step", "cpu_ms": "process CPU ms / step",
                                            "main_ms": "main-thread CPU ms / step",
                                            "glue_ms": "sync + commit ms / step"}, {"glue_ms": 3})

if __name__ == "__main__":
    sys.exit(main())
