"""kvtool's own AWQ scale search and simulated low-bit weights, on the PyTorch language model.

Used where NNCF cannot act: the ONNX backend (AWQ scales are folded into the PyTorch weights before export,
then onnxruntime's MatMulNBits quantizer rounds them) and ``--wbits 3`` (no runtime has an int3 type: weights
are quantized group-wise asymmetric to 3 bits and stored dequantized — ``storage: simulated``, no memory
saved). OpenVINO at 4/8 bits uses NNCF's own AWQ instead.

Written by hand following the published AWQ method (Lin et al.; llm-awq's search/apply split):
``search_awq_scales`` returns plain data — one per-input-channel scale vector per group of linears that share
an input — and ``apply_awq_scales`` folds them in (the preceding RMSNorm or linear divided by s, the linears
multiplied by s), which leaves the fp model's outputs unchanged. The search grid-searches
``s = mean|x|^alpha`` (alpha in [0, 1)) minimising each group's output error after fake quantization; unlike
llm-awq it scores each linear group's own output rather than the whole attention/MLP block, and it does not
clip weights. Decoder layers must be Llama/Qwen2-style (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``). This module does not export graphs.
"""

from __future__ import annotations

from typing import Any

from kvtool.errors import InputError

MAX_TOKENS = 4096  # calibration tokens kept per linear group during the search


def fake_quantize_groups(w: Any, bits: int, group_size: int, sym: bool = False) -> Any:
    """Quantize-dequantize a weight [out, in] group-wise along ``in`` (group_size -1: one group per row);
    returns a tensor of ``w``'s shape and dtype.

    Asymmetric: eq. (2) of the study, computed by ``kvtool.quant_ops.affine`` (``choose_qparams_affine``,
    ``quantize_affine``, ``dequantize_affine`` with block size ``(1, group)`` on the float32 weight): the same
    function the KV cache uses, not a second derivation. Symmetric (no equivalent in quant_ops):
    ``Δ = max|w|/(2^(b-1) - 1)`` with q in [-2^(b-1), 2^(b-1) - 1]. Round half to even; a constant group
    dequantizes to itself. Raises ``InputError`` when the group does not divide ``in``.
    """
    import torch

    from kvtool.quant_ops.affine import choose_qparams_affine, dequantize_affine, quantize_affine

    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    if in_f % g:
        raise InputError(f"--group-size {group_size}: does not divide a layer width {in_f}")
    x = w.float().contiguous()
    if sym:
        xg = x.reshape(out_f, in_f // g, g)
        qmax = 2 ** (bits - 1) - 1
        delta = xg.abs().amax(-1, keepdim=True) / qmax
        safe = torch.where(delta > 0, delta, torch.ones_like(delta))
        q = torch.clamp(torch.round(xg / safe), -qmax - 1, qmax)
        return torch.where(delta > 0, q * safe, xg).reshape(out_f, in_f).to(w.dtype)
    block = (1, g)
    delta, mn = choose_qparams_affine(x, block, bits)  # float32, [out, in / g]
    deq = dequantize_affine(quantize_affine(x, block, delta, mn, bits), block, delta, mn)
    flat = (delta > 0).repeat_interleave(g, dim=1)  # a group whose delta underflows keeps its values
    return torch.where(flat, deq, x).to(w.dtype)


def decoder_layers(model: Any) -> Any:
    return model.model.language_model.layers


def linear_groups(layer: Any) -> list[tuple[str, Any, list[Any]]]:
    """(name, preceding op, linears sharing its output as input) for one decoder layer."""
    att, mlp = layer.self_attn, layer.mlp
    groups = [("qkv", layer.input_layernorm, [att.q_proj, att.k_proj, att.v_proj])]
    if att.v_proj.weight.shape[0] == att.o_proj.weight.shape[1]:  # no GQA: v's rows map 1:1 onto o's inputs
        groups.append(("o", att.v_proj, [att.o_proj]))
    groups += [("gate_up", layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
               ("down", mlp.up_proj, [mlp.down_proj])]
    return groups


def check_group_size(model: Any, group_size: int) -> None:
    """Refuse a group size that does not divide every decoder linear's input width."""
    if group_size == -1:
        return
    widths = {lin.weight.shape[1] for layer in decoder_layers(model) for _, _, lins in linear_groups(layer)
              for lin in lins}
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        raise InputError(f"--group-size {group_size}: does not divide the language model's layer widths {bad} "
                         "(choose a power of two dividing them, or -1 for per-channel)")


class _Stop(Exception):
    pass


def _layer_inputs(model: Any, idx: int, samples: list[dict]) -> dict[str, Any]:
    """Inputs [tokens, in] of each linear group of decoder layer ``idx`` over all calibration samples."""
    import torch

    layer = decoder_layers(model)[idx]
    groups = linear_groups(layer)
    seen: dict[str, list] = {name: [] for name, _, _ in groups}
    hooks = []
    for name, _, lins in groups:
        def grab(_m, args, name=name):
            seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        hooks.append(lins[0].register_forward_pre_hook(grab))

    def stop(_m, _a, _o):
        raise _Stop

    hooks.append(layer.register_forward_hook(stop))
    lm = model.model.language_model
    try:
        for s in samples:
            try:
                with torch.no_grad():
                    lm(inputs_embeds=torch.from_numpy(s["inputs_embeds"]),
                       position_ids=torch.from_numpy(s["position_ids"]), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    out = {}
    g = torch.Generator().manual_seed(idx)
    for name, chunks in seen.items():
        x = torch.cat(chunks).float()
        if x.shape[0] > MAX_TOKENS:
            x = x[torch.randperm(x.shape[0], generator=g)[:MAX_TOKENS]]
        out[name] = x
    return out


def search_group_scale(x: Any, linears: list[Any], bits: int, group_size: int, sym: bool, n_grid: int = 20
                       ) -> tuple[Any, float, float]:
    """Best per-input-channel scale for linears sharing input ``x`` [tokens, in]; returns (s, best, rtn) errors."""
    import torch

    ws = [lin.weight.detach().float() for lin in linears]
    refs = [x @ w.T for w in ws]
    x_mean = x.abs().mean(0)
    best, best_s, rtn = float("inf"), torch.ones_like(x_mean), float("nan")
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, ref in zip(ws, refs, strict=True):
            wq = fake_quantize_groups(w * s, bits, group_size, sym) / s
            err += float(((x @ wq.T - ref) ** 2).mean())
        if i == 0:
            rtn = err
        if err < best:
            best, best_s = err, s.clone()
    return best_s, best, rtn


def search_awq_scales(model: Any, samples: list[dict], bits: int, group_size: int, sym: bool = False,
                      progress: Any = None) -> dict[str, list[float]]:
    """AWQ scales as plain data: ``{"<layer>.<group>": [s_0, ..., s_in-1]}``, plus per-group errors under
    ``"_errors"`` (``{"<layer>.<group>": [awq_mse, rtn_mse]}``)."""
    if not samples:
        raise InputError("--awq: no calibration samples (pass --calibration DATA)")
    scales: dict[str, Any] = {"_errors": {}}
    for idx, layer in enumerate(decoder_layers(model)):
        xs = _layer_inputs(model, idx, samples)
        for name, _, lins in linear_groups(layer):
            s, err, rtn = search_group_scale(xs[name], lins, bits, group_size, sym)
            scales[f"{idx}.{name}"] = s.tolist()
            scales["_errors"][f"{idx}.{name}"] = [err, rtn]
        # scaling preserves the fp function, so later layers' inputs need not wait for apply
        if progress is not None:
            progress.set_postfix_str(f"awq layer {idx + 1}")
    return scales


def apply_awq_scales(model: Any, scales: dict[str, Any]) -> None:
    """Fold ``search_awq_scales``'s scales into the weights (in place); the fp function is unchanged."""
    import torch

    with torch.no_grad():
        for idx, layer in enumerate(decoder_layers(model)):
            for name, prev, lins in linear_groups(layer):
                key = f"{idx}.{name}"
                if key not in scales:
                    continue
                s = torch.tensor(scales[key], dtype=lins[0].weight.dtype)
                if isinstance(prev, torch.nn.Linear):
                    prev.weight.div_(s[:, None])
                    if prev.bias is not None:
                        prev.bias.div_(s)
                else:  # RMSNorm: y = w * x_hat
                    prev.weight.div_(s)
                for lin in lins:
                    lin.weight.mul_(s[None, :])


def simulate_low_bit(model: Any, bits: int, group_size: int, sym: bool = False) -> int:
    """Replace every decoder linear weight by its group-wise quantize-dequantize; returns how many."""
    import torch

    n = 0
    with torch.no_grad():
        for layer in decoder_layers(model):
            for _, _, lins in linear_groups(layer):
                for lin in lins:
                    lin.weight.copy_(fake_quantize_groups(lin.weight, bits, group_size, sym))
                    n += 1
    return n


def transform_lm_weights(model: Any, cfg: Any, samples: list[dict] | None) -> dict[str, Any] | None:
    """What the export pipeline applies to the PyTorch LM before conversion: AWQ scales (when ``cfg.awq``)
    then, at ``cfg.wbits == 3``, simulated 3-bit weights. Returns the scales (or None)."""
    scales = None
    if cfg.awq:
        scales = search_awq_scales(model, samples or [], cfg.wbits, cfg.group_size, cfg.sym)
        apply_awq_scales(model, scales)
    if cfg.wbits == 3:
        simulate_low_bit(model, 3, cfg.group_size, cfg.sym)
    return scales
