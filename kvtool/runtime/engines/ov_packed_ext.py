"""The packed engine's attention as an OpenVINO C++ extension op, and which route runs.

The packed engine (``openvino_packed``) inserts one attention op per layer, after its SDPA or in its place
(``packed_prefix.removes_sdpa``). Two routes:

- ``"openvino C++ extension op"`` (the default where it is built): ``KvtoolPackedKVAttention`` from
  ``_ov_packed_op.cpp`` (hand-written: no library offers an OpenVINO op over kvtool's packed stores), made with
  openvino's ``NodeFactory`` from the library ``pip install`` built (``setup.py``). Its decode fast path (T = 1
  on a store the fused kernel reads) runs the same kernel as ``quant_ops.attention.native_decode``
  (``_native_attention.h``, included by both builds) with no Python: the op reads the layer's store through a
  per-layer C struct (``KvSlotC``: pointers, strides, token counts of the packed codes, params and residual)
  that ``sync`` refreshes before each inference when the store changed. The op then appends the new token to
  the store itself where ``QuantizedKVStore.inplace_targets`` gives room (a token waiting in a per-channel
  residual, or a per-token group quantized + packed into its tile by the store's own quantize_pack kernel:
  the bytes the store's ``append`` writes) and advances the slot, so ``commit`` only accounts for it
  (``appended_in_place``) and the next ``sync`` has nothing to refresh; otherwise (the token that completes a
  per-channel group, a buffer that must grow, ``KVTOOL_NO_OP_APPEND=1``) it leaves the token, in the stores'
  dtype, in the slot's pending buffers and ``commit`` appends it after the inference. At 0.8k-2.2k tokens on
  the bench model this took ``sync`` + ``commit`` from ~1.0-1.2 to ~0.15 ms of Python per step and the step
  to 0.90-0.93x (docs/BENCHMARKS.md, "Decode without Python between tokens"). A failed inference appends nothing (``kvtool_ov_unappend`` clears the
  codes the op packed; every slot is re-described). Every other call (a prefill
  pass-through, a chunked prefill's buffer, T > 1 on a non-empty store, a scheme the kernel cannot read:
  uniform, or<s>, g-CN) calls back into the engine's Python ``_evaluate`` through a ctypes function (ctypes
  takes the GIL; OpenVINO's ``infer`` releases it), so those cases keep one implementation.
- ``"openvino python op"``: the ``openvino.Op`` subclass (``packed_pyop.op_class``), where the extension
  is not built, fails to load (another openvino version), or ``KVTOOL_NO_OV_EXTENSION=1`` (comparisons, tests).

Never silently: ``route()`` returns ``(name, reason)``, the engine's ``info()["route"]`` / ``["route_reason"]``
and ``kvtool run --json`` say which ran and why. Results are the same on both routes: the fast path calls the
kernel with the inputs the Python op passes it (f32 q, the new token in its own type) and converts the new token
to the stores' dtype as numpy does (round to nearest even; F16C where cpuid has it: the compiler's own
conversion is a libgcc call per value, which cost ~45 us per layer and step), so the stores hold the same bytes.

The kernel's kv heads run on OpenVINO's own TBB pool where the extension was built with the wheel's TBB
(``setup.py``; the op is evaluated inside the CPU plugin's arena, so the plugin's idle worker takes the other
heads), else on std::threads spawned per call; ``kernel_pool()`` says which (and sets it for comparisons), and
``route()``'s reason names it. Spawned threads competed with the plugin's spinning TBB worker for the cores:
the pool cut the 2-bit decode step's process CPU by 7-17% at 2k tokens (docs/BENCHMARKS.md, "decode step at
2k, op vs PagedAttention"). A call runs one thread below ``kernel_min_work(pool)`` multiply-adds of q.K (2^20 on
both pools; settable for comparisons, ``bench/op_decode.py``). ``sync`` writes each slot side with one
``struct.pack_into``.

The slot's address is the op's ``slot`` attribute: the model made here runs only with the engine that owns its
slots (a serialized model is not usable elsewhere). CPU only, batch 1 (as the engine).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import itertools
import os
import struct
import weakref
from pathlib import Path

import numpy as np

ENV_OFF = "KVTOOL_NO_OV_EXTENSION"
# =1: the op never appends to the store itself (every fast-path token goes through commit's Python append; A/B)
ENV_NO_OP_APPEND = "KVTOOL_NO_OP_APPEND"
OP_TYPE = "KvtoolPackedKVAttention"
CPP_ROUTE, PY_ROUTE = "openvino C++ extension op", "openvino python op"
NODE_NAME = "kvtool_attention.{i}"  # the op's friendly name in the LM graph (make_node)


class KvSideC(ctypes.Structure):
    """One side (K or V) of a layer's packed store as the C++ op reads it (mirrors ``KvSide`` in _ov_packed_op.cpp)."""

    _fields_ = [("mode", ctypes.c_int64), ("bits", ctypes.c_int64), ("nq", ctypes.c_int64), ("g", ctypes.c_int64),
                ("codes", ctypes.c_void_p), ("cs", ctypes.c_int64 * 3), ("delta", ctypes.c_void_p),
                ("mn", ctypes.c_void_p), ("p16", ctypes.c_int64), ("pb", ctypes.c_int64), ("ph", ctypes.c_int64),
                ("pn", ctypes.c_int64), ("seg", ctypes.c_void_p), ("nseg", ctypes.c_void_p),
                ("nseg_max", ctypes.c_int64), ("resid", ctypes.c_void_p), ("rs", ctypes.c_int64 * 3),
                ("nres", ctypes.c_int64), ("r16", ctypes.c_int64)]


class KvTensorC(ctypes.Structure):
    """A borrowed numpy array (data pointer, element type, shape, strides) handed to the C++ op."""

    _fields_ = [("data", ctypes.c_void_p), ("etype", ctypes.c_int64), ("ndim", ctypes.c_int64),
                ("shape", ctypes.c_int64 * 4)]


CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(KvTensorC), ctypes.POINTER(KvTensorC))


class KvAppendC(ctypes.Structure):
    """Where the op may append one side's next decode token itself (mirrors ``KvAppendC`` in _ov_packed_op.cpp;
    filled from ``QuantizedKVStore.inplace_targets``): kind 0 nowhere, 1 an exact token into ``buf``, 2 quantize +
    pack into the codes ``buf`` and params ``delta`` / ``mn``; the op appends while ``n < cap``."""

    _fields_ = [("kind", ctypes.c_int64), ("n", ctypes.c_int64), ("cap", ctypes.c_int64), ("buf", ctypes.c_void_p),
                ("bs", ctypes.c_int64 * 3), ("delta", ctypes.c_void_p), ("mn", ctypes.c_void_p),
                ("ps", ctypes.c_int64 * 4), ("bh", ctypes.c_int64), ("bl", ctypes.c_int64), ("bits", ctypes.c_int64),
                ("e16", ctypes.c_int64)]


class KvSlotC(ctypes.Structure):
    """A layer's slot: the store the fast path reads, where it appends (or the pending new token), the Python
    fallback callback."""

    _fields_ = [("fast", ctypes.c_int64), ("pending", ctypes.c_int64), ("H", ctypes.c_int64), ("D", ctypes.c_int64),
                ("threads", ctypes.c_int64), ("pend16", ctypes.c_int64), ("scale", ctypes.c_double),
                ("pend_k", ctypes.c_void_p), ("pend_v", ctypes.c_void_p), ("key", ctypes.c_int64),
                ("callback", CALLBACK), ("fast_calls", ctypes.c_int64), ("hq", ctypes.c_int64),
                ("k", KvSideC), ("v", KvSideC), ("appended", ctypes.c_int64), ("ka", KvAppendC), ("va", KvAppendC)]


def library_path() -> Path | None:
    """The built extension library (``kvtool/runtime/engines/_ov_packed_op*.so``), or None."""
    found = sorted(glob.glob(str(Path(__file__).with_name("_ov_packed_op")) + "*.so"))
    return Path(found[0]) if found else None


@functools.lru_cache(maxsize=1)
def _load() -> tuple[object | None, str]:
    """(NodeFactory holding the extension, or None; why). Loaded once per process (the library stays loaded)."""
    path = library_path()
    if path is None:
        return None, ("OpenVINO extension op not built (pip install found no openvino headers, or its build failed; "
                      "reinstall with openvino installed: pip install .)")
    try:
        from openvino.utils.node_factory import NodeFactory

        lib = ctypes.CDLL(str(path))
        sizes = (ctypes.c_int64 * 3)()
        lib.kvtool_ov_struct_sizes(sizes)
        want = (ctypes.sizeof(KvSideC), ctypes.sizeof(KvTensorC), ctypes.sizeof(KvSlotC))
        if tuple(sizes) != want:
            return None, f"OpenVINO extension op {path.name}: struct sizes {tuple(sizes)}, expected {want} (rebuild)"
        factory = NodeFactory()
        factory.add_extension(str(path))
    except Exception as e:  # another openvino version (undefined symbols), a broken build
        return None, f"OpenVINO extension op {path.name} did not load ({str(e).splitlines()[0][:200]})"
    factory._kvtool_lib = lib  # keep the library loaded as long as the factory
    lib.kvtool_ov_pool.restype = ctypes.c_int64
    lib.kvtool_ov_pool.argtypes = [ctypes.c_int64]
    lib.kvtool_ov_min_work.restype = ctypes.c_int64
    lib.kvtool_ov_min_work.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.kvtool_ov_unappend.restype = None
    lib.kvtool_ov_unappend.argtypes = [ctypes.c_void_p]
    threads = "OpenVINO's TBB pool" if lib.kvtool_ov_pool(-1) else "std::threads per call"
    return factory, (f"{path.name} loaded (decode fast path in C++, kernel threads: {threads}; other calls through "
                     f"the Python fallback)")


def kernel_pool(mode: int | None = None) -> str | None:
    """Where the C++ op's kernel runs its kv heads: ``"tbb"`` (OpenVINO's own TBB pool, the op being evaluated
    inside the CPU plugin's arena; the default where the extension was built with the wheel's TBB) or
    ``"spawn"`` (std::threads started per call). ``mode`` 0 / 1 sets spawn / tbb for the process (comparisons,
    tests; 1 is ignored by a build without TBB). None where the extension is not loaded. Either gives the same
    output bit for bit: a kv head's result does not depend on the thread that computes it."""
    factory, _ = _load()
    if factory is None:
        return None
    return "tbb" if factory._kvtool_lib.kvtool_ov_pool(-1 if mode is None else int(mode)) else "spawn"


def kernel_min_work(pool: str, value: int | None = None) -> int | None:
    """The least work (multiply-adds of q.K: tokens x query heads per kv head x head dim x kv heads) for which the
    C++ op's kernel runs more than one thread on ``pool`` (``"tbb"`` or ``"spawn"``, as ``kernel_pool``);
    ``value`` sets it for the process (comparisons, tests). None where the extension is not loaded. The output
    is the same bit for bit with any number of threads."""
    factory, _ = _load()
    if factory is None:
        return None
    if pool not in ("tbb", "spawn"):
        raise ValueError(f"pool {pool!r}: expected 'tbb' or 'spawn'")
    return int(factory._kvtool_lib.kvtool_ov_min_work(int(pool == "tbb"), -1 if value is None else int(value)))


def route() -> tuple[str, str]:
    """``(route, reason)`` the next packed engine will use: ``CPP_ROUTE`` or ``PY_ROUTE``."""
    if os.environ.get(ENV_OFF) == "1":
        return PY_ROUTE, f"{ENV_OFF}=1"
    factory, why = _load()
    return (CPP_ROUTE if factory is not None else PY_ROUTE), why


# -- the Python fallback the op calls back into ----------------------------------------------------------------
_REGISTRY: dict[int, tuple] = {}  # key -> (weakref to the layer, evaluate): the layer owns its slot
_ERRORS: dict[int, BaseException] = {}
_KEYS = itertools.count(1)
_DTYPES = {0: np.float32, 1: np.float16, 2: np.uint16}  # bf16: raw bits


def _array(t: KvTensorC) -> np.ndarray:
    shape = tuple(t.shape[:t.ndim])
    dt = np.dtype(_DTYPES[t.etype])
    n = int(np.prod(shape)) * dt.itemsize
    if n == 0:
        return np.empty(shape, dt)
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(t.data)).view(dt).reshape(shape)


def _fallback(key: int, inputs, output) -> int:
    """The op's calls other than the fast path: the engine's ``_evaluate`` on numpy views of the op's tensors
    (bf16 widened to f32, as the Python op does; an absent sdpa_out, etype -1, as None). 1: wrote the output;
    0: the op copies the SDPA's; -1: raised."""
    try:
        from kvtool.runtime.engines.openvino_engine import bf16_bits_to_f32, f32_to_bf16_bits

        ref, evaluate = _REGISTRY[key]
        layer = ref()
        ins = [inputs[j] for j in range(4 if inputs[3].etype >= 0 else 3)]
        o = output[0]
        raw = [_array(t) for t in ins]
        bf16 = any(t.etype == 2 for t in ins[:3]) or o.etype == 2
        arrs = [bf16_bits_to_f32(a) if t.etype == 2 else a for a, t in zip(raw, ins, strict=True)] + [None]
        out_arr = _array(o)
        dst = out_arr if (not bf16 and o.etype == 0) else None
        out = evaluate(layer, arrs[0], arrs[1], arrs[2], arrs[3], dst)
        if out is None:
            return 0
        if o.etype == 2:
            out_arr[...] = f32_to_bf16_bits(out)
        elif dst is None or not np.shares_memory(out, dst):
            out_arr[...] = out
        return 1
    except BaseException as e:  # noqa: BLE001 (handed back to the engine after infer)
        _ERRORS[key] = e
        return -1


_CALLBACK = CALLBACK(_fallback)  # one C function pointer per process, kept alive here


# -- one engine's slots ----------------------------------------------------------------------------------------
class _ArrayInterface(ctypes.Structure):
    """The head of numpy's ``PyArrayInterface`` (the C-struct array interface, ``__array_struct__``; numpy docs
    "The array interface protocol"), up to its data pointer."""

    _fields_ = [("two", ctypes.c_int), ("nd", ctypes.c_int), ("typekind", ctypes.c_char),
                ("itemsize", ctypes.c_int), ("flags", ctypes.c_int), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("data", ctypes.c_void_p)]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_DATA_OFF = _ArrayInterface.data.offset
_void_at = ctypes.c_void_p.from_address


def _ptr(a) -> int | None:
    """An array's data pointer (None for None), read from its ``__array_struct__`` capsule: ~2.5x cheaper than
    ``__array_interface__``, which builds a dict per call (sync reads 8-12 pointers per layer and step)."""
    if a is None:
        return None
    cap = a.__array_struct__  # held while its struct is read (the capsule's destructor frees the struct)
    return _void_at(_capsule_pointer(cap, None) + _DATA_OFF).value or 0


# KvSideC's 23 eight-byte fields in order (q: int64, Q: a pointer), written with one struct.pack_into
_SIDE_FMT = struct.Struct("=4qQ3q2Q4q2QqQ3q2q")
assert _SIDE_FMT.size == ctypes.sizeof(KvSideC)
_K_OFF, _V_OFF = KvSlotC.k.offset, KvSlotC.v.offset


def _side_values(t: tuple) -> tuple:
    """``KvSideC``'s field values, in order, from ``attention._side_tuple``'s 13-tuple (the Python extension's
    side description); strides and dtype flags of an absent array are 0 (the kernel reads none of them)."""
    mode, bits, nq, g, codes, delta, mn, pb, ph, pn, seg, nseg, resid = t
    cs = codes.strides[:3] if codes is not None else (0, 0, 0)
    p16 = int(delta.itemsize == 2) if codes is not None else 0
    if resid is not None:
        it = resid.itemsize
        rs, nres, r16 = tuple(x // it for x in resid.strides[:3]), resid.shape[2], int(it == 2)
    else:
        rs, nres, r16 = (0, 0, 0), 0, 0
    return (mode, bits, nq, g, _ptr(codes) or 0, *cs, _ptr(delta) or 0, _ptr(mn) or 0, p16, pb, ph, pn,
            _ptr(seg) or 0, _ptr(nseg) or 0, 0 if seg is None else seg.shape[1], _ptr(resid) or 0, *rs, nres, r16)


def _fill_side(buf: memoryview, offset: int, t: tuple, keep: list) -> None:
    """The ``KvSideC`` at byte ``offset`` of a slot's bytes ``buf`` from ``attention._side_tuple``'s 13-tuple, in
    one write (a field-by-field ctypes fill cost ~18 us per side and step); the arrays it points to go into
    ``keep``."""
    _SIDE_FMT.pack_into(buf, offset, *_side_values(t))
    keep += [t[4], t[5], t[6], t[10], t[11], t[12]]


class Slot:
    """One layer's ``KvSlotC`` and what it points to (kept alive until the next refresh)."""

    def __init__(self, layer, evaluate):
        self.c = KvSlotC()
        self.buf = memoryview(self.c).cast("B")  # the slot's bytes: _fill_side packs each side at its offset
        self.c.key = next(_KEYS)
        self.c.callback = _CALLBACK
        self.c.scale = layer.scale
        self.c.threads = layer.threads
        self.c.pend16 = int(np.dtype(layer.dtype) == np.float16)
        _REGISTRY[self.c.key] = (weakref.ref(layer), evaluate)
        self.synced: tuple = (None, -1)  # (store, n_tokens, prefill) the slot describes
        self.keep: list = []
        self.pend: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def address(self) -> int:
        """The slot struct's address (the op's ``slot`` attribute)."""
        return ctypes.addressof(self.c)

    def __del__(self):
        if _REGISTRY is not None and _ERRORS is not None:  # (None at interpreter exit)
            _REGISTRY.pop(self.c.key, None)
            _ERRORS.pop(self.c.key, None)


def make_node(inputs: list, layer, evaluate, python_op):
    """The layer's attention op over ``inputs`` (q, k_new, v_new[, sdpa_out]; without sdpa_out the op computes
    every case itself, ``packed_prefix``): the C++ op with a new ``Slot`` (``layer.slot``) on the C++ route, else
    ``python_op(inputs, layer)``; ``layer.route`` names it. The node's friendly name is ``NODE_NAME`` of
    ``layer.index`` (how ``ov_layers``' split finds which layer's op a sub-model holds)."""
    name, why = route()
    layer.route = (name, why)
    if name == PY_ROUTE:
        layer.slot = None
        node = python_op(inputs, layer)
    else:
        layer.slot = Slot(layer, evaluate)
        node = _load()[0].create(OP_TYPE, inputs, {"slot": layer.slot.address})
    node.set_friendly_name(NODE_NAME.format(i=layer.index))
    return node


def _fill_append(a: KvAppendC, t: tuple | None, keep: list) -> None:
    """A ``KvAppendC`` from one side's ``QuantizedKVStore.inplace_targets`` tuple (None: kind 0); the arrays it
    points to go into ``keep``."""
    if t is None:
        a.kind = 0
        return
    if t[0] == 1:
        _, n, cap, buf = t
        it = buf.itemsize
        a.bs[0], a.bs[1], a.bs[2] = (x // it for x in buf.strides[:3])
        a.e16 = int(it == 2)
        keep.append(buf)
    else:
        _, n, cap, buf, delta, mn, bh, bl, bits = t
        it = delta.itemsize
        a.bs[0], a.bs[1], a.bs[2] = buf.strides[:3]
        a.delta, a.mn = _ptr(delta), _ptr(mn)
        a.ps[0], a.ps[1], a.ps[2], a.ps[3] = (x // it for x in delta.strides)
        a.bh, a.bl, a.bits, a.e16 = bh, bl, bits, int(it == 2)
        keep += [buf, delta, mn]
    a.kind, a.n, a.cap, a.buf = t[0], n, cap, _ptr(buf)


def sync(layers) -> None:
    """Before an inference: point each C++ slot at its store as it is now (after appends, a reset or a prefill
    buffer's flush), decide its fast path (a non-empty store the fused kernel reads, outside a chunked prefill)
    and where the op may append the new token itself (``QuantizedKVStore.inplace_targets``; nowhere with
    ``KVTOOL_NO_OP_APPEND=1``). Only layers whose store changed since the last refresh are refreshed: after the
    op's own append the slot already describes the store (``commit`` records that)."""
    from kvtool.quant_ops.attention import _side_tuple, attention_path

    for layer in layers:
        slot, st = layer.slot, layer.store
        state = (st, st.n_tokens, layer.prefill is None)
        if slot.synced[0] is st and slot.synced[1:] == state[1:]:
            continue
        slot.synced = state
        c = slot.c
        c.pending = c.appended = c.ka.kind = c.va.kind = 0
        if st.n_tokens == 0 or layer.prefill is not None:
            c.fast = 0
            continue
        if layer.native is None:  # as _evaluate decides it: the scheme, bits and dtype, once per store
            layer.decode_path = attention_path(st)
            layer.native = layer.decode_path[0] == "native"
        if not layer.native:
            c.fast = 0
            continue
        b, h, d = st.format.k
        if slot.pend is None or slot.pend[0].shape != (1, h, 1, d):
            slot.pend = (np.empty((1, h, 1, d), layer.dtype), np.empty((1, h, 1, d), layer.dtype))
            c.pend_k, c.pend_v = _ptr(slot.pend[0]), _ptr(slot.pend[1])
        c.H, c.D = h, d
        keep: list = []
        _fill_side(slot.buf, _K_OFF, _side_tuple(st.side_layout("k")), keep)
        _fill_side(slot.buf, _V_OFF, _side_tuple(st.side_layout("v")), keep)
        targets = st.inplace_targets() if b == 1 and os.environ.get(ENV_NO_OP_APPEND) != "1" else None
        if targets is not None:
            _fill_append(c.ka, targets[0], keep)
            _fill_append(c.va, targets[1], keep)
        slot.keep = keep
        c.fast = int(b == 1)


def _count_native(layer, c, n_before: int) -> None:
    """One fast-path call counted as the op's native decode (path, calls, the kernel's scratch per thread and
    the output, as ``_evaluate`` counts them, over ``n_before`` stored tokens plus the new one)."""
    pk = layer.slot.pend[0]
    layer.path = layer.decode_path
    layer.calls["native"] += 1
    d = pk.shape[3]
    rep = c.hq // pk.shape[1]
    scratch = layer.threads * 4 * (rep * (n_before + 1) + (4 * rep + 2) * d) + 4 * c.hq * d
    layer.scratch_peak = max(layer.scratch_peak, scratch)


def commit(layers) -> None:
    """After an inference: each fast-path call's new token into its store — accounted for where the op appended
    it itself (``QuantizedKVStore.appended_in_place``; the slot still describes the store, so the next ``sync``
    skips it), else appended from the slot's pending buffers (what the Python op does inside its call) — and the
    call counted as the op's native decode."""
    for layer in layers:
        slot = layer.slot
        c = slot.c
        st = layer.store
        t = c.appended
        if t:
            c.appended = 0
            n = st.n_tokens
            st.appended_in_place(t)
            slot.synced = (st, st.n_tokens, slot.synced[2])
            _count_native(layer, c, n)
            layer.appends["op"] += t
            continue
        if not c.pending:
            continue
        c.pending = 0
        _count_native(layer, c, st.n_tokens)
        layer.appends["python"] += 1
        pk, pv = slot.pend
        st.append(pk.copy(), pv.copy())


def _roll_back(layers) -> None:
    """A failed inference appends nothing: pending tokens dropped, the op's own appends undone
    (``kvtool_ov_unappend`` clears their codes; the store never counted them) and every slot re-described from
    its store at the next ``sync``."""
    lib = None
    for layer in layers:
        slot = layer.slot
        slot.c.pending = 0
        if slot.c.appended:
            lib = lib or _load()[0]._kvtool_lib
            lib.kvtool_ov_unappend(slot.address)
        slot.synced = (None, -1)


def infer(layers, req, feeds: dict | None) -> None:
    """``req.infer(feeds)`` (None: the inputs already set on ``req``) with the C++ route's ``sync`` before and
    ``commit`` after (just the inference on the Python-op route); an error the Python fallback raised inside the
    inference is re-raised as itself."""
    if feeds is None:
        _run(layers, lambda: req.infer(share_outputs=True))
    else:
        _run(layers, lambda: req.infer(feeds, share_inputs=True, share_outputs=True))


def infer_chain(layers, reqs) -> None:
    """Run ``reqs`` in order with no feeds (their inputs already set: ``ov_layers.DecodeChain``), with one
    ``sync`` of all ``layers`` before the first and one ``commit`` after the last on the C++ route (a layer's op
    reads only its own slot, so syncing every slot up front is what a sync per request would do). Errors as
    ``infer``; a failed chain appends nothing."""
    def run():
        for req in reqs:
            req.infer(None, share_outputs=True)
    _run(layers, run)


def _run(layers, call) -> None:
    """``call()`` (the inferences) between ``sync(layers)`` and ``commit(layers)`` on the C++ route; on a
    RuntimeError no layer appends, and an error the Python fallback raised is re-raised as itself."""
    if not layers or getattr(layers[0], "slot", None) is None:
        call()
        return
    sync(layers)
    try:
        call()
    except BaseException as exc:  # (an interrupt too: the op may have appended to some stores)
        _roll_back(layers)
        if isinstance(exc, RuntimeError):
            errs = [_ERRORS.pop(layer.slot.c.key, None) for layer in layers]
            for err in errs:
                if err is not None:
                    raise err from None
        raise
    commit(layers)
