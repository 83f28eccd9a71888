"""Prompts and images on the tiny models of the three architectures: user text cannot inject special tokens,
an inline ``<image>`` gets the chat template's image markup, the prompt-length check, 16-bit images, empty
prompts, one conversation rule for run and eval (issue 16, items 8-12 and 13's conversation rule)."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.errors import InputError, PromptTooLong
from kvtool.runtime.preprocess import (
    LITERAL_MARK,
    build_prompt,
    image_markup,
    load_images,
    prepare_inputs,
    resolve_conversation,
)
from tests.runtime.helpers import random_image

ARCHS = ("tiny-llava", "tiny-llava-next", "tiny-qwen2-vl")


@pytest.fixture(scope="module")
def processors(tiny_model):
    from transformers import AutoProcessor

    return {name: AutoProcessor.from_pretrained(tiny_model(name)) for name in ARCHS}


def _specials(processor) -> list[str]:
    tok = processor.tokenizer
    return sorted({*tok.all_special_tokens, *(t.content for t in tok.added_tokens_decoder.values())})


def _special_counts(ids, tok) -> dict[int, int]:
    special = set(tok.added_tokens_decoder)
    ids = np.asarray(ids).ravel().tolist()
    return {i: ids.count(i) for i in special}


@pytest.mark.parametrize("arch", ARCHS)
def test_user_text_never_yields_a_special_token(processors, arch):
    """Every special/added token of the tokenizer typed in the question comes out as the plain-text tokens of
    its characters: the prompt holds exactly the special tokens it holds without that text."""
    proc = processors[arch]
    tok = proc.tokenizer
    image = random_image()
    plain = prepare_inputs(proc, [image], "Look at this here", "chat_template")
    expected = _special_counts(plain.input_ids, tok)
    specials = _specials(proc)
    assert len(specials) >= 4  # <s> </s> <unk> <image> / the Qwen2-VL ChatML and vision tokens
    for s in specials:
        if s == "<image>":  # kvtool's image placeholder (LLaVA's convention), tested below
            continue
        for conversation in ("chat_template", "vicuna_v1"):
            q = f"Look at {s} here"
            got = prepare_inputs(proc, [image], q, conversation)
            ref = prepare_inputs(proc, [image], "Look at this here", conversation)
            assert _special_counts(got.input_ids, tok) == _special_counts(ref.input_ids, tok), (arch, s)
            # and the text is the tokenizer's plain-text reading of it, in place
            as_text = tok(q, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            ids = got.input_ids[0].tolist()
            assert any(ids[i:i + len(as_text)] == as_text for i in range(len(ids))), (arch, s, conversation)
            assert tok.decode(ids).count(q) == 1
        assert _special_counts(got.input_ids, tok) != {} and expected == _special_counts(plain.input_ids, tok)


def test_a_question_without_special_text_tokenises_as_before(processors):
    """The literal-text normaliser changes nothing for ordinary text (ids equal the processor's own)."""
    for arch in ARCHS:
        proc = processors[arch]
        prepare_inputs(proc, [random_image()], "x <|im_start|> <s> y", "chat_template")  # installs the normaliser
        assert proc.tokenizer._kvtool_literal
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this? ok"}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ref = proc(text=text, images=random_image(), return_tensors="np")["input_ids"]
        got = prepare_inputs(proc, [random_image()], "What is this? ok", "chat_template").input_ids
        assert got.tolist() == ref.tolist()
        assert LITERAL_MARK not in build_prompt(proc, "What is this? ok", 1, "chat_template")


def test_qwen2_vl_question_with_image_pad_text_runs(tiny_model):
    """The issue's crash: a Qwen2-VL question holding the literal text <|image_pad|> raised IndexError."""
    from kvtool.runtime import VLMPipeline

    pipe = VLMPipeline.load(tiny_model("tiny-qwen2-vl"), backend="torch")
    out = pipe.generate(random_image(), "What is <|image_pad|> and <|vision_start|>?", max_new_tokens=2)
    assert len(out.token_ids) >= 1
    pad = pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    plain = prepare_inputs(pipe.processor, [random_image()], "What is x and y?", "chat_template")
    assert out.stats["prompt_tokens"] > plain.n_tokens  # the typed tokens are text, not one id each
    assert int((plain.input_ids == pad).sum()) == int((prepare_inputs(
        pipe.processor, [random_image()], "What is <|image_pad|>?", "chat_template").input_ids == pad).sum())


def test_inline_image_on_qwen2_vl_gets_the_vision_markers(processors):
    proc = processors["tiny-qwen2-vl"]
    assert image_markup(proc) == "<|vision_start|><|image_pad|><|vision_end|>"
    p = build_prompt(proc, "Look: <image> what is it?", 1, "chat_template")
    assert "<|im_start|>user\nLook: <|vision_start|><|image_pad|><|vision_end|> what is it?<|im_end|>" in p
    ids = prepare_inputs(proc, [random_image()], "Look: <image> what is it?", "chat_template").input_ids[0].tolist()
    tok = proc.tokenizer
    start, end, pad = (tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>",
                                                               "<|image_pad|>"))
    first, last = ids.index(pad), len(ids) - 1 - ids[::-1].index(pad)
    assert ids[first - 1] == start and ids[last + 1] == end and ids.count(start) == ids.count(end) == 1
    # the same markup the chat template gives an image item
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
    assert "<|vision_start|><|image_pad|><|vision_end|>q" in proc.apply_chat_template(msgs, tokenize=False)
    # LLaVA's placeholder stays the bare token, as LLaVA's scripts put it
    for arch in ("tiny-llava", "tiny-llava-next"):
        assert image_markup(processors[arch]) == "<image>"
        assert "USER: Look: <image> what is it? ASSISTANT:" in build_prompt(processors[arch], "Look: <image> what "
                                                                          "is it?", 1, "chat_template")


@pytest.mark.parametrize("question", ["", " ", "\n\t "])
def test_empty_question_is_refused(processors, question):
    with pytest.raises(InputError) as e:
        build_prompt(processors["tiny-llava"], question, 1)
    assert str(e.value) == f"prompt: {question!r} is empty; expected a question"


def test_prompt_too_long_message_and_type():
    e = PromptTooLong(4657, 64, 4096)
    assert isinstance(e, InputError)
    assert str(e) == ("prompt: 4657 tokens + 64 new tokens = 4721, more than the model's 4096 positions "
                      "(max_position_embeddings); shorten the prompt or lower --max-new-tokens")
    import pickle

    back = pickle.loads(pickle.dumps(e))
    assert (back.prompt_tokens, back.max_new_tokens, back.max_positions, str(back)) == (4657, 64, 4096, str(e))


class _Started(Exception):
    pass


@pytest.mark.parametrize("backend", ["torch", "openvino", "onnxruntime"])
def test_prompt_longer_than_the_positions_is_refused_on_every_engine(tiny_model, exported, backend, monkeypatch):
    from kvtool.runtime import VLMPipeline

    path = {"torch": lambda: tiny_model("tiny-llava"),
            "openvino": lambda: exported("tiny-llava", "openvino", 16, "fp32"),
            "onnxruntime": lambda: exported("tiny-llava", "onnx", 16, "fp32")}[backend]()
    pipe = VLMPipeline.load(path, backend=backend)
    assert pipe.max_positions == 4096  # tiny text_config.max_position_embeddings
    image = random_image()
    question = "word " * 5000
    n = prepare_inputs(pipe.processor, load_images(image), question, pipe.conversation).n_tokens
    assert n > 4096
    with pytest.raises(PromptTooLong) as e:
        pipe.generate(image, question, max_new_tokens=16)
    assert (e.value.prompt_tokens, e.value.max_new_tokens, e.value.max_positions) == (n, 16, 4096)
    # at the boundary: prompt + new tokens == positions passes the check (the engine is then started)
    short = "word " * 1000
    n = prepare_inputs(pipe.processor, load_images(image), short, pipe.conversation).n_tokens
    monkeypatch.setattr(pipe.engine, "start", lambda *a, **k: (_ for _ in ()).throw(_Started()))
    with pytest.raises(_Started):
        pipe.generate(image, short, max_new_tokens=4096 - n)
    with pytest.raises(PromptTooLong):
        pipe.generate(image, short, max_new_tokens=4096 - n + 1)


MODES16 = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@pytest.mark.parametrize("mode", MODES16)
def test_16bit_images_are_scaled_not_clipped(mode):
    from PIL import Image

    dtype = {"I;16": "<u2", "I;16B": ">u2", "I;16L": "<u2", "I;16N": "=u2", "I": "<i4"}[mode]
    im = Image.frombytes(mode, (3, 1), np.array([[10000, 60000, 65535]], dtype=dtype).tobytes())
    (rgb,) = load_images(im)
    assert rgb.mode == "RGB"
    # round(10000 / 257) = 39, round(60000 / 257) = 233, 65535 -> 255
    assert np.asarray(rgb)[0].tolist() == [[39] * 3, [233] * 3, [255] * 3]


def test_16bit_png_file_and_dataset_image_are_scaled(tmp_path):
    import datasets
    from PIL import Image

    path = tmp_path / "deep.png"
    Image.frombytes("I;16", (2, 1), np.array([[10000, 60000]], dtype="<u2").tobytes()).save(path)
    assert Image.open(path).mode.startswith("I")
    assert np.asarray(load_images(path)[0])[0, :, 0].tolist() == [39, 233]
    ds = datasets.Dataset.from_dict({"image": [str(path)]}).cast_column("image", datasets.Image())
    row_image = ds[0]["image"]
    assert row_image.mode.startswith("I")  # what a dataset row hands the runner
    assert np.asarray(load_images(row_image)[0])[0, :, 0].tolist() == [39, 233]
    # 8-bit images are untouched
    rgb = random_image()
    assert np.array_equal(np.asarray(load_images(rgb)[0]), np.asarray(rgb))


def test_image_directory_and_missing_file_are_named(tmp_path):
    with pytest.raises(InputError) as e:
        load_images(tmp_path)
    assert str(e.value) == f"image {tmp_path}: is a directory; expected an image file"
    with pytest.raises(InputError) as e:
        load_images(tmp_path / "nope.png")
    assert str(e.value) == f"image {tmp_path / 'nope.png'}: no such file"


def test_auto_conversation_is_one_rule(tiny_model, exported):
    from kvtool.evals.runner import EvalConfig, _conversation
    from kvtool.models.bundled import SHAPES_MODEL_DIR
    from kvtool.runtime import VLMPipeline

    cases = {tiny_model("tiny-llava"): "vicuna_v1", exported("tiny-llava", "openvino", 16, "fp32"): "vicuna_v1",
             tiny_model("tiny-llava-next"): "chat_template", tiny_model("tiny-qwen2-vl"): "chat_template",
             SHAPES_MODEL_DIR: "chat_template"}
    for path, want in cases.items():
        assert resolve_conversation(path, "auto") == want, path
        assert _conversation(EvalConfig(model=str(path), tasks=["shapes"], output="x")) == want
        assert VLMPipeline.prompt_format(path, "auto") == want  # what the runner asks, and load uses
        assert resolve_conversation(path, "vicuna_v1") == "vicuna_v1"
    with pytest.raises(InputError, match="conversation"):
        resolve_conversation(SHAPES_MODEL_DIR, "llama3")

    class Loaded:  # a loaded pipeline says which format it uses; the runner records that, reading no files
        conversation = "vicuna_v1"

    assert _conversation(EvalConfig(model=str(SHAPES_MODEL_DIR), tasks=["shapes"], output="x"), Loaded()) == "vicuna_v1"


def _png16(a) -> bytes:
    """A 16-bit PNG (colour type 2, RGB) of ``a`` [H, W, 3] uint16, written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_rgb_png_is_not_clipped(tmp_path):
    """Pillow opens a 16-bit RGB PNG as 8-bit RGB itself (its high byte, within 1 of v / 257): no clipping."""
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png16(np.array([[[10000, 60000, 65535]]], dtype=np.uint16)))
    got = np.asarray(load_images(path)[0])[0, 0].tolist()
    assert got == [10000 >> 8, 60000 >> 8, 255]  # [39, 234, 255]
    assert all(abs(g - round(v / 257)) <= 1 for g, v in zip(got, (10000, 60000, 65535), strict=True))
