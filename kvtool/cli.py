"""The ``kvtool`` command line (click).

Each command parses its options, builds a config (a dataclass of the library), calls one library function and
prints the result as a table (or JSON with ``--json``). No logic lives here. Heavy libraries (torch, openvino,
onnxruntime, nncf, transformers) are imported inside the commands so that ``kvtool --help`` is instant.

Bad input raises ``kvtool.errors.InputError`` (a ``ValueError``) or ``FileNotFoundError`` in the library;
``KvtoolGroup`` turns both into a one-line ``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys

import click

from kvtool import __version__
from kvtool.errors import InputError


class KvtoolGroup(click.Group):
    """A click group that reports bad input as one line and exit code 2, never a traceback. The library
    names its options as Python arguments (``text_only=True``, ``kv_mode: ...``); the line shown spells each
    one that is a CLI option as its flag (``--text-only``, ``--kv-mode: ...``): ``cli_flag_names``."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (InputError, FileNotFoundError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            click.echo(f"error: {cli_flag_names(msg, ctx.find_root().command)}", err=True)
            sys.exit(2)
        except ModuleNotFoundError as exc:  # the runtime-only install has no torch / export libraries
            if (exc.name or "").split(".")[0] not in FULL_ONLY_MODULES:
                raise
            click.echo(f"error: this needs the full install (pip install \"kvtool[full]\"): no module named "
                       f"{exc.name!r} in the runtime-only install", err=True)
            sys.exit(2)


# what the `full` extra adds to the runtime-only install (pyproject.toml)
FULL_ONLY_MODULES = ("torch", "torchvision", "accelerate", "nncf", "optimum", "onnx", "onnxscript")


def _option_flags(command: click.Command) -> dict[str, str]:
    """{python name: --flag} for every long option of ``command`` and its subcommands (names of one letter
    and the JSON switch left out): both the parameter name and each flag spelt with underscores."""
    flags: dict[str, str] = {}
    for cmd in [command, *getattr(command, "commands", {}).values()]:
        if cmd is not command and isinstance(cmd, click.Group):
            flags.update(_option_flags(cmd))
            continue
        for p in cmd.params:
            longs = [o for o in getattr(p, "opts", []) if o.startswith("--")]
            if not isinstance(p, click.Option) or not longs or p.name in ("as_json",):
                continue
            for o in longs:
                flags.setdefault(o[2:].replace("-", "_"), o)
            flags.setdefault(p.name, longs[0])
    return {k: v for k, v in flags.items() if len(k) > 1}


def cli_flag_names(msg: str, command: click.Command | None = None) -> str:
    """``msg`` with the library's Python argument names of CLI options spelt as the flags: ``name=True`` ->
    ``--name``, ``name=False`` -> ``without --name``, ``name=X`` -> ``--name X``, and a leading ``name:`` ->
    ``--name:``. Names that are no option of the CLI (``kv_owner``) are left as they are."""
    import re

    flags = _option_flags(command or main)
    for name in sorted(flags, key=len, reverse=True):
        flag = flags[name]
        pre = r"(?<![\w.\-])"
        msg = re.sub(pre + re.escape(name) + r"=True\b", flag, msg)
        msg = re.sub(pre + re.escape(name) + r"=False\b", "without " + flag, msg)
        msg = re.sub(pre + re.escape(name) + r"=(?=\S)", flag + " ", msg)
        msg = re.sub(r"^" + re.escape(name) + r"(?=:)", flag, msg)
    return msg


def echo_json(obj, path: str | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` (or stdout when path is ``-`` or None)."""
    text = json.dumps(obj, indent=2, default=str)
    if path in (None, "-"):
        click.echo(text)
    else:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


@click.group(cls=KvtoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvtool")
def main() -> None:
    """kvtool: compress a LLaVA-family VLM (int4/int8 weights, quantized KV cache), run it on an edge
    device, and measure what the compression changes against the PyTorch reference."""


@main.group(name="ls", cls=KvtoolGroup)
def ls_group() -> None:
    """List what kvtool knows: KV schemes, eval tasks, tiny models."""


# ---------------------------------------------------------------------------------------------------------
# quant_ops commands
# ---------------------------------------------------------------------------------------------------------


def _bits_option(name: str, help_text: str, multiple: bool = False):
    return click.option(name, type=click.Choice(["2", "3", "4", "8", "16"]), multiple=multiple, help=help_text)


@ls_group.command(name="schemes")
@_bits_option("--bits", "Bits for K and V (default 4).")
@_bits_option("--k-bits", "Bits for K (default: --bits).")
@_bits_option("--v-bits", "Bits for V (default: --bits).")
@click.option("--tokens", type=int, default=4096, show_default=True, help="Cache length N for g-CN/uniform costs.")
@click.option("--d-model", type=int, default=4096, show_default=True, help="H*D of the K/V cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def ls_schemes(bits, k_bits, v_bits, tokens, d_model, as_json) -> None:
    """List every KV scheme with its meaning and storage cost in bits per value (K and V averaged; fp16
    scale and min per group, 48 bits per or<s> outlier)."""
    from kvtool.quant_ops.tables import scheme_table

    b = int(bits or 4)
    rows = scheme_table(int(k_bits or b), int(v_bits or b), n_tokens=tokens, d_model=d_model)
    if as_json:
        echo_json(rows)
        return
    w = max(len(r["scheme"]) for r in rows)
    click.echo(f"{'scheme':<{w}}  K/V bits  bits/value  meaning")
    for r in rows:
        kv = f"{r['k_bits']}/{r['v_bits']}"
        click.echo(f"{r['scheme']:<{w}}  {kv:<8}  {r['bits_per_value']:>10.3f}  {r['meaning']}")


@main.command(name="kv-roundtrip")
@click.option("--scheme", "schemes", multiple=True, help="KV scheme (repeatable; default: every study scheme).")
@_bits_option("--bits", "Bits for K and V (repeatable; default 4 and 2).", multiple=True)
@_bits_option("--k-bits", "Bits for K (then --bits is ignored).")
@_bits_option("--v-bits", "Bits for V (then --bits is ignored).")
@click.option("--tokens", type=int, default=512, show_default=True, help="Tokens N of the random KV block.")
@click.option("--heads", type=int, default=8, show_default=True, help="KV heads H.")
@click.option("--head-dim", type=int, default=128, show_default=True, help="Head dim D.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def kv_roundtrip(schemes, bits, k_bits, v_bits, tokens, heads, head_dim, seed, as_json) -> None:
    """Quantization round trip on a random fp16 KV block with outlier channels: relative error, max error
    and bytes held vs fp16 per scheme (through the packed store)."""
    from kvtool.quant_ops.tables import roundtrip

    rows = roundtrip(list(schemes) or None, [int(b) for b in bits] or None,
                     int(k_bits) if k_bits else None, int(v_bits) if v_bits else None,
                     tokens=tokens, heads=heads, head_dim=head_dim, seed=seed, progress=not as_json)
    if as_json:
        echo_json(rows)
        return
    from kvtool.quant_ops import native

    w = max(len(r["scheme"]) for r in rows)
    click.echo(f"quant_ops kernels: {native.info()['path']} — {native.reason()}")
    click.echo(f"KV [1, {heads}, {tokens}, {head_dim}] fp16, K with outlier channels; errors relative (L2) "
               f"and max |x - x_hat|")
    click.echo(f"{'scheme':<{w}}  K/V bits  K rel err  V rel err  K max err  V max err  held/fp16  bits/value")
    for r in rows:
        kv = f"{r['k_bits']}/{r['v_bits']}"
        click.echo(f"{r['scheme']:<{w}}  {kv:<8}  {r['k_rel_err']:>9.4f}  {r['v_rel_err']:>9.4f}  "
                   f"{r['k_max_err']:>9.3f}  {r['v_max_err']:>9.3f}  {r['held_vs_fp16']:>9.3f}  "
                   f"{r['bits_per_value']:>10.3f}")


# ---------------------------------------------------------------------------------------------------------
# models commands
# ---------------------------------------------------------------------------------------------------------


@main.group(name="models", cls=KvtoolGroup)
def models_group() -> None:
    """Build tiny random checkpoints offline, for tests and benchmarks (the bundled kvtool-shapes model is trained
    by `python scripts/train_shapes.py`, outside the package)."""


REAL_SHAPE_NAMES = ["llava-1.5-7b", "llava-1.5-13b", "llava-v1.6-vicuna-7b", "qwen2-vl-2b", "qwen2-vl-7b"]


@models_group.command(name="make")
@click.argument("name", type=click.Choice(["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl", *REAL_SHAPE_NAMES]))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Weight initialisation seed.")
@click.option("--hidden", type=int, help="Text hidden size (default 128).")
@click.option("--layers", type=int, help="Text decoder layers (tiny default 2; real shapes: all, as published).")
@click.option("--dtype", "weight_dtype", type=click.Choice(["float16", "bfloat16"]),
              help="Real shapes only: weight dtype (default: the published one).")
@click.option("--heads", type=int, help="Attention heads (default 4).")
@click.option("--kv-heads", type=int, help="KV heads (default 4; 2 for Qwen2-VL).")
@click.option("--intermediate", type=int, help="MLP intermediate size (default 256).")
@click.option("--vision-hidden", type=int, help="Vision tower hidden size (default 64).")
@click.option("--vision-layers", type=int, help="Vision tower layers (default 2).")
@click.option("--image-size", type=int, help="Vision input side in pixels (default 48).")
@click.option("--json", "as_json", is_flag=True, help="Print the sizes as JSON.")
def models_make(name, out_dir, seed, as_json, weight_dtype, **sizes) -> None:
    """Build the random checkpoint NAME into OUT_DIR (no hub access).

    tiny-*: tiny models for tests. The others have the published config.json of the real model (random
    weights, written shard by shard in fp16/bf16; --layers N truncates the decoder)."""
    from dataclasses import asdict

    from kvtool.models import make_tiny_model, tiny_size

    if name in REAL_SHAPE_NAMES:
        _make_real_shape(name, out_dir, seed, as_json, weight_dtype, sizes)
        return
    if weight_dtype:
        raise InputError("--dtype: only for the real-shape models (tiny models are written in float32)")

    size = tiny_size(name, **sizes)  # validates before any heavy import
    path = make_tiny_model(name, out_dir, seed=seed, **{k: v for k, v in sizes.items() if v is not None})
    info = {"name": name, "path": str(path), "seed": seed, "sizes": asdict(size)}
    if as_json:
        echo_json(info)
    else:
        click.echo(f"{name} -> {path}")
        click.echo("  " + ", ".join(f"{k}={v}" for k, v in asdict(size).items()))


def _make_real_shape(name, out_dir, seed, as_json, weight_dtype, sizes) -> None:
    from kvtool.models.real_shapes import make_real_shape_model

    other = sorted(f"--{k.replace('_', '-')}" for k, v in sizes.items() if v is not None and k != "layers")
    if other:
        raise InputError(f"{', '.join(other)}: {name} has the published sizes; only --layers, --dtype, --seed apply")
    info = make_real_shape_model(name, out_dir, layers=sizes.get("layers"), seed=seed, dtype=weight_dtype)
    if as_json:
        echo_json(info)
        return
    click.echo(f"{name} ({info['hub_id']} shapes) -> {info['path']}")
    click.echo(f"  {info['layers']} decoder layers, {info['params'] / 1e9:.2f} B params, {info['dtype']}, "
               f"{info['bytes'] / 2**30:.2f} GiB in {info['files']} shard(s)")


@ls_group.command(name="models")
@click.option("--json", "as_json", is_flag=True)
def ls_models(as_json) -> None:
    """List the checkpoints `kvtool models make` builds (tiny ones, and the study's real shapes with random
    weights) and the trained models bundled with kvtool (`kvtool run NAME` takes their name) with their paths."""
    from kvtool.models.bundled import BUNDLED_MODELS
    from kvtool.models.real_shapes import REAL_SHAPE_MODELS
    from kvtool.models.tiny import TINY_MODELS

    models = {**TINY_MODELS, **REAL_SHAPE_MODELS}
    if as_json:
        echo_json({"tiny": TINY_MODELS, "real_shapes": REAL_SHAPE_MODELS,
                   "bundled": {n: {"path": str(p), "description": d} for n, (p, d) in BUNDLED_MODELS.items()}})
        return
    width = max(map(len, [*models, *BUNDLED_MODELS]))
    click.echo("checkpoints with random weights (kvtool models make NAME DIR):")
    for name, what in models.items():
        click.echo(f"  {name:<{width}}  {what}")
    click.echo("bundled trained models (pass the name as MODEL):")
    for name, (path, what) in BUNDLED_MODELS.items():
        click.echo(f"  {name:<{width}}  {path}\n  {'':<{width}}  {what}")


# ---------------------------------------------------------------------------------------------------------
# export commands
# ---------------------------------------------------------------------------------------------------------


@main.command(name="export")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Export directory.")
@click.option("--backend", default="openvino", show_default=True, help="openvino | onnx (or onnxruntime).")
@click.option("--wbits", default=16, show_default=True, type=int,
              help="Language-model weight bits: 16 none, 8 int8, 4 int4 group-wise, 3 simulated 3-bit "
                   "(group-wise, stored dequantized: for accuracy studies, saves no memory).")
@click.option("--group-size", default=128, show_default=True, type=int, help="Weight group size (-1 per-channel).")
@click.option("--sym", is_flag=True, help="Symmetric weight quantization (default asymmetric).")
@click.option("--ratio", default=1.0, show_default=True, type=float, help="Fraction of LM layers in int4 (rest int8).")
@click.option("--awq", is_flag=True, help="Data-aware AWQ on --calibration data (OpenVINO: NNCF; data-free if none).")
@click.option("--scale-estimation", is_flag=True, help="NNCF scale estimation after AWQ (openvino, --wbits 4).")
@click.option("--calibration", help="Local .jsonl of {\"text\": ...} or {\"image\": path, \"question\": ...} rows, "
                                    "or an eval task: shapes | TASK=LOCAL_COPY. Never downloaded.")
@click.option("--num-samples", default=32, show_default=True, type=int, help="Calibration samples used.")
@click.option("--dtype", default="fp16", show_default=True, help="fp16 | fp32 for the unquantized parts.")
@click.option("--stateful/--stateless", default=None,
              help="OpenVINO LM with the KV cache inside the graph (default; what the fast engine, optimum-intel "
                   "and openvino.genai read) or with explicit past/present K/V (--stateless).")
@click.option("--onnx-quant", default="rtn", show_default=True, help="rtn | hqq (ONNX MatMulNBits algorithm).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own code (off by default).")
@click.option("--force", is_flag=True, help="Replace another export already in --output (refused without it).")
@click.option("--verbose", is_flag=True, help="Show the exporting libraries' own log lines and warnings.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (graphs, sizes, manifest) as JSON.")
def export_cmd(model, output, as_json, **opts) -> None:
    """Export MODEL (a local Hugging Face checkpoint dir, or a hub id when online) to graphs + kvtool.json.

    Graphs: language model (OpenVINO: stateful by default; --stateless / ONNX: explicit
    past_key_values.{i}.key|value inputs, present.{i}.* outputs; logits of the last position only), text embeddings, vision embeddings (+ merger for Qwen2-VL). Supported: llava, llava_next
    and qwen2_vl, on both backends.
    """
    from kvtool.export import ExportConfig, export_model

    cfg = ExportConfig(model=model, output=output, **opts)
    cfg.validate()  # before any heavy import
    res = export_model(cfg)
    if as_json:
        echo_json(res.to_dict())
        return
    w = res.manifest.weights
    click.echo(f"{res.manifest.architecture} -> {res.output_dir} ({res.manifest.backend}, {res.seconds:.1f} s; "
               f"weights {w.bits}-bit {w.method}, storage {w.storage})")
    click.echo(f"{'graph':<26} {'file':<48} {'MiB':>9}  weights")
    for row in res.graphs:
        click.echo(f"{row['role']:<26} {row['file']:<48} {row['bytes'] / 2**20:>9.2f}  {row['weights']}")


# ---------------------------------------------------------------------------------------------------------
# runtime / devices commands
# ---------------------------------------------------------------------------------------------------------


def _kv_residual_option(f):
    return click.option("--kv-residual", type=int, default=None, metavar="R",
                        help="KIVI's full-precision window: the newest R tokens stay unquantized (V: the newest R; "
                             "per-channel/per-tensor sides: N mod R, quantized R at a time). Quantizing schemes "
                             "only; KIVI uses 128.")(f)


@main.command(name="run")
@click.argument("model", type=click.Path())
@click.option("--image", "images", multiple=True, help="Image file (repeat for models that take several).")
@click.option("--prompt", required=True, help="The question about the image.")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "openvino", "onnxruntime", "onnx", "torch"]),
              help="onnx and onnxruntime are the same backend.")
@click.option("--device", default="auto", show_default=True, help="CPU / GPU / NPU (OpenVINO), cpu / cuda.")
@click.option("--kv", default="fp16", show_default=True, help="KV scheme: fp16, g-KC128VT128, ..., ov-u8, ov-u4.")
@click.option("--kv-bits", type=int, default=None, help="Bits for K and V (default 4).")
@click.option("--k-bits", type=int, default=None, help="Bits for K (overrides --kv-bits).")
@click.option("--v-bits", type=int, default=None, help="Bits for V (overrides --kv-bits).")
@click.option("--kv-mode", default="packed", show_default=True, type=click.Choice(["packed", "simulate"]))
@click.option("--first-token", default="compressed", show_default=True, type=click.Choice(["compressed", "fp"]))
@click.option("--conversation", default="auto", show_default=True,
              type=click.Choice(["auto", "chat_template", "vicuna_v1"]),
              help="Prompt format; auto is the rule `kvtool eval` uses too, so both prompt a model alike: "
                   "vicuna_v1 for LLaVA-1.5 (the conversation LLaVA's eval scripts use for the study's tasks), "
                   "unless the checkpoint's chat template holds vicuna_v1's system prompt itself (kvtool-shapes: "
                   "its training format); the checkpoint's chat template for every other model.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--text-only", is_flag=True, help="Ask without an image.")
@click.option("--ov-group-size", type=int, default=None, help="ov-u8/ov-u4: KV group size along head_dim.")
@click.option("--ov-key-by-channel", is_flag=True, help="ov-u8/ov-u4: quantize keys by channel.")
@_kv_residual_option
@click.option("--json", "as_json", is_flag=True, help="Print the answer, stats and pipeline as JSON.")
def run_cmd(model, images, prompt, backend, device, kv, kv_bits, k_bits, v_bits, kv_mode, first_token,
            conversation, max_new_tokens, temperature, top_p, seed, text_only, ov_group_size, ov_key_by_channel,
            kv_residual, as_json) -> None:
    """Answer PROMPT about --image with the model in MODEL (an export dir, an HF checkpoint for torch, or a
    bundled model's name: `kvtool ls models`), streaming the answer, then print the stats."""
    from kvtool.models.bundled import model_path
    from kvtool.runtime.run import RunConfig, run_once

    cfg = RunConfig(model=model_path(model), prompt=prompt, images=list(images), backend=backend, device=device, kv=kv,
                    kv_bits=kv_bits, k_bits=k_bits, v_bits=v_bits, kv_mode=kv_mode, first_token=first_token,
                    conversation=conversation, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, seed=seed, text_only=text_only, ov_group_size=ov_group_size,
                    ov_key_by_channel=ov_key_by_channel, kv_residual=kv_residual)
    if as_json:
        echo_json(run_once(cfg))
        return
    res = run_once(cfg, on_text=lambda t: click.echo(t, nl=False))
    click.echo("")
    st, info = res["stats"], res["pipeline"]
    bits = "" if info["k_bits"] is None else f" K{info['k_bits']}V{info['v_bits']}"
    window = f", fp window {st['kv_residual']}" if st.get("kv_residual") else ""
    click.echo(f"-- {info['backend']} on {info['device']} | kv {st['kv']}{bits} {st['kv_mode']} (first token: "
               f"{st['first_token']}{window})")
    click.echo(f"prompt {st['prompt_tokens']} tokens, prefill {st['prefill_ms']:.1f} ms | {st['new_tokens']} new, "
               f"{st['decode_ms_per_token']:.2f} ms/token ({st['tokens_per_s']:.1f} tok/s)")
    held = f" {st['kv_dtype']}" if st.get("kv_dtype") else ""
    if info["k_bits"] is not None:  # a quantizing scheme: the dtype is that of its unquantized residual
        held = f" = K{info['k_bits']}V{info['v_bits']} codes + group params +{held or ' fp'} residual"
    click.echo(f"KV {st['kv_bytes'] / 2**20:.3f} MiB{held} (fp16 {st['kv_fp16_bytes'] / 2**20:.3f} MiB) | "
               f"peak RSS {st['peak_rss_bytes'] / 2**20:.0f} MiB")


@main.command(name="devices")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def devices_cmd(as_json) -> None:
    """List OpenVINO devices, ONNX Runtime providers and torch CUDA devices, and what `auto` picks."""
    from kvtool.devices import list_devices
    from kvtool.quant_ops import native

    d = list_devices()
    d["quant_ops"] = native.info()
    if as_json:
        echo_json(d)
        return
    click.echo("OpenVINO:")
    for x in d["openvino"] or [{"device": "(not installed)", "name": ""}]:
        click.echo(f"  {x['device']:<10} {x['name']}")
    click.echo("ONNX Runtime providers: " + (", ".join(d["onnxruntime"]) or "(not installed)"))
    click.echo("torch: " + ", ".join(f"{x['device']} ({x['name']})" for x in d["torch"]))
    click.echo("auto picks: " + ", ".join(f"{b} -> {v}" for b, v in d["auto"].items()))
    click.echo(f"quant_ops kernels: {d['quant_ops']['path']} ({d['quant_ops']['reason']})")



# ---------------------------------------------------------------------------------------------------------
# evals commands
# ---------------------------------------------------------------------------------------------------------


def _judge_config(judge_url, judge_model, judge_key, mmvet_runs, toxicity_model, toxicity_url, competence_words,
                  stereotype_words):
    from kvtool.evals.judges import JudgeConfig

    return JudgeConfig.from_env(url=judge_url, model=judge_model, key=judge_key, mmvet_runs=mmvet_runs,
                                toxicity_model=toxicity_model, toxicity_url=toxicity_url,
                                competence_words=competence_words, stereotype_words=stereotype_words)


def _judge_options(f):
    for opt in reversed([
        click.option("--judge-url", default=None, help="OpenAI-compatible base URL (env KVTOOL_JUDGE_URL) for the "
                     "MM-Vet grader and HallusionBench judge."),
        click.option("--judge-model", default=None, help="Judge model name (env KVTOOL_JUDGE_MODEL)."),
        click.option("--judge-key", default=None, help="Judge API key (env KVTOOL_JUDGE_KEY / OPENAI_API_KEY)."),
        click.option("--mmvet-runs", default=1, show_default=True, type=int,
                     help="MM-Vet grading runs to average (the study used 5)."),
        click.option("--toxicity-model", default=None, help="Local text-classification checkpoint for toxicity."),
        click.option("--toxicity-url", default=None, help="HTTP toxicity scorer: POST {texts} -> {scores}."),
        click.option("--competence-words", default=None, help="Competence word list (one per line)."),
        click.option("--stereotype-words", default=None, help="Stereotype words, JSON {group: [words]}."),
    ]):
        f = opt(f)
    return f


def _print_results(results: dict) -> None:
    """One line per task: its headline metric on the task's own scale, and the sample count. The other
    metrics (on their official scales, some 0-1, some 0-100) are in results.json / ``--json``, not mixed in."""
    from kvtool.evals.tasks import flatten_metrics, get_task, headline_value

    for task, rec in results.get("tasks", {}).items():
        m = rec.get("metrics", {})
        spec = get_task(task)
        head, val = spec.headline, headline_value(spec, m)
        shown = "missing" if val is None else f"{val:.2f}"
        flat = flatten_metrics(m, keep_missing=True)
        beside = "".join(f" {k}={'–' if flat.get(k) is None else format(flat[k], '.2f')}" for k in spec.beside)
        click.echo(f"{task:<15} {head}={shown:<10}{beside} n={rec.get('n_samples', m.get('n'))}")
    if results.get("tasks"):
        click.echo("(every metric: results.json in the run directory, or --json)")


def _print_failures(results: dict) -> None:
    """One line per task with failed rows: how many, and why."""
    for task, rec in results.get("tasks", {}).items():
        failed = rec.get("failed") or {}
        if failed.get("n"):
            why = "; ".join(f"{n['n']}x {reason}" for reason, n in list(failed["reasons"].items())[:3])
            click.echo(f"{task}: {failed['n']} of {rec.get('n_samples')} rows failed, counted as wrong ({why})",
                       err=True)


@main.command(name="eval")
@click.argument("model_or_dir", required=False)
@click.option("--tasks", "tasks", default=None, help="Comma-separated tasks (kvtool ls tasks).")
@click.option("-o", "--output", default=None, help="Run directory (results.json, <task>/predictions.jsonl).")
@click.option("--backend", default="auto", show_default=True,
              help="openvino | onnxruntime (or onnx) | torch | auto.")
@click.option("--device", default="auto", show_default=True)
@click.option("--kv", default="fp16", show_default=True, help="KV scheme, e.g. g-KC128VT128 (kvtool ls schemes).")
@click.option("--kv-bits", type=int, default=None, help="Bits for both K and V.")
@click.option("--k-bits", type=int, default=None)
@click.option("--v-bits", type=int, default=None)
@click.option("--kv-mode", default="packed", show_default=True, type=click.Choice(["packed", "simulate"]))
@click.option("--first-token", default="compressed", show_default=True, type=click.Choice(["compressed", "fp"]))
@click.option("--conversation", default="auto", show_default=True,
              help="auto | vicuna_v1 | chat_template. auto is the rule `kvtool run` uses too: vicuna_v1 for "
                   "LLaVA-1.5 (LLaVA's eval scripts prompt the study's tasks so), unless the checkpoint's chat "
                   "template holds vicuna_v1's system prompt itself (kvtool-shapes: its training format); the "
                   "chat template for other models. Tasks add their own answer instruction to the question.")
@click.option("--wbits", type=int, default=None, help="Weight-bits label for reports (else from the manifest).")
@click.option("--limit", type=int, default=None, help="At most N dataset rows per task.")
@click.option("--offset", type=int, default=0, show_default=True, help="Skip the first N rows.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of greedy tasks.")
@click.option("--seeds", default=None, help="Seeds of sampled tasks (PAIRS, SocialCF), e.g. 0,1,2.")
@click.option("--shard", default=None, help="i/n: run the i-th of n interleaved shards.")
@click.option("--merge", is_flag=True, help="Join the shards in -o into predictions.jsonl + results.json.")
@click.option("--rescore", default=None, help="Re-score saved predictions of RUN_DIR (judges) without generating.")
@click.option("--data", "data", multiple=True, help="TASK=PATH_OR_HUB_ID (repeatable).")
@click.option("--data-dir", default=None, help="Folder holding <task>/ local copies in the hub format.")
@click.option("--max-new-tokens", type=int, default=None, help="Override every task's default.")
@click.option("--retry-failed", is_flag=True, help="Generate again the failed rows (unreadable image, processor "
              "error, prompt too long) a resumed run would otherwise keep.")
@_kv_residual_option
@_judge_options
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print results.json to stdout.")
def eval_cmd(model_or_dir, tasks, output, backend, device, kv, kv_bits, k_bits, v_bits, kv_mode, first_token,
             conversation, wbits, limit, offset, seed, seeds, shard, merge, rescore, data, data_dir, max_new_tokens,
             retry_failed, kv_residual, judge_url, judge_model, judge_key, mmvet_runs, toxicity_model, toxicity_url, competence_words,
             stereotype_words, no_progress, as_json) -> None:
    """Evaluate MODEL_OR_DIR on the study's benchmarks; resumable (re-run the same command to continue).

    The run directory records the settings that produced it; a re-run under other settings (model, --kv,
    bits, ...) is refused (--limit, --offset and --shard may change). --limit takes a balanced sample across a
    task's strata (POPE category, MME category, ...). A sample that fails is saved as a failed row and the run
    goes on; resumed runs keep failed rows unless --retry-failed."""
    from kvtool.evals.runner import EvalConfig, EvalInterrupted, merge_shards, parse_shard, run_eval
    from kvtool.evals.runner import rescore as rescore_run

    judge = _judge_config(judge_url, judge_model, judge_key, mmvet_runs, toxicity_model, toxicity_url,
                          competence_words, stereotype_words)
    if rescore:
        results = rescore_run(rescore, judge, tasks.split(",") if tasks else None)
    elif merge:
        if not output:
            raise InputError("--merge: give the run directory with -o")
        results = merge_shards(output, judge)
    else:
        if not model_or_dir:
            raise InputError("MODEL_OR_DIR: missing; expected an exported dir or an HF checkpoint dir")
        if not tasks:
            raise InputError("--tasks: missing; expected e.g. --tasks textvqa,pope (kvtool ls tasks)")
        if not output:
            raise InputError("-o/--output: missing; expected a run directory such as runs/NAME")
        data_map = {}
        for item in data:
            if "=" not in item:
                raise InputError(f"--data {item!r}: expected TASK=PATH_OR_HUB_ID")
            key, val = item.split("=", 1)
            data_map[key.strip().lower()] = val.strip()
        try:
            seed_list = [int(s) for s in seeds.split(",")] if seeds else None
        except ValueError:
            raise InputError(f"--seeds {seeds!r}: expected comma-separated integers") from None
        from kvtool.runtime.kvspec import resolve_bits

        k_bits, v_bits = resolve_bits(kv, kv_bits, k_bits, v_bits)
        cfg = EvalConfig(model=model_or_dir, tasks=tasks.split(","), output=output, backend=backend, device=device,
                         kv=kv, k_bits=k_bits, v_bits=v_bits, kv_residual=kv_residual, kv_mode=kv_mode,
                         first_token=first_token, conversation=conversation, wbits=wbits, limit=limit,
                         offset=offset, seed=seed, shard=parse_shard(shard), data=data_map, data_dir=data_dir,
                         max_new_tokens=max_new_tokens, seeds=seed_list, judge=judge, progress=not no_progress,
                         retry_failed=retry_failed)
        try:
            results = run_eval(cfg)
        except EvalInterrupted as exc:
            click.echo(str(exc), err=True)
            sys.exit(130)
    if as_json:
        echo_json(results)
    else:
        _print_results(results)
        _print_failures(results)


@main.command(name="compare")
@click.argument("run_a")
@click.argument("run_b")
@click.option("--tasks", default=None, help="Comma-separated subset of the common tasks.")
@click.option("--n-boot", default=1000, show_default=True, type=int, help="Bootstrap resamples.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
def compare_cmd(run_a, run_b, tasks, n_boot, seed, as_json) -> None:
    """Parity of RUN_B against reference RUN_A: metric deltas with bootstrap 95% CI, agreement, flips."""
    from kvtool.evals.compare import compare_runs, format_comparison

    cmp = compare_runs(run_a, run_b, tasks.split(",") if tasks else None, n_boot=n_boot, seed=seed)
    if as_json:
        echo_json(cmp)
    else:
        click.echo(format_comparison(cmp))


@main.command(name="report")
@click.argument("runs", nargs=-1, required=True)
@click.option("-o", "--output", default="report", show_default=True, help="Output folder.")
@click.option("--reference", default=None,
              help="Run (one of RUNS) the trade-off plot compares against; default: per model its fp16-KV run "
                   "with the most weight bits, PyTorch first.")
@click.option("--n-boot", type=int, default=1000, show_default=True,
              help="Bootstrap resamples of the 95% intervals (0: none).")
@click.option("--json", "as_json", is_flag=True)
def report_cmd(runs, output, reference, n_boot, as_json) -> None:
    """Table-3-shaped Markdown/CSV table and PNG plots over RUNS (run directories): headline vs KV bits, and
    the accuracy change vs KV bytes per token with its Pareto front (tradeoff.png)."""
    from kvtool.evals.report import write_report

    if n_boot < 0:
        raise InputError(f"--n-boot {n_boot}: expected 0 or a positive number of resamples")
    rep = write_report(list(runs), output, reference=reference, n_boot=n_boot)
    if as_json:
        echo_json(rep)
    else:
        click.echo((open(rep["markdown"], encoding="utf-8").read()).rstrip())
        click.echo(f"\nwrote {rep['markdown']}, {rep['csv']}, " + ", ".join(rep["plots"]))


@main.command(name="sweep")
@click.argument("grid")
@click.option("-o", "--output", required=True, help="Sweep folder (cells/, compare/, report/, sweep.json).")
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local: no server needed; ray: each unit a Ray task.")
@click.option("--address", default=None, help="Ray cluster: auto | ray://host:10001 (default: a local Ray).")
@click.option("--workers", default=1, show_default=True, type=int,
              help="local: process pool size (1 = units one after another here); ray: CPUs of a local Ray.")
@click.option("--max-retries", default=3, show_default=True, type=int, help="Ray: retries of a unit whose worker died.")
@click.option("--dry-run", is_flag=True, help="Show units, samples and a time estimate; run nothing.")
@click.option("--rates-from", multiple=True, help="Earlier run/sweep folders to measure rows/s from (dry run).")
@click.option("--n-boot", default=1000, show_default=True, type=int, help="Bootstrap resamples of compare.")
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def sweep_cmd(grid, output, executor, address, workers, max_retries, dry_run, rates_from, n_boot, no_progress,
              as_json) -> None:
    """Run the grid in GRID (TOML: models, weights, KV schemes x bits, tasks, reference) into -o: every unit
    (cell x task x shard) once, resumable, then compare every cell with the reference and write the
    study-shaped report. The judge's API key comes from the environment (KVTOOL_JUDGE_KEY), never the grid."""
    from kvtool.evals.sweep import SweepConfig, format_plan, run_sweep

    cfg = SweepConfig(grid=grid, output=output, executor=executor, address=address, workers=workers,
                      max_retries=max_retries, dry_run=dry_run, rates_from=list(rates_from), n_boot=n_boot,
                      progress=not no_progress)
    result = run_sweep(cfg)
    if as_json:
        echo_json(result)
    else:
        click.echo(format_plan(result["plan"]))
        if not dry_run:
            st = result["study"]
            click.echo(f"ran {result['units_run']} units in {result['run_wall_s']:.1f} s; cells done "
                       f"{len(st['cells_done'])}/{len(st['cells_done']) + len(st['cells_missing'])}")
            if st.get("study"):
                click.echo(f"report: {st['study']}, {st['report']['markdown']}")
    if not dry_run and result["failed"]:
        for f in result["failed"]:
            click.echo(f"error: unit {f['unit']}: {f['error']}", err=True)
        sys.exit(1)


@ls_group.command(name="tasks")
@click.option("--json", "as_json", is_flag=True)
def ls_tasks(as_json) -> None:
    """List the eval tasks: data source, metric, the number each reports and its generation length (with source)."""
    from kvtool.evals.tasks import TASKS

    rows = [{"task": t.name, "data": t.source, "hub_ids": list(t.hub_ids), "metric": t.metric,
             "headline": t.headline, "beside": list(t.beside), "reports": t.reports, "judges": list(t.judges),
             "generation": t.generation(), "generation_source": t.generation_source, "notes": t.notes}
            for t in TASKS.values()]
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['task']:<15} {r['data']}\n{'':<15} metric: {r['metric']}\n{'':<15} reports: {r['reports']}\n"
                   f"{'':<15} max new tokens: {r['generation']['max_new_tokens']}; source: {r['generation_source']}")


@main.command(name="submission")
@click.argument("run_dir")
@click.option("-o", "--output", required=True, help="The JSON file to upload (to EvalAI's test-dev phase).")
@click.option("--task", default="vqav2_testdev", show_default=True, help="The run's task to export.")
@click.option("--question-ids", default=None,
              help="Every question of the test set (VQA's test2015 questions JSON or LLaVA's test2015 JSONL): "
                   "listed questions without a prediction get \"\", as LLaVA's converter writes.")
@click.option("--json", "as_json", is_flag=True)
def submission_cmd(run_dir, output, task, question_ids, as_json) -> None:
    """Write the EvalAI upload file of RUN_DIR's VQAv2 test-dev predictions (LLaVA's converter's format)."""
    from kvtool.evals.submission import write_submission

    info = write_submission(run_dir, output, task=task, question_ids=question_ids)
    if as_json:
        echo_json(info)
    else:
        click.echo(f"wrote {info['path']}: {info['n_answers']} answers ({info['n_predicted']} predicted, "
                   f"{info['n_blank']} blank)")


# ---------------------------------------------------------------------------------------------------------
# demo command
# ---------------------------------------------------------------------------------------------------------


@main.command(name="demo")
@click.option("--out", "-o", "out_dir", default="kvtool-demo", show_default=True, help="Directory for runs, JSON and plot.")
@click.option("--cache-dir", default=None, help="Export cache (default $KVTOOL_CACHE or ~/.cache/kvtool).")
@click.option("--n", "n", type=int, default=300, show_default=True, help="shapes test questions per row.")
@click.option("--quick", is_flag=True, help="Fewer questions (60), for CI.")
@click.option("--schemes", default=",".join(("uniform", "or2", "g-CN", "g-T128", "g-KCNVT128", "g-KC128VT128")),
              show_default=True, help="Comma-separated KV schemes.")
@click.option("--bits", default="4,2", show_default=True, help="Comma-separated KV bit widths (K = V).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_path", default=None, help="Also write the {'rows': [...]} JSON here ('-': stdout).")
def demo_cmd(out_dir, cache_dir, n, quick, schemes, bits, device, json_path) -> None:
    """Export the bundled kvtool-shapes model with int4 weights to OpenVINO and evaluate it on the shapes
    benchmark: PyTorch fp32 reference, fp16 KV, and the study's KV schemes at each bit width (Table 3 shape)."""
    from kvtool.demo import DemoConfig, run_demo

    try:
        bit_list = tuple(int(b) for b in bits.split(",") if b.strip())
    except ValueError:
        raise InputError(f"--bits {bits!r}: expected comma-separated integers such as 4,2") from None
    cfg = DemoConfig(out_dir=out_dir, cache_dir=cache_dir, n=n, quick=quick, device=device, bits=bit_list,
                     schemes=tuple(s.strip() for s in schemes.split(",") if s.strip()))
    result = run_demo(cfg)
    if json_path == "-":
        echo_json({"rows": result["rows"]})
        return
    click.echo(result["table"])
    click.echo(f"\nplots: {', '.join(result['plots'])}   json: {out_dir}/demo.json")
    if json_path:
        echo_json({"rows": result["rows"], "config": result["config"]}, json_path)


if __name__ == "__main__":  # pragma: no cover
    main()
