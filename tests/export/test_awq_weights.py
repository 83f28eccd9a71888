"""kvtool's hand-written weight code: group-wise fake quantization vs a naive loop, AWQ search/apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtool.errors import InputError
from kvtool.export.awq import (
    apply_awq_scales,
    fake_quantize_groups,
    linear_groups,
    search_awq_scales,
    search_group_scale,
    simulate_low_bit,
)


def naive_fake_quant(w: np.ndarray, bits: int, g: int, sym: bool) -> np.ndarray:
    out = np.empty_like(w)
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], g):
            x = w[r, c0:c0 + g].astype(np.float64)
            if sym:
                qmax = 2 ** (bits - 1) - 1
                d = np.abs(x).max() / qmax
                out[r, c0:c0 + g] = x if d == 0 else np.clip(np.round(x / d), -qmax - 1, qmax) * d
            else:
                lo, hi = x.min(), x.max()
                d = (hi - lo) / (2**bits - 1)
                out[r, c0:c0 + g] = x if d == 0 else np.round((x - lo) / d) * d + lo
    return out


@pytest.mark.parametrize("bits,g,sym", [(3, 32, False), (4, 16, False), (4, 64, True), (8, 128, False), (3, 128, True)])
def test_fake_quant_matches_naive(bits, g, sym):
    rng = np.random.default_rng(bits * g)
    w = rng.standard_normal((24, 256)).astype(np.float32)
    w[3, :g] = 0.7  # a constant group dequantizes to itself
    got = fake_quantize_groups(torch.from_numpy(w), bits, g, sym).numpy()
    np.testing.assert_allclose(got, naive_fake_quant(w, bits, g, sym), atol=1e-5)
    assert np.all(got[3, :g] == np.float32(0.7))
    levels = max(len(np.unique(got[r, c:c + g])) for r in range(24) for c in range(0, 256, g))
    assert levels <= 2**bits


def _eq2_in_torch(w: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """Eq. (2) written out in float32 torch ops (what awq computed before it called quant_ops.affine)."""
    x = w.reshape(w.shape[0], -1, g).float()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    delta = (hi - lo) / (2**bits - 1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    q = torch.clamp(torch.round((x - lo) / safe), 0, 2**bits - 1)
    return torch.where(delta > 0, q * safe + lo, x).reshape(w.shape).to(w.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,g", [(2, 16), (3, 32), (4, 128), (8, 64)])
def test_asymmetric_fake_quant_is_quant_ops_affine_bit_for_bit(bits, g, dtype):
    """The asymmetric path is quant_ops.affine's eq. (2) (one definition): identical bits to the formula written
    out, and to fake-quantizing through quant_ops' own choose/quantize/dequantize on the float32 weight."""
    from kvtool.quant_ops.affine import choose_qparams_affine, dequantize_affine, quantize_affine

    gen = torch.Generator().manual_seed(bits * 1000 + g)
    w = (torch.randn(16, 256, generator=gen) * 0.05).to(dtype)
    w[2, :g] = 0.25  # constant group
    got = fake_quantize_groups(w, bits, g)
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.equal(got, _eq2_in_torch(w, bits, g))
    x = w.float()
    d, m = choose_qparams_affine(x, (1, g), bits)
    assert torch.equal(got, dequantize_affine(quantize_affine(x, (1, g), d, m, bits), (1, g), d, m).to(dtype))


def test_fake_quant_refuses_bad_group():
    with pytest.raises(InputError, match="group-size"):
        fake_quantize_groups(torch.zeros(4, 96), 4, 64)


@pytest.fixture(scope="module")
def small_lm(tiny_model):
    from kvtool.export.source import load_torch_model

    return load_torch_model(tiny_model("tiny-llava"))


def _samples(model, n=4, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = model.config.get_text_config().hidden_size
    # heavy-tailed channels, as real activations have: AWQ should protect them
    chan = torch.ones(h)
    chan[:4] = 20.0
    return [{"inputs_embeds": (torch.randn(1, t, h, generator=g) * chan).numpy(),
             "position_ids": np.arange(t, dtype=np.int64)[None]} for _ in range(n)]


def _lm_out(model, samples):
    with torch.no_grad():
        return torch.cat([model.model.language_model(inputs_embeds=torch.from_numpy(s["inputs_embeds"]),
                                                     position_ids=torch.from_numpy(s["position_ids"])).last_hidden_state
                          for s in samples])


def test_awq_apply_preserves_fp_outputs_and_beats_rtn(small_lm):
    import copy

    model = copy.deepcopy(small_lm)
    samples = _samples(model)
    ref = _lm_out(model, samples)
    scales = search_awq_scales(model, samples, bits=3, group_size=32)
    errs = scales.pop("_errors")
    assert set(scales) == {f"{i}.{n}" for i, layer in enumerate(model.model.language_model.layers)
                           for n, _, _ in linear_groups(layer)}
    assert all(awq <= rtn + 1e-12 for awq, rtn in errs.values())
    assert any(awq < 0.95 * rtn for awq, rtn in errs.values()), errs  # the search really moves something
    apply_awq_scales(model, scales)
    torch.testing.assert_close(_lm_out(model, samples), ref, atol=1e-4, rtol=1e-4)
    # end to end: 3-bit weights with AWQ scales stay closer to the fp model than plain 3-bit RTN
    rtn_model = copy.deepcopy(small_lm)
    simulate_low_bit(rtn_model, 3, 32)
    simulate_low_bit(model, 3, 32)
    err_awq = float(((_lm_out(model, samples) - ref) ** 2).mean())
    err_rtn = float(((_lm_out(rtn_model, samples) - ref) ** 2).mean())
    assert err_awq < err_rtn, (err_awq, err_rtn)


def test_group_scale_search_alpha0_is_rtn():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 128, generator=g)
    lin = torch.nn.Linear(128, 32, bias=False)
    s, best, rtn = search_group_scale(x, [lin], bits=4, group_size=64, sym=False)
    wq = fake_quantize_groups(lin.weight.detach(), 4, 64)
    expect_rtn = float(((x @ wq.T - x @ lin.weight.detach().T) ** 2).mean())
    assert abs(rtn - expect_rtn) <= 1e-6 * max(1.0, expect_rtn) and best <= rtn and s.shape == (128,)
