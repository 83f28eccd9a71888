"""kvtool.export (see DESIGN.md)."""
