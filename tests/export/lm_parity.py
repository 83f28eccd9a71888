"""Test helper: drive an exported language-model graph by hand and compare it with PyTorch.

``compare_lm(export_dir, model_dir)`` builds a real image+question prompt, captures the PyTorch model's
language-model inputs (inputs_embeds with the image merged, position_ids), runs prefill plus ``steps``
greedy decode steps through both the exported graph (explicit past K/V, names from the manifest) and the
PyTorch language model with a DynamicCache, and returns the worst logit and K/V differences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvtool.manifest import Manifest


def graph_runner(export_dir: Path, role: str = "language_model"):
    """A callable feed-dict -> output-dict for one graph of an export (OpenVINO in f32, or onnxruntime)."""
    m = Manifest.load(export_dir)
    g = m.graphs[role]
    path = str(Path(export_dir) / g.file)
    if m.backend == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

        def run(feed):
            # a fresh request per call: a stateful LM starts from an empty cache every time
            req = compiled.create_infer_request()
            if "beam_idx" in g.inputs:
                feed = {**feed, "beam_idx": np.zeros((1,), np.int32)}
            res = req.infer(feed)
            return {name: res[compiled.output(name)] for name in g.outputs}

        return run
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(feed):
        names = [i.name for i in sess.get_inputs()]
        return dict(zip(g.outputs, sess.run(g.outputs, {k: v for k, v in feed.items() if k in names}), strict=True))

    return run


def sample_prompt(model_dir: Path, seed: int = 0, question: str = "What is the color of the shape?"):
    """Processor inputs (torch tensors) for a random image and one question, in the model's chat template."""
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((64, 80, 3)) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    return proc(images=image, text=prompt, return_tensors="pt")


def captured_lm_inputs(model, inputs) -> dict:
    """inputs_embeds / position_ids the PyTorch model hands its language model for ``inputs``."""
    import torch

    box = {}

    def hook(_m, args, kwargs):
        box["inputs_embeds"] = kwargs["inputs_embeds"].detach().clone()
        pos = kwargs.get("position_ids")
        box["position_ids"] = None if pos is None else pos.detach().clone()
        raise StopIteration

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except StopIteration:
        pass
    finally:
        h.remove()
    return box


def compare_lm(export_dir: Path, model, model_dir: Path, steps: int = 3, seed: int = 0) -> dict:
    """Prefill + ``steps`` decode steps through graph and PyTorch; returns max abs diffs and argmax agreement."""
    import torch
    from transformers import DynamicCache

    m = Manifest.load(export_dir)
    run = graph_runner(export_dir)
    lm_in = m.graphs["language_model"].inputs
    L = m.lm.num_layers
    inputs = sample_prompt(model_dir, seed)
    cap = captured_lm_inputs(model, inputs)
    emb = cap["inputs_embeds"]
    T = emb.shape[1]
    pos = cap["position_ids"]
    if pos is None:
        pos = torch.arange(T)[None]
    if pos.ndim == 3 and pos.shape[0] == 4:
        pos = pos[1:]
    mrope = pos.ndim == 3
    cache = DynamicCache(config=model.config.get_text_config())
    past = {i: (np.zeros((1, m.lm.num_kv_heads, 0, m.lm.head_dim), np.float32),) * 2 for i in range(L)}
    diffs = {"logits": 0.0, "kv": 0.0, "agree": 0, "steps": 0}
    text_pos = int(pos.max()) + 1
    for step in range(steps + 1):
        n_past = past[0][0].shape[2]
        feed = {"inputs_embeds": emb.numpy().astype(np.float32),
                "attention_mask": np.ones((1, n_past + emb.shape[1]), np.int64),
                "position_ids": pos.numpy().astype(np.int64)}
        for i in range(L):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[i]
        assert set(feed) == set(lm_in), (sorted(feed), lm_in)
        out = run(feed)
        with torch.no_grad():
            hid = model.model.language_model(inputs_embeds=emb, position_ids=pos, past_key_values=cache,
                                             use_cache=True).last_hidden_state
            ref = model.lm_head(hid).numpy()
        # every exported LM graph returns the last position's logits only
        assert out["logits"].shape == (1, 1, ref.shape[-1]), out["logits"].shape
        diffs["logits"] = max(diffs["logits"], float(np.abs(out["logits"] - ref[:, -1:]).max()))
        for i in range(L):
            for kind, ref_kv in (("key", cache.layers[i].keys), ("value", cache.layers[i].values)):
                got = out[f"present.{i}.{kind}"]
                assert got.shape == tuple(ref_kv.shape), (got.shape, ref_kv.shape)
                diffs["kv"] = max(diffs["kv"], float(np.abs(got - ref_kv.numpy()).max()))
        past = {i: (out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(L)}
        diffs["agree"] += int(out["logits"][0, -1].argmax() == ref[0, -1].argmax())
        diffs["steps"] += 1
        tok = int(ref[0, -1].argmax())
        with torch.no_grad():
            emb = model.get_input_embeddings()(torch.tensor([[tok]]))
        pos = torch.full((3, 1, 1), text_pos) if mrope else torch.tensor([[T + step]])
        text_pos += 1
    return diffs


def greedy_agreement(export_dir: Path, model, n_prompts: int = 32, length: int = 12, seed: int = 0) -> float:
    """Fraction of random text prompts whose next greedy token from the exported text-embedding + LM graphs
    equals PyTorch's (text-only prefill with an empty past)."""
    import torch

    m = Manifest.load(export_dir)
    lm, te = graph_runner(export_dir), graph_runner(export_dir, "text_embeddings")
    te_in = m.graphs["text_embeddings"].inputs[0]
    rng = np.random.default_rng(seed)
    vocab = m.lm.vocab_size
    agree = 0
    for _ in range(n_prompts):
        ids = rng.integers(10, min(vocab, 500), size=(1, length)).astype(np.int64)
        feed = {"inputs_embeds": te({te_in: ids})[m.graphs["text_embeddings"].outputs[0]],
                "attention_mask": np.ones((1, length), np.int64),
                "position_ids": np.arange(length, dtype=np.int64)[None]}
        if any("position_ids" == n for n in m.graphs["language_model"].inputs) and m.architecture == "qwen2_vl":
            feed["position_ids"] = np.broadcast_to(feed["position_ids"], (3, 1, length)).copy()
        for i in range(m.lm.num_layers):  # stateless graphs: an empty past (stateful: inside the graph)
            for kind in ("key", "value"):
                if f"past_key_values.{i}.{kind}" in m.graphs["language_model"].inputs:
                    feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, m.lm.num_kv_heads, 0, m.lm.head_dim),
                                                                   np.float32)
        got = lm(feed)["logits"][0, -1].argmax()
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(ids)).logits[0, -1].argmax().item()
        agree += int(got == ref)
    return agree / n_prompts
