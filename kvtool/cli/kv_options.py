"""The KV-cache options, declared once for every command that loads a model (``run``, ``eval run``):
``kv_options`` adds ``--kv``, ``--kv-bits``, ``--k-bits``, ``--v-bits``, ``--kv-mode``, ``--first-token``,
``--kv-residual`` (and, for ``run``, OpenVINO's ``--ov-group-size`` / ``--ov-key-by-channel``), resolves the
bit defaults once (``runtime.kvspec.resolve_bits``) and hands the command one ``kv_spec`` built by
``runtime.kvspec.make_kv_spec``; ``kv_fields`` turns that spec into the run / eval configs' fields.
``conversation_option`` is the shared ``--conversation``. It holds no KV rule itself: the runtime's kvspec
does.
"""

from __future__ import annotations

import functools

import click
from click.core import ParameterSource

from kvtool.errors import InputError

KV_PARAMS = ("kv", "kv_bits", "k_bits", "v_bits", "kv_mode", "first_token", "kv_residual", "ov_group_size",
             "ov_key_by_channel")
# a quantizing scheme to suggest when bit options come without --kv (the study's best at 2 bits)
SUGGESTED_SCHEME = "g-KC128VT128"


def _options(ov: bool) -> list:
    opts = [
        click.option("--kv", default="fp16", show_default=True,
                     help="KV scheme: fp16 (none), a quantizing scheme such as g-KC128VT128 (kvtool ls schemes), "
                          "or OpenVINO's ov-u8 / ov-u4."),
        click.option("--kv-bits", type=int, default=None, help="Bits for K and V (quantizing schemes; default 4)."),
        click.option("--k-bits", type=int, default=None, help="Bits for K (overrides --kv-bits)."),
        click.option("--v-bits", type=int, default=None, help="Bits for V (overrides --kv-bits)."),
        click.option("--kv-mode", default="packed", show_default=True, type=click.Choice(["packed", "simulate"])),
        click.option("--first-token", default="compressed", show_default=True,
                     type=click.Choice(["compressed", "fp"])),
        click.option("--kv-residual", type=int, default=None, metavar="R",
                     help="KIVI's full-precision window: the newest R tokens stay unquantized (V: the newest R; "
                          "per-channel/per-tensor sides: N mod R, quantized R at a time). Quantizing schemes "
                          "only; KIVI uses 128."),
    ]
    if ov:
        opts += [click.option("--ov-group-size", type=int, default=None,
                              help="ov-u8/ov-u4: KV group size along head_dim."),
                 click.option("--ov-key-by-channel", is_flag=True, help="ov-u8/ov-u4: quantize keys by channel.")]
    return opts


def build_kv_spec(kv: str = "fp16", kv_bits: int | None = None, k_bits: int | None = None,
                  v_bits: int | None = None, kv_mode: str = "packed", first_token: str = "compressed",
                  kv_residual: int | None = None, ov_group_size: int | None = None,
                  ov_key_by_channel: bool = False, kv_given: bool = True):
    """The runtime's ``KVSpec`` for the KV options as given (``make_kv_spec``), bit defaults resolved once
    (``resolve_bits``: --k-bits / --v-bits override --kv-bits, default 4). ``kv_given=False`` (--kv left at
    its fp16 default) with a bit option or a window raises an ``InputError`` saying fp16 is the default and
    naming ``--kv SCHEME``; other bad values raise the kvtool.runtime.kvspec errors."""
    from kvtool.runtime.kvspec import make_kv_spec, resolve_bits

    given = [(flag, v) for flag, v in (("--kv-bits", kv_bits), ("--k-bits", k_bits), ("--v-bits", v_bits),
                                       ("--kv-residual", kv_residual)) if v is not None]
    if not kv_given and given:
        flags = " ".join(f"{f} {v}" for f, v in given)
        raise InputError(f"{flags}: the default KV scheme is fp16, which quantizes nothing; pass --kv SCHEME to "
                         f"quantize, e.g. --kv {SUGGESTED_SCHEME} {flags} (kvtool ls schemes)")
    kb, vb = resolve_bits(kv, kv_bits, k_bits, v_bits)
    return make_kv_spec(kv, kb, vb, kv_mode, first_token, ov_group_size, ov_key_by_channel, residual=kv_residual)


def kv_fields(spec, ov: bool = False) -> dict:
    """The fields of ``RunConfig`` / ``EvalConfig`` that ``spec`` (a ``KVSpec``) sets: the scheme, the resolved
    bits of a quantizing scheme (None for fp16 and ov-*, whose bits the configs must not be given), mode, first
    token, window; with ``ov`` also OpenVINO's group size and key-by-channel. The one place the CLI reads a
    spec's members."""
    quantizes = spec.quantizes
    out = {"kv": str(spec.scheme), "k_bits": spec.k_bits if quantizes else None,
           "v_bits": spec.v_bits if quantizes else None, "kv_mode": spec.mode, "first_token": spec.first_token,
           "kv_residual": spec.residual}
    if ov:
        out.update(ov_group_size=spec.ov_group_size, ov_key_by_channel=spec.ov_key_by_channel)
    return out


def kv_options(ov: bool = False):
    """Decorator: the KV options above on a click command, which receives them as one ``kv_spec`` argument
    (``build_kv_spec``, checked before the command body runs, so bad KV options fail before anything loads)."""

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            opts = {name: kwargs.pop(name) for name in KV_PARAMS if name in kwargs}
            ctx = click.get_current_context()
            kv_given = ctx.get_parameter_source("kv") not in (ParameterSource.DEFAULT, None)
            kwargs["kv_spec"] = build_kv_spec(**opts, kv_given=kv_given)
            return f(*args, **kwargs)

        for opt in reversed(_options(ov)):
            wrapper = opt(wrapper)
        return wrapper

    return decorate


def conversation_option(f):
    return click.option(
        "--conversation", default="auto", show_default=True, type=click.Choice(["auto", "chat_template", "vicuna_v1"]),
        help="Prompt format; auto is one rule for run and eval, resolved when the model loads: vicuna_v1 for "
             "LLaVA-1.5 (the conversation LLaVA's eval scripts use for the study's tasks), unless the checkpoint's "
             "chat template holds vicuna_v1's system prompt itself (kvtool-shapes: its training format); the "
             "checkpoint's chat template for every other model. Tasks add their own answer instruction.")(f)
