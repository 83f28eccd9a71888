"""Time the exact multi-query prefix attention (one chunk of a chunked prefill) three ways, same shapes:

- ``native``: ``kvtool.quant_ops.prefix.prefix_attention`` (the C++ kernel, f16 past read directly);
- ``numpy``: ``prefix_attention_numpy`` (the portable path);
- ``openvino``: a one-op OpenVINO graph as the packed engine's graph-side prefix computes it — the f16
  token-major past converted to f32, transposed, concatenated with the chunk's K/V, then
  ``ScaledDotProductAttention`` with a [T, P+T] float mask (CPU plugin, f32 inference precision).

Reports milliseconds per call (median of ``--repeats``), process CPU seconds per call, GFLOP/s
(4 * Hq * D * visible (query, key) pairs) and the largest difference from the native result.

    python bench/prefix_attention.py --past 0,2048,4096,7680 --chunk 512 --heads 8 --kv-heads 8 --head-dim 128
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np


def ov_model(hq: int, h: int, d: int):
    import openvino as ov
    import openvino.opset13 as ops

    q = ops.parameter([1, hq, -1, d], ov.Type.f32, name="q")
    kp = ops.parameter([-1, h, d], ov.Type.f16, name="k_past")
    vp = ops.parameter([-1, h, d], ov.Type.f16, name="v_past")
    kn = ops.parameter([1, h, -1, d], ov.Type.f32, name="k_new")
    vn = ops.parameter([1, h, -1, d], ov.Type.f32, name="v_new")
    mask = ops.parameter([1, 1, -1, -1], ov.Type.f32, name="mask")
    perm = ops.constant(np.array([1, 0, 2], np.int64))
    zero = ops.constant(np.array([0], np.int64))

    def full(past, new):
        x = ops.unsqueeze(ops.transpose(ops.convert(past, ov.Type.f32), perm), zero)
        x = ops.concat([x, new], 2)
        if hq != h:  # GQA: repeat the kv heads as the exported graphs do
            x = ops.reshape(ops.broadcast(ops.unsqueeze(x, ops.constant(np.array([2], np.int64))),
                                          ops.concat([ops.constant(np.array([1, h, hq // h], np.int64)),
                                                      ops.gather(ops.shape_of(x), ops.constant([2, 3]), 0)], 0)),
                            ops.constant(np.array([1, hq, -1, d], np.int64)), False)
        return x

    out = ops.scaled_dot_product_attention(q, full(kp, kn), full(vp, vn), mask,
                                           ops.constant(np.float32(d ** -0.5)), causal=False)
    return ov.Model([out], [q, kp, vp, kn, vn, mask], "prefix_sdpa")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--past", default="0,2048,4096,7680")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-numpy", action="store_true")
    a = ap.parse_args()
    import openvino as ov

    from kvtool.quant_ops import prefix

    hq, h, d, t = a.heads, a.kv_heads, a.head_dim, a.chunk
    core = ov.Core()
    compiled = core.compile_model(ov_model(hq, h, d), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    print(f"path: {prefix.path()}; Hq={hq} H={h} D={d} T={t}")
    print("| P | way | ms / call | CPU s / call | GFLOP/s | max abs diff vs native |")
    print("|---|---|---|---|---|---|")
    for p in [int(x) for x in a.past.split(",")]:
        q = rng.standard_normal((1, hq, t, d), dtype=np.float32)
        kp = rng.standard_normal((p, h, d), dtype=np.float32).astype(np.float16)
        vp = rng.standard_normal((p, h, d), dtype=np.float32).astype(np.float16)
        kn = rng.standard_normal((1, h, t, d), dtype=np.float32)
        vn = rng.standard_normal((1, h, t, d), dtype=np.float32)
        mask = np.where(np.arange(p + t)[None, :] > p + np.arange(t)[:, None], -np.inf, 0).astype(np.float32)
        feeds = {"q": q, "k_past": kp, "v_past": vp, "k_new": kn, "v_new": vn, "mask": mask[None, None]}
        flops = 4 * hq * d * (p * t + t * (t + 1) // 2)
        args = (q, kp, vp, kn, vn, d ** -0.5)
        ways = {"native": functools.partial(prefix.prefix_attention, *args),
                "openvino": functools.partial(lambda f: req.infer(f)[0].copy(), feeds)}
        if not a.skip_numpy:
            ways["numpy"] = functools.partial(prefix.prefix_attention_numpy, *args)
        base = None
        for name, fn in ways.items():
            out = fn()  # warm-up (and the value compared)
            walls, cpus = [], []
            for _ in range(a.repeats):
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                walls.append(time.perf_counter() - w0)
                cpus.append(time.process_time() - c0)
            base = out if base is None else base
            ms = 1e3 * statistics.median(walls)
            print(f"| {p} | {name} | {ms:.1f} | {statistics.median(cpus):.3f} | {flops / ms / 1e6:.1f} | "
                  f"{float(np.abs(out - base).max()):.2e} |")


if __name__ == "__main__":
    main()
