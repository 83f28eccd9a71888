"""The language model's torch weights are released only after its IR is saved (issue 14, found at the full
``qwen2-vl-2b`` shape): OpenVINO's converted constants may share the torch tensors' memory, so releasing them
before NNCF compresses the IR and before it is written made NNCF read freed memory (a segfault there; garbage
weights where the memory is reused). Checked with optimum-intel's save step and NNCF replaced by recorders."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("optimum.exporters.openvino")


class _TinyLM(torch.nn.Module):
    """The attribute layout ``release_lm_weights`` reads (LLaVA / Qwen2-VL in transformers 5)."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.language_model = torch.nn.Module()
        self.model.language_model.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
        self.model.language_model.norm = torch.nn.LayerNorm(8)
        self.embed = torch.nn.Embedding(16, 8)
        self.lm_head = torch.nn.Linear(8, 16, bias=False)

    def get_input_embeddings(self):
        return self.embed


def _held(m: _TinyLM) -> int:
    return sum(p.numel() for p in (*m.model.language_model.parameters(), *m.lm_head.parameters()))


@pytest.mark.parametrize("wbits", [4, 16])
def test_lm_weights_released_after_save_not_before(monkeypatch, wbits):
    from optimum.exporters.openvino import convert

    from kvtool.export import openvino_backend as ob
    from kvtool.export.config import ExportConfig

    tm = _TinyLM()
    full = _held(tm)
    seen: dict[str, int] = {}
    monkeypatch.setattr(ob, "slice_last_logits", lambda model: True)
    monkeypatch.setattr(ob, "compress_in_memory",
                        lambda model, role, cfg, feeds: seen.setdefault("compress", _held(tm)) and model)
    monkeypatch.setattr(convert, "_save_model", lambda model, path, *a, **k: seen.setdefault("save", _held(tm)))
    cfg = ExportConfig(model="unused", output="unused", wbits=wbits)
    with ob._compress_while_converting(tm, cfg, None, None) as sliced:
        convert._save_model(object(), Path("out") / ob.OV_GRAPH_FILES["language_model"])
    assert sliced == {"language_model": True}
    assert seen == {"compress": full, "save": full}  # every weight still there while NNCF and the save read them
    assert _held(tm) == 0  # and released once the IR is written (lm_head too; the input embeddings kept)
    assert tm.embed.weight.numel() == 16 * 8
