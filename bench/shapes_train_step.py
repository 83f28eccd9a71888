"""Time one kvtool-shapes training step (forward + backward) two ways, side by side on the same batch:
transformers' ``model(**enc).loss`` and kvtool's ``answer_loss`` (shared prefix run once, LM head only at the
answer positions). Prints medians in ms and the loss of both (they must agree).

    python bench/shapes_train_step.py [--batch 16] [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the training script's modules
    from shapes_batches import answer_loss, encode_batch, shared_prefix_len
    from train_shapes import TrainConfig, build_model

    from kvtool.evals.shapes import make_shapes_split

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, processor = build_model(TrainConfig(out_dir=""))
    enc = encode_batch(processor, make_shapes_split("train", args.batch))
    p = shared_prefix_len(enc["input_ids"], model.config.image_token_id)
    ways = {"transformers_loss": lambda: model(**enc).loss, "answer_loss_shared_prefix": lambda: answer_loss(model, enc, p)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    losses = {}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        for name, fn in ways.items():
            model.zero_grad()
            t0 = time.perf_counter()
            loss = fn()
            loss.backward()
            times[name].append((time.perf_counter() - t0) * 1e3)
            losses[name] = loss.item()
    out = {"batch": args.batch, "tokens_per_row": int(enc["input_ids"].shape[1]), "shared_prefix": p,
           "median_ms": {k: round(statistics.median(v), 1) for k, v in times.items()}, "loss": losses}
    out["speedup"] = round(out["median_ms"]["transformers_loss"] / out["median_ms"]["answer_loss_shared_prefix"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
