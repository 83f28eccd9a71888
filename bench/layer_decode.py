"""Benchmark: the packed engine's layer-major decode step, as a chain vs every input fed per call, in one process.

Loads the long-context bench export (``bench/long_context.py``'s model) with ``prefill_order="layer"``, prefills
one prompt of ``--tokens`` tokens, then runs decode steps on a fixed random hidden state, alternating blocks of
``--steps`` steps between the two arms over the same stores (each step appends one token, so both arms see the
same cache length to within a block):

- ``chain``: ``ov_layers.DECODE_FIXED_FEEDS`` on (``LayerRunner._decode`` / ``DecodeChain``: inputs set once per
  request, layer ``i``'s output tensor layer ``i + 1``'s input, op slots synced and committed once per token);
- ``fed``: off (``LayerRunner.step``'s general path: every input fed on every call, each output copied).

Reports medians of wall ms, process CPU ms (all threads) and main-thread CPU ms per step. The machine is
shared: the CPU columns and the ratio of the two arms in one process are the figures to read.
Run:  python bench/layer_decode.py [--tokens 2048] [--blocks 16] [--steps 5] [--json out.json]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from long_context import bench_pipeline, decode_ab_parser, image, report_ab

    from kvtool.runtime.engines import ov_layers

    a = decode_ab_parser(__doc__.splitlines()[0], "g-KT128VC128").parse_args()
    found = bench_pipeline(a, prefill_order="layer")
    if found is None:
        return 2
    pipe, question = found
    pipe.generate(image(0), question, max_new_tokens=2, ignore_eos=True)
    eng = pipe.engine
    run = eng.layer_runner
    x = np.random.default_rng(0).standard_normal((1, 1, eng.manifest.lm.hidden_size)).astype(np.float32) * 0.1
    res: dict[str, list] = {"chain": [], "fed": []}
    p = eng.kv.n_tokens
    keep = ov_layers.DECODE_FIXED_FEEDS
    try:
        for _ in range(a.blocks):
            for arm in res:
                ov_layers.DECODE_FIXED_FEEDS = arm == "chain"
                for _ in range(a.steps):
                    pos = np.array([[p]], np.int64)
                    p += 1
                    w0, c0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
                    run.step(x, pos, eng.kv)
                    res[arm].append((time.perf_counter() - w0, time.process_time() - c0, time.thread_time() - t0))
    finally:
        ov_layers.DECODE_FIXED_FEEDS = keep
    out = {"tokens": eng.kv.n_tokens, "kv": a.kv, "bits": a.bits, "load": os.getloadavg()[0],
           **{arm: {k: 1e3 * statistics.median(r[j] for r in v) for j, k in enumerate(("wall_ms", "cpu_ms", "main_ms"))}
              for arm, v in res.items()}}
    return report_ab(a, out, list(res), {"wall_ms": "wall ms / step", "cpu_ms": "process CPU ms / step",
                                         "main_ms": "main-thread CPU ms / step"})

if __name__ == "__main__":
    sys.exit(main())
