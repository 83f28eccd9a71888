"""Benchmark of ``kvtool sweep``: the demo's grid by the local executor and by Ray with 2 workers, then the
study's full grid for LLaVA-1.5-7B on paper.

Measured part: the bundled ``kvtool-shapes`` model, reference (PyTorch fp32) + its OpenVINO int4 export x 13 KV
configurations (fp16 and the demo's 6 schemes at 4 and 2 bits) on ``shapes`` (``--n`` questions, 300 in the
demo), one unit per cell (``--shards 1``). Each executor sweeps into its own folder: wall time of the unit phase,
units/min, rows/s per backend, and the driver overhead per unit = (unit-phase wall x workers - sum of the units'
own wall times) / units — what scheduling, process start-up and result streaming add to a unit.

Paper part (``estimate``): the study's grid on the ten benchmarks, sample counts from the datasets' cards, a
per-sample cost model for a 7B model whose constants are stated (not measured here: no 7B weights and no GPU on
this machine), units of at most ``--unit-samples`` samples, and the makespan on 1, 8 and 64 workers from
greedy longest-first scheduling (the order a Ray queue of equal tasks approximates).

    python bench/sweep.py --n 300 --out /tmp/sweep-bench --json sweep_bench.json
    python bench/sweep.py --estimate-only
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from pathlib import Path

from kvtool.demo import DEMO_BITS, DEMO_SCHEMES
from kvtool.quant_ops.schemes import QUANT_BITS

# --- the study's grid on paper ---------------------------------------------------------------------------
# Samples per cell (generations): datasets' cards. VQAv2: test-dev (107,394, LLaVA's evaluation set; the
# validation split kvtool's task loads has 214,354). PAIRS: 200 images -> 520 questions x 3 seeds.
# SocialCF: the physical-gender subset, 5,000 images, one seed. HallusionBench: 951 image + 178 text-only.
CARD_SAMPLES = {"mmvet": 218, "textvqa": 5000, "gqa": 12578, "mme": 2374, "scienceqa": 2017, "vqav2": 107394,
                "pope": 9000, "hallusionbench": 1129, "pairs": 1560, "socialcf": 5000}
# assumed mean generated tokens per sample (LLaVA-1.5 answers: one word / letter on the short-answer tasks)
NEW_TOKENS = {"mmvet": 100, "textvqa": 3, "gqa": 3, "mme": 2, "scienceqa": 2, "vqav2": 3, "pope": 2,
              "hallusionbench": 30, "pairs": 15, "socialcf": 20}
PROMPT_TOKENS = 640  # 576 image tokens (CLIP-L/336) + ~60 text tokens
# per-sample cost model (assumptions, see docs/BENCHMARKS.md): GPU = one A6000-class GPU running the PyTorch
# reference (fp16 weights, the study's simulate-mode KV); CPU = one 16-core AVX-512 node running the OpenVINO
# int4/int8 export with the packed KV store.
COST = {"gpu": {"prefill_s": 0.12, "decode_ms": 28.0, "load_s": 30.0},
        "cpu": {"prefill_s": 4.0, "decode_ms": 90.0, "load_s": 30.0}}
KV_SCHEMES = ("uniform", "or2", "g-CN", "g-C128", "g-T128", "g-KCNVT128", "g-KC128VT128")
KV_BITS = QUANT_BITS  # the bits a run accepts (kvtool.quant_ops.schemes)


def study_cells() -> list[dict]:
    """The study's grid for one model: weights {fp16 (GPU), AWQ W3/W4/W8 (CPU)} x (fp16 KV + 7 schemes x 4
    bits); Fig. 5: K/V bits apart (k != v in {2, 3, 4}) for g-KC128VT128 and g-KCNVT128 at fp16 weights;
    Fig. 6: g-KC<g1>VT<g2>, g1, g2 in {32, 64, 128, 256}, 2 bits, fp16 weights (the 128/128 cell counted once)."""
    cells = []
    for w, node in (("fp16", "gpu"), ("awq-w3", "cpu"), ("awq-w4", "cpu"), ("awq-w8", "cpu")):
        cells.append({"weights": w, "kv": "fp16", "node": node})
        cells += [{"weights": w, "kv": f"{s}-k{b}v{b}", "node": node} for s in KV_SCHEMES for b in KV_BITS]
    for s in ("g-KC128VT128", "g-KCNVT128"):
        cells += [{"weights": "fp16", "kv": f"{s}-k{k}v{v}", "node": "gpu"} for k in (2, 3, 4) for v in (2, 3, 4)
                  if k != v]
    cells += [{"weights": "fp16", "kv": f"g-KC{g1}VT{g2}-k2v2", "node": "gpu"} for g1 in (32, 64, 128, 256)
              for g2 in (32, 64, 128, 256) if (g1, g2) != (128, 128)]
    return cells


def sample_s(node: str, task: str) -> float:
    c = COST[node]
    return c["prefill_s"] + NEW_TOKENS[task] * c["decode_ms"] / 1000


def makespan(durations: list[float], workers: int) -> float:
    """Greedy longest-first list scheduling of ``durations`` on ``workers`` identical workers."""
    heap = [0.0] * workers
    for d in sorted(durations, reverse=True):
        heapq.heappush(heap, heapq.heappop(heap) + d)
    return max(heap)


def estimate(unit_samples: int = 2000, overhead_s: float = 0.0) -> dict:
    """GPU-/CPU-hours and wall time on 1, 8, 64 workers (per node kind) of the study's grid on paper."""
    cells = study_cells()
    units: dict[str, list[float]] = {"gpu": [], "cpu": []}
    samples = {"gpu": 0, "cpu": 0}
    for c in cells:
        for task, n in CARD_SAMPLES.items():
            shards = -(-n // unit_samples)
            for i in range(shards):
                rows = len(range(i, n, shards))
                units[c["node"]].append(COST[c["node"]]["load_s"] + overhead_s + rows * sample_s(c["node"], task))
            samples[c["node"]] += n
    out = {"cells": {k: sum(c["node"] == k for c in cells) for k in units}, "samples": samples,
           "units": {k: len(v) for k, v in units.items()}, "cost_model": COST, "new_tokens": NEW_TOKENS,
           "prompt_tokens": PROMPT_TOKENS, "card_samples": CARD_SAMPLES, "unit_samples": unit_samples}
    for k, durs in units.items():
        out[f"{k}_hours"] = sum(durs) / 3600
        out[f"{k}_wall_h"] = {w: makespan(durs, w) / 3600 for w in (1, 8, 64)}
    return out


# --- the measured part -----------------------------------------------------------------------------------

def demo_grid(n: int, shards: int, export_dir: Path, model_dir: Path) -> str:
    schemes = json.dumps(["fp16", *DEMO_SCHEMES])
    return "\n".join([
        'tasks = ["shapes"]', f"limit = {n}", f"shards = {shards}",
        "[models.torch]", f'path = "{model_dir}"', 'backend = "torch"', "wbits = 16",
        "[models.w4]", f'path = "{export_dir}"', 'backend = "openvino"', "wbits = 4",
        "[reference]", 'model = "torch"',
        "[[kv]]", 'models = ["w4"]', f"schemes = {schemes}", f"bits = {json.dumps(list(DEMO_BITS))}", ""])


def measure(executor: str, grid: Path, out: Path, workers: int) -> dict:
    from kvtool.evals.sweep import SweepConfig, run_sweep

    t0 = time.perf_counter()
    res = run_sweep(SweepConfig(grid=str(grid), output=str(out), executor=executor, workers=workers,
                                n_boot=200, progress=False))
    total = time.perf_counter() - t0
    units = [json.loads(line) for line in (out / "units.jsonl").read_text().splitlines()]
    units = [u for u in units if "error" not in u]
    wall = res["run_wall_s"]
    rows = {}
    for u in units:
        backend = "torch" if u["unit"].startswith("torch-") else "openvino"
        r = rows.setdefault(backend, [0, 0.0])
        r[0] += u["n_generated_now"]
        r[1] += u["generate_s"]
    return {"executor": executor, "workers": workers, "units": len(units), "failed": len(res["failed"]),
            "unit_phase_wall_s": wall, "total_wall_s": total, "finish_s": total - wall,
            "units_per_min": 60 * len(units) / wall if wall else None,
            "sum_unit_wall_s": sum(u["wall_s"] for u in units),
            "sum_generate_s": sum(u["generate_s"] for u in units),
            "driver_overhead_per_unit_s": (wall * workers - sum(u["wall_s"] for u in units)) / max(1, len(units)),
            "load_and_score_per_unit_s": sum(u["wall_s"] - u["generate_s"] for u in units) / max(1, len(units)),
            "rows_per_s": {b: n / s for b, (n, s) in rows.items() if s}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="shapes questions per cell (the demo: 300)")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--out", default="/tmp/kvtool-sweep-bench")
    ap.add_argument("--executors", default="local,ray")
    ap.add_argument("--unit-samples", type=int, default=2000, help="paper grid: samples per unit at most")
    ap.add_argument("--estimate-only", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    result: dict = {}
    if not a.estimate_only:
        from kvtool.demo import ensure_export
        from kvtool.models.bundled import SHAPES_MODEL_DIR

        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        export_dir = ensure_export(SHAPES_MODEL_DIR, out / "cache")
        result["export_s"] = time.perf_counter() - t0
        grid = out / "grid.toml"
        grid.write_text(demo_grid(a.n, a.shards, export_dir, SHAPES_MODEL_DIR))
        result["n"] = a.n
        result["runs"] = []
        for ex in a.executors.split(","):
            workers = 2 if ex == "ray" else 1
            result["runs"].append(measure(ex, grid, out / ex, workers))
            print(json.dumps(result["runs"][-1], indent=1), flush=True)
        overhead = max(r["driver_overhead_per_unit_s"] for r in result["runs"])
    else:
        overhead = 0.0
    result["estimate"] = estimate(a.unit_samples, overhead)
    print(json.dumps(result["estimate"], indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
