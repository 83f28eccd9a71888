"""Long-context benchmark (issue 13): kvtool's runtime vs openvino.genai's ``VLMPipeline`` on the same export.

A mid-size random LLaVA-1.5-style model (LM 8 layers, hidden 1024, 8 KV heads x 128, int4 weights, stateful
OpenVINO export with tokenizer IRs, made offline with ``kvtool.models`` + ``kvtool.export``) answers an image
(96 px = 576 image tokens) plus a long text padded to reach each prompt length. Configurations:

- ``genai_f16`` / ``genai_u8`` / ``genai_u4``: ``openvino_genai.VLMPipeline(export, "CPU", KV_CACHE_PRECISION=...)``
  (u4: ``KEY_CACHE_PRECISION`` / ``VALUE_CACHE_PRECISION`` = u4, as OpenVINO's CPU plugin names them), with
  prefix caching off (its default PagedAttention backend otherwise reuses the warm-up's image prefix);
- ``kvtool_fp16_paged``: kvtool fp16 on its PagedAttention engine (``kv_owner="paged"``), genai's graph form;
- ``kvtool_fp16``: ``kvtool.runtime.VLMPipeline.load(export, kv="fp16")`` (whatever engine ``load_engine`` picks);
- ``kvtool_fp16_onecall`` / ``kvtool_fp16_chunk512`` / ``kvtool_fp16_chunk2048``: fp16 on the stateful engine
  (``kv_owner="openvino"``) with ``prefill_chunk`` 0 (one call) / 512 / 2048;
- ``kvtool_kc128vt128_{2,4}b`` / ``kvtool_kt128vc128_{2,4}b``: the g-KC128VT128 / g-KT128VC128 schemes at 2
  and 4 bits, engine chosen by ``load_engine`` (``--kv-owner`` forces one for the quantized configurations).

Every (configuration, length) runs in its own child process, warmed up once on a short prompt, then timed on
the long one; configurations take turns for ``--rounds`` rounds and medians over rounds are reported. Per
row: decode ms/token (genai: ``perf_metrics.get_tpot``; kvtool: ``stats["decode_ms_per_token"]``), time to
first token (genai: ``get_ttft``; kvtool: preprocessing + prefill, the same span), the child's own peak RSS
(VmHWM through ``kvtool.memory.peak_rss_bytes``, not ``ru_maxrss``), RSS after load, KV bytes held (kvtool:
its stats; genai: computed from the precision, as it does not report it) and ``kv_work_bytes``. A 256-token
row per configuration gives "KV-attributable memory" = peak RSS minus that configuration's at 256 tokens.
Issue 13's targets are evaluated as ratios at ``--target-tokens`` (8192) and reported met / missed.

    python bench/long_context.py --quick                    # 256/2k, 1 round, 16 new tokens, 4 configs
    python bench/long_context.py --lengths 256,2048,8192,16384 --rounds 3 --json out.json
    python bench/long_context.py --markdown out.json        # re-print a saved run
    python bench/long_context.py --model qwen2-vl --configs genai_f16,kvtool_fp16_onecall,kvtool_fp16_chunk512 ...
                                                            # the same LM shape as Qwen2-VL (M-RoPE)

It does not measure quant_ops' pack/unpack throughput (``bench/quant_ops.py`` does).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = dict(hidden=1024, layers=8, heads=8, kv_heads=8, intermediate=2816, image_size=96, patch_size=4,
             vocab_size=1024)
# --model: the tiny-model builder and its sizes. Qwen2-VL gets the same LM shape (its M-RoPE sections are then
# 16/24/24 of head dim 128, as published); its image side is 2 x image_size = 192 px after the processor's
# resize (min = max pixels), i.e. (192 / 4 / 2)^2 = 576 image tokens, as LLaVA's 96 px / patch 4.
MODELS = {"llava": ("tiny-llava", SIZES), "qwen2-vl": ("tiny-qwen2-vl", SIZES)}
FILLER = ("The red circle is left of the blue square, and the green triangle sits above the yellow star "
          "near the bottom of the image. ")
QUESTION_TAIL = "Describe everything you can see in this picture, with as much detail as you can."

# name -> (kind, options); genai options are VLMPipeline properties, kvtool options are VLMPipeline.load's
CONFIGS: dict[str, tuple[str, dict]] = {
    "genai_f16": ("genai", {"KV_CACHE_PRECISION": "f16"}),
    "genai_u8": ("genai", {"KV_CACHE_PRECISION": "u8"}),
    "genai_u4": ("genai", {"KEY_CACHE_PRECISION": "u4", "VALUE_CACHE_PRECISION": "u4"}),
    "kvtool_fp16": ("kvtool", dict(kv="fp16")),
    "kvtool_fp16_paged": ("kvtool", dict(kv="fp16", kv_owner="paged")),
    # the stateful engine (kv_owner=openvino) in one prefill call / in chunks of 512 (Qwen2-VL fp16 default: paged)
    "kvtool_fp16_onecall": ("kvtool", dict(kv="fp16", kv_owner="openvino", prefill_chunk=0)),
    "kvtool_fp16_chunk512": ("kvtool", dict(kv="fp16", kv_owner="openvino", prefill_chunk=512)),
    "kvtool_fp16_chunk2048": ("kvtool", dict(kv="fp16", kv_owner="openvino", prefill_chunk=2048)),
    "kvtool_kc128vt128_2b": ("kvtool", dict(kv="g-KC128VT128", k_bits=2, v_bits=2)),
    "kvtool_kc128vt128_4b": ("kvtool", dict(kv="g-KC128VT128", k_bits=4, v_bits=4)),
    "kvtool_kt128vc128_2b": ("kvtool", dict(kv="g-KT128VC128", k_bits=2, v_bits=2)),
    "kvtool_kt128vc128_4b": ("kvtool", dict(kv="g-KT128VC128", k_bits=4, v_bits=4)),
    # the packed engine's chunked prefill with the exact-prefix attention in the graph's SDPA or in the op
    "kvtool_kc128vt128_2b_graphprefix": ("kvtool", dict(kv="g-KC128VT128", k_bits=2, v_bits=2,
                                                        prefix_attention="graph")),
    "kvtool_kc128vt128_2b_opprefix": ("kvtool", dict(kv="g-KC128VT128", k_bits=2, v_bits=2, prefix_attention="op")),
    # the packed engine's layer-major exact prefill (ov_layers; the default where the op prefix runs; docs/BENCHMARKS.md)
    "kvtool_kc128vt128_2b_layer": ("kvtool", dict(kv="g-KC128VT128", k_bits=2, v_bits=2, prefill_order="layer")),
    "kvtool_kt128vc128_2b_layer": ("kvtool", dict(kv="g-KT128VC128", k_bits=2, v_bits=2, prefill_order="layer")),
    # the chunk-major order (all layers' exact buffers at once; the default before layer-major)
    "kvtool_kc128vt128_2b_chunk": ("kvtool", dict(kv="g-KC128VT128", k_bits=2, v_bits=2, prefill_order="chunk")),
}
QUICK = dict(lengths="256,2048", rounds=1, new_tokens=16,
             configs="genai_f16,genai_u4,kvtool_fp16,kvtool_kc128vt128_2b")
WARMUP_WORDS = 8  # warm-up prompt: the image plus a few words (compiles kernels, allocates little)
BASE_TOKENS = 256  # the row KV-attributable memory is measured against


# --- model --------------------------------------------------------------------------------------------------
def build(workdir: Path, max_tokens: int, model_name: str = "llava") -> Path:
    """The stateful int4 OpenVINO export in ``workdir`` (built once, offline); positions cover ``max_tokens``;
    ``model_name``: a ``MODELS`` key (LLaVA's folders keep their old names)."""
    from kvtool.export import ExportConfig, export_model
    from kvtool.models import make_tiny_model

    positions = max(20480, -(-max_tokens // 4096) * 4096)
    tag = "" if model_name == "llava" else f"{model_name}_"
    model, out = workdir / f"{tag}model_p{positions}", workdir / f"{tag}ov_w4_stateful_p{positions}"
    if not (model / "config.json").is_file():
        tiny, sizes = MODELS[model_name]
        make_tiny_model(tiny, model, max_positions=positions, **sizes)
    if not (out / "kvtool.json").is_file():
        export_model(ExportConfig(model=str(model), output=str(out), backend="openvino", wbits=4, group_size=128,
                                  dtype="fp16", stateful=True))
    return out


def decode_ab_parser(description: str, kv: str) -> argparse.ArgumentParser:
    """The options of the in-process decode A/B scripts over this bench's export (``layer_decode.py``,
    ``op_append.py``): work directory, prompt tokens, kvtool scheme and bits, interleaved blocks and steps."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--workdir", default="/tmp/kvtool-bench-long-context", help="long_context.py's work directory")
    ap.add_argument("--tokens", type=int, default=2048, help="prompt tokens (a question_<N>.txt of long_context.py)")
    ap.add_argument("--kv", default=kv)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=16, help="interleaved blocks per arm")
    ap.add_argument("--steps", type=int, default=5, help="decode steps per block")
    ap.add_argument("--json", default=None)
    return ap


def bench_pipeline(a, **load_kwargs):
    """``(pipeline, question)`` for a decode A/B script's options ``a`` (``decode_ab_parser``): kvtool's
    ``VLMPipeline`` on the export this bench built in ``a.workdir`` with ``a.kv`` at ``a.bits`` (plus
    ``load_kwargs``), and the question text of ``a.tokens`` prompt tokens; None, with a one-line message on
    stderr, where they have not been built yet."""
    from kvtool.runtime import VLMPipeline

    work = Path(a.workdir)
    export = next(work.glob("ov_w4_stateful_p*"), None)
    qfile = work / f"question_{a.tokens}.txt"
    if export is None or not qfile.is_file():
        print(f"{work}: no export or {qfile.name}; run bench/long_context.py --lengths {a.tokens} first",
              file=sys.stderr)
        return None
    return VLMPipeline.load(export, kv=a.kv, k_bits=a.bits, v_bits=a.bits, **load_kwargs), qfile.read_text()


def report_ab(a, result: dict, arms: list[str], columns: dict[str, str], digits: dict[str, int] | None = None) -> int:
    """Print a decode A/B script's Markdown table (one row per arm of ``result[arm][column]``, headed by
    ``columns``' titles, with ``a.kv``, ``a.bits``, the tokens and the load), save ``result`` to ``a.json`` when
    asked; returns the exit code (0)."""
    digits = digits or {}
    print(f"| arm | {' | '.join(columns.values())} |  ({a.kv} {a.bits}-bit, {result['tokens']} tokens, load "
          f"{result['load']:.1f})\n|---|{'---|' * len(columns)}")
    for arm in arms:
        print(f"| {arm} | " + " | ".join(f"{result[arm][c]:.{digits.get(c, 2)}f}" for c in columns) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


def image(seed: int = 0):
    """The prompt's 96 px random image; the warm-up uses another seed, so that no prefix of the timed prompt
    beyond the template's first tokens was seen before (openvino.genai caches prefixes)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((96, 96, 3)) * 255).astype("uint8"))


def make_question(export: Path, n_tokens: int) -> tuple[str, int]:
    """A question of filler text plus ``QUESTION_TAIL`` whose prompt (chat template + image tokens) is as
    close to ``n_tokens`` as word granularity allows; returns (question, its prompt's token count)."""
    from kvtool.runtime.lean_processor import load_lean_processor
    from kvtool.runtime.preprocess import load_images, prepare_inputs
    from kvtool.runtime.processing import load_processor

    proc, img = load_lean_processor(export) or load_processor(export), load_images(image())
    conv = "chat_template"  # what both runtimes apply here (VLMPipeline.load's default; genai's only one)
    words = (FILLER * 4).split()

    def text(n_words: int) -> str:
        reps = words * (n_words // len(words) + 1)
        return " ".join(reps[:n_words] + [QUESTION_TAIL])

    def count(n_words: int) -> int:
        return prepare_inputs(proc, img, text(n_words), conv).n_tokens

    base = count(0)
    if n_tokens <= base:
        return text(0), base
    per_word = (count(400) - base) / 400
    lo = hi = max(0, int((n_tokens - base) / per_word))
    while count(lo) > n_tokens and lo > 0:
        lo = max(0, lo - 16)
    while count(hi) < n_tokens:
        hi += 16
    while hi - lo > 1:  # largest word count whose prompt stays within n_tokens
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= n_tokens else (lo, mid)
    return text(lo), count(lo)


# --- one child ----------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _kv_fp16_bytes(n_tokens: int) -> int:
    return 2 * SIZES["layers"] * SIZES["kv_heads"] * (SIZES["hidden"] // SIZES["heads"]) * n_tokens * 2


def run_genai(export: Path, props: dict, question: str, warm_q: str, new_tokens: int) -> dict:
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    from kvtool.memory import peak_rss_bytes
    from kvtool.runtime.kvspec import make_kv_spec, ov_kv_nbytes

    sched = og.SchedulerConfig()
    sched.enable_prefix_caching = False  # else a prompt sharing a prefix with an earlier one skips its prefill
    t0 = time.perf_counter()
    pipe = og.VLMPipeline(str(export), "CPU", scheduler_config=sched, **props)
    load_s = time.perf_counter() - t0
    rss_load, hwm_load = _rss_bytes(), peak_rss_bytes()
    def gen(q: str, n: int, seed: int):
        cfg = og.GenerationConfig()
        cfg.max_new_tokens, cfg.do_sample, cfg.ignore_eos = n, False, True
        return pipe.generate(q, images=[ov.Tensor(np.array(image(seed))[None])], generation_config=cfg)

    gen(warm_q, 4, 1)
    marks: list[float] = []  # process CPU seconds at each generated token (the first: prefill done)

    class TokenMarks(og.StreamerBase):  # write() gets every token id as it is generated (no detokenizing)
        def write(self, token):
            marks.append(time.process_time())
            return og.StreamingStatus.RUNNING

        def end(self):
            pass

    streamer = TokenMarks()

    c0 = time.process_time()
    cfg = og.GenerationConfig()
    cfg.max_new_tokens, cfg.do_sample, cfg.ignore_eos = new_tokens, False, True
    res = pipe.generate(question, images=[ov.Tensor(np.array(image(0))[None])], generation_config=cfg,
                        streamer=streamer)
    c1 = time.process_time()
    pm = res.perf_metrics
    n_prompt = int(pm.get_num_input_tokens())
    prec = props.get("KV_CACHE_PRECISION") or props.get("KEY_CACHE_PRECISION")
    kv_bytes = (_kv_fp16_bytes(n_prompt + new_tokens) if prec == "f16" else ov_kv_nbytes(
        make_kv_spec("ov-u8" if prec == "u8" else "ov-u4"), SIZES["layers"], SIZES["kv_heads"],
        SIZES["hidden"] // SIZES["heads"], n_prompt + new_tokens))
    return {"prompt_tokens": n_prompt, "new_tokens": int(pm.get_num_generated_tokens()),
            "decode_ms_per_token": float(pm.get_tpot().mean), "ttft_ms": float(pm.get_ttft().mean),
            "peak_rss_bytes": peak_rss_bytes(), "rss_after_load_bytes": rss_load, "hwm_after_load_bytes": hwm_load,
            "load_s": load_s, "kv_bytes": int(kv_bytes), "kv_bytes_source": "computed from the precision",
            "kv_work_bytes": 0, "engine": {"genai": props}, **_cpu_split(c0, marks[0] if marks else None, c1,
                                                                        int(pm.get_num_generated_tokens()))}


def _cpu_split(c0: float, first: float | None, c1: float, new_tokens: int) -> dict:
    """Process CPU seconds (all threads, ``time.process_time``) of the time to first token (from the call to
    the first token) and per decoded token after it: on a shared machine, the figures wall time cannot give."""
    if first is None or new_tokens < 2:
        return {}
    return {"ttft_cpu_s": first - c0, "decode_cpu_ms_per_token": (c1 - first) * 1e3 / (new_tokens - 1)}


def run_kvtool(export: Path, kwargs: dict, question: str, warm_q: str, new_tokens: int) -> dict:
    from kvtool.memory import peak_rss_bytes
    from kvtool.runtime import VLMPipeline

    t0 = time.perf_counter()
    pipe = VLMPipeline.load(export, **kwargs)
    load_s = time.perf_counter() - t0
    rss_load, hwm_load = _rss_bytes(), peak_rss_bytes()
    pipe.generate(image(1), warm_q, max_new_tokens=4, ignore_eos=True)
    eng, marks = pipe.engine, []
    first_token = eng.run_token  # the first call comes right after the first token is chosen

    def run_token(tok):
        if not marks:
            marks.append(time.process_time())
        return first_token(tok)

    eng.run_token = run_token
    c0 = time.process_time()
    st = pipe.generate(image(0), question, max_new_tokens=new_tokens, ignore_eos=True).stats
    c1 = time.process_time()
    info = pipe.info()
    heavy = sorted(m for m in ("torch", "transformers", "optimum", "nncf", "onnxruntime") if m in sys.modules)
    return {"prompt_tokens": st["prompt_tokens"], "new_tokens": st["new_tokens"],
            "decode_ms_per_token": st["decode_ms_per_token"],
            "ttft_ms": st.get("preprocess_ms", 0.0) + st["prefill_ms"], "prefill_ms": st["prefill_ms"],
            "peak_rss_bytes": st["peak_rss_bytes"], "peak_rss_end_bytes": peak_rss_bytes(),
            "rss_after_load_bytes": rss_load, "hwm_after_load_bytes": hwm_load, "load_s": load_s,
            "kv_bytes": st["kv_bytes"], "kv_bytes_source": "kvtool stats", "kv_work_bytes": st["kv_work_bytes"],
            "heavy_modules": heavy, **_cpu_split(c0, marks[0] if marks else None, c1, st["new_tokens"]),
            "engine": {k: info["engine"].get(k) for k in ("class", "kv_owner", "path", "attention_path", "route", "config",
                                                          "prefill_chunk", "prefix_attention", "prefill_order",
                                                          "prefill_buffer_bytes")
                       if isinstance(info.get("engine"), dict) and k in info["engine"]}}


def run_child(a) -> dict:
    kind, opts = CONFIGS[a.one]
    export = Path(a.export)
    question = Path(a.question_file).read_text(encoding="utf-8")
    warm_q = " ".join(FILLER.split()[:WARMUP_WORDS])
    if kind == "genai":
        row = run_genai(export, opts, question, warm_q, a.new_tokens)
    else:
        kw = dict(opts)
        if a.kv_owner and kw["kv"] != "fp16":
            kw["kv_owner"] = a.kv_owner
        if a.kv_owner_fp16 and a.one == "kvtool_fp16":
            kw["kv_owner"] = a.kv_owner_fp16
        if a.prefill_chunk is not None and kw["kv"] == "fp16":
            kw["prefill_chunk"] = a.prefill_chunk
        row = run_kvtool(export, kw, question, warm_q, a.new_tokens)
    return {"name": a.one, **row}


# --- parent -------------------------------------------------------------------------------------------------
METRICS = ("decode_ms_per_token", "ttft_ms", "peak_rss_bytes", "rss_after_load_bytes", "kv_bytes", "kv_work_bytes",
           "ttft_cpu_s", "decode_cpu_ms_per_token")


def summarize(rows: list[dict]) -> dict:
    last = rows[-1]
    med = {k: statistics.median(r[k] for r in rows) for k in METRICS if all(k in r for r in rows)}
    return {**{k: v for k, v in last.items() if k not in med}, **med, "rounds": len(rows),
            "decode_ms_all": [r["decode_ms_per_token"] for r in rows], "ttft_ms_all": [r["ttft_ms"] for r in rows]}


def _row(results: list[dict], name: str, length: int) -> dict | None:
    return next((r for r in results if r["name"] == name and r["length"] == length), None)


def _kv_attr(results: list[dict], name: str, length: int) -> float | None:
    r, b = _row(results, name, length), _row(results, name, BASE_TOKENS)
    return None if r is None or b is None else r["peak_rss_bytes"] - b["peak_rss_bytes"]


def targets(results: list[dict], at: int) -> list[dict]:
    """Issue 13's benchmark targets as ratios; a target whose rows are missing is reported as not measured."""
    out: list[dict] = []

    def ratio(what: str, num, den, limit: float, length: int) -> None:
        ok = num is not None and den not in (None, 0)
        val = num / den if ok else None
        out.append({"target": what, "tokens": length, "ratio": val, "limit": limit,
                    "status": "not measured" if val is None else ("met" if val <= limit else "missed")})

    def get(name: str, length: int, key: str):
        r = _row(results, name, length)
        return None if r is None else r[key]

    lengths = sorted({r["length"] for r in results if r["length"] != BASE_TOKENS})
    for q in ("kvtool_kc128vt128_2b", "kvtool_kt128vc128_2b"):
        if any(r["name"] == q for r in results):
            ratio(f"peak RSS {q} / genai_u4 <= 1.0", get(q, at, "peak_rss_bytes"),
                  get("genai_u4", at, "peak_rss_bytes"), 1.0, at)
            ratio(f"KV-attributable memory {q} / genai_f16 <= 0.2", _kv_attr(results, q, at),
                  _kv_attr(results, "genai_f16", at), 0.2, at)
    for n in sorted({2048, at} & set(lengths)) or [at]:
        ratio("peak RSS kvtool_fp16 / genai_f16 <= 1.1", get("kvtool_fp16", n, "peak_rss_bytes"),
              get("genai_f16", n, "peak_rss_bytes"), 1.1, n)
    ratio("TTFT kvtool_fp16 / genai_f16 <= 1.1", get("kvtool_fp16", at, "ttft_ms"), get("genai_f16", at, "ttft_ms"),
          1.1, at)
    for n in lengths:
        ratio("decode kvtool_fp16 / genai_f16 <= 1.0", get("kvtool_fp16", n, "decode_ms_per_token"),
              get("genai_f16", n, "decode_ms_per_token"), 1.0, n)
        for q in ("kvtool_kc128vt128_2b", "kvtool_kt128vc128_2b"):
            if any(r["name"] == q for r in results):
                ratio(f"decode {q} / genai_u4 <= 1.0", get(q, n, "decode_ms_per_token"),
                      get("genai_u4", n, "decode_ms_per_token"), 1.0, n)
    if 16384 in lengths:
        for q in ("kvtool_kc128vt128_2b", "kvtool_kt128vc128_2b"):
            if any(r["name"] == q for r in results):
                ratio(f"decode {q} / genai_f16 <= 0.8 (aim)", get(q, 16384, "decode_ms_per_token"),
                      get("genai_f16", 16384, "decode_ms_per_token"), 0.8, 16384)
    return out


def run(a) -> dict:
    from kvtool.memory import peak_rss_bytes

    lengths = sorted({int(x) for x in a.lengths.split(",")} | {BASE_TOKENS})
    names = a.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; expected some of {', '.join(CONFIGS)}")
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    export = build(workdir, max(lengths) + a.new_tokens + 64, a.model)
    questions: dict[int, Path] = {}
    for n in lengths:
        q, got = make_question(export, n)
        questions[n] = workdir / f"question_{n}.txt"
        questions[n].write_text(q, encoding="utf-8")
        print(f"prompt for {n} tokens: {got} tokens", file=sys.stderr)
    rows: dict[tuple[str, int], list[dict]] = {}
    failures: list[str] = []
    loads: list[float] = []
    jobs = [(r, n, name) for r in range(a.rounds) for n in lengths for name in names]
    for i, (r, n, name) in enumerate(jobs):
        loads.append(os.getloadavg()[0])
        cmd = [sys.executable, __file__, "--one", name, "--export", str(export), "--question-file",
               str(questions[n]), "--new-tokens", str(a.new_tokens)]
        if a.kv_owner:
            cmd += ["--kv-owner", a.kv_owner]
        if a.kv_owner_fp16:
            cmd += ["--kv-owner-fp16", a.kv_owner_fp16]
        if a.prefill_chunk is not None:
            cmd += ["--prefill-chunk", str(a.prefill_chunk)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if a.child_pythonpath:
            env["PYTHONPATH"] = a.child_pythonpath
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.child_timeout, env=env)
        except subprocess.TimeoutExpired:
            failures.append(f"{name} @ {n}: timed out after {a.child_timeout} s")
            continue
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
            failures.append(f"{name} @ {n}: exit {proc.returncode}: {tail}")
            print(f"[{i + 1}/{len(jobs)}] {name} @ {n}: FAILED {tail}", file=sys.stderr)
            continue
        row = json.loads(line[0][7:])
        rows.setdefault((name, n), []).append(row)
        if a.json:  # what is measured so far, in case the run is stopped
            partial = [{"length": m, **summarize(v)} for (nm, m), v in rows.items()]
            Path(a.json + ".partial").write_text(json.dumps({"results": partial, "failures": failures}, indent=2))
        print(f"[{i + 1}/{len(jobs)}] round {r} {name} @ {n}: ttft {row['ttft_ms']:.0f} ms, decode "
              f"{row['decode_ms_per_token']:.2f} ms/tok, peak {row['peak_rss_bytes'] / 2**20:.0f} MiB "
              f"({time.perf_counter() - t0:.0f} s, load {loads[-1]:.1f})", file=sys.stderr)
    results = [{"length": n, **summarize(rows[(name, n)])} for n in lengths for name in names if (name, n) in rows]
    for r in results:
        r["kv_attributable_bytes"] = _kv_attr(results, r["name"], r["length"])
    import platform

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": a.model,
            "sizes": MODELS[a.model][1], "rounds": a.rounds,
            "new_tokens": a.new_tokens, "lengths": lengths, "configs": names, "kv_owner": a.kv_owner,
            "child_pythonpath": a.child_pythonpath,
            "target_tokens": a.target_tokens, "load_average": {"min": min(loads, default=0.0),
                                                               "median": statistics.median(loads or [0.0]),
                                                               "max": max(loads, default=0.0)},
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "parent_peak_rss_bytes": peak_rss_bytes(), "results": results,
            "targets": targets(results, a.target_tokens), "failures": failures}


def merge(paths: list[str], target_tokens: int) -> dict:
    """Several saved runs as one (rows of later files replace rows of the same config and length), targets
    re-evaluated: for configurations measured in separate invocations (e.g. a before/after pair)."""
    runs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    rows: dict[tuple[str, int], dict] = {}
    for run_ in runs:
        for r in run_["results"]:
            rows[(r["name"], r["length"])] = r
    results = sorted(rows.values(), key=lambda r: (r["length"], r["name"]))
    for r in results:
        r["kv_attributable_bytes"] = _kv_attr(results, r["name"], r["length"])
    loads = [run_["load_average"] for run_ in runs]
    return {**runs[-1], "date": " / ".join(dict.fromkeys(run_["date"] for run_ in runs)), "merged_from": paths,
            "rounds": min(run_["rounds"] for run_ in runs), "configs": sorted({r["name"] for r in results}),
            "lengths": sorted({r["length"] for r in results}), "target_tokens": target_tokens,
            "load_average": {"min": min(x["min"] for x in loads), "median": statistics.median(x["median"] for x in loads),
                             "max": max(x["max"] for x in loads)},
            "results": results, "targets": targets(results, target_tokens),
            "failures": [f for run_ in runs for f in run_.get("failures", [])]}


def markdown(res: dict) -> str:
    mib = 2 ** 20
    la = res["load_average"]
    lines = [f"long context, {res['date']}: {res['rounds']} round(s), {res['new_tokens']} new tokens, load average "
             f"{la['min']:.1f}-{la['max']:.1f} (median {la['median']:.1f}) on {res['cpus']} CPUs", "",
             "| config | prompt tokens | decode ms/token | TTFT ms | peak RSS MiB | RSS after load MiB | "
             "KV-attributable MiB | KV held MiB | kv_work MiB | engine |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["results"], key=lambda r: (r["length"], r["name"])):
        attr = r.get("kv_attributable_bytes")
        eng = r.get("engine") or {}
        eng_s = eng.get("class") or eng.get("kv_owner") or ("genai" if "genai" in eng else
                                                            "stateful" if "config" in eng else "")
        lines.append(f"| {r['name']} | {r['prompt_tokens']:,} | {r['decode_ms_per_token']:.2f} | {r['ttft_ms']:,.0f} | "
                     f"{r['peak_rss_bytes'] / mib:,.0f} | {r['rss_after_load_bytes'] / mib:,.0f} | "
                     f"{'' if attr is None else f'{attr / mib:,.0f}'} | {r['kv_bytes'] / mib:,.1f} | "
                     f"{r['kv_work_bytes'] / mib:,.1f} | {eng_s} |")
    lines += ["", "| target (issue 13) | tokens | ratio | status |", "|---|---|---|---|"]
    for t in res["targets"]:
        val = "" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        lines.append(f"| {t['target']} | {t['tokens']} | {val} | {t['status']} |")
    for f in res.get("failures", []):
        lines.append(f"\nfailed: {f}")
    return "\n".join(lines)


def main() -> int:
    from benchio import run_and_report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/kvtool-bench-long-context")
    ap.add_argument("--model", default="llava", choices=sorted(MODELS), help="the bench model's architecture "
                    "(same LM shape; qwen2-vl: M-RoPE positions; fp16 runs the paged engine, as LLaVA)")
    ap.add_argument("--lengths", default="2048,8192,16384", help=f"prompt tokens (a {BASE_TOKENS} row is added)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of: " + ", ".join(CONFIGS))
    ap.add_argument("--kv-owner", default=None, help="force this engine (VLMPipeline.load's kv_owner) for the "
                    "quantized kvtool configurations (default: whatever load_engine picks)")
    ap.add_argument("--kv-owner-fp16", default=None, help="the same for kvtool_fp16")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="prefill_chunk for the kvtool fp16 "
                    "configurations (VLMPipeline.load's engine option; default: the engine's)")
    ap.add_argument("--child-pythonpath", default=None, help="PYTHONPATH of the child processes (e.g. another "
                    "kvtool tree, for before/after rows; default: this environment's)")
    ap.add_argument("--target-tokens", type=int, default=8192, help="the length the targets are evaluated at")
    ap.add_argument("--child-timeout", type=int, default=1800, help="seconds per child process")
    ap.add_argument("--quick", action="store_true", help="preset: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                    + " (targets at 2048)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--merge", default=None, help="comma-separated saved --json runs: print them as one table "
                    "(later files' rows replace earlier ones'), targets re-evaluated; measure nothing")
    ap.add_argument("--markdown", default=None, help="re-print a saved --json run, measure nothing")
    for name in ("--one", "--export", "--question-file"):  # child process: one configuration, JSON on stdout
        ap.add_argument(name, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.one:
        print("RESULT " + json.dumps(run_child(a)))
        return 0
    if a.merge:
        res = merge(a.merge.split(","), a.target_tokens)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2), encoding="utf-8")
        print(markdown(res))
        return 0
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
        a.target_tokens = 2048
    if a.rounds < 1 or a.new_tokens < 2:
        raise SystemExit("--rounds must be >= 1 and --new-tokens >= 2")
    return run_and_report(a, run, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
