"""The packed engine's prefill chunk (issue 13 item 4): time to first token in *CPU seconds* of the process (all
threads; load-independent where wall time on a shared machine is not) and the child's own peak RSS (VmHWM),
per ``prefill_chunk``, on ``bench/long_context.py``'s export and prompts (build them with that bench first).

Each (length, chunk) runs in its own child process: load, a warm-up on a short prompt, then one timed
generate of ``--new-tokens`` tokens. Per row: prompt tokens, prefill CPU s (``time.process_time`` around the
engine's prefill calls, preprocessing excluded), prefill wall s, peak RSS, the exact prefill buffer's bytes
(``info()["prefill_buffer_bytes"]``) and kv_bytes.

    python bench/prefill_chunk.py --lengths 2048,8192 --chunks 0,256,512,1024 --json out.json

It measures one configuration (``--kv``, ``--bits``); ``bench/long_context.py`` compares against openvino.genai.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def child(a) -> dict:
    from kvtool.memory import peak_rss_bytes
    from kvtool.runtime import VLMPipeline

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from long_context import image

    kw = dict(kv=a.kv, kv_owner="packed", prefill_chunk=a.chunk)
    if a.kv != "fp16":
        kw.update(k_bits=a.bits, v_bits=a.bits)
    pipe = VLMPipeline.load(a.export, **kw)
    pipe.generate(image(1), "Describe the image.", max_new_tokens=2, ignore_eos=True)
    eng = pipe.engine
    spent = {"cpu": 0.0, "wall": 0.0}
    run_prompt = eng.run_prompt

    def timed(s, e):  # the prefill calls only (the last prompt token's call included, as in TTFT)
        c, w = time.process_time(), time.perf_counter()
        out = run_prompt(s, e)
        spent["cpu"] += time.process_time() - c
        spent["wall"] += time.perf_counter() - w
        return out

    eng.run_prompt = timed
    question = Path(a.question).read_text(encoding="utf-8")
    st = pipe.generate(image(0), question, max_new_tokens=a.new_tokens, ignore_eos=True).stats
    info = eng.info()
    return {"chunk": a.chunk, "prompt_tokens": st["prompt_tokens"], "prefill_cpu_s": spent["cpu"],
            "prefill_wall_s": spent["wall"], "peak_rss_bytes": peak_rss_bytes(), "kv_bytes": st["kv_bytes"],
            "prefill_buffer_bytes": info["prefill_buffer_bytes"], "decode_ms_per_token": st["decode_ms_per_token"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/kvtool-bench-long-context")
    ap.add_argument("--export", default=None, help="default: <workdir>/ov_w4_stateful_p20480")
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--chunks", default="0,256,512,1024")
    ap.add_argument("--kv", default="g-KC128VT128")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--question", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.export = a.export or str(Path(a.workdir) / "ov_w4_stateful_p20480")
    if a.child:
        print(json.dumps(child(a)))
        return 0
    rows = []
    for n in (int(x) for x in a.lengths.split(",")):
        q = Path(a.workdir) / f"question_{n}.txt"
        if not q.is_file():
            print(f"{q}: missing; run bench/long_context.py --lengths {n} first", file=sys.stderr)
            return 2
        for c in (int(x) for x in a.chunks.split(",")):
            cmd = [sys.executable, __file__, "--child", "--export", a.export, "--question", str(q), "--chunk",
                   str(c), "--kv", a.kv, "--bits", str(a.bits), "--new-tokens", str(a.new_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            row = {"length": n, **json.loads(out.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{n} chunk {c}: {row['prompt_tokens']} tokens, prefill {row['prefill_cpu_s']:.2f} CPU s "
                  f"({row['prefill_wall_s']:.1f} s wall), peak {row['peak_rss_bytes'] / 2**20:,.0f} MiB, "
                  f"buffer {row['prefill_buffer_bytes'] / 2**20:.1f} MiB, kv {row['kv_bytes'] / 2**20:.1f} MiB",
                  flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"kv": a.kv, "bits": a.bits, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
