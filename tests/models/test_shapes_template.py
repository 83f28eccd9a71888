"""kvtool-shapes' shipped chat template renders exactly the format the model was trained on (issue 16 item 13):
any client that applies it (transformers' ``apply_chat_template`` on the bundled tokenizer or processor,
optimum-intel, openvino.genai) prompts the model as training did; the eval harness's prompt is the same string."""

from __future__ import annotations

import pytest

from kvtool.evals.shapes import SHAPES_CHAT_TEMPLATE, SHAPES_CONTEXT, make_shapes_split, shapes_messages
from kvtool.evals.tasks import SHORT_ANSWER
from kvtool.models.bundled import SHAPES_MODEL_DIR
from kvtool.models.tiny import LLAVA_CHAT_TEMPLATE
from kvtool.runtime.preprocess import VICUNA_V1_SYSTEM


@pytest.fixture(scope="module")
def bundled():
    from transformers import AutoProcessor, AutoTokenizer

    return (AutoTokenizer.from_pretrained(SHAPES_MODEL_DIR, local_files_only=True),
            AutoProcessor.from_pretrained(SHAPES_MODEL_DIR, local_files_only=True))


def _training_prompt(tok, question: str) -> str:
    """What the training loop encoded: shapes_prompt through the LLaVA template training built its processor
    with (kvtool.models.tiny), on the training chat (system prompt + instruction, image, question, answer line)."""
    return tok.apply_chat_template(shapes_messages(question), chat_template=LLAVA_CHAT_TEMPLATE,
                                   add_generation_prompt=True, tokenize=False)


def _user(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def test_shipped_template_is_the_training_format(bundled):
    tok, proc = bundled
    assert (SHAPES_MODEL_DIR / "chat_template.jinja").read_text() == SHAPES_CHAT_TEMPLATE
    q = "What color is the circle?"
    want = f"{VICUNA_V1_SYSTEM} USER: {SHAPES_CONTEXT}\n<image>\n{q}\n{SHORT_ANSWER} ASSISTANT:"
    assert _training_prompt(tok, q) == want
    assert tok.apply_chat_template(_user(q), add_generation_prompt=True, tokenize=False) == want
    assert proc.apply_chat_template(_user(q), add_generation_prompt=True, tokenize=False) == want
    for row in make_shapes_split("test", 10):  # every question type
        got = tok.apply_chat_template(_user(row["question"]), add_generation_prompt=True, tokenize=False)
        assert got == _training_prompt(tok, row["question"]), row["question"]
    # the image given inline, and a chat already in the training format, render the same string
    inline = [{"role": "user", "content": [{"type": "text", "text": f"<image>\n{q}"}]}]
    assert tok.apply_chat_template(inline, add_generation_prompt=True, tokenize=False) == want
    assert tok.apply_chat_template(shapes_messages(q), add_generation_prompt=True, tokenize=False) == want


def test_later_turns_are_the_training_conversation(bundled):
    """turn_mode="conversation": each later question follows the previous answer's </s> as a LLaVA-v1 turn."""
    tok, _ = bundled
    chat = _user("What color is the circle?") + [
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "How many shapes are in the image?"},
        {"role": "assistant", "content": "one"},
    ]
    want = (_training_prompt(tok, "What color is the circle?") + " red</s>"
            + f"USER: How many shapes are in the image?\n{SHORT_ANSWER} ASSISTANT: one</s>")
    assert tok.apply_chat_template(chat, tokenize=False) == want


def test_run_and_eval_build_the_same_prompt(bundled):
    """kvtool run (the bare question) and the shapes eval task (its instruction-wrapped question), under the
    conversation both resolve by default, give the training prompt; so does vicuna_v1 for the task."""
    from kvtool.evals.tasks import get_task
    from kvtool.runtime.preprocess import build_prompt, resolve_conversation

    tok, proc = bundled
    conv = resolve_conversation(SHAPES_MODEL_DIR, "auto")
    assert conv == "chat_template"
    for row in make_shapes_split("test", 5):
        want = _training_prompt(tok, row["question"])
        task_prompt = get_task("shapes").build(row)[0].prompt
        assert build_prompt(proc, row["question"], 1, conv) == want
        assert build_prompt(proc, task_prompt, 1, conv) == want
        assert build_prompt(proc, task_prompt, 1, "vicuna_v1") == want


def test_openvino_genai_renders_the_training_format(bundled, tmp_path):
    """openvino.genai renders chat templates with its own engine (minja) from the template openvino_tokenizers
    embeds in the tokenizer IR; its LLaVA pipeline passes the prompt as a string with ``<image>\\n`` in front."""
    ov_genai = pytest.importorskip("openvino_genai")
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer

    tok, _ = bundled
    ov_tok, ov_detok = convert_tokenizer(tok, with_detokenizer=True)
    ov.save_model(ov_tok, tmp_path / "openvino_tokenizer.xml")
    ov.save_model(ov_detok, tmp_path / "openvino_detokenizer.xml")
    genai_tok = ov_genai.Tokenizer(str(tmp_path))
    assert genai_tok.chat_template == SHAPES_CHAT_TEMPLATE
    q = "Is there a red square in the image?"
    got = genai_tok.apply_chat_template([{"role": "user", "content": f"<image>\n{q}"}], add_generation_prompt=True)
    assert got == _training_prompt(tok, q)
