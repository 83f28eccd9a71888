"""``kvtool run`` (answer one question about an image, streaming, then the stats) and ``kvtool devices``. The
work is ``kvtool.runtime.run.run_once`` / ``kvtool.devices.list_devices``; this module parses and prints."""

from __future__ import annotations

import click

from kvtool.cli.base import echo_json, main, model_argument, quiet_loading, verbose_option
from kvtool.cli.kv_options import conversation_option, kv_fields, kv_options


def backend_option(choices: bool = True):
    """``--backend`` (auto picks by the model directory: an export's manifest, else torch for a checkpoint)."""
    if choices:
        return click.option("--backend", default="auto", show_default=True,
                            type=click.Choice(["auto", "openvino", "onnxruntime", "onnx", "torch"]),
                            help="onnx and onnxruntime are the same backend.")
    return click.option("--backend", default="auto", show_default=True,
                        help="openvino | onnxruntime (or onnx) | torch | auto.")


def device_option(f):
    return click.option("--device", default="auto", show_default=True,
                        help="CPU / GPU / NPU (OpenVINO), cpu / cuda (torch).")(f)


@main.command(name="run")
@model_argument("model")
@click.option("--image", "images", multiple=True, help="Image file (repeat for models that take several).")
@click.option("--prompt", required=True, help="The question about the image.")
@backend_option()
@device_option
@kv_options(ov=True)
@conversation_option
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--text-only", is_flag=True, help="Ask without an image.")
@verbose_option
@click.option("--json", "as_json", is_flag=True, help="Print the answer, stats and pipeline as JSON.")
def run_cmd(model, images, prompt, kv_spec, verbose, as_json, **opts) -> None:
    """Answer PROMPT about --image with the model in MODEL (an export dir, an HF checkpoint for torch, or a
    bundled model's name: `kvtool ls models`), streaming the answer, then print the stats."""
    from kvtool.runtime.run import RunConfig, run_once

    cfg = RunConfig(model=model, prompt=prompt, images=list(images), **kv_fields(kv_spec, ov=True), **opts)
    with quiet_loading(verbose):
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
        if st["kv_mode"] == "simulate":  # nothing is held as codes: the figure is packed storage's, in theory
            held = (f" as packed storage would hold it (simulate holds K/V dense: kv_work "
                    f"{st.get('kv_work_bytes', 0) / 2**20:.3f} MiB)")
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
