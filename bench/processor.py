"""Processor cost per eval sample on the bundled kvtool-shapes model: the runtime's processor
(``kvtool.runtime.processing.load_processor``: PIL image processing, fast call) against transformers'
``AutoProcessor`` as the runtime used it before (its default backend, the processor's own ``__call__``), alone
and inside a whole eval sample (``VLMPipeline.generate`` on the OpenVINO int4 export, the shapes task's prompt
and its 4 new tokens at most).

The two processors take turns sample by sample (so load from other processes spreads over both); the figures
are medians over ``--n`` shapes test questions after ``--warmup`` untimed ones.

    python bench/processor.py --workdir /tmp/kvtool-bench-proc --n 200 [--json out.json]

The int4 export of kvtool-shapes is built once into ``--workdir`` (``kvtool.export``, needs the full install);
``--export DIR`` points at an existing one instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/kvtool-bench-proc")
    ap.add_argument("--export", default=None, help="an existing OpenVINO export of kvtool-shapes")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--kv", default="fp16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from transformers import AutoProcessor

    from kvtool.evals.shapes import make_shapes_split
    from kvtool.evals.tasks import get_task
    from kvtool.models.bundled import SHAPES_MODEL_DIR
    from kvtool.runtime import VLMPipeline
    from kvtool.runtime.preprocess import prepare_inputs
    from kvtool.runtime.processing import load_processor

    export = Path(args.export) if args.export else Path(args.workdir) / "shapes-ov-int4"
    if not (export / "kvtool.json").is_file():
        from kvtool.export import ExportConfig, export_model

        export_model(ExportConfig(model=str(SHAPES_MODEL_DIR), output=str(export), backend="openvino", wbits=4,
                                  dtype="fp16"))
    pipe = VLMPipeline.load(export, kv=args.kv, k_bits=2, v_bits=2, conversation="vicuna_v1")
    procs = {"before": AutoProcessor.from_pretrained(str(export)), "after": load_processor(export)}
    spec = get_task("shapes")
    rows = make_shapes_split("test", args.n + args.warmup, seed=1)
    samples = [s for r in rows for s in spec.build(r)][: args.n + args.warmup]
    t_proc: dict[str, list[float]] = {k: [] for k in procs}
    t_sample: dict[str, list[float]] = {k: [] for k in procs}
    answers: dict[str, list[str]] = {k: [] for k in procs}
    for i, s in enumerate(samples):
        for name, proc in procs.items():
            t0 = time.perf_counter()
            prepare_inputs(proc, [s.image], s.prompt, "vicuna_v1")
            t1 = time.perf_counter()
            pipe.processor = proc
            out = pipe.generate(s.image, s.prompt, max_new_tokens=spec.max_new_tokens)
            t2 = time.perf_counter()
            if i >= args.warmup:
                t_proc[name].append(t1 - t0)
                t_sample[name].append(t2 - t1)
                answers[name].append(out.text)
    res = {"n": args.n, "kv": args.kv, "export": str(export),
           "processor_class": {k: type(getattr(p, "processor", p).image_processor).__name__ for k, p in procs.items()},
           "agreement": sum(a == b for a, b in zip(answers["before"], answers["after"], strict=True)) / args.n}
    for name in procs:
        res[name] = {"processor_ms": _median_ms(t_proc[name]), "sample_ms": _median_ms(t_sample[name]),
                     "processor_share": _median_ms(t_proc[name]) / _median_ms(t_sample[name])}
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
