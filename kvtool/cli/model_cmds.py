"""``kvtool models make``, ``kvtool ls models`` and ``kvtool export``: build checkpoints offline, list them, export
one to graphs. The work is ``kvtool.models`` / ``kvtool.export``'s; this module parses and prints."""

from __future__ import annotations

from pathlib import Path

import click

from kvtool.cli.base import (
    KvtoolGroup,
    echo_json,
    ls_group,
    main,
    model_argument,
    progress_option,
    quiet_loading,
    verbose_option,
)
from kvtool.errors import InputError


@main.group(name="models", cls=KvtoolGroup)
def models_group() -> None:
    """Build tiny random checkpoints offline, for tests and benchmarks (the bundled kvtool-shapes model is trained
    by `python scripts/train_shapes.py`, outside the package)."""


REAL_SHAPE_NAMES = ["llava-1.5-7b", "llava-1.5-13b", "llava-v1.6-vicuna-7b", "qwen2-vl-2b", "qwen2-vl-7b"]


@models_group.command(name="make")
@click.argument("name", metavar="NAME",
                type=click.Choice(["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl", *REAL_SHAPE_NAMES]))
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
@progress_option
@verbose_option
@click.option("--json", "as_json", is_flag=True, help="Print the sizes as JSON.")
def models_make(name, out_dir, seed, as_json, weight_dtype, no_progress, verbose, **sizes) -> None:
    """Build the random checkpoint NAME (kvtool ls models) into OUT_DIR (no hub access).

    tiny-*: tiny models for tests. The others have the published config.json of the real model (random
    weights, written shard by shard in fp16/bf16, with a progress bar of the shards; --layers N truncates the
    decoder)."""
    from dataclasses import asdict

    from kvtool.models import make_tiny_model, tiny_size

    if name in REAL_SHAPE_NAMES:
        with quiet_loading(verbose):
            _make_real_shape(name, out_dir, seed, as_json, weight_dtype, sizes, progress=not no_progress)
        return
    if weight_dtype:
        raise InputError("--dtype: only for the real-shape models (tiny models are written in float32)")

    size = tiny_size(name, **sizes)  # validates before any heavy import
    with quiet_loading(verbose):  # transformers' "Writing model shards" bar: a library's (one tiny shard)
        path = make_tiny_model(name, out_dir, seed=seed, **{k: v for k, v in sizes.items() if v is not None})
    shown = asdict(size)
    # the tokenizer is trained up to vocab_size entries and may end smaller: report what the checkpoint has
    from kvtool.export.source import read_config

    cfg = read_config(Path(path))
    shown["vocab_size"] = (cfg.get("text_config") or {}).get("vocab_size") or cfg.get("vocab_size", size.vocab_size)
    info = {"name": name, "path": str(path), "seed": seed, "sizes": shown}
    if as_json:
        echo_json(info)
    else:
        click.echo(f"{name} -> {path}")
        click.echo("  " + ", ".join(f"{k}={v}" for k, v in shown.items()))


def _make_real_shape(name, out_dir, seed, as_json, weight_dtype, sizes, progress: bool = True) -> None:
    from kvtool.models.real_shapes import make_real_shape_model

    other = sorted(f"--{k.replace('_', '-')}" for k, v in sizes.items() if v is not None and k != "layers")
    if other:
        raise InputError(f"{', '.join(other)}: {name} has the published sizes; only --layers, --dtype, --seed apply")
    info = make_real_shape_model(name, out_dir, layers=sizes.get("layers"), seed=seed, dtype=weight_dtype,
                                 progress=progress)
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


@main.command(name="export")
@model_argument("model")
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
@progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the result (graphs, sizes, manifest) as JSON.")
def export_cmd(model, output, as_json, no_progress, **opts) -> None:
    """Export MODEL (a local Hugging Face checkpoint dir, a bundled model's name such as kvtool-shapes, or a hub
    id when online) to graphs + kvtool.json.

    Graphs: language model (OpenVINO: stateful by default; --stateless / ONNX: explicit
    past_key_values.{i}.key|value inputs, present.{i}.* outputs; logits of the last position only), text embeddings, vision embeddings (+ merger for Qwen2-VL). Supported: llava, llava_next
    and qwen2_vl, on both backends.
    """
    from kvtool.export import ExportConfig, export_model

    cfg = ExportConfig(model=model, output=output, progress=not no_progress, **opts)
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
