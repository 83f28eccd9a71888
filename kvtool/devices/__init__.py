"""kvtool.devices (see DESIGN.md)."""
