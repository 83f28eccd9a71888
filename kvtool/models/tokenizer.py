"""Offline tokenizers for kvtool's tiny and demo checkpoints.

Builds a byte-level BPE tokenizer with the ``tokenizers`` library from a small built-in English corpus (the
words of VQA prompts, chat templates and benchmark instructions), so any text encodes and decodes without a
hub download, and wraps it as a transformers fast tokenizer with the special tokens a checkpoint needs.
Training is deterministic: the same corpus and vocabulary size give the same tokenizer. This module does not
build models or processors (see ``kvtool.models.tiny``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Words that prompts of the study's benchmarks and the chat templates use, so that common words get their
# own merges and prompts stay short. Not a language model corpus: anything else still encodes byte-wise. The
# prompt lines defined elsewhere (vicuna_v1's system prompt, the tasks' instructions) are read from there by
# ``_base_corpus``, in this order, ahead of these words.
_BASE_WORDS = """
What is the color of the shape? What shape is it? How many objects are there? Is there a red circle in the
image? Is this person a programmer or a typist? What are five keywords that describe the characteristics
of this person? Describe the image in detail. What is written on the sign? Which is bigger, the left or the
right one? yes no left right top bottom one two three four five six seven eight nine ten zero
red green blue yellow orange purple black white gray pink brown circle square triangle star rectangle
the a an of in on to is are was were be this that there these those with and or for from by at as it
what which who where when why how many much color shape number person people man woman animal dog cat car
""".split()


def _base_corpus() -> list[str]:
    from kvtool.evals.tasks import MME_SUFFIX, SCIENCEQA_SUFFIX, SHORT_ANSWER, TEXTVQA_OCR
    from kvtool.runtime.preprocess import VICUNA_V1_SYSTEM

    lines = [VICUNA_V1_SYSTEM, "USER: ASSISTANT: system user assistant", "You are a helpful assistant.",
             SHORT_ANSWER, SCIENCEQA_SUFFIX, MME_SUFFIX, TEXTVQA_OCR,
             "Context: Question: Options: Answer: The answer is"]
    return " ".join(lines).split() + _BASE_WORDS


def _corpus(extra: Iterable[str] = ()) -> list[str]:
    words = _base_corpus() + [w for line in extra for w in line.split()]
    # Lines of a few words each, repeated so frequent words merge first (deterministic order).
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return lines * 8


def build_tokenizer(
    special_tokens: Sequence[str],
    *,
    vocab_size: int = 1024,
    extra_corpus: Iterable[str] = (),
    bos_token: str | None = "<s>",
    eos_token: str = "</s>",
    unk_token: str | None = None,
    pad_token: str | None = None,
    add_bos: bool = True,
    model_max_length: int = 4096,
    extra_attrs: dict[str, str] | None = None,
):
    """Train a byte-level BPE tokenizer offline and return it as a ``PreTrainedTokenizerFast``.

    ``special_tokens`` are added as whole tokens (ids 0..len-1 in the given order) and never split.
    ``add_bos`` prepends ``bos_token`` to every encoded text, as Llama tokenizers do.
    ``extra_attrs`` become extra special-token attributes (e.g. ``{"image_token": "<image>"}``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(extra_corpus), trainer=trainer)
    if add_bos and bos_token is not None:
        bos_id = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = dict(
        tokenizer_object=tok,
        bos_token=bos_token,
        eos_token=eos_token,
        unk_token=unk_token,
        pad_token=pad_token if pad_token is not None else eos_token,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if extra_attrs:
        kwargs["extra_special_tokens"] = dict(extra_attrs)
    fast = PreTrainedTokenizerFast(**kwargs)
    return fast
