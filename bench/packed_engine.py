"""The packed OpenVINO engine (KV held only packed, attention reading the codes through a Python custom op)
vs the paged engine (today's packed path: PagedAttention over kvtool-filled blocks) and the fp16 stateful
engine (OpenVINO owns an f16 cache), on one stateful export, at long prompts.

Each (configuration, prompt length) runs in its own child process, so peak RSS (``kvtool.memory``: the
child's own VmHWM) is its own. Wall and process CPU time are both reported: on a shared, loaded machine the
CPU time of the (CPU-bound) child is the steadier figure. The configurations take turns for ``--rounds`` rounds (load from other
processes spreads over all of them) and medians over rounds are reported, with ratios to the fp16 engine of
the same length. The prompt is a question text repeated to about N tokens plus one image.

    python bench/packed_engine.py --model EXPORT_DIR --lengths 2048,8192 --rounds 2 [--new 32] [--json out.json]

EXPORT_DIR: a stateful OpenVINO export (e.g. ``kvtool models make`` at LLaVA-1.5 width with 8 layers and
``max_positions`` >= 9k, ``kvtool export --wbits 4``). It does not compare against openvino.genai
(``bench/long_context.py`` does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import benchio

SENTENCE = ("The red circle is left of the blue square, and the green triangle sits above the yellow star near "
            "the bottom of the image. ")

# name -> pipeline kwargs
CONFIGS: dict[str, dict] = {
    "fp16 stateful": dict(kv="fp16"),
    "paged 2-bit": dict(kv="g-KC128VT128", k_bits=2, v_bits=2, kv_owner="paged"),
    "packed 2-bit": dict(kv="g-KC128VT128", k_bits=2, v_bits=2, kv_owner="packed"),
    "packed 4-bit": dict(kv="g-KC128VT128", k_bits=4, v_bits=4, kv_owner="packed"),
    "packed KT/VC 2-bit": dict(kv="g-KT128VC128", k_bits=2, v_bits=2, kv_owner="packed"),
}

CHILD = r"""
import json, sys, time
import numpy as np
from PIL import Image
from kvtool.memory import peak_rss_bytes
from kvtool.runtime import VLMPipeline
from kvtool.runtime.preprocess import prepare_inputs
model, kw, question, new = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
pipe = VLMPipeline.load(model, **kw)
img = Image.fromarray((np.random.default_rng(0).random((96, 96, 3)) * 255).astype("uint8"))
prepared = prepare_inputs(pipe.processor, [img], question, pipe.conversation)
eng, n = pipe.engine, prepared.n_tokens
# the pipeline's order (DESIGN.md): prompt minus its last token, then the last token against the cache
w0, c0 = time.perf_counter(), time.process_time()
eng.start(prepared, new)
if pipe.spec.quantizes:
    eng.run_prompt(0, n - 1)
    logits = eng.run_prompt(n - 1, n)
else:
    logits = eng.run_prompt(0, n)
w1, c1 = time.perf_counter(), time.process_time()
for _ in range(new):
    logits = eng.run_token(int(np.argmax(logits)))
w2, c2 = time.perf_counter(), time.process_time()
kv, fp16 = eng.kv_nbytes()
work = eng.kv_work_nbytes() if hasattr(eng, "kv_work_nbytes") else 0
print("RESULT" + json.dumps({"prompt_tokens": n, "prefill_ms": (w1 - w0) * 1e3, "prefill_cpu_ms": (c1 - c0) * 1e3,
                             "decode_ms_per_token": (w2 - w1) * 1e3 / new,
                             "decode_cpu_ms_per_token": (c2 - c1) * 1e3 / new, "kv_bytes": kv,
                             "kv_fp16_bytes": fp16, "kv_work_bytes": work, "peak_rss_bytes": peak_rss_bytes(),
                             "path": eng.info().get("attention_path"), "engine": type(eng).__name__}))
"""


def _question(n_tokens: int) -> str:
    return SENTENCE * max(1, int((n_tokens - 600) / 34))  # 576 image tokens; ~34 per sentence with LLaVA's tokenizer


def _child(model: str, kw: dict, question: str, new: int) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, model, json.dumps(kw), question, str(new)],
                         capture_output=True, text=True, timeout=3600)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"child failed: {res.stderr[-2000:]}")
    return json.loads(line[len("RESULT"):])


def run(args) -> dict:
    lengths = [int(x) for x in args.lengths.split(",")]
    names = args.only.split(",") if args.only else list(CONFIGS)
    rows: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for n in lengths:
            for name in names:
                got = _child(args.model, CONFIGS[name], _question(n), args.new)
                rows.setdefault(f"{n}|{name}", []).append(got)
                print(f"round {r} {n} {name}: {got}", file=sys.stderr, flush=True)
    med = {}
    for key, runs in rows.items():
        m = {k: statistics.median(x[k] for x in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
        med[key] = {**m, "path": runs[0]["path"], "engine": runs[0]["engine"], "rounds": len(runs)}
    return {"model": str(Path(args.model).resolve()), "new_tokens": args.new, "rounds": args.rounds, "rows": med}


def markdown(res: dict) -> str:
    out = ["| prompt tokens | config | engine (attention) | decode ms/token (CPU ms) | TTFT ms (CPU ms) | peak RSS "
           "MiB | kv MiB held | kv_work MiB | decode CPU / fp16 | TTFT CPU / fp16 | RSS / fp16 |", "|" + "---|" * 11]
    for key, r in res["rows"].items():
        n, name = key.split("|")
        base = res["rows"].get(f"{n}|fp16 stateful", r)
        eng = r["engine"].replace("OpenVINO", "").replace("Engine", "") + (f" ({r['path']})" if r["path"] else "")
        mib = 2**20
        out.append(f"| {int(r['prompt_tokens']):,} | {name} | {eng} | {r['decode_ms_per_token']:.1f} "
                   f"({r['decode_cpu_ms_per_token']:.1f}) | {r['prefill_ms']:,.0f} ({r['prefill_cpu_ms']:,.0f}) | "
                   f"{r['peak_rss_bytes'] / mib:,.0f} | {r['kv_bytes'] / mib:.1f} | {r['kv_work_bytes'] / mib:.1f} | "
                   f"{r['decode_cpu_ms_per_token'] / base['decode_cpu_ms_per_token']:.2f} | "
                   f"{r['prefill_cpu_ms'] / base['prefill_cpu_ms']:.2f} | "
                   f"{r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--only", default="")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    if not args.markdown and not args.model:
        ap.error("--model is required (or --markdown FILE)")
    return benchio.run_and_report(args, run, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
