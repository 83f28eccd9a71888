"""The eval run's text options (``kvtool.evals.options``): tasks, --data, --seeds as the CLI passes them."""

from __future__ import annotations

import pytest

from kvtool.errors import InputError
from kvtool.evals.options import parse_data, parse_seeds, parse_tasks


def test_tasks_split_and_stripped():
    assert parse_tasks("pope, mme,") == ["pope", "mme"]
    for bad in (None, "", " , "):
        with pytest.raises(InputError, match=r"^--tasks: missing"):
            parse_tasks(bad)


def test_data_items_become_a_task_map():
    assert parse_data([]) == {}
    assert parse_data(["POPE = /d/pope", "mme=lmms-lab/MME", "pope=/d/pope2"]) == {"pope": "/d/pope2",
                                                                                  "mme": "lmms-lab/MME"}
    assert parse_data(["vqav2=/d/a=b"]) == {"vqav2": "/d/a=b"}  # only the first '=' splits
    for bad in ("pope", "=x", "pope="):
        with pytest.raises(InputError) as e:
            parse_data([bad])
        assert str(e.value) == f"--data {bad!r}: expected TASK=PATH_OR_HUB_ID"


def test_seeds_are_comma_separated_integers():
    assert parse_seeds(None) is None and parse_seeds("") is None
    assert parse_seeds("0, 1,2") == [0, 1, 2] and parse_seeds("7") == [7]
    for bad in ("0,x", "1,,2", "1.5"):
        with pytest.raises(InputError) as e:
            parse_seeds(bad)
        assert str(e.value) == f"--seeds {bad!r}: expected comma-separated integers"
