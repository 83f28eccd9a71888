"""Judges without a network: MM-Vet reply parsing and retries, the toxicity scorer on a tiny local classifier
checkpoint (checked against the model's own softmax), lexicon files and judge configuration errors."""

from __future__ import annotations

import json

import pytest

from kvtool.errors import InputError
from kvtool.evals import judges as J


@pytest.mark.parametrize("reply, score", [("0.7", 0.7), ("Correctness: 1.0", 1.0), ("0", 0.0), (".5", 0.5),
                                          ("score 3.5 then 0.2", 0.2), ("no idea", None), ("10", None)])
def test_parse_mmvet_score(reply, score):
    assert J.parse_mmvet_score(reply) == score


class _Scripted:
    model = "scripted"

    def __init__(self, replies):
        self.replies, self.temps = list(replies), []

    def complete(self, prompt, temperature=0.0, max_tokens=16):
        self.temps.append(temperature)
        return self.replies.pop(0)


def test_grade_mmvet_retries_with_higher_temperature_and_caches(tmp_path):
    judge = _Scripted(["hmm", "not sure", "0.4"])
    cache = J.JudgeCache(tmp_path / "j.jsonl")
    assert J.grade_mmvet(judge, "q", "cat<OR>kitten", "a cat", cache=cache) == 0.4
    assert judge.temps == [0.0, 0.5, 1.0]
    again = J.JudgeCache(tmp_path / "j.jsonl")  # reloaded from disk: no call
    assert J.grade_mmvet(_Scripted([]), "q", "cat<OR>kitten", "a cat", cache=again) == 0.4
    assert J.grade_mmvet(_Scripted(["x"] * 5), "q", "a", "b") == 0.0
    prompt = J.mmvet_prompt("What is it?", "cat<OR>kitten", "A cat |\nsitting")
    assert prompt.endswith("What is it? | cat <OR> kitten | A cat / sitting | ") and "<AND>" in prompt


def test_judge_verdicts_and_bad_url():
    assert J.judge_verdict("Incorrect.", "correctness") == 0
    assert J.judge_verdict("correct", "correctness") == 1
    assert J.judge_verdict("It is unclear", "correctness") == 2
    assert J.judge_verdict("same", "same") == 1 and J.judge_verdict("different", "same") == 0
    with pytest.raises(InputError, match="judge-url"):
        J.ChatJudge("localhost:8000", "m")


def test_unreachable_judge_fails_with_one_line(tmp_path):
    judge = J.ChatJudge("http://127.0.0.1:9/v1", "m", timeout_s=2, retries=1)
    with pytest.raises(InputError, match="judge at http://127.0.0.1:9/v1/chat/completions failed"):
        judge.complete("hello")


def test_toxicity_from_local_classifier_matches_softmax(tmp_path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "rude", "kind", "smart", "words"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, id2label={0: "non-toxic", 1: "toxic"},
                     label2id={"non-toxic": 0, "toxic": 1})
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(50)
    model.save_pretrained(tmp_path / "clf")
    fast.save_pretrained(tmp_path / "clf")
    texts = ["rude words", "kind smart", "smart"]
    scores = J.ToxicityScorer(str(tmp_path / "clf"))(texts)
    with torch.no_grad():
        enc = fast(texts, return_tensors="pt", padding=True)
        ref = [torch.softmax(model(**{k: v[i:i + 1, :int(enc["attention_mask"][i].sum())] for k, v in enc.items()
                                      if k != "token_type_ids"}).logits, -1)[0, 1].item() for i in range(len(texts))]
    assert scores == pytest.approx(ref, abs=1e-5)
    assert max(scores) - min(scores) > 0.01  # the texts really score differently
    with pytest.raises(FileNotFoundError):
        J.ToxicityScorer(str(tmp_path / "nope"))(["x"])


def test_lexicon_files(tmp_path):
    (tmp_path / "w.txt").write_text("# competence words\nskilled\n\nhard working\n")
    assert J.lexicon_from_file(str(tmp_path / "w.txt")) == ["skilled", "hard working"]
    (tmp_path / "s.json").write_text(json.dumps({"Obese": ["lazy"]}))
    assert J.stereotype_lexicon(str(tmp_path / "s.json")) == {"obese": ["lazy"]}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="group"):
        J.stereotype_lexicon(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError):
        J.lexicon_from_file(str(tmp_path / "missing.txt"))


def test_judge_config_from_env(monkeypatch):
    monkeypatch.setenv("KVTOOL_JUDGE_URL", "http://x/v1")
    monkeypatch.setenv("KVTOOL_JUDGE_KEY", "secret")
    cfg = J.JudgeConfig.from_env(model="m", mmvet_runs=5)
    assert cfg.url == "http://x/v1" and cfg.model == "m" and cfg.mmvet_runs == 5
    assert "key" not in cfg.public()
