"""Decode-speed benchmark of the runtime: KV cache inside the graph (OpenVINO stateful, the anchor) vs held
outside by kvtool (fp16 and g-KC128VT128 2-bit packed) vs the torch engine.

A mid-size random LLaVA-style model (8 layers, hidden 1024, 8 heads, int4 weights; a 96 px image = 576 image
tokens, ~600 prompt tokens) generates 128 new tokens. Each configuration runs in its own process (so peak
RSS is its own), is warmed up once, then timed once per round; the configurations take turns for
``--rounds`` rounds (so load from other processes on a shared machine spreads over all of them) and medians
over rounds are reported. Levers of the kvtool runs are toggled by configuration so that what each gives is
measured side by side.

    python bench/decode.py --workdir /tmp/kvtool-bench --rounds 3 [--only a_ov_stateful_f16,b_kvtool_fp16] [--json out.json]

The model and both exports are built once into ``--workdir`` (offline, ``kvtool.models`` + ``kvtool.export``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = dict(hidden=1024, layers=8, heads=8, kv_heads=8, intermediate=2816, image_size=96, patch_size=4,
             vocab_size=1024, max_positions=2048)
QUESTION = "Describe everything you can see in this picture, with as much detail as you can."

# name -> (export, pipeline kwargs, what it shows)
CONFIGS: dict[str, tuple[str, dict, str]] = {
    "a_ov_stateful_f16": ("stateful", dict(kv="fp16"), "(a) anchor: stateful export, KV inside, f16 KV"),
    "a_ov_stateful_u8": ("stateful", dict(kv="ov-u8"), "(a') stateful, OpenVINO's default u8 KV"),
    "b_naive": ("stateless", dict(kv="fp16", edit_graph=False), "(b0) stateless as exported, f32 KV in/out, "
                "full present copied out"),
    "b_kvtool_f32kv": ("stateless", dict(kv="fp16"), "(b1) + new-only outputs, token-major zero-copy past"),
    "b_kvtool_fp16": ("stateless", dict(kv="fp16", kv_precision="f16"), "(b) + f16 KV element type"),
    "c_kvtool_kc128vt128_2b": ("stateless", dict(kv="g-KC128VT128", k_bits=2, v_bits=2, kv_precision="f16"),
                               "(c) g-KC128VT128 2-bit packed, incremental dequantization"),
    "b_state_fp16": ("stateful", dict(kv="fp16", kv_owner="kvtool"),
                     "(b*) stateful graph, kvtool owns the cache: fp16 mirror, states never rewritten"),
    "c_state_kc128vt128_2b": ("stateful", dict(kv="g-KC128VT128", k_bits=2, v_bits=2, kv_owner="kvtool"),
                              "(c*) stateful graph, g-KC128VT128 K2V2 packed, kvtool rewrites the states"),
    "b_paged_fp16": ("stateful", dict(kv="fp16", kv_owner="paged"),
                     "(b+) PagedAttention graph, caller-owned cache blocks, kvtool's fp16 mirror"),
    "c_paged_kc128vt128_2b": ("stateful", dict(kv="g-KC128VT128", k_bits=2, v_bits=2, kv_owner="paged"),
                              "(c+) PagedAttention, g-KC128VT128 K2V2 packed, changed tokens written in place"),
    "d_torch": ("model", dict(backend="torch", kv="fp16"), "(d) torch engine (fp32 HF model)"),
}


def build(workdir: Path) -> dict[str, Path]:
    from kvtool.export import ExportConfig, export_model
    from kvtool.models import make_tiny_model

    paths = {"model": workdir / "model", "stateless": workdir / "ov_w4_stateless",
             "stateful": workdir / "ov_w4_stateful"}
    if not (paths["model"] / "config.json").is_file():
        make_tiny_model("tiny-llava", paths["model"], **SIZES)
    for key, stateful in (("stateless", False), ("stateful", True)):
        if not (paths[key] / "kvtool.json").is_file():
            export_model(ExportConfig(model=str(paths["model"]), output=str(paths[key]), backend="openvino",
                                      wbits=4, group_size=128, dtype="fp16", stateful=stateful))
    return paths


def image():
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((96, 96, 3)) * 255).astype("uint8"))


def run_one(name: str, workdir: Path, new_tokens: int) -> dict:
    from kvtool.runtime import VLMPipeline

    export, kwargs, what = CONFIGS[name]
    paths = build(workdir)
    pipe = VLMPipeline.load(paths[export], **kwargs)
    img = image()
    pipe.generate(img, QUESTION, max_new_tokens=8, ignore_eos=True)  # warm-up
    st = pipe.generate(img, QUESTION, max_new_tokens=new_tokens, ignore_eos=True).stats
    return {"name": name, "what": what, **st, "engine": pipe.info()["engine"]}


def summarize(name: str, rows: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in rows) for k in ("decode_ms_per_token", "prefill_ms", "peak_rss_bytes")}
    last = rows[-1]
    return {"name": name, "what": last["what"], **med, "decode_ms_all": [r["decode_ms_per_token"] for r in rows],
            "prompt_tokens": last["prompt_tokens"], "new_tokens": last["new_tokens"], "kv_bytes": last["kv_bytes"],
            "kv_fp16_bytes": last["kv_fp16_bytes"], "engine": last["engine"]}


def interleaved(workdir: Path, names: list[str], new_tokens: int) -> list[dict]:
    """All configurations in one process, taking turns step by step after their prefill: every decode step of
    every configuration sees the same machine load (the robust comparison on a shared machine)."""
    import numpy as np

    from kvtool.runtime import VLMPipeline
    from kvtool.runtime.preprocess import load_images, prepare_inputs

    paths = build(workdir)
    pipes = {n: VLMPipeline.load(paths[CONFIGS[n][0]], **CONFIGS[n][1]) for n in names}
    toks, times = {}, {n: [] for n in names}
    for n, p in pipes.items():
        prep = prepare_inputs(p.processor, load_images(image()), QUESTION)
        p.engine.start(prep, new_tokens)
        toks[n] = int(np.argmax(p.engine.run_prompt(0, prep.n_tokens)))
    for _ in range(new_tokens):
        for n, p in pipes.items():
            t0 = time.perf_counter()
            toks[n] = int(np.argmax(p.engine.run_token(toks[n])))
            times[n].append((time.perf_counter() - t0) * 1e3)
    return [{"name": n, "step_ms_median": statistics.median(v), "step_ms_p10": float(np.percentile(v, 10))}
            for n, v in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/kvtool-bench-decode")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--only", default=None, help="comma-separated config names")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--interleaved", action="store_true",
                    help="also time decode steps of all non-torch configs taking turns in one process")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one config, JSON on stdout
    a = ap.parse_args()
    workdir = Path(a.workdir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.one:
        print("RESULT " + json.dumps(run_one(a.one, workdir, a.new_tokens)))
        return
    build(workdir)
    names = a.only.split(",") if a.only else list(CONFIGS)
    rows: dict[str, list[dict]] = {n: [] for n in names}
    from tqdm import tqdm

    for _, name in tqdm([(r, n) for r in range(a.rounds) for n in names], desc="rounds x configs"):
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--workdir", str(workdir),
                               "--new-tokens", str(a.new_tokens)], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[name].append(json.loads(line[0][7:]))
    results = [summarize(n, rows[n]) for n in names if rows[n]]
    anchor = next((r for r in results if r["name"] == "a_ov_stateful_f16"), None)
    ref_b = next((r for r in results if r["name"] == "b_kvtool_fp16"), None)
    print(f"\n{'config':<26}{'ms/token':>10}{'x anchor':>10}{'prefill ms':>12}{'KV MiB':>9}{'x (b) KV':>10}"
          f"{'RSS MiB':>9}  what")
    for r in results:
        ratio = r["decode_ms_per_token"] / anchor["decode_ms_per_token"] if anchor else float("nan")
        kv_ratio = r["kv_bytes"] / ref_b["kv_bytes"] if ref_b else float("nan")
        r["x_anchor"], r["x_b_kv"] = ratio, kv_ratio
        print(f"{r['name']:<26}{r['decode_ms_per_token']:>10.2f}{ratio:>10.2f}{r['prefill_ms']:>12.1f}"
              f"{r['kv_bytes'] / 2**20:>9.2f}{kv_ratio:>10.3f}{r['peak_rss_bytes'] / 2**20:>9.0f}  {r['what']}")
    inter = []
    if a.interleaved:
        inter = interleaved(workdir, [n for n in names if n != "d_torch"], a.new_tokens)
        base = next((r["step_ms_median"] for r in inter if r["name"] == "a_ov_stateful_f16"), float("nan"))
        print(f"\ninterleaved decode steps (same load for all): {'median ms':>10}{'p10 ms':>8}{'x anchor':>10}")
        for r in inter:
            r["x_anchor"] = r["step_ms_median"] / base
            print(f"  {r['name']:<44}{r['step_ms_median']:>10.2f}{r['step_ms_p10']:>8.2f}{r['x_anchor']:>10.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"sizes": SIZES, "rounds": a.rounds, "new_tokens": a.new_tokens,
                                            "results": results, "interleaved": inter}, indent=2) + "\n")


if __name__ == "__main__":
    main()
