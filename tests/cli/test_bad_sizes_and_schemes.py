"""Bad values a new user types into `models make` size options and `demo --schemes`: one line naming the
option and what was expected, exit 2, before anything is built or exported."""

from __future__ import annotations

import pytest

from kvtool.cli import main
from kvtool.models.tiny import TinySize

SIZE_OPTIONS = ["--hidden", "--layers", "--heads", "--kv-heads", "--intermediate", "--vision-hidden",
                "--vision-layers", "--image-size"]


def _run(args, capfd) -> tuple[int, str]:
    with pytest.raises(SystemExit) as ex:
        main.main(args, prog_name="kvtool")
    return ex.value.code, capfd.readouterr().err


@pytest.mark.parametrize("opt", SIZE_OPTIONS)
@pytest.mark.parametrize("value", ["0", "-2"])
def test_models_make_size_not_positive_is_one_line(opt, value, tmp_path, capfd):
    # `--layers 0` used to write a checkpoint without decoder layers and exit 0
    out = tmp_path / "ck"
    code, err = _run(["models", "make", "tiny-llava", str(out), opt, value], capfd)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {opt} {value}: expected a positive integer"), err
    assert not out.exists()


def test_size_options_cover_every_tiny_size_field():
    # the test above walks every size option models make has (patch_size / vision_heads / vocab_size are fixed)
    fields = {f"--{k.replace('_', '-')}" for k in TinySize.__dataclass_fields__}
    assert set(SIZE_OPTIONS) <= fields


@pytest.mark.parametrize("schemes,says", [
    ("uniform,nosuch", "error: --schemes: unknown KV scheme 'nosuch'"),
    (" , ", "error: --schemes: empty; expected comma-separated KV schemes"),
])
def test_demo_bad_schemes_name_the_option(schemes, says, tmp_path, capfd):
    code, err = _run(["demo", "-o", str(tmp_path / "d"), "--schemes", schemes], capfd)
    assert code == 2 and err.count("\n") == 1 and err.startswith(says), err
    assert not (tmp_path / "d").exists()
