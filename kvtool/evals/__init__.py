"""kvtool.evals (see DESIGN.md)."""
