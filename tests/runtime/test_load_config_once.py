"""``VLMPipeline.load`` reads ``config.json`` once (the engine's read); the prompt format and the position
limit come from that read, and resolve as ``VLMPipeline.prompt_format`` (the files) says."""

from pathlib import Path

import pytest

from kvtool.runtime.pipeline import VLMPipeline, model_max_positions


def _count_config_reads(monkeypatch) -> list[str]:
    seen: list[str] = []
    real_text, real_bytes = Path.read_text, Path.read_bytes

    def read_text(self, *a, **k):
        if self.name == "config.json":
            seen.append(str(self))
        return real_text(self, *a, **k)

    def read_bytes(self):
        if self.name == "config.json":
            seen.append(str(self))
        return real_bytes(self)

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    return seen


@pytest.mark.parametrize("conversation", ["auto", "vicuna_v1"])
def test_export_load_reads_config_json_once(exported, monkeypatch, conversation):
    out = exported("tiny-llava", "openvino", 16, "fp32")
    want = VLMPipeline.prompt_format(out, conversation)
    seen = _count_config_reads(monkeypatch)
    pipe = VLMPipeline.load(out, conversation=conversation)
    assert len(seen) == 1, seen
    assert pipe.conversation == want
    monkeypatch.undo()
    assert pipe.max_positions == model_max_positions(Path(out)) is not None


def test_torch_load_resolves_as_the_files_say(tiny_model, monkeypatch):
    path = tiny_model("tiny-llava")
    want = VLMPipeline.prompt_format(path, "auto"), model_max_positions(path)
    seen = _count_config_reads(monkeypatch)
    pipe = VLMPipeline.load(path, backend="torch", conversation="auto")
    assert not seen  # transformers reads the checkpoint's config itself; the pipeline reads it no more
    assert (pipe.conversation, pipe.max_positions) == want
