"""``kvtool ls schemes`` and ``kvtool kv-roundtrip``: print the tables ``kvtool.quant_ops.tables`` builds (scheme
meanings and storage costs; a quantization round trip on a random KV block). No quantization logic here."""

from __future__ import annotations

import click

from kvtool.cli.base import echo_json, ls_group, main, progress_option
from kvtool.errors import InputError

# what the bit options' help names; a test holds it equal to quant_ops.schemes.QUANT_BITS (not imported here:
# kvtool.quant_ops loads its kernels, and `kvtool --help` stays instant)
BITS_TEXT = "2, 3, 4 or 8"


def _check_bits(ctx: click.Context, param: click.Parameter, value):
    """The bits ``kvtool run`` / ``eval`` accept for a quantizing scheme (``quant_ops.schemes.QUANT_BITS``, the
    one source), so that what ``ls schemes`` / ``kv-roundtrip`` show is what a run can use; else ``InputError``
    naming the option."""
    from kvtool.quant_ops.schemes import QUANT_BITS

    for b in (value if isinstance(value, tuple) else (value,)):
        if b is not None and b not in QUANT_BITS:
            raise InputError(f"{param.opts[0]} {b}: expected one of {', '.join(map(str, QUANT_BITS))} (the bits "
                             f"kvtool run --kv SCHEME takes; fp16 is the unquantized scheme)")
    return value


def _bits_option(name: str, help_text: str, multiple: bool = False):
    return click.option(name, type=int, multiple=multiple, callback=_check_bits, metavar="BITS",
                        help=f"{help_text} One of {BITS_TEXT}, as kvtool run takes.")


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
@progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def kv_roundtrip(schemes, bits, k_bits, v_bits, tokens, heads, head_dim, seed, no_progress, as_json) -> None:
    """Quantization round trip on a random fp16 KV block with outlier channels: relative error, max error
    and bytes held vs fp16 per scheme (through the packed store)."""
    from kvtool.quant_ops.tables import roundtrip

    rows = roundtrip(list(schemes) or None, [int(b) for b in bits] or None,
                     int(k_bits) if k_bits else None, int(v_bits) if v_bits else None,
                     tokens=tokens, heads=heads, head_dim=head_dim, seed=seed, progress=not no_progress)
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
