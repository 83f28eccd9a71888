"""POPE (and every hub-loaded task) without a local copy and without the hub: ``kvtool eval`` says so in one line,
naming what to do, exit 2 — not the httpx client's "Cannot send a request, as the client has been closed", which
is what ``datasets.load_dataset`` raises once huggingface_hub's retries on a failed name lookup are spent (its
context: "Dataset lmms-lab/POPE is not cached"). The exceptions here are built as that call chains them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kvtool.errors import InputError


def _closed_client(*args, **kwargs):
    try:
        raise FileNotFoundError(f"Dataset {args[0]} is not cached in None")
    except FileNotFoundError:  # chained implicitly (__context__), as datasets' call chains it
        raise RuntimeError("Cannot send a request, as the client has been closed.")  # noqa: B904


def _offline(*args, **kwargs):
    try:
        raise FileNotFoundError(f"Dataset {args[0]} is not cached in None")
    except FileNotFoundError as exc:
        raise ConnectionError(f"Couldn't reach '{args[0]}' on the Hub (OfflineModeIsEnabled)") from exc


def _not_found(*args, **kwargs):
    raise FileNotFoundError(f"Dataset {args[0]} doesn't exist on the Hub or cannot be accessed.")


def test_reasons_from_the_chain():
    from kvtool.evals.loaders import hub_unreachable

    for fn, want in ((_closed_client, "no connection"), (_offline, "offline mode"), (_not_found, None)):
        try:
            fn("lmms-lab/POPE")
        except Exception as exc:  # noqa: BLE001
            got = hub_unreachable(exc)
        assert (got is None) if want is None else got.startswith(want), (fn.__name__, got)
    try:  # the chained form: the closed client over the not-cached error
        _closed_client("lmms-lab/POPE")
    except RuntimeError as exc:
        assert isinstance(exc.__context__, FileNotFoundError)


@pytest.mark.parametrize(("fake", "reason"), [(_closed_client, "no connection to the Hugging Face hub"),
                                              (_offline, "offline mode is on (HF_HUB_OFFLINE)")])
def test_pope_without_data_or_hub_is_one_line(monkeypatch, fake, reason):
    import datasets

    from kvtool.evals.loaders import load_task_data
    from kvtool.evals.tasks import get_task

    monkeypatch.setattr(datasets, "load_dataset", fake)
    with pytest.raises(InputError) as e:
        load_task_data(get_task("pope"))
    msg = str(e.value)
    assert msg == ("pope: could not load lmms-lab/POPE or lmms-lab-encoder/POPE: the data is not local and the hub "
                   f"is unreachable ({reason}); give a local copy with --data-dir DIR (holding pope/) or --data PATH")
    assert "client has been closed" not in msg and "\n" not in msg


def test_other_hub_errors_keep_their_text(monkeypatch):
    import datasets

    from kvtool.evals.loaders import load_task_data
    from kvtool.evals.tasks import get_task

    monkeypatch.setattr(datasets, "load_dataset", _not_found)
    with pytest.raises(InputError, match=r"^pope: could not load lmms-lab/POPE or lmms-lab-encoder/POPE \("
                                         r"lmms-lab/POPE: Dataset lmms-lab/POPE doesn't exist"):
        load_task_data(get_task("pope"))


def test_kvtool_eval_pope_exits_2(monkeypatch, exported, tmp_path):
    import datasets

    from kvtool.cli import main

    monkeypatch.setattr(datasets, "load_dataset", _closed_client)
    out = exported("tiny-llava", "openvino", 16, "fp32")
    res = CliRunner().invoke(main, ["eval", str(out), "--tasks", "pope", "-o", str(tmp_path / "run"), "--limit", "2"])
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert "the hub is unreachable" in last and "--data-dir" in last and "client has been closed" not in res.output
