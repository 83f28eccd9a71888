"""Choosing the next token from one position's logits: greedy, or temperature + top-p sampling with a seed.

Numpy only, so every engine samples identically. It does not do beam search, repetition penalties or
batching.
"""

from __future__ import annotations

import numpy as np

from kvtool.errors import InputError


def check_sampling(do_sample: bool, temperature: float, top_p: float) -> None:
    if do_sample and not temperature > 0:
        raise InputError(f"temperature: expected > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p: expected a value in (0, 1], got {top_p}")


def next_token(logits: np.ndarray, do_sample: bool, temperature: float, top_p: float,
               rng: np.random.Generator) -> int:
    """``logits``: [V]. Greedy argmax, or a draw from softmax(logits / T) restricted to the smallest set of
    tokens whose probability reaches ``top_p``."""
    logits = np.asarray(logits, dtype=np.float64)
    if not do_sample:
        return int(np.argmax(logits))
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.shape[0], p=p))
