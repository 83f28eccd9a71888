"""Fixtures shared by the export tests."""

import pytest


@pytest.fixture(scope="session")
def torch_model(tiny_model):
    """``torch_model(name)``: the tiny checkpoint ``name`` loaded as a PyTorch model, once per session."""
    from kvtool.export.source import load_torch_model

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_torch_model(tiny_model(name))
        return cache[name]

    return get
