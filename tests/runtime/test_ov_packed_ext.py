"""The packed attention as an OpenVINO C++ extension op (``engines.ov_packed_ext``, ``_ov_packed_op.cpp``), alone:
one op in a graph of its four inputs, run by OpenVINO's CPU plugin, over a ``QuantizedKVStore`` of random tokens.

- the decode fast path (T = 1) gives the Python extension's kernel result bit for bit (the same kernel code,
  called with the same inputs) and a naive float64 reference (dequantize, concatenate the new token,
  softmax(q K^T * scale) V) within the kernel's derived bound (tests/quant_ops/test_attention.py, reused);
- it appends the new token to the store itself where ``inplace_targets`` gives room (else it leaves the token
  in the slot and ``commit`` appends it): either way the store then holds the bytes a Python append of the same
  token would (same codes, params, residual), over many steps (group flushes, new and partly filled tiles,
  buffers that grow), and a failed inference leaves no trace of the op's appends;
- no Python runs in a fast-path call (the fallback callback is counted), every other call does;
- ragged N (not a multiple of the group or the packing tile), N = 1 (one stored token + the new one), GQA,
  head_dim 64 / 80 / 128, per-channel and per-token groups, outlier channels, 2/3/4/8 bits, f16 / f32 stores;
- the route when the extension is absent (``KVTOOL_NO_OV_EXTENSION=1``), and a fallback error re-raised as
  itself after the inference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvtool.errors import InputError
from kvtool.quant_ops import QuantizedKVStore, native
from kvtool.quant_ops.attention import attention_path, native_decode
from kvtool.runtime.engines import ov_packed_ext as ext
from tests.quant_ops.test_attention import _kv, _reference, _tolerance

pytestmark = pytest.mark.skipif(ext.route()[0] != ext.CPP_ROUTE or not native.available(),
                                reason=f"OpenVINO extension op: {ext.route()[1]}; native: {native.reason()}")


class _Counting:
    """The engine's ``_evaluate`` with a call counter (what the op calls back into)."""

    def __init__(self):
        from kvtool.runtime.engines.openvino_packed import _evaluate

        self.fn, self.calls = _evaluate, 0

    def __call__(self, *a):
        self.calls += 1
        return self.fn(*a)


def _graph(hq: int, h: int, d: int, layer, evaluate):
    import openvino as ov
    import openvino.opset13 as ops

    from kvtool.runtime.engines.packed_pyop import op_class

    params = [ops.parameter(ov.PartialShape([1, n, -1, d]), ov.Type.f32) for n in (hq, h, h, hq)]
    node = ext.make_node([p.output(0) for p in params], layer, evaluate, op_class())
    assert node.get_type_name() == ext.OP_TYPE and layer.route[0] == ext.CPP_ROUTE
    model = ov.Model([node.output(0)], params)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled.create_infer_request()


def _layer(scheme, kb, vb, k, v, dtype, scale):
    from kvtool.runtime.engines.openvino_packed import _Layer

    layer = _Layer(0, scale, dtype)
    layer.store = QuantizedKVStore(scheme, kb, vb)
    n = k.shape[2]
    n0 = max(n - 3, 0)
    if n0:
        layer.store.append(k[:, :, :n0], v[:, :, :n0])  # a prefill, then decode tokens one by one
    for t in range(n0, n):
        layer.store.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    return layer


def _run(scheme, kb, vb, h, rep, d, n, dtype=np.float16, seed=0, steps=2):
    rng = np.random.default_rng(seed)
    k, v = _kv(rng, 1, h, n + steps, d, dtype)
    scale = 1 / math.sqrt(d)
    layer = _layer(scheme, kb, vb, k[:, :, :n], v[:, :, :n], dtype, scale)
    twin = _layer(scheme, kb, vb, k[:, :, :n], v[:, :, :n], dtype, scale)  # appended in Python
    assert attention_path(layer.store)[0] == "native"
    evaluate = _Counting()
    req = _graph(h * rep, h, d, layer, evaluate)
    for s in range(steps):
        q = rng.standard_normal((1, h * rep, 1, d)).astype(np.float32)
        kx = (rng.standard_normal((1, h, 1, d)) * 2).astype(np.float32)
        vx = rng.standard_normal((1, h, 1, d)).astype(np.float32)
        sd = np.full((1, h * rep, 1, d), 7.0, np.float32)  # the SDPA's output: must not be what comes out
        want = native_decode(np.ascontiguousarray(q[:, :, 0]), twin.store, scale, 2, kx, vx)
        ext.infer([layer], req, {0: q, 1: kx, 2: vx, 3: sd})
        out = req.get_output_tensor(0).data.copy()
        assert evaluate.calls == 0 and layer.slot.c.fast_calls == s + 1  # no Python inside the inference
        np.testing.assert_array_equal(out[:, :, 0], want)  # the same kernel, bit for bit
        kk, vv = twin.store.dequantize()
        kk = np.concatenate([kk.astype(np.float32), kx.astype(dtype).astype(np.float32)], axis=2)
        vv = np.concatenate([vv.astype(np.float32), vx.astype(dtype).astype(np.float32)], axis=2)
        q3 = q[:, :, 0]
        ref = _reference(q3, kk, vv, scale)
        # the op attends to the exact f32 new token; the reference's is rounded to the store's dtype: that
        # rounding (rho, relative) moves one score by at most scale |q| |k| rho and the output by rho max|v|
        rho = 2.0**-11 if dtype == np.float16 else 2.0**-23
        extra = np.abs(vx).max() * rho + 2.2 * np.abs(vv).max() * scale * np.abs(q3).sum(-1, keepdims=True) \
            * np.abs(kx).max() * rho
        assert (np.abs(out[:, :, 0] - ref) <= _tolerance(q3, kk, vv, scale) + extra).all()
        twin.store.append(kx.astype(dtype), vx.astype(dtype))
        assert layer.store.n_tokens == twin.store.n_tokens == n + s + 1
        for which in (0, 1):
            np.testing.assert_array_equal(layer.store.dequantize()[which], twin.store.dequantize()[which])
        assert layer.store.nbytes == twin.store.nbytes
    assert layer.calls["native"] == steps and layer.path[0] == "native"


@pytest.mark.parametrize("scheme,kb,vb", [("g-KC32VT32", 2, 2), ("g-KT32VC32", 4, 2), ("g-KC32VT32", 3, 8),
                                          ("g-KC128VT128", 2, 4), ("g-T32", 8, 3), ("g-C32", 2, 2)])
def test_schemes_and_bits(scheme, kb, vb):
    _run(scheme, kb, vb, h=2, rep=2, d=64, n=75)


@pytest.mark.parametrize("d,n", [(64, 1), (80, 37), (128, 130), (128, 2)])
def test_head_dims_and_ragged_tokens(d, n):
    _run("g-KC32VT32", 2, 2, h=2, rep=1, d=d, n=n)


@pytest.mark.parametrize("rep", [1, 4, 7])
def test_gqa(rep):
    _run("g-KT32VC32", 2, 4, h=2, rep=rep, d=64, n=41)


def test_f32_store():
    _run("g-KC32VT32", 2, 2, h=2, rep=2, d=64, n=67, dtype=np.float32)


def test_other_calls_go_through_python():
    """An empty store (a prefill pass-through: the SDPA's output, the tokens appended), T > 1 on a non-empty
    store (case c) and a scheme the kernel cannot read (uniform) each call the Python fallback once."""
    rng = np.random.default_rng(1)
    h, d = 2, 64
    from kvtool.runtime.engines.openvino_packed import _Layer

    for scheme in ("g-KC32VT32", "uniform"):
        layer = _Layer(0, 1 / 8, np.float16)
        layer.store = QuantizedKVStore(scheme, 2, 2)
        evaluate = _Counting()
        req = _graph(h, h, d, layer, evaluate)
        feeds = {i: rng.standard_normal((1, h, 5, d)).astype(np.float32) for i in range(4)}
        ext.infer([layer], req, feeds)
        np.testing.assert_array_equal(req.get_output_tensor(0).data, feeds[3])  # case (a): the SDPA's own
        assert evaluate.calls == 1 and layer.store.n_tokens == 5 and layer.slot.c.fast_calls == 0
        ext.infer([layer], req, feeds)  # case (c): 5 tokens on a non-empty store
        assert evaluate.calls == 2 and layer.calls["portable"] == 1
        assert not np.array_equal(req.get_output_tensor(0).data, feeds[3])
        one = {i: x[:, :, :1] for i, x in feeds.items()}
        ext.infer([layer], req, one)  # decode: C++ for the grid scheme, Python for uniform
        fast = scheme != "uniform"
        assert evaluate.calls == (2 if fast else 3) and layer.slot.c.fast_calls == int(fast)
        assert layer.store.n_tokens == 11


def test_fallback_error_is_reraised():
    """An error the Python fallback raises inside the inference comes back as itself (one line, InputError)."""
    from kvtool.runtime.engines.openvino_packed import _Layer

    def bad(*a):
        raise InputError("packed op: bad input")

    layer = _Layer(0, 1 / 8, np.float16)
    layer.store = QuantizedKVStore("g-KC32VT32", 2, 2)
    req = _graph(2, 2, 64, layer, bad)
    x = np.zeros((1, 2, 3, 64), np.float32)
    with pytest.raises(InputError, match="^packed op: bad input$"):
        ext.infer([layer], req, {0: x, 1: x, 2: x, 3: x})


def test_route_without_the_extension(monkeypatch):
    monkeypatch.setenv(ext.ENV_OFF, "1")
    assert ext.route() == (ext.PY_ROUTE, f"{ext.ENV_OFF}=1")
    monkeypatch.delenv(ext.ENV_OFF)
    assert ext.route()[0] == ext.CPP_ROUTE and "loaded" in ext.route()[1]


@pytest.mark.parametrize("scheme,kb,vb", [("g-KC128VT128", 2, 2), ("g-KT128VC128", 2, 2), ("g-KC32VT64", 4, 3)])
def test_kernel_threads_pool_and_spawn_agree(scheme, kb, vb):
    """A step large enough for the kernel's threads (N * rep * D * kv heads >= 2^20; ragged N), on OpenVINO's TBB
    pool and on spawned std::threads: both the Python extension's kernel result, bit for bit."""
    rng = np.random.default_rng(5)
    h, rep, d, n = 8, 2, 128, 1031
    k, v = _kv(rng, 1, h, n, d, np.float16)
    scale = 1 / math.sqrt(d)
    layer = _layer(scheme, kb, vb, k, v, np.float16, scale)
    layer.threads = 2
    req = _graph(h * rep, h, d, layer, _Counting())
    was = ext.kernel_pool()
    try:
        for mode in (0, 1, 0, 1):
            used = ext.kernel_pool(mode)
            q = rng.standard_normal((1, h * rep, 1, d)).astype(np.float32)
            kx = rng.standard_normal((1, h, 1, d)).astype(np.float32)
            want = native_decode(np.ascontiguousarray(q[:, :, 0]), layer.store, scale, 1, kx, kx.copy())
            ext.infer([layer], req, {0: q, 1: kx, 2: kx.copy(), 3: np.zeros((1, h * rep, 1, d), np.float32)})
            np.testing.assert_array_equal(req.get_output_tensor(0).data[:, :, 0], want, err_msg=used)
    finally:
        ext.kernel_pool(1 if was == "tbb" else 0)
    assert layer.slot.c.fast_calls == 4


def _fill_reference(c, t: tuple) -> None:
    """The slot side's fields set one by one (the fill ``_fill_side`` replaced), absent arrays' strides 0."""
    mode, bits, nq, g, codes, delta, mn, pb, ph, pn, seg, nseg, resid = t
    c.mode, c.bits, c.nq, c.g, c.pb, c.ph, c.pn = mode, bits, nq, g, pb, ph, pn
    c.codes, c.delta, c.mn = (ext._ptr(x) for x in (codes, delta, mn))
    if codes is not None:
        c.cs[0], c.cs[1], c.cs[2] = codes.strides[:3]
        c.p16 = int(delta.itemsize == 2)
    c.seg, c.nseg, c.nseg_max = ext._ptr(seg), ext._ptr(nseg), 0 if seg is None else seg.shape[1]
    c.resid, c.nres = ext._ptr(resid), 0 if resid is None else resid.shape[2]
    if resid is not None:
        c.rs[0], c.rs[1], c.rs[2] = (s // resid.itemsize for s in resid.strides[:3])
        c.r16 = int(resid.itemsize == 2)


@pytest.mark.parametrize("scheme,kb,vb,n,dtype", [("g-KC128VT128", 2, 2, 300, np.float16),
                                                  ("g-KT32VC32", 4, 3, 31, np.float32),
                                                  ("g-KC32VT32", 8, 2, 64, np.float16),
                                                  ("fp16", 16, 16, 5, np.float16)])
def test_fill_side_writes_the_fields(scheme, kb, vb, n, dtype):
    """``_fill_side``'s one struct write gives the bytes of a field-by-field ctypes fill (ragged N, residual
    present or absent, per-channel / per-token / dense sides, f16 / f32)."""
    from kvtool.quant_ops.attention import _side_tuple

    rng = np.random.default_rng(3)
    st = QuantizedKVStore(scheme, kb, vb)
    st.append(*_kv(rng, 1, 4, n, 64, dtype))
    for which, off in (("k", ext._K_OFF), ("v", ext._V_OFF)):
        t = _side_tuple(st.side_layout(which))
        got, want = ext.KvSlotC(), ext.KvSlotC()
        keep: list = []
        ext._fill_side(memoryview(got).cast("B"), off, t, keep)
        _fill_reference(getattr(want, which), t)
        assert bytes(got) == bytes(want) and keep == [t[4], t[5], t[6], t[10], t[11], t[12]]


def test_data_pointers():
    """``_ptr`` (read from ``__array_struct__``) equals numpy's ``__array_interface__`` data pointer for views at
    an offset, strided and reversed views, read-only, zero-size and float16 arrays; None for None."""
    base = np.arange(2 * 8 * 40 * 16, dtype=np.uint8).reshape(2, 8, 40, 16)
    ro = np.ones((3, 5), np.float16)
    ro.flags.writeable = False
    for a in (base, base[1], base[:, 3:, 7:30], base[..., ::2], base[:, ::-1], base[:, :, :0], ro,
              np.empty((1, 4, 1, 64), np.float32)):
        assert ext._ptr(a) == a.__array_interface__["data"][0]
    assert ext._ptr(None) is None


def _same_bytes(a: QuantizedKVStore, b: QuantizedKVStore) -> None:
    """Two stores hold the same tokens in the same bytes: counts, and per side the codes (every held tile row, the
    unused slots of a partly filled tile included), params and residual."""
    assert a.n_tokens == b.n_tokens and a.quantized_counts == b.quantized_counts and a.nbytes == b.nbytes
    for which in ("k", "v"):
        la, lb = a.side_layout(which), b.side_layout(which)
        for f in ("codes", "delta", "mn", "residual", "dense"):
            x, y = getattr(la, f), getattr(lb, f)
            assert (x is None) == (y is None), (which, f)
            if x is not None:
                np.testing.assert_array_equal(x, y, err_msg=f"{which} {f}")


def _counting_appends(store: QuantizedKVStore) -> dict:
    """Counts the store's ``append`` calls and the tokens ``appended_in_place`` accounted for."""
    n = {"append": 0, "in_place": 0}
    append, in_place = store.append, store.appended_in_place

    def counted_append(*a, **k):
        n["append"] += 1
        return append(*a, **k)

    def counted_in_place(t):
        n["in_place"] += t
        return in_place(t)

    store.append, store.appended_in_place = counted_append, counted_in_place
    return n


@pytest.mark.parametrize("scheme,kb,vb,dtype", [("g-KC32VT32", 2, 2, np.float16), ("g-KT32VC32", 3, 4, np.float16),
                                                ("g-KC32VT16", 4, 8, np.float32), ("g-KC32VT32", 8, 3, np.float16),
                                                ("fp16", 16, 16, np.float16), ("g-KC32VT32", 2, 16, np.float16)])
def test_op_appends_to_the_store(scheme, kb, vb, dtype):
    """70 decode steps from a ragged 37-token prefill (groups of 32 complete twice, 2/3/4-bit tiles fill and start,
    the code / param buffers grow): after every step the store the op appended to holds the same bytes as one
    appended in Python, the op's output is the Python extension's kernel over that store bit for bit, and the op
    did append itself (``appended_in_place``) with ``commit``'s Python append left for the tokens that complete
    a per-channel group or need a bigger buffer."""
    rng = np.random.default_rng(11)
    h, rep, d, n, steps = 2, 2, 64, 37, 70
    k, v = _kv(rng, 1, h, n + steps, d, dtype)
    scale = 1 / math.sqrt(d)
    from kvtool.runtime.engines.openvino_packed import _Layer

    layer, twin = _Layer(0, scale, dtype), _Layer(0, scale, dtype)
    layer.store, twin.store = QuantizedKVStore(scheme, kb, vb), QuantizedKVStore(scheme, kb, vb)
    for st in (layer.store, twin.store):
        st.append(k[:, :, :n], v[:, :, :n])
    counts = _counting_appends(layer.store)
    req = _graph(h * rep, h, d, layer, _Counting())
    bufs = tuple(np.zeros((1, h, n + steps, d), dtype) for _ in range(2))
    layer.store.dequantize(out=bufs)
    for s in range(steps):
        q = rng.standard_normal((1, h * rep, 1, d)).astype(np.float32)
        kx, vx = k[:, :, n + s:n + s + 1], v[:, :, n + s:n + s + 1]
        want = native_decode(np.ascontiguousarray(q[:, :, 0]), twin.store, scale, 2, kx, vx)
        ext.infer([layer], req, {0: q, 1: kx.astype(np.float32), 2: vx.astype(np.float32),
                                 3: np.zeros((1, h * rep, 1, d), np.float32)})
        np.testing.assert_array_equal(req.get_output_tensor(0).data[:, :, 0], want, err_msg=f"step {s}")
        twin.store.append(kx, vx)
        _same_bytes(layer.store, twin.store)
        got = layer.store.dequantize(out=bufs)  # incremental: only what changed since the last step rewritten
        for which, want_side in enumerate(twin.store.dequantize()):
            np.testing.assert_array_equal(got[which], want_side, err_msg=f"step {s} incremental dequantize")
    assert counts["in_place"] + counts["append"] == steps and layer.calls["native"] == steps
    assert counts["in_place"] >= steps // 2, counts  # the op appended most tokens itself
    assert layer.appends == {"op": counts["in_place"], "python": counts["append"]}  # what layer_paths reports
    if "KC32" in scheme and kb != 16:  # the tokens completing a group of 32 (2 of them) go through Python
        assert counts["append"] >= 2, counts


def test_no_op_append_switch(monkeypatch):
    """``KVTOOL_NO_OP_APPEND=1``: every fast-path token appended by ``commit`` in Python, the same bytes."""
    monkeypatch.setenv(ext.ENV_NO_OP_APPEND, "1")
    rng = np.random.default_rng(2)
    layer = _layer("g-KC32VT32", 2, 2, *_kv(rng, 1, 2, 9, 64, np.float16), np.float16, 1 / 8)
    counts = _counting_appends(layer.store)
    req = _graph(2, 2, 64, layer, _Counting())
    x = rng.standard_normal((1, 2, 1, 64)).astype(np.float32)
    for _ in range(3):
        ext.infer([layer], req, {0: x, 1: x, 2: x, 3: x})
    assert counts == {"append": 3, "in_place": 0} and layer.slot.c.ka.kind == 0


def test_failed_inference_undoes_the_op_appends():
    """Two layers' ops in one graph, the second one's Python fallback raising after the first op appended its
    token itself: the error comes back, the first store counts nothing new, and its codes keep no trace — the
    next token, appended by Python into the same partly filled tile (OR into its free slots), gives the bytes of
    a store that never saw the failed step; then the op's own appends go on as before."""
    import openvino as ov
    import openvino.opset13 as ops

    from kvtool.runtime.engines.openvino_packed import _Layer
    from kvtool.runtime.engines.packed_pyop import op_class

    rng = np.random.default_rng(4)
    h, d, n = 2, 64, 41  # 2-bit V tiles of 4 tokens: token 41 sits in slot 1 of a partly filled tile
    k, v = _kv(rng, 1, h, n + 3, d, np.float16)
    first, twin = _layer("g-KC32VT32", 2, 2, k[:, :, :n], v[:, :, :n], np.float16, 1 / 8), \
        _layer("g-KC32VT32", 2, 2, k[:, :, :n], v[:, :, :n], np.float16, 1 / 8)
    fail = {"on": True}

    def second_eval(*a):
        if fail["on"]:
            raise InputError("second layer: bad input")
        return _Counting()(*a)

    second = _Layer(1, 1 / 8, np.float16)
    second.store = QuantizedKVStore("g-KC32VT32", 2, 2)  # empty: its op calls back into Python
    params = [ops.parameter(ov.PartialShape([1, h, -1, d]), ov.Type.f32) for _ in range(4)]
    a = ext.make_node([p.output(0) for p in params], first, _Counting(), op_class())
    b = ext.make_node([a.output(0), params[1].output(0), params[2].output(0), params[3].output(0)], second,
                      second_eval, op_class())
    req = ov.Core().compile_model(ov.Model([b.output(0)], params), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    feeds = lambda t: {0: rng.standard_normal((1, h, 1, d)).astype(np.float32),  # noqa: E731
                       1: k[:, :, t:t + 1].astype(np.float32), 2: v[:, :, t:t + 1].astype(np.float32),
                       3: np.zeros((1, h, 1, d), np.float32)}
    with pytest.raises(InputError, match="^second layer: bad input$"):
        ext.infer([first, second], req, feeds(n))
    assert first.slot.c.fast_calls == 1 and first.store.n_tokens == n and first.slot.c.appended == 0
    _same_bytes(first.store, twin.store)
    first.store.append(k[:, :, n:n + 1], v[:, :, n:n + 1])  # Python's append into the tile the op had written
    twin.store.append(k[:, :, n:n + 1], v[:, :, n:n + 1])
    _same_bytes(first.store, twin.store)
    fail["on"] = False
    second.store.append(k[:, :, :1], v[:, :, :1])  # now a store the op reads: both layers on the fast path
    counts = _counting_appends(first.store)
    for t in (n + 1, n + 2):
        ext.infer([first, second], req, feeds(t))
        twin.store.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        _same_bytes(first.store, twin.store)
    assert counts == {"append": 0, "in_place": 2}


def test_kernel_min_work_threshold():
    """``kernel_min_work``: below the threshold one thread, from it the pool's threads; a short store (41 tokens)
    with the threshold at 0 on both pools gives the Python extension's single-thread result bit for bit; the
    setting is read back and restored, and a pool name other than tbb / spawn is refused."""
    rng = np.random.default_rng(8)
    h, rep, d, n = 4, 2, 64, 41
    k, v = _kv(rng, 1, h, n, d, np.float16)
    layer = _layer("g-KC32VT32", 2, 2, k, v, np.float16, 1 / 8)
    layer.threads = 2
    req = _graph(h * rep, h, d, layer, _Counting())
    was = {p: ext.kernel_min_work(p) for p in ("tbb", "spawn")}
    pool = ext.kernel_pool()
    try:
        for p in ("tbb", "spawn"):
            ext.kernel_pool(int(p == "tbb"))
            assert ext.kernel_min_work(p, 0) == 0 and ext.kernel_min_work(p) == 0
            q = rng.standard_normal((1, h * rep, 1, d)).astype(np.float32)
            kx = rng.standard_normal((1, h, 1, d)).astype(np.float32)
            want = native_decode(np.ascontiguousarray(q[:, :, 0]), layer.store, 1 / 8, 1, kx, kx.copy())
            ext.infer([layer], req, {0: q, 1: kx, 2: kx.copy(), 3: np.zeros((1, h * rep, 1, d), np.float32)})
            np.testing.assert_array_equal(req.get_output_tensor(0).data[:, :, 0], want, err_msg=p)
    finally:
        for p, w in was.items():
            ext.kernel_min_work(p, w)
        ext.kernel_pool(1 if pool == "tbb" else 0)
    assert {p: ext.kernel_min_work(p) for p in ("tbb", "spawn")} == was
    with pytest.raises(ValueError, match="pool 'omp'"):
        ext.kernel_min_work("omp")
