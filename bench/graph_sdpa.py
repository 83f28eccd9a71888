"""A/B of the packed engine's graph SDPA (h-sdpa): with ``prefix_attention="op"`` the LM graph is edited without
its ``ScaledDotProductAttention`` (the op computes a prefill's causal attention itself; ``packed_prefix``) vs the
same engine with it kept (``KVTOOL_KEEP_SDPA=1``: the op takes the SDPA's output for a prefill's first chunk and
discards it on every other call).

Both engines are loaded in ONE process (the variable is read when the graph is edited, so it is set around each
load and prefill: ``packed_order`` may rebuild the graph for a long prompt), warmed up on a short prompt, then: ``--rounds`` interleaved prefills of the same ``--tokens``-token prompt
(time to first token: the engine's ``run_prompt`` calls as ``VLMPipeline.generate`` makes them, wall and process
CPU), and after the last one ``--steps`` decode steps alternating between the two engines (which one goes first
alternates too), wall and process CPU per step, medians, and the medians of the paired differences (removed
minus kept, same round / step). The compiled LM's node counts by type
(``get_runtime_model``) say what the edit removed. Same greedy tokens are checked.

    python bench/graph_sdpa.py --export /tmp/kvtool-bench-long-context/ov_w4_stateful_p20480 --tokens 2048

The export is read only; the prompt is ``bench/long_context.py``'s (filler text + a 96 px image).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

FORMS = ("kept", "removed")


def _timed(fn, *a):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*a)
    return out, (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3


def _prefill(eng, prepared, new_tokens):
    """``generate``'s prefill (prompt minus the last token, then the last token) -> its logits."""
    t = prepared.n_tokens
    eng.start(prepared, new_tokens)
    eng.run_prompt(0, t - 1)
    return eng.run_prompt(t - 1, t)


def run(a) -> dict:
    import numpy as np
    from long_context import WARMUP_WORDS, image, make_question

    from kvtool.runtime import VLMPipeline
    from kvtool.runtime.engines.packed_prefix import KEEP_SDPA_ENV
    from kvtool.runtime.preprocess import load_images, prepare_inputs

    export = Path(a.export)
    kw = dict(kv="g-KC128VT128", k_bits=2, v_bits=2)
    pipes = {}
    def form_env(form):  # read where the graph is edited: at load, and where packed_order switches the order
        os.environ[KEEP_SDPA_ENV] = "1" if form == "kept" else "0"

    for form in FORMS:
        form_env(form)
        pipes[form] = VLMPipeline.load(export, **kw)
        pipes[form].generate(image(1), " ".join(["word"] * WARMUP_WORDS), max_new_tokens=4, ignore_eos=True)
    question, n = make_question(export, a.tokens)
    p0 = pipes[FORMS[0]]
    prepared = prepare_inputs(p0.processor, load_images(image(0)), question, p0.conversation)
    ttft = {f: {"wall": [], "cpu": []} for f in FORMS}
    logits = {}
    for r in range(a.rounds):
        for form in (FORMS if r % 2 == 0 else FORMS[::-1]):
            form_env(form)
            logits[form], w, c = _timed(_prefill, pipes[form].engine, prepared, a.steps + 1)
            ttft[form]["wall"].append(w)
            ttft[form]["cpu"].append(c)
    os.environ.pop(KEEP_SDPA_ENV, None)
    step = {f: {"wall": [], "cpu": []} for f in FORMS}
    tokens = {f: [int(np.argmax(logits[f]))] for f in FORMS}
    for s in range(a.steps):
        for form in (FORMS if s % 2 == 0 else FORMS[::-1]):
            out, w, c = _timed(pipes[form].engine.run_token, tokens[form][-1])
            tokens[form].append(int(np.argmax(out)))
            step[form]["wall"].append(w)
            step[form]["cpu"].append(c)
    res = {"prompt_tokens": n, "rounds": a.rounds, "steps": a.steps, "same_tokens": tokens["kept"] == tokens["removed"]}
    # paired differences (removed - kept) of the same round / step, medians: the load both saw cancels in part
    for what, d in (("ttft", ttft), ("decode", step)):
        for clock in ("wall", "cpu"):
            res[f"{what}_{clock}_diff_ms"] = statistics.median(r - k for r, k in zip(d["removed"][clock], d["kept"][clock],
                                                                                     strict=True))
    for form in FORMS:
        eng = pipes[form].engine
        graphs = [eng.lm] if eng.lm is not None else [*eng.layer_runner.compiled, eng.layer_runner.head_compiled]
        nodes = collections.Counter(o.get_rt_info()["layerType"].astype(str)
                                    for g in graphs for o in g.get_runtime_model().get_ordered_ops())
        info = eng.info()
        res[form] = {"graph_sdpa": info["graph_sdpa"], "prefill_order": info["prefill_order"],
                     "decode_graph": info["decode_graph"],
                     "ttft_ms": statistics.median(ttft[form]["wall"]), "ttft_cpu_ms": statistics.median(ttft[form]["cpu"]),
                     "ttft_rounds_ms": [round(x) for x in ttft[form]["wall"]],
                     "ttft_cpu_rounds_ms": [round(x) for x in ttft[form]["cpu"]],
                     "decode_ms": statistics.median(step[form]["wall"]),
                     "decode_cpu_ms": statistics.median(step[form]["cpu"]),
                     "lm_nodes": sum(nodes.values()), "subgraph_nodes": nodes.get("Subgraph", 0)}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, help="a stateful OpenVINO export (bench/long_context.py's)")
    ap.add_argument("--tokens", type=int, default=2048, help="prompt tokens")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved prefills per form")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per form")
    print(json.dumps(run(ap.parse_args()), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
