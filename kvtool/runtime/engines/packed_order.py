"""The packed engine's prompt-length order policy: chunk-major where all layers' exact prefill buffers are small,
layer-major above that, each graph set compiled when first needed and the other one dropped.

Why (docs/BENCHMARKS.md, "h-calls"): the layer-major order (``ov_layers``) holds one layer's exact prefill buffer
at a time instead of all ``L`` (peak RSS 591 vs 727 MiB at 8k tokens on the issue-13 bench model), but it compiles
no full LM (the CPU plugin repacks the int4 weights per compiled model: a full LM beside the sub-models costs +82
MiB at 8k), so its decode runs ``L + 1`` OpenVINO calls per token (before ``ov_layers.DecodeChain``: +3-4 ms per
token at <= 2k, 21.8 vs 18.8 ms at 2k; the chain took most of that back, "h-chain" in docs/BENCHMARKS.md). Where all layers' buffers, ``2 * L * T * kv_heads * head_dim * itemsize`` bytes for a ``T``-token prompt,
are within ``BUFFER_BUDGET``, the chunk-major order (one full-LM call per chunk and per token) holds at most that
much more and decodes in one call; above it the layer-major order runs. 96 MiB: 3,072 tokens on the bench model
(8 layers x 8 KV heads x 128, f16 stores: 32 KiB per token; chunk-major at 2k peaks at 459 MiB, layer-major 468),
192 tokens on llava-1.5-7b's shape (512 KiB per token). A choice, not a measured optimum: the crossover of the
two orders' peaks lies between 2k (chunk-major lower) and 8k (layer-major 136 MiB lower) on the bench model.

Only one graph set is compiled at a time (``build``), and the switch goes one way (chunk -> layer; ``choose``):
a prompt whose order differs from the compiled one drops
it (its compiled models and requests, and the layers' op slots they point to), reads and edits the LM graph
again (``openvino_packed._packed_lm``: new ``_Layer`` objects, the stores are reset by ``start`` anyway) and
compiles the other set. That costs the switch's compile (~0.7 s full LM, ~1.2 s the sub-models on the 2-core
dev machine) plus the new set's first-call weight repacking, inside that prompt's time to first token; the
peak RSS of either order is what it is alone. ``info()`` names the rule (``prefill_order_rule``), the order that
ran and why (``prefill_order``, ``prefill_order_reason``), the budget and the switches (``order_switches``).

Does not: run where the exact-prefix attention runs in the graph (``prefix_attention="graph"``: chunk-major
always, ``ov_layers.load_runner``'s reason), or when ``prefill_order`` is given (that order, compiled at load).
"""

from __future__ import annotations

import numpy as np

# All layers' exact prefill buffers (bytes) up to which the default order is chunk-major (module docstring).
BUFFER_BUDGET = 96 * 2**20


def buffer_bytes(tokens: int, num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of all layers' exact prefill buffers for a ``tokens``-token prompt: K and V, ``[T, H, D]`` each, in
    the stores' dtype (``_PackedKV.begin_prefill`` of every layer)."""
    return 2 * num_layers * tokens * num_kv_heads * head_dim * itemsize


def auto_order(tokens: int, num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int,
               budget: int = BUFFER_BUDGET) -> tuple[str, str]:
    """("chunk" | "layer", why) for a ``tokens``-token prompt: chunk-major where ``buffer_bytes`` <= ``budget``."""
    b = buffer_bytes(tokens, num_layers, num_kv_heads, head_dim, itemsize)
    mib = f"{b / 2**20:.1f} MiB for {tokens} prompt tokens, budget {budget / 2**20:.0f} MiB"
    if b <= budget:
        return "chunk", (f"chunk-major: all layers' exact prefill buffers within packed_order.BUFFER_BUDGET ({mib}): "
                         "one full-LM call per chunk and per token")
    return "layer", f"layer-major: all layers' exact prefill buffers over packed_order.BUFFER_BUDGET ({mib})"


def is_auto(engine) -> bool:
    """Whether ``engine`` picks its order per prompt: no ``prefill_order`` given, ``ov_layers.DEFAULT_ORDER``
    is "auto" and the native prefix runs (``prefix_attention="op"``)."""
    from kvtool.runtime.engines import ov_layers

    return engine.prefill_order is None and ov_layers.DEFAULT_ORDER == "auto" and engine.prefix_attention[0] == "op"


def build(engine, order: str | None) -> None:
    """Compile ``engine``'s LM graph set for ``order`` ("layer" | "chunk" | None: ``ov_layers.load_runner``'s
    default), dropping the set compiled before (if any) first. Sets ``engine.layers`` (and the cache's),
    ``prefill_runner``, ``layer_runner``, ``lm``, ``lm_req``, ``prefill_order_reason`` and ``n_states``.
    InputError where KV state is left in the edited graph."""
    from kvtool.errors import InputError
    from kvtool.runtime.engines import ov_layers
    from kvtool.runtime.engines.openvino_packed import _packed_lm, _PackedKV

    kv = getattr(engine, "kv", None)  # (no packed cache yet while the engine loads)
    engine.prefill_runner = engine.layer_runner = engine.lm = engine.lm_req = None  # before their op slots go
    engine._fixed = engine._bound = None  # the new request has none of the old one's tensors
    core, cfg = engine._core, engine._cfg
    model = engine._read_language_model(core, stateful_needed_by="the packed engine")
    engine.layers = _packed_lm(model, engine.num_layers, engine.kv_dtype, engine.prefix_attention[0])
    if isinstance(kv, _PackedKV):
        kv.layers = engine.layers
    engine.lm_names = [i.get_any_name() for i in model.inputs]
    runner, engine.prefill_order_reason = ov_layers.load_runner(engine, core, model, cfg, order)
    engine.prefill_runner = runner
    engine.layer_runner = None if runner is None or ov_layers.DECODE_FULL_LM else runner
    if engine.layer_runner is None:
        engine.lm = engine._compile(core, model, cfg, "language_model (packed KV, Python attention op)")
        engine.lm_req = engine.lm.create_infer_request()
    engine.n_states = (runner.n_states if runner else 0) + (len(engine.lm_req.query_state()) if engine.lm_req else 0)
    if engine.n_states:
        raise InputError(f"language model: {engine.n_states} KV states left after the packed engine's edit")


def load(engine) -> None:
    """``_load_graphs``' LM part: the given order's graph set, or where ``is_auto`` the chunk-major one (the
    first prompt's ``choose`` may switch)."""
    engine.order_switches, engine.order_why = 0, None
    engine.order_rule = "auto" if is_auto(engine) else "given" if engine.prefill_order else "default"
    build(engine, "chunk" if engine.order_rule == "auto" else engine.prefill_order)


def choose(engine, tokens: int) -> None:
    """Before a prompt of ``tokens`` tokens (``start``): where the rule is "auto", the order ``auto_order``
    picks, rebuilding the graph set (``build``) where it differs from the compiled one (``engine.order_switches``
    counts the rebuilds; a graph that will not split stays chunk-major); otherwise nothing. Once layer-major it
    stays layer-major (it serves any length): a workload whose prompts straddle the budget pays one switch, not
    one per crossing (a switch costs seconds of compile and weight repacking inside that prompt's TTFT)."""
    if engine.order_rule != "auto":
        return
    want, engine.order_why = auto_order(tokens, engine.num_layers, engine.num_kv_heads, engine.head_dim,
                                        np.dtype(engine.kv_dtype).itemsize, BUFFER_BUDGET)
    have = "layer" if engine.prefill_runner is not None else "chunk"
    if have == "layer" and want == "chunk":  # sticky: layer-major serves any length; no switch back and forth
        engine.order_why = ("layer-major: kept for a prompt within packed_order.BUFFER_BUDGET, as an earlier one "
                            f"went over it (at most one switch per engine; the rule: {engine.order_why})")
        return
    if want != have and not _unsplittable(engine):
        engine.order_switches += 1
        build(engine, want)


def _unsplittable(engine) -> bool:
    return engine.prefill_order_reason.startswith("chunk-major: the LM graph cannot be split")


def reason(engine) -> str:
    """``info()["prefill_order_reason"]``: why the compiled order runs (the rule's reason, then the build's
    where it says more: the layer split, or why it failed)."""
    if engine.order_rule != "auto":
        return engine.prefill_order_reason
    if engine.order_why is None:
        return ("chunk-major until the first prompt (packed_order: chunk-major where all layers' exact prefill "
                "buffers fit packed_order.BUFFER_BUDGET, else layer-major)")
    if _unsplittable(engine):
        return f"{engine.prefill_order_reason} (the rule: {engine.order_why})"
    if engine.prefill_runner is not None:
        return f"{engine.order_why}; {engine.prefill_order_reason}"
    return engine.order_why
