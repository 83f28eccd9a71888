"""kvtool.quant_ops (see DESIGN.md)."""
