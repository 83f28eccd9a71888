// kvtool.quant_ops._native: hand-written C++ kernels for kvtool's KV quantization (no library does this).
//
//   quantize_pack(x, packed, delta, mn, bh, bt, bl, bits[, offset[, accumulate]])
//       eq. (2) group-wise affine quantize + token-tile packing of x [B, H, T, L] (float16 or float32,
//       any strides with a contiguous last axis) with block (1, bh, bt, bl); writes packed uint8
//       [B, H, rows, L], delta / mn [B, H/bh, T/bt, L/bl] (float16 for float16 input, else float32).
//       accumulate=1 ORs the codes into packed instead (a store's one-token append into a partly filled
//       tile whose free slots are zero: one call, the same bytes as packing then OR-ing in numpy).
//       Bit-identical to kvtool.quant_ops.affine + packing (same float32 operations in the same order).
//   dequantize(packed, delta, mn, out, bh, bt, bl, bits)
//       unpack + (float)q * delta + min (a float32 multiply then add, no FMA) -> out [B, H, T, L] (f16/f32).
//   decode_attention(q, out, kside, vside, scale, threads[, k_extra, v_extra])
//       softmax(q K^T * scale) V for one decode step straight from packed codes + params (+ fp16
//       residual, + the caller's extra exact tokens [B, H, X, D] f16/f32 after them, in the same softmax),
//       GQA, std::threads over (batch, kv head). See _native_impl.h and kvtool/quant_ops/attention.py.
//   prefix_attention(q, out, k_past, v_past, k_new, v_new, scale, threads)
//       exact multi-query attention of a chunked prefill: q [1, Hq, T, D] f32 over the P past tokens
//       k_past / v_past [P, H, D] (f16/f32, token-major) plus the T new ones k_new / v_new [1, H, T, D]
//       (f16/f32) causally, one softmax -> out [1, Hq, T, D] f32; GQA; see _native_prefix.h.
//   isa() -> "avx2+fma+f16c" or "baseline": the code path cpuid picked.
//
// Plain CPython API + the buffer protocol (numpy arrays; torch CPU tensors via .numpy()), no numpy headers,
// so the build needs only a C++ compiler. The GIL is released while a kernel runs.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace {

#include "_native_types.h"  // Side / AArgs / tile sizes (shared with the OpenVINO extension op)

struct PArgs {  // prefix_attention: element strides; the last axis of every array is contiguous
    const float* q;
    float* out;
    long qs_h, qs_t, os_h, os_t;
    const void *kp, *vp, *kn, *vn;
    int kp16, vp16, kn16, vn16;
    long kps_n, kps_h, vps_n, vps_h, kns_h, kns_t, vns_h, vns_t;
    long Hq, H, rep, D, P, T;
    float scale;
};

}  // namespace

namespace k_base {
#include "_native_impl.h"
#include "_native_attention.h"
#include "_native_prefix.h"
}

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define KV_IMPL_AVX2 1
namespace k_avx2 {
#include "_native_impl.h"
#include "_native_attention.h"
#include "_native_prefix.h"
}
#undef KV_IMPL_AVX2
#pragma GCC pop_options
#define KV_HAVE_AVX2 1
#endif

namespace {

#include "_native_dispatch.h"  // use_avx2, run_workers (shared with the OpenVINO op)

// ---- buffers ------------------------------------------------------------------------------------------
struct Buf {
    Py_buffer b;
    bool ok = false;
    ~Buf() {
        if (ok) PyBuffer_Release(&b);
    }
};

// fmt: 'e' float16, 'f' float32, 'B' uint8 (0: any of e/f). Fills v (element strides). Returns false + error.
bool get_view(PyObject* o, Buf& buf, View4& v, const char* name, char fmt, bool writable, int ndim = 4) {
    int flags = PyBUF_STRIDES | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(o, &buf.b, flags) != 0) return false;
    buf.ok = true;
    const char* f = buf.b.format ? buf.b.format : "B";
    if (f[0] == '<' || f[0] == '=' || f[0] == '@') ++f;
    char got = f[0];
    bool dtype_ok = fmt ? got == fmt : (got == 'e' || got == 'f');
    if (!dtype_ok || f[1] != '\0') {
        PyErr_Format(PyExc_TypeError, "%s: dtype format '%s' not supported here", name, buf.b.format);
        return false;
    }
    if (buf.b.ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d dimensions, got %d", name, ndim, buf.b.ndim);
        return false;
    }
    v.p = (char*)buf.b.buf;
    v.esz = (int)buf.b.itemsize;
    for (int i = 0; i < 4; ++i) { v.n[i] = 1; v.s[i] = 0; }
    for (int i = 0; i < ndim; ++i) {
        int j = i + 4 - ndim;
        v.n[j] = (long)buf.b.shape[i];
        if (buf.b.strides[i] % buf.b.itemsize) {
            PyErr_Format(PyExc_ValueError, "%s: stride not a multiple of the item size", name);
            return false;
        }
        v.s[j] = (long)(buf.b.strides[i] / buf.b.itemsize);
    }
    if (v.n[3] > 1 && v.s[3] != 1) {
        PyErr_Format(PyExc_ValueError, "%s: the last axis must be contiguous", name);
        return false;
    }
    v.s[3] = 1;
    return true;
}

bool check_bits(int bits) {
    if (bits == 2 || bits == 3 || bits == 4 || bits == 8) return true;
    PyErr_Format(PyExc_ValueError, "bits=%d: expected 2, 3, 4 or 8", bits);
    return false;
}

PyObject* py_quantize_pack(PyObject*, PyObject* args) {
    PyObject *xo, *po, *dob, *mo;
    long bh, bt, bl, offset = 0, accumulate = 0;
    int bits;
    if (!PyArg_ParseTuple(args, "OOOOllli|ll", &xo, &po, &dob, &mo, &bh, &bt, &bl, &bits, &offset, &accumulate))
        return nullptr;
    if (!check_bits(bits)) return nullptr;
    Buf bx, bp, bd, bm;
    QArgs a{};
    if (!get_view(xo, bx, a.x, "x", 0, false)) return nullptr;
    a.x16 = a.x.esz == 2;
    char pf = a.x16 ? 'e' : 'f';
    if (!get_view(po, bp, a.out, "packed", 'B', true) || !get_view(dob, bd, a.delta, "delta", pf, true) ||
        !get_view(mo, bm, a.mn, "mn", pf, true))
        return nullptr;
    const long P = tile_tokens(bits), R = tile_rows(bits);
    const long T = a.x.n[2];
    bool ok = bh >= 1 && bt >= 1 && bl >= 1 && a.x.n[1] % bh == 0 && T % bt == 0 && a.x.n[3] % bl == 0 &&
              offset >= 0 && offset < P && a.out.n[0] == a.x.n[0] && a.out.n[1] == a.x.n[1] &&
              a.out.n[3] == a.x.n[3] && a.out.n[2] == (T + offset + P - 1) / P * R &&
              a.delta.n[0] == a.x.n[0] && a.delta.n[1] == a.x.n[1] / bh && a.delta.n[2] == T / bt &&
              a.delta.n[3] == a.x.n[3] / bl;
    for (int i = 0; ok && i < 4; ++i) ok = a.mn.n[i] == a.delta.n[i];
    if (!ok || T == 0) {
        PyErr_SetString(PyExc_ValueError, "quantize_pack: shapes of x / packed / delta / mn do not match the block");
        return nullptr;
    }
    a.bh = bh; a.bt = bt; a.bl = bl; a.bits = bits; a.offset = offset;
    const View4 dst = a.out;
    std::vector<unsigned char> tmp;
    if (accumulate) {  // the kernel writes a contiguous scratch, OR-ed into packed below (a partly filled tile)
        tmp.resize((size_t)(dst.n[0] * dst.n[1] * dst.n[2] * dst.n[3]));
        a.out.p = (char*)tmp.data();
        a.out.s[3] = 1; a.out.s[2] = dst.n[3]; a.out.s[1] = dst.n[2] * dst.n[3]; a.out.s[0] = dst.n[1] * a.out.s[1];
    }
    Py_BEGIN_ALLOW_THREADS
#ifdef KV_HAVE_AVX2
    if (use_avx2()) k_avx2::quantize_pack(a); else
#endif
    k_base::quantize_pack(a);
    if (accumulate)
        for (long i0 = 0; i0 < dst.n[0]; ++i0)
            for (long i1 = 0; i1 < dst.n[1]; ++i1)
                for (long i2 = 0; i2 < dst.n[2]; ++i2) {
                    unsigned char* d = (unsigned char*)dst.at(i0, i1, i2, 0);
                    const unsigned char* t = (const unsigned char*)a.out.at(i0, i1, i2, 0);
                    for (long i3 = 0; i3 < dst.n[3]; ++i3) d[i3] |= t[i3];
                }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject* py_dequantize(PyObject*, PyObject* args) {
    PyObject *po, *dob, *mo, *oo;
    long bh, bt, bl;
    int bits;
    if (!PyArg_ParseTuple(args, "OOOOllli", &po, &dob, &mo, &oo, &bh, &bt, &bl, &bits)) return nullptr;
    if (!check_bits(bits)) return nullptr;
    Buf bp, bd, bm, bo;
    DArgs a{};
    if (!get_view(po, bp, a.packed, "packed", 'B', false) || !get_view(dob, bd, a.delta, "delta", 0, false) ||
        !get_view(mo, bm, a.mn, "mn", 0, false) || !get_view(oo, bo, a.out, "out", 0, true))
        return nullptr;
    a.p16 = a.delta.esz == 2;
    a.o16 = a.out.esz == 2;
    const long P = tile_tokens(bits), R = tile_rows(bits), T = a.out.n[2];
    bool ok = a.mn.esz == a.delta.esz && bh >= 1 && bt >= 1 && bl >= 1 && a.out.n[1] % bh == 0 &&
              a.out.n[3] % bl == 0 && a.packed.n[0] == a.out.n[0] && a.packed.n[1] == a.out.n[1] &&
              a.packed.n[3] == a.out.n[3] && a.packed.n[2] >= (T + P - 1) / P * R &&
              a.delta.n[0] == a.out.n[0] && a.delta.n[1] == a.out.n[1] / bh &&
              a.delta.n[2] >= (T + bt - 1) / bt && a.delta.n[3] == a.out.n[3] / bl;
    for (int i = 0; ok && i < 4; ++i) ok = a.mn.n[i] == a.delta.n[i];
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "dequantize: shapes of packed / delta / mn / out do not match the block");
        return nullptr;
    }
    a.bh = bh; a.bt = bt; a.bl = bl; a.bits = bits;
    Py_BEGIN_ALLOW_THREADS
#ifdef KV_HAVE_AVX2
    if (use_avx2()) k_avx2::dequantize(a); else
#endif
    k_base::dequantize(a);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// side tuple: (mode, bits, nq, g, codes, delta, mn, pb, ph, pn, seg, nseg, resid)
bool parse_side(PyObject* t, Side& s, std::vector<Buf>& keep, long B, long H, long D, const char* name) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 13) {
        PyErr_Format(PyExc_TypeError, "%s: expected a 13-tuple side description", name);
        return false;
    }
    s.mode = (int)PyLong_AsLong(PyTuple_GET_ITEM(t, 0));
    s.bits = (int)PyLong_AsLong(PyTuple_GET_ITEM(t, 1));
    s.nq = PyLong_AsLong(PyTuple_GET_ITEM(t, 2));
    s.g = PyLong_AsLong(PyTuple_GET_ITEM(t, 3));
    s.pstride_b = PyLong_AsLong(PyTuple_GET_ITEM(t, 7));
    s.pstride_h = PyLong_AsLong(PyTuple_GET_ITEM(t, 8));
    s.pstride_n = PyLong_AsLong(PyTuple_GET_ITEM(t, 9));
    if (PyErr_Occurred()) return false;
    if (s.mode == 2) s.nq = 0;
    if (s.mode != 2) {
        if (!check_bits(s.bits)) return false;
        View4 c, d, m;
        if (!get_view(PyTuple_GET_ITEM(t, 4), keep[0], c, name, 'B', false) ||
            !get_view(PyTuple_GET_ITEM(t, 5), keep[1], d, name, 0, false) ||
            !get_view(PyTuple_GET_ITEM(t, 6), keep[2], m, name, 0, false))
            return false;
        const long P = tile_tokens(s.bits), R = tile_rows(s.bits);
        if (c.n[0] != B || c.n[1] != H || c.n[3] != D || c.n[2] < (s.nq + P - 1) / P * R || d.esz != m.esz ||
            (s.mode == 0 && (s.g < 1 || s.nq % s.g))) {
            PyErr_Format(PyExc_ValueError, "%s: codes / params do not match [B, H, tokens, D]", name);
            return false;
        }
        s.codes = (const unsigned char*)c.p;
        s.cs[0] = c.s[0]; s.cs[1] = c.s[1]; s.cs[2] = c.s[2];
        s.delta = d.p; s.mn = m.p; s.p16 = d.esz == 2;
        if (s.mode == 1) {
            Py_buffer* sb = &keep[3].b;
            Py_buffer* nb = &keep[4].b;
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(t, 10), sb, PyBUF_C_CONTIGUOUS) != 0) return false;
            keep[3].ok = true;
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(t, 11), nb, PyBUF_C_CONTIGUOUS) != 0) return false;
            keep[4].ok = true;
            if (nb->len != (Py_ssize_t)(H * 8) || sb->len % (H * 24)) {
                PyErr_Format(PyExc_ValueError, "%s: segment table does not match H", name);
                return false;
            }
            s.seg = (const SegEntry*)sb->buf;
            s.nseg = (const long long*)nb->buf;
            s.nseg_max = (long)(sb->len / (H * 24));
        }
    }
    PyObject* r = PyTuple_GET_ITEM(t, 12);
    if (r != Py_None) {
        View4 rv;
        if (!get_view(r, keep[5], rv, name, 0, false)) return false;
        if (rv.n[0] != B || rv.n[1] != H || rv.n[3] != D) {
            PyErr_Format(PyExc_ValueError, "%s: residual does not match [B, H, R, D]", name);
            return false;
        }
        s.resid = rv.p; s.r16 = rv.esz == 2;
        s.rs[0] = rv.s[0]; s.rs[1] = rv.s[1]; s.rs[2] = rv.s[2];
    }
    return true;
}

// the caller's extra exact tokens of one side ([B, H, X, D] float16/float32, or None): X, or -1 + error
long parse_extra(PyObject* x, Side& s, Buf& keep, long B, long H, long D, const char* name) {
    if (x == nullptr || x == Py_None) return 0;
    View4 xv;
    if (!get_view(x, keep, xv, name, 0, false)) return -1;
    if (xv.n[0] != B || xv.n[1] != H || xv.n[3] != D) {
        PyErr_Format(PyExc_ValueError, "%s: extra tokens do not match [B, H, X, D]", name);
        return -1;
    }
    s.extra = xv.p; s.x16 = xv.esz == 2;
    s.xs[0] = xv.s[0]; s.xs[1] = xv.s[1]; s.xs[2] = xv.s[2];
    return xv.n[2];
}

long resid_len(PyObject* t) {
    PyObject* r = PyTuple_GET_ITEM(t, 12);
    if (r == Py_None) return 0;
    PyObject* shp = PyObject_GetAttrString(r, "shape");
    if (!shp) return -1;
    long n = PyLong_AsLong(PyTuple_GetItem(shp, 2));
    Py_DECREF(shp);
    return n;
}

PyObject* py_decode_attention(PyObject*, PyObject* args) {
    PyObject *qo, *oo, *ko, *vo, *kxo = nullptr, *vxo = nullptr;
    float scale;
    int threads;
    if (!PyArg_ParseTuple(args, "OOO!O!fi|OO", &qo, &oo, &PyTuple_Type, &ko, &PyTuple_Type, &vo, &scale, &threads,
                          &kxo, &vxo))
        return nullptr;
    Buf bq, bo;
    View4 q, o;
    if (!get_view(qo, bq, q, "q", 'f', false, 3) || !get_view(oo, bo, o, "out", 'f', true, 3)) return nullptr;
    const long B = q.n[1], Hq = q.n[2], D = q.n[3];
    if (o.n[1] != B || o.n[2] != Hq || o.n[3] != D || q.s[2] != D || q.s[1] != Hq * D || o.s[2] != D ||
        o.s[1] != Hq * D) {
        PyErr_SetString(PyExc_ValueError, "decode_attention: q and out must be C-contiguous [B, Hq, D] float32");
        return nullptr;
    }
    if (PyTuple_GET_SIZE(ko) != 13 || PyTuple_GET_SIZE(vo) != 13) {
        PyErr_SetString(PyExc_TypeError, "decode_attention: sides must be 13-tuples");
        return nullptr;
    }
    // kv heads from the codes or residual
    PyObject* probe = PyTuple_GET_ITEM(ko, 12) != Py_None ? PyTuple_GET_ITEM(ko, 12) : PyTuple_GET_ITEM(ko, 4);
    PyObject* shp = PyObject_GetAttrString(probe, "shape");
    if (!shp) return nullptr;
    const long H = PyLong_AsLong(PyTuple_GetItem(shp, 1));
    Py_DECREF(shp);
    if (H < 1 || Hq % H) {
        PyErr_Format(PyExc_ValueError, "decode_attention: %ld query heads is not a multiple of %ld kv heads", Hq, H);
        return nullptr;
    }
    std::vector<Buf> kk(7), vk(7);
    AArgs a{};
    if (!parse_side(ko, a.k, kk, B, H, D, "k side") || !parse_side(vo, a.v, vk, B, H, D, "v side")) return nullptr;
    const long rk = resid_len(ko), rv = resid_len(vo);
    if (rk < 0 || rv < 0) return nullptr;
    const long xk = parse_extra(kxo, a.k, kk[6], B, H, D, "k extra"), xv = parse_extra(vxo, a.v, vk[6], B, H, D,
                                                                                           "v extra");
    if (xk < 0 || xv < 0) return nullptr;
    a.k.nres = rk; a.v.nres = rv;
    a.N = a.k.nq + rk + xk;
    if (a.v.nq + rv + xv != a.N || a.N < 1) {
        PyErr_Format(PyExc_ValueError, "decode_attention: K holds %ld tokens, V %ld: expected the same, >= 1",
                     a.N, a.v.nq + rv + xv);
        return nullptr;
    }
    a.q = (const float*)q.p; a.out = (float*)o.p;
    a.B = B; a.Hq = Hq; a.H = H; a.rep = Hq / H; a.D = D; a.scale = scale;
    const long tasks = B * H;
    const long wsz = a.rep * a.N + (4 * a.rep + 2) * D + 2 * a.rep + 16;
    const bool avx = use_avx2();
    // threads over (batch row, kv head): std::thread per call, no spinning workers between calls (OpenMP's
    // would burn a core after every layer); one thread when the step is too small to pay for a spawn
    long nth = threads > 0 ? threads : 1;
    if (nth > tasks) nth = tasks;
    if (a.N * a.rep * D * tasks < (1L << 20)) nth = 1;
    Py_BEGIN_ALLOW_THREADS
    std::atomic<long> next(0);
    auto worker = [&]() {
        std::vector<float> work(wsz);
        for (long t; (t = next.fetch_add(1)) < tasks;) {
#ifdef KV_HAVE_AVX2
            if (avx) { k_avx2::attention_task(a, t / H, t % H, work.data()); continue; }
#endif
            k_base::attention_task(a, t / H, t % H, work.data());
        }
    };
    run_workers(nth, worker);
    (void)avx;
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject* py_prefix_attention(PyObject*, PyObject* args) {
    PyObject *qo, *oo, *kpo, *vpo, *kno, *vno;
    float scale;
    int threads;
    if (!PyArg_ParseTuple(args, "OOOOOOfi", &qo, &oo, &kpo, &vpo, &kno, &vno, &scale, &threads)) return nullptr;
    Buf bq, bo, bkp, bvp, bkn, bvn;
    View4 q, o, kp, vp, kn, vn;
    if (!get_view(qo, bq, q, "q", 'f', false) || !get_view(oo, bo, o, "out", 'f', true) ||
        !get_view(kpo, bkp, kp, "k_past", 0, false, 3) || !get_view(vpo, bvp, vp, "v_past", 0, false, 3) ||
        !get_view(kno, bkn, kn, "k_new", 0, false) || !get_view(vno, bvn, vn, "v_new", 0, false))
        return nullptr;
    const long Hq = q.n[1], T = q.n[2], D = q.n[3], H = kn.n[1], P = kp.n[1];
    bool ok = q.n[0] == 1 && T >= 1 && D >= 1 && H >= 1 && Hq % H == 0;
    for (int i = 0; ok && i < 4; ++i) ok = o.n[i] == q.n[i] && vn.n[i] == kn.n[i];
    ok = ok && kn.n[0] == 1 && kn.n[2] == T && kn.n[3] == D && kp.n[2] == H && kp.n[3] == D;
    for (int i = 1; ok && i < 4; ++i) ok = vp.n[i] == kp.n[i];
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "prefix_attention: expected q / out [1, Hq, T, D] float32, k_past / v_past "
                     "[P, H, D], k_new / v_new [1, H, T, D] with Hq a multiple of H");
        return nullptr;
    }
    PArgs a{};
    a.q = (const float*)q.p; a.out = (float*)o.p;
    a.qs_h = q.s[1]; a.qs_t = q.s[2]; a.os_h = o.s[1]; a.os_t = o.s[2];
    a.kp = kp.p; a.vp = vp.p; a.kn = kn.p; a.vn = vn.p;
    a.kp16 = kp.esz == 2; a.vp16 = vp.esz == 2; a.kn16 = kn.esz == 2; a.vn16 = vn.esz == 2;
    a.kps_n = kp.s[1]; a.kps_h = kp.s[2]; a.vps_n = vp.s[1]; a.vps_h = vp.s[2];
    a.kns_h = kn.s[1]; a.kns_t = kn.s[2]; a.vns_h = vn.s[1]; a.vns_t = vn.s[2];
    a.Hq = Hq; a.H = H; a.rep = Hq / H; a.D = D; a.P = P; a.T = T; a.scale = scale;
    // tasks: (kv head, block of qb queries), qb * rep rows sharing each key block (k_base::prefix_rows: as many
    // as the threads allow); the last query blocks (the most keys) first
    long nth = threads > 0 ? threads : 1;
    if ((P + T) * T * Hq * D < (1L << 20)) nth = 1;
    const long qb = k_base::prefix_rows(T, a.rep, H, nth);
    const long nqb = (T + qb - 1) / qb, tasks = H * nqb;
    const long wsz = k_base::prefix_scratch(qb * a.rep, D);
    const bool avx = use_avx2();
    if (nth > tasks) nth = tasks;
    Py_BEGIN_ALLOW_THREADS
    std::atomic<long> next(0);
    auto worker = [&]() {
        std::vector<float> work(wsz);
        for (long t; (t = next.fetch_add(1)) < tasks;) {
            const long b = nqb - 1 - t / H, h = t % H;
            const long t0 = b * qb, t1 = t0 + qb < T ? t0 + qb : T;
#ifdef KV_HAVE_AVX2
            if (avx) { k_avx2::prefix_task(a, h, t0, t1, work.data()); continue; }
#endif
            k_base::prefix_task(a, h, t0, t1, work.data());
        }
    };
    run_workers(nth, worker);
    (void)avx;
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject* py_isa(PyObject*, PyObject*) { return PyUnicode_FromString(use_avx2() ? "avx2+fma+f16c" : "baseline"); }



PyMethodDef methods[] = {
    {"quantize_pack", py_quantize_pack, METH_VARARGS, "eq. (2) quantize + token-tile pack (see module source)"},
    {"dequantize", py_dequantize, METH_VARARGS, "unpack + dequantize (see module source)"},
    {"decode_attention", py_decode_attention, METH_VARARGS, "fused decode attention over packed codes"},
    {"prefix_attention", py_prefix_attention, METH_VARARGS, "exact multi-query prefix attention (prefill)"},
    {"isa", py_isa, METH_NOARGS, "the instruction set path picked at run time"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_native", "kvtool's hand-written quant_ops kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&moddef); }
