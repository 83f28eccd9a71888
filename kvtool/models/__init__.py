"""kvtool.models (see DESIGN.md)."""
