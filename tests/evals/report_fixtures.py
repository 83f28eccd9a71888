"""Hand-made run directories for the report tests: results.json + shapes/predictions.jsonl, scored by the task's
own aggregate, with chosen correctness per row and (optionally) recorded KV bytes."""

from __future__ import annotations

import json
from pathlib import Path

from kvtool.evals.tasks import get_task, task_metrics

QTYPES = ("color", "shape", "count")


def write_run(root: Path, name: str, kv: str, bits: int | None, n_right: int, n: int = 60, backend: str = "openvino",
              wbits: int = 4, kv_ratio: float | None = None, wrong_first: bool = False) -> Path:
    """A run of the ``shapes`` task: ``n_right`` of ``n`` answers right (the wrong ones first when
    ``wrong_first``, else last); ``kv_ratio``: recorded kv_bytes / kv_fp16_bytes (None: no KV stats recorded)."""
    run = root / name
    (run / "shapes").mkdir(parents=True)
    rows = []
    for i in range(n):
        right = (i >= n - n_right) if wrong_first else (i < n_right)
        stats = {} if kv_ratio is None else {"kv_bytes": int(1000 * kv_ratio), "kv_fp16_bytes": 1000}
        rows.append({"id": str(i), "task": "shapes", "row": i, "seed": 0, "prediction": "red" if right else "blue",
                     "answer": "red", "question_type": QTYPES[i % 3], "pope_split": None, "stats": stats})
    with open(run / "shapes" / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    timing = {} if kv_ratio is None else {"mean_kv_bytes": 1000.0 * kv_ratio, "mean_kv_fp16_bytes": 1000.0}
    quant = kv != "fp16"
    res = {"config": {"model": "/models/toy", "tasks": ["shapes"], "backend": backend, "kv": kv, "wbits": wbits,
                      "k_bits": bits if quant else None, "v_bits": bits if quant else None},
           "pipeline": {"backend": backend, "kv": kv, "k_bits": bits if quant else 16, "v_bits": bits if quant else 16},
           "tasks": {"shapes": {"metrics": task_metrics(get_task("shapes"), rows), "n_samples": n,
                                "predictions": "shapes/predictions.jsonl", "timing": timing}}}
    (run / "results.json").write_text(json.dumps(res, indent=2), encoding="utf-8")
    return run


def study_runs(root: Path) -> list[Path]:
    """A reference, an int4 fp16-KV run and three schemes at 4 and 2 bits; two schemes tie at 4 bits, one run
    records no KV bytes (its ratio comes from quant_ops' bound)."""
    return [
        write_run(root, "torch-fp32", "fp16", None, 58, backend="torch", wbits=16, kv_ratio=2.0),
        write_run(root, "ov-w4-fp16", "fp16", None, 57, kv_ratio=1.0),
        write_run(root, "uniform-4", "uniform", 4, 55, kv_ratio=0.2502),
        write_run(root, "g-T128-4", "g-T128", 4, 55, kv_ratio=0.2656),
        write_run(root, "g-KC128VT128-4", "g-KC128VT128", 4, 57, kv_ratio=None),
        write_run(root, "uniform-2", "uniform", 2, 20, kv_ratio=0.1252),
        write_run(root, "g-T128-2", "g-T128", 2, 50, kv_ratio=0.1406, wrong_first=True),
        write_run(root, "g-KC128VT128-2", "g-KC128VT128", 2, 54, kv_ratio=0.1406),
    ]
