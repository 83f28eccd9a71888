"""Slow opt-in benchmark (issue 14): a full real-shape checkpoint made, exported and decoded, one command.

Steps, each in its own process under ``/usr/bin/time -v`` (wall, user+sys CPU seconds, maximum resident set),
with the 1-minute load average before and after (the development machine is shared):

1. ``kvtool models make SHAPE CKPT [--layers N]`` — random weights, the published config (skipped when CKPT
   already holds a checkpoint);
2. ``kvtool export CKPT -o EXPORT --wbits 4`` — OpenVINO int4, stateful default (skipped with ``--reuse``
   when EXPORT holds an export); reports peak RSS, its ratio to the checkpoint's bytes and the output's size;
3. for each ``--kv`` configuration, ``kvtool run EXPORT --image IMG --prompt Q --max-new-tokens N --json``
   on one prompt of about ``--prompt-tokens`` tokens (a random image plus ``bench/long_context.py``'s filler
   text, counted with the export's own processor and the conversation passed to ``kvtool run``). From
   ``run --json``: peak RSS (the child's own VmHWM, ``kvtool.memory``), time to first token (preprocessing
   + prefill), decode ms/token, KV bytes held (and the fp16 equivalent), the engine's class, its
   ``prefill_chunk`` and ``prefill_buffer_bytes`` (the chunked prefill's transient exact K/V copy); the whole
   ``run --json`` is kept as ``WORKDIR/run-KV.json``.

    python bench/real_shape.py --shape llava-1.5-7b --workdir /tmp/real-shape --json out.json
    python bench/real_shape.py --shape llava-1.5-7b --layers 2 --prompt-tokens 1024   # a quick check

The full ``llava-1.5-7b`` needs ~13.5 GiB of disk for the checkpoint, ~4 GiB for the export and an hour of
two CPU cores; ``--clean`` deletes both at the end. It measures; it does not compare with another exporter
(``bench/export.py --vs-optimum`` does) and does not judge accuracy (random weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

KV_CONFIGS = {  # name -> kvtool run options
    "g-KC128VT128-2b": ["--kv", "g-KC128VT128", "--kv-bits", "2"],
    "g-KC128VT128-4b": ["--kv", "g-KC128VT128", "--kv-bits", "4"],
    "fp16": ["--kv", "fp16"],
}
CONVERSATION = "chat_template"  # the prompt is counted with it and kvtool run is told to use it


def kvtool_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvtool.cli", *args]


def timed(cmd: list[str]) -> tuple[dict, str]:
    """Run ``cmd`` under ``/usr/bin/time -v``: (wall/CPU seconds, peak RSS, load averages; its stdout)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    fields = dict(line.strip().rsplit(": ", 1) for line in res.stderr.splitlines() if ": " in line)
    if res.returncode != 0:
        killed = "signal 9" in res.stderr or res.returncode in (-9, 137)
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {res.returncode}{', killed: out of memory?' if killed else ''}"
                           f", peak {fields.get('Maximum resident set size (kbytes)', '?')} kB):\n{res.stderr[-3000:]}")
    cpu = float(fields["User time (seconds)"]) + float(fields["System time (seconds)"])
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "time_v_peak_rss_gib": round(int(fields["Maximum resident set size (kbytes)"]) / 2**20, 2),
            "loadavg_1min": [round(load0, 1), round(os.getloadavg()[0], 1)]}, res.stdout


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_image(path: Path, side: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray((np.random.default_rng(seed).random((side, side, 3)) * 255).astype("uint8")).save(path)


def make_question(export: Path, image: Path, n_tokens: int) -> tuple[str, int]:
    """Filler text + ``long_context.QUESTION_TAIL`` whose prompt (``CONVERSATION``, image tokens included) is
    the longest not above ``n_tokens``; returns (question, its prompt's token count)."""
    from long_context import FILLER, QUESTION_TAIL

    from kvtool.runtime.lean_processor import load_lean_processor
    from kvtool.runtime.preprocess import load_images, prepare_inputs
    from kvtool.runtime.processing import load_processor

    proc, img = load_lean_processor(export) or load_processor(export), load_images([str(image)])
    words = (FILLER * 4).split()

    def text(n: int) -> str:
        return " ".join((words * (n // len(words) + 1))[:n] + [QUESTION_TAIL])

    def count(n: int) -> int:
        return prepare_inputs(proc, img, text(n), CONVERSATION).n_tokens

    lo, hi = 0, 64
    if count(0) > n_tokens:
        return text(0), count(0)
    while count(hi) <= n_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= n_tokens else (lo, mid)
    return text(lo), count(lo)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llava-1.5-7b", help="kvtool models make NAME (a real shape).")
    ap.add_argument("--layers", type=int, help="Decoder layers (default: all, as published).")
    ap.add_argument("--workdir", default="/tmp/kvtool-real-shape")
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=336, help="Side of the random square image (pixels).")
    ap.add_argument("--kv", default="g-KC128VT128-2b,fp16", help="Comma list of " + ", ".join(KV_CONFIGS) + ".")
    ap.add_argument("--checkpoint", help="An existing checkpoint of SHAPE to use (default: made in the workdir).")
    ap.add_argument("--reuse", action="store_true", help="Keep an export already in the workdir.")
    ap.add_argument("--clean", action="store_true", help="Delete the checkpoint and the export at the end.")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    kvs = a.kv.split(",")
    bad = [k for k in kvs if k not in KV_CONFIGS]
    if bad:
        raise SystemExit(f"--kv {','.join(bad)}: expected names from {', '.join(KV_CONFIGS)}")

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Path(a.checkpoint) if a.checkpoint else work / f"{a.shape}-l{a.layers or 'all'}"
    export = work / f"{ckpt.name}-ov-w{a.wbits}"
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                    "shape": a.shape, "layers": a.layers, "steps": {}, "runs": []}

    def save() -> None:
        if a.json_out:  # after every step: an interrupted run keeps what it measured
            Path(a.json_out).write_text(json.dumps(result, indent=2) + "\n")

    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if not a.checkpoint and not (ckpt / "model.safetensors.index.json").is_file():
        say(f"make {a.shape} -> {ckpt}")
        if ckpt.exists():
            shutil.rmtree(ckpt)
        result["steps"]["make"], _ = timed(kvtool_cmd("models", "make", a.shape, str(ckpt),
                                                      *(["--layers", str(a.layers)] if a.layers else [])))
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    result["checkpoint_gib"] = round(ckpt_bytes / 2**30, 3)
    save()

    if not (a.reuse and (export / "kvtool.json").is_file()):
        say(f"export {ckpt} -> {export} (--wbits {a.wbits})")
        if export.exists():
            shutil.rmtree(export)
        row, _ = timed(kvtool_cmd("export", str(ckpt), "-o", str(export), "--wbits", str(a.wbits)))
        row["peak_rss_vs_checkpoint"] = round(row["time_v_peak_rss_gib"] * 2**30 / ckpt_bytes, 2)
        row["output_gib"] = round(dir_bytes(export) / 2**30, 3)
        result["steps"]["export"] = row
        say(f"export: {row}")
        save()

    image = work / f"image{a.image_size}.png"
    write_image(image, a.image_size)
    question, n_prompt = make_question(export, image, a.prompt_tokens)
    result["prompt_tokens_counted"] = n_prompt
    for kv in kvs:
        say(f"run {kv} on a {n_prompt}-token prompt")
        row, out = timed(kvtool_cmd("run", str(export), "--image", str(image), "--prompt", question,
                                    "--conversation", CONVERSATION, "--max-new-tokens", str(a.new_tokens),
                                    *KV_CONFIGS[kv], "--json"))
        res = json.loads(out[out.index("{"):])
        st, eng = res["stats"], res["pipeline"]["engine"]
        row.update(kv=kv, engine=eng["name"], prompt_tokens=st["prompt_tokens"], new_tokens=st["new_tokens"],
                   peak_rss_gib=round(st["peak_rss_bytes"] / 2**30, 3),
                   ttft_ms=round(st["preprocess_ms"] + st["prefill_ms"], 1), prefill_ms=round(st["prefill_ms"], 1),
                   decode_ms_per_token=round(st["decode_ms_per_token"], 1), kv_bytes=st["kv_bytes"],
                   kv_fp16_bytes=st["kv_fp16_bytes"], kv_work_bytes=st["kv_work_bytes"], kv_dtype=st.get("kv_dtype"),
                   prefill_chunk=eng.get("prefill_chunk"), prefill_buffer_bytes=eng.get("prefill_buffer_bytes"))
        (work / f"run-{kv}.json").write_text(json.dumps(res, indent=2) + "\n")  # the whole run --json, kept
        result["runs"].append(row)
        say(f"run: {row}")
        save()

    if a.clean:
        shutil.rmtree(export, ignore_errors=True)
        if not a.checkpoint:
            shutil.rmtree(ckpt, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
