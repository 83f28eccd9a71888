"""kvtool.runtime (see DESIGN.md)."""
