"""KV options as users give them: bits that do not apply are refused, fp16 records no bits, KIVI's window
(``--kv-residual``) is honoured by every engine and recorded, the KV is held (and reported) in the dtype named,
the backend aliases, and error lines that name CLI flags."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from kvtool.cli import cli_flag_names, main
from kvtool.errors import InputError
from kvtool.quant_ops import QuantizedKVStore
from kvtool.runtime import VLMPipeline
from kvtool.runtime.kv_cache import GraphKVCache, make_quant_cache
from kvtool.runtime.kvspec import make_kv_spec, resolve_bits
from tests.runtime.helpers import QUESTION, random_image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# -- bits and windows that do not apply -------------------------------------------------------------------

def test_bits_for_fp16_and_ov_schemes_are_refused():
    assert resolve_bits("fp16") == (None, None) and resolve_bits("ov-u8") == (None, None)
    assert resolve_bits("g-T128") == (4, 4) and resolve_bits("g-T128", 2, None, 8) == (2, 8)
    with pytest.raises(InputError) as e:
        resolve_bits("fp16", 2)
    assert str(e.value) == ("kv=fp16 keeps K and V unquantized: kv_bits=2 does not apply (bits are for kvtool's "
                            "quantizing schemes)")
    with pytest.raises(InputError, match=r"^kv_bits: expected one of 2, 3, 4, 8, got 5$"):
        resolve_bits("g-T128", 5, None, 2)
    with pytest.raises(InputError, match=r"^kv=ov-u4 sets its own bits: k_bits=4, v_bits=2 does not apply"):
        make_kv_spec("ov-u4", 4, 2)
    spec = make_kv_spec("fp16")
    assert (spec.k_bits, spec.v_bits, spec.residual) == (None, None, None)
    with pytest.raises(InputError, match=r"^kv_residual=128: kv=fp16 keeps every token exact"):
        make_kv_spec("fp16", residual=128)
    with pytest.raises(InputError, match=r"^kv_residual=24: expected a multiple of g-KC16VT16's per-channel "
                                         r"group of 16 tokens"):
        make_kv_spec("g-KC16VT16", 2, 2, residual=24)
    assert make_kv_spec("g-KC128VT128", 2, 2, residual=128).residual == 128


def test_eval_config_records_null_bits_for_fp16():
    from kvtool.evals.runner import EvalConfig

    cfg = EvalConfig(model=None, tasks=["shapes"], output="x", kv="fp16", backend="onnx")
    assert (cfg.k_bits, cfg.v_bits, cfg.kv_residual, cfg.backend) == (None, None, None, "onnxruntime")
    assert cfg.to_json()["k_bits"] is None and cfg.to_json()["v_bits"] is None
    assert EvalConfig(model=None, tasks=["shapes"], output="x", kv="uniform").k_bits == 4
    with pytest.raises(InputError, match=r"^kv=fp16 keeps K and V unquantized: k_bits=4 does not apply"):
        EvalConfig(model=None, tasks=["shapes"], output="x", kv="fp16", k_bits=4)


@pytest.mark.parametrize("cmd", [
    ["run", "no/such/model", "--prompt", "q"],
    ["eval", "no/such/model", "--tasks", "shapes", "-o", "runs/none"],
])
def test_cli_refuses_bits_with_fp16_naming_the_flags(cmd, tmp_path):
    if cmd[0] == "run":  # a valid image, so that the KV options are what is refused
        random_image().save(tmp_path / "img.png")
        cmd = cmd + ["--image", str(tmp_path / "img.png")]
    res = CliRunner().invoke(main, cmd + ["--kv", "fp16", "--kv-bits", "2"])
    assert res.exit_code == 2
    assert res.output == ("error: --kv fp16 keeps K and V unquantized: --kv-bits 2 does not apply (bits are for "
                          "kvtool's quantizing schemes)\n")
    res = CliRunner().invoke(main, cmd + ["--kv", "g-KC16VT16", "--kv-residual", "24"])
    assert res.exit_code == 2
    assert res.output.startswith("error: --kv-residual 24: expected a multiple of g-KC16VT16's per-channel group")


def test_error_lines_spell_python_arguments_as_flags():
    assert cli_flag_names("image: text_only=True takes no image") == "--image: --text-only takes no image"
    assert cli_flag_names("x: kv=ov-u8 needs a stateful export (export with stateful=True)") == \
        "x: --kv ov-u8 needs a stateful export (export with --stateful)"
    assert cli_flag_names("kv_mode: expected one of packed, simulate") == "--kv-mode: expected one of packed, simulate"
    # names that are no CLI option, and words that only look like one, stay
    assert cli_flag_names("kv_owner=kvtool needs a stateful export") == "kv_owner=kvtool needs a stateful export"
    assert cli_flag_names("data row 3 of pope: no image") == "data row 3 of pope: no image"


# -- KIVI's window through the runtime caches ----------------------------------------------------------------

def _kv(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((1, 2, n, 32)).astype(np.float32),
            rng.standard_normal((1, 2, n, 32)).astype(np.float32))


@pytest.mark.parametrize("mode", ["packed", "simulate"])
def test_graph_cache_honours_the_window(mode):
    """packed: the cache equals a store with the window; simulate: the window of the past stays exact
    while the tokens before it are re-quantized."""
    spec = make_kv_spec("g-KC16VT16", 2, 2, kv_mode=mode, residual=32)
    cache = GraphKVCache(spec, num_layers=1, num_kv_heads=2, head_dim=32)
    cache.reset(8)
    k, v = _kv(70)
    store = QuantizedKVStore("g-KC16VT16", 2, 2, residual=32)
    for a, b in [(0, 40), *[(t, t + 1) for t in range(40, 70)]]:
        cache.append(0, k[:, :, a:b], v[:, :, a:b])
        cache.advance(b - a)
        store.append(k[:, :, a:b], v[:, :, a:b])
        kh, vh = cache.dequantized(0)
    if mode == "packed":
        rk, rv = store.dequantize()
        np.testing.assert_array_equal(kh, rk)
        np.testing.assert_array_equal(vh, rv)
    # K: 70 mod 32 = 6 exact; V: the newest 32; the rest moved by 2-bit codes
    np.testing.assert_array_equal(kh[:, :, 64:], k[:, :, 64:])
    np.testing.assert_array_equal(vh[:, :, 38:], v[:, :, 38:])
    assert np.abs(kh[:, :, :64] - k[:, :, :64]).max() > 0.05 and np.abs(vh[:, :, :38] - v[:, :, :38]).max() > 0.05


def test_torch_caches_honour_the_window():
    import torch

    k, v = (torch.from_numpy(x) for x in _kv(50, 1))
    spec = make_kv_spec("g-KC16VT16", 2, 2, kv_mode="packed", residual=16)
    layer = make_quant_cache(spec, 1).layers[0]
    layer.update(k[:, :, :40], v[:, :, :40])
    pk, pv = layer.update(k[:, :, 40:41], v[:, :, 40:41])  # past (40: K 8 exact, V 16 exact) + the new token
    np.testing.assert_array_equal(pk[:, :, 32:].numpy(), k[:, :, 32:41].numpy())
    np.testing.assert_array_equal(pv[:, :, 24:].numpy(), v[:, :, 24:41].numpy())
    assert not torch.equal(pv[:, :, :24], v[:, :, :24])
    sim = make_quant_cache(make_kv_spec("g-KC16VT16", 2, 2, kv_mode="simulate", residual=16), 1).layers[0]
    sk, sv = sim.update(k[:, :, :41], v[:, :, :41])  # past = 40 tokens: the same window, then the newest
    np.testing.assert_array_equal(sk[:, :, 32:].numpy(), k[:, :, 32:41].numpy())
    np.testing.assert_array_equal(sv[:, :, 24:].numpy(), v[:, :, 24:41].numpy())
    np.testing.assert_array_equal(sv[:, :, :24].numpy(), pv[:, :, :24].numpy())


# -- engines: the window, the dtype held, the backend alias ---------------------------------------------------

@pytest.fixture(scope="module")
def llava_ov(exported):
    return exported("tiny-llava", "openvino", 16, "fp32")


def test_window_engines_agree_and_record_it(tiny_model, llava_ov):
    kw = dict(kv="g-KC128VT128", k_bits=2, v_bits=2, kv_residual=128)
    t = VLMPipeline.load(tiny_model("tiny-llava"), backend="torch", **kw)
    o = VLMPipeline.load(llava_ov, **kw)
    a = t.generate(random_image(), QUESTION, max_new_tokens=5)
    b = o.generate(random_image(), QUESTION, max_new_tokens=5)
    assert a.token_ids == b.token_ids and a.stats["kv_bytes"] == b.stats["kv_bytes"]
    no_window = VLMPipeline.load(llava_ov, kv="g-KC128VT128", k_bits=2, v_bits=2)
    c = no_window.generate(random_image(), QUESTION, max_new_tokens=5)
    # the window holds V's newest 128 tokens in fp32 where the plain scheme holds 2-bit codes
    assert b.stats["kv_bytes"] > c.stats["kv_bytes"]
    assert b.stats["kv_residual"] == 128 and o.info()["kv_residual"] == 128 and o.info()["kv_spec"]["residual"] == 128
    assert c.stats["kv_residual"] is None


@pytest.mark.parametrize("stateful", [True, False])
def test_fp16_kv_is_held_in_fp16_and_the_reference_in_fp32(tiny_model, exported, stateful):
    # an fp32 export: the graph computes in f32, the cache is held in fp16 as named — in the stateful graph's
    # states (the default export) or in kvtool's own buffers (the stateless one)
    path = exported("tiny-llava", "openvino", 16, "fp32", stateful=stateful)
    o = VLMPipeline.load(path)
    st = o.generate(random_image(), QUESTION, max_new_tokens=3).stats
    assert st["kv_dtype"] == "float16"
    if not stateful:
        assert o.engine.kv.dtype == np.float16
    assert st["kv_bytes"] == st["kv_fp16_bytes"] > 0
    assert o.info()["k_bits"] is None and o.info()["v_bits"] is None
    f32 = VLMPipeline.load(path, kv_precision="f32")
    st32 = f32.generate(random_image(), QUESTION, max_new_tokens=3).stats
    assert st32["kv_dtype"] == "float32" and st32["kv_bytes"] == 2 * st32["kv_fp16_bytes"]
    t = VLMPipeline.load(tiny_model("tiny-llava"), backend="torch")  # the fp32 reference: labelled fp32
    stt = t.generate(random_image(), QUESTION, max_new_tokens=3).stats
    assert stt["kv_dtype"] == "float32" and stt["kv_bytes"] == 2 * stt["kv_fp16_bytes"]


def test_cli_run_reports_dtype_window_and_takes_the_onnx_alias(llava_ov, tmp_path):
    img = tmp_path / "img.png"
    random_image().save(img)
    base = ["run", str(llava_ov), "--image", str(img), "--prompt", "What is this?", "--max-new-tokens", "2"]
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 0, res.output
    assert "| kv fp16 packed (first token: compressed)" in res.output and "KNone" not in res.output
    assert " MiB float16 (fp16 " in res.output
    res = CliRunner().invoke(main, base + ["--kv", "g-KC128VT128", "--kv-bits", "2", "--kv-residual", "128",
                                           "--json"])
    d = json.loads(res.output)
    res = CliRunner().invoke(main, base + ["--kv", "g-KC128VT128", "--kv-bits", "2"])
    assert res.exit_code == 0, res.output  # a 2-bit cache is not labelled as a float cache
    assert re.search(r"KV [0-9.]+ MiB = K2V2 codes \+ group params \+ float(16|32) residual \(fp16 ", res.output)
    assert d["stats"]["kv_residual"] == 128 and d["config"]["kv_residual"] == 128
    res = CliRunner().invoke(main, base + ["--backend", "onnx"])  # accepted, and means onnxruntime
    assert res.exit_code == 2
    assert res.output == (f"error: --backend: {llava_ov} holds openvino graphs, which backend 'onnxruntime' "
                          f"cannot run (use 'openvino')\n")
    res = CliRunner().invoke(main, base + ["--text-only"])
    assert res.exit_code == 2 and res.output == "error: --image: --text-only takes no image\n"


def test_stateful_fp16_kv_reports_the_precision_it_holds(exported):
    """OpenVINO's stateful graph: kv="fp16" asks KV_CACHE_PRECISION f16 even when inference runs in f32, and
    kv_bytes counts the states in the precision the compiled model reports."""
    out_dir = exported("tiny-llava", "openvino", 16, "fp32", stateful=True)
    p = VLMPipeline.load(out_dir)
    st = p.generate(random_image(), QUESTION, max_new_tokens=2).stats
    assert p.info()["engine"]["config"]["KV_CACHE_PRECISION"] == "f16"
    assert st["kv_dtype"] == "float16" and st["kv_bytes"] == st["kv_fp16_bytes"] > 0
    f32 = VLMPipeline.load(out_dir, kv_precision="f32")
    st = f32.generate(random_image(), QUESTION, max_new_tokens=2).stats
    assert st["kv_dtype"] == "float32" and st["kv_bytes"] == 2 * st["kv_fp16_bytes"]


def test_report_tells_a_window_run_from_the_plain_scheme():
    from kvtool.evals.report import _row_labels

    plain = {"config": {"kv": "g-KC128VT128", "k_bits": 2, "v_bits": 2}, "pipeline": None}
    kivi = {"config": {"kv": "g-KC128VT128", "k_bits": 2, "v_bits": 2, "kv_residual": 128}, "pipeline": None}
    assert (_row_labels(plain)["kv"], _row_labels(kivi)["kv"]) == ("g-KC128VT128", "g-KC128VT128 r128")
    assert _row_labels(kivi)["bits"] == "2"
