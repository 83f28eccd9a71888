"""Fixtures shared by the eval tests."""

import pytest

from tests.evals.fixtures import MAKERS


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A folder holding a small local copy of every task's dataset, in each dataset's own format."""
    root = tmp_path_factory.mktemp("evaldata")
    for make in MAKERS.values():
        make(root)
    return root
