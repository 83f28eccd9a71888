"""Next-token choice against a naive reference: greedy argmax, and the distribution temperature + top-p
sampling draws from (empirical frequencies over many seeded draws)."""

from __future__ import annotations

import numpy as np
import pytest

from kvtool.errors import InputError
from kvtool.runtime.sampling import check_sampling, next_token


def naive_probs(logits, temperature, top_p):
    p = np.exp(logits / temperature)
    p = p / p.sum()
    keep, total = [], 0.0
    for i in sorted(range(len(p)), key=lambda j: -p[j]):  # most likely first, until top_p is reached
        keep.append(i)
        total += p[i]
        if total >= top_p:
            break
    q = np.zeros_like(p)
    q[keep] = p[keep]
    return q / q.sum()


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.standard_normal(50)
        assert next_token(logits, False, 1.0, 1.0, rng) == int(np.argmax(logits))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.75, 1.0), (2.0, 0.6), (0.5, 0.9)])
def test_sampling_follows_the_tempered_nucleus(temperature, top_p):
    logits = np.random.default_rng(1).standard_normal(8) * 2
    expect = naive_probs(logits, temperature, top_p)
    rng = np.random.default_rng(2)
    n = 20000
    counts = np.bincount([next_token(logits, True, temperature, top_p, rng) for _ in range(n)], minlength=8)
    assert np.all(counts[expect == 0] == 0)  # nothing outside the nucleus
    np.testing.assert_allclose(counts / n, expect, atol=4 * np.sqrt(0.25 / n))


def test_same_seed_same_draws_and_bad_settings():
    logits = np.random.default_rng(3).standard_normal(100)
    a = [next_token(logits, True, 0.75, 0.9, r) for r in [np.random.default_rng(5)] for _ in range(10)]
    b = [next_token(logits, True, 0.75, 0.9, r) for r in [np.random.default_rng(5)] for _ in range(10)]
    assert a == b
    for args in [(True, 0.0, 1.0), (False, 1.0, 0.0), (False, 1.0, 1.5)]:
        with pytest.raises(InputError):
            check_sampling(*args)
