// kvtool's packed-KV attention as an OpenVINO C++ extension op (hand-written: no library offers an OpenVINO
// operation that attends over kvtool's packed KV stores).
//
// Op "KvtoolPackedKVAttention" (opset "kvtool"): inputs (q [1, Hq, T, D], k_new [1, H, T, D], v_new [1, H, T, D]
// [, sdpa_out [1, Hq, T, D]]), output [1, Hq, T, D] of sdpa_out's type, or of q's where the op has no sdpa_out
// (the graph's SDPA removed: the op computes every case itself, packed_prefix); attribute "slot": the address of a
// KvSlotC (below) that Python (kvtool/runtime/engines/ov_packed_ext.py) owns for the op's layer and refreshes
// before each inference. evaluate():
//   - fast path (slot.fast = 1 and T = 1: a decode step over a store the fused kernel reads): the SAME kernel
//     as the Python extension (kvtool/quant_ops/_native_attention.h, included below, not copied) over the
//     store's packed codes plus the new token, written into the output; the new token's K/V are converted to
//     the stores' dtype into the slot's pending buffers. Then, where both sides' append targets (slot.ka /
//     slot.va, from QuantizedKVStore.inplace_targets) have room, the op appends the token to the store itself
//     (an exact token into a residual / dense buffer; a per-token group quantized + packed into its tile by the
//     same quantize_pack kernel as the store's own append) and advances the slot's sides, so the slot stays
//     valid for the next step (slot.appended counts the tokens Python has not yet accounted for); otherwise
//     slot.pending = 1 and Python appends the pending token after the inference (a per-channel group that
//     completes, a buffer that must grow). No Python runs.
//   - every other call (prefill pass-through, a chunked prefill's buffer, T > 1 on a non-empty store, a store
//     the kernel cannot read): the slot's callback (a ctypes function into the engine's Python `_evaluate`),
//     with the inputs (an absent sdpa_out as etype -1) and the output as raw tensors; it returns 1 (it wrote the
//     output), 0 (copy sdpa_out; an error without one) or -1 (it raised: the op throws, the engine re-raises the
//     Python error).
//
// The kernel's kv heads run on OpenVINO's TBB pool (KV_OP_TBB: setup.py links the wheel's libtbb), else on
// std::threads spawned per call; kvtool_ov_pool(mode) reads / sets which (ov_packed_ext.kernel_pool).
// Plain C ABI for Python (ctypes): kvtool_ov_struct_sizes() (layout check), kvtool_ov_pool(mode),
// kvtool_ov_unappend(slot) (a failed inference: clear the codes the op appended, before Python re-syncs).
// Built by setup.py against the openvino wheel's headers (optional); loaded with openvino's NodeFactory.

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#if defined(KV_OP_TBB) && __has_include(<tbb/parallel_for.h>)
// the kernel's tasks on OpenVINO's own TBB pool (the op runs inside the CPU plugin's arena): no thread spawned
// per call, and no spawned thread contending with the plugin's idle TBB worker for the other core
#include <tbb/blocked_range.h>
#include <tbb/enumerable_thread_specific.h>
#include <tbb/parallel_for.h>
#define KV_USE_TBB 1
#define KV_TBB_POOL 1
#else
#define KV_TBB_POOL 0
#endif

#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/op/op.hpp>

namespace {
#include "../../quant_ops/_native_types.h"
}  // namespace

namespace k_base {
#include "../../quant_ops/_native_impl.h"
#include "../../quant_ops/_native_attention.h"
}  // namespace k_base

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define KV_IMPL_AVX2 1
namespace k_avx2 {
#include "../../quant_ops/_native_impl.h"
#include "../../quant_ops/_native_attention.h"
}  // namespace k_avx2
#undef KV_IMPL_AVX2
#pragma GCC pop_options
#define KV_HAVE_AVX2 1
#endif

extern "C" {
// One side (K or V) of a layer's store, as kvtool.quant_ops.attention._side_tuple describes it.
struct KvSideC {
    int64_t mode, bits, nq, g;
    const void* codes;
    int64_t cs[3];  // codes strides (bytes) over batch, head, row
    const void* delta;
    const void* mn;
    int64_t p16;
    int64_t pb, ph, pn;  // params strides (elements)
    const void* seg;     // int64 [H, nseg_max, 3] (per-token sides)
    const void* nseg;    // int64 [H]
    int64_t nseg_max;
    const void* resid;
    int64_t rs[3];  // residual strides (elements) over batch, head, token
    int64_t nres, r16;
};

// One tensor handed to the Python callback: etype 0 f32, 1 f16, 2 bf16.
struct KvTensorC {
    void* data;
    int64_t etype, ndim;
    int64_t shape[4];
};

typedef int64_t (*KvCallback)(int64_t key, KvTensorC* inputs, KvTensorC* output);

// Where the op may append the next decode token of one side itself (QuantizedKVStore.inplace_targets).
struct KvAppendC {
    int64_t kind;      // 0: nowhere (Python appends); 1: an exact token into buf; 2: quantize + pack (per-token groups)
    int64_t n, cap;    // kind 1: tokens in buf; kind 2: quantized tokens; the op appends while n < cap
    void* buf;         // kind 1: [B, H, >=cap, D] in the stores' dtype; kind 2: the codes, uint8 [B, H, rows, D]
    int64_t bs[3];     // buf's strides over batch, head, token (kind 1, elements) or row (kind 2, bytes)
    void* delta;       // kind 2: the params [B, H / bh, >=cap, D / bl] in the stores' dtype
    void* mn;
    int64_t ps[4];     // kind 2: the params' strides (elements)
    int64_t bh, bl, bits, e16;  // kind 2: the group block (1, bh, 1, bl) and bits; e16: float16 buffers
};

// A layer's slot, owned by Python (ctypes), its address the op's "slot" attribute.
struct KvSlotC {
    int64_t fast;     // 1: T = 1 calls run the fused kernel over k / v below; 0: every call goes to the callback
    int64_t pending;  // set by the op: the new token's K/V are in pend_k / pend_v
    int64_t H, D, threads, pend16;
    double scale;
    void* pend_k;  // [H, D] in the stores' dtype (pend16: float16, else float32)
    void* pend_v;
    int64_t key;  // the callback's layer key
    KvCallback callback;
    int64_t fast_calls;  // fast-path calls so far (tests: "no Python call per layer")
    int64_t hq;          // query heads of the last fast-path call
    KvSideC k, v;
    int64_t appended;    // tokens the op appended to the store itself that Python has not accounted for yet
    KvAppendC ka, va;    // where (kind 0 on either side: the pending path)
};

// Where the kernel's tasks run: 1 OpenVINO's TBB pool (where built with it), 0 std::threads spawned per call
// (comparisons, tests). Returns the mode now in force (0 where the build has no TBB).
static std::atomic<int> g_pool{1};
__attribute__((visibility("default"))) int64_t kvtool_ov_pool(int64_t mode) {
#ifdef KV_USE_TBB
    if (mode >= 0) g_pool.store((int)(mode != 0));
    return g_pool.load();
#else
    (void)mode;
    return 0;
#endif
}

// The least work (tokens x query heads per kv head x head dim x kv heads, multiply-adds of q.K) for which the
// kernel runs more than one thread, per pool: spawning std::threads costs tens of microseconds, waking OpenVINO's
// idle TBB worker a few. kvtool_ov_min_work(pool, value) reads / sets it (value < 0: read; pool 0 spawn, 1 tbb).
static std::atomic<int64_t> g_min_work[2] = {{1L << 20}, {1L << 20}};
__attribute__((visibility("default"))) int64_t kvtool_ov_min_work(int64_t pool, int64_t value) {
    std::atomic<int64_t>& w = g_min_work[pool != 0];
    if (value >= 0) w.store(value);
    return w.load();
}

__attribute__((visibility("default"))) void kvtool_ov_struct_sizes(int64_t* out) {
    out[0] = sizeof(KvSideC);
    out[1] = sizeof(KvTensorC);
    out[2] = sizeof(KvSlotC);
}
}

namespace {

#include "../../quant_ops/_native_dispatch.h"  // use_avx2, run_workers (shared with _native.cpp)

void to_side(const KvSideC& c, Side& s) {
    s.mode = (int)c.mode;
    s.bits = (int)c.bits;
    s.nq = c.mode == 2 ? 0 : c.nq;
    s.g = c.g;
    s.codes = (const unsigned char*)c.codes;
    for (int i = 0; i < 3; ++i) { s.cs[i] = c.cs[i]; s.rs[i] = c.rs[i]; }
    s.delta = c.delta; s.mn = c.mn; s.p16 = (int)c.p16;
    s.pstride_b = c.pb; s.pstride_h = c.ph; s.pstride_n = c.pn;
    s.seg = (const SegEntry*)c.seg;
    s.nseg = (const long long*)c.nseg;
    s.nseg_max = c.nseg_max;
    s.resid = c.resid; s.r16 = (int)c.r16; s.nres = c.nres;
}

int64_t etype_code(const ov::element::Type& t) {
    if (t == ov::element::f32) return 0;
    if (t == ov::element::f16) return 1;
    if (t == ov::element::bf16) return 2;
    return -1;
}

float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_bf16(float f) {  // round to nearest even, as kvtool's f32_to_bf16_bits
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// float16 <-> float32 rows, round to nearest even: F16C 8 at a time where cpuid has it (the kernels' own rows,
// _native_impl.h), else the compiler's conversion (a libgcc call per value on the baseline ISA: ~20 ns each,
// which made the f32 -> f16 copy of a decode token ~40 us per layer, more than the kernel at short context)
void f16_to_f32(const _Float16* src, float* dst, size_t n) {
#ifdef KV_HAVE_AVX2
    if (use_avx2()) { k_avx2::row_to_f32(src, dst, (long)n); return; }
#endif
    k_base::row_to_f32(src, dst, (long)n);
}

void f32_to_f16(const float* src, _Float16* dst, size_t n) {
#ifdef KV_HAVE_AVX2
    if (use_avx2()) { k_avx2::row_from_f32(src, dst, (long)n); return; }
#endif
    k_base::row_from_f32(src, dst, (long)n);
}

// n values of a tensor of element code et -> float32
void load_f32(const void* src, int64_t et, float* dst, size_t n) {
    if (et == 0) std::memcpy(dst, src, n * 4);
    else if (et == 1) f16_to_f32((const _Float16*)src, dst, n);
    else for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(((const uint16_t*)src)[i]);
}

void store_f32(const float* src, int64_t et, void* dst, size_t n) {
    if (et == 0) std::memcpy(dst, src, n * 4);
    else if (et == 1) f32_to_f16(src, (_Float16*)dst, n);
    else for (size_t i = 0; i < n; ++i) ((uint16_t*)dst)[i] = f32_to_bf16(src[i]);
}

// the new token's K/V (element code et) -> the slot's pending buffer in the stores' dtype, as numpy's
// astype would (f32 -> f16 rounds to nearest even; bf16 is widened to f32 first, as the Python op does)
void to_pending(const void* src, int64_t et, void* dst, int pend16, size_t n) {
    if (!pend16) { load_f32(src, et, (float*)dst, n); return; }
    if (et == 1) { std::memcpy(dst, src, n * 2); return; }
    if (et == 0) { f32_to_f16((const float*)src, (_Float16*)dst, n); return; }
    for (size_t i = 0; i < n; ++i) ((_Float16*)dst)[i] = (_Float16)bf16_to_f32(((const uint16_t*)src)[i]);
}

// The fused kernel over the slot's store plus one exact token (the same threading as _native.cpp's
// decode_attention: std::thread over kv heads, one thread when the step is too small to pay for a spawn).
void run_kernel(const KvSlotC& slot, const float* q, float* out, long Hq, const void* kx, const void* vx, int x16) {
    AArgs a{};
    to_side(slot.k, a.k);
    to_side(slot.v, a.v);
    const long H = (long)slot.H, D = (long)slot.D;
    for (Side* s : {&a.k, &a.v}) {
        s->extra = s == &a.k ? kx : vx;
        s->x16 = x16;
        s->xs[0] = H * D; s->xs[1] = D; s->xs[2] = D;
    }
    a.N = a.k.nq + a.k.nres + 1;
    a.q = q; a.out = out;
    a.B = 1; a.Hq = Hq; a.H = H; a.rep = Hq / H; a.D = D; a.scale = (float)slot.scale;
    const long tasks = H;
    const long wsz = a.rep * a.N + (4 * a.rep + 2) * D + 2 * a.rep + 16;
    const bool avx = use_avx2();
    long nth = slot.threads > 0 ? (long)slot.threads : 1;
    if (nth > tasks) nth = tasks;
    const int on_tbb = KV_TBB_POOL && g_pool.load(std::memory_order_relaxed);
    if (a.N * a.rep * D * tasks < g_min_work[on_tbb].load(std::memory_order_relaxed)) nth = 1;
    // each thread pulls kv heads from one counter until none is left: a thread that starts late finds the heads
    // taken instead of holding some back; a head's result does not depend on the thread that computes it
    std::atomic<long> next(0);
    auto pull = [&](float* work) {
        for (long t; (t = next.fetch_add(1)) < tasks;) {
#ifdef KV_HAVE_AVX2
            if (avx) { k_avx2::attention_task(a, 0, t, work); continue; }
#endif
            k_base::attention_task(a, 0, t, work);
        }
    };
    (void)avx;
#ifdef KV_USE_TBB
    if (nth > 1 && g_pool.load(std::memory_order_relaxed)) {  // nth bodies on OpenVINO's TBB pool
        tbb::parallel_for(tbb::blocked_range<long>(0, nth, 1), [&](const tbb::blocked_range<long>&) {
            static thread_local std::vector<float> work;
            if ((long)work.size() < wsz) work.resize(wsz);
            pull(work.data());
        });
        return;
    }
#endif
    auto worker = [&]() {
        std::vector<float> work(wsz);
        pull(work.data());
    };
    run_workers(nth, worker);
}

// ---- the op's own append (hand-written: the store's Python append, kvtool/quant_ops/store.py, for one token) ----
// The tile bits of token t: its rows (R of them for 3-bit) and, per row byte, the mask of its code.
inline void tile_slot(const KvAppendC& a, long t, long& row0, long& off, uint32_t& word) {
    const long P = tile_tokens((int)a.bits), R = tile_rows((int)a.bits);
    off = t % P;
    row0 = t / P * R;
    word = ((1u << a.bits) - 1u) << (a.bits * off);
}

// An exact token pend [H, D] (the stores' dtype) into buf at token a.n: a per-channel side's residual (the group it
// waits for does not complete: cap says so) or an unquantized side; the kernel's view of the side reads it next.
void append_exact(KvAppendC& a, KvSideC& s, const void* pend, long H, long D) {
    const size_t esz = a.e16 ? 2 : 4;
    char* dst = (char*)a.buf;
    for (long h = 0; h < H; ++h)
        std::memcpy(dst + (size_t)(h * a.bs[1] + a.n * a.bs[2]) * esz, (const char*)pend + (size_t)(h * D) * esz,
                    (size_t)D * esz);
    ++a.n;
    s.resid = a.buf;
    s.rs[0] = a.bs[0]; s.rs[1] = a.bs[1]; s.rs[2] = a.bs[2];
    s.r16 = a.e16;
    s.nres = a.n;
}

// A per-token-group side: pend [H, D] quantized + packed (eq. (2), the store's quantize_pack kernel) as token a.n,
// its params at a.n; a new tile's rows are written whole (the codes of its later tokens 0), a partly filled tile
// gets this token's bits cleared then set (the store's own append ORs into zero bits: the same bytes).
void append_codes(KvAppendC& a, KvSideC& s, const void* pend, long H, long D) {
    const long R = tile_rows((int)a.bits), t = a.n;
    long row0, off;
    uint32_t word;
    tile_slot(a, t, row0, off, word);
    const int esz = a.e16 ? 2 : 4;
    std::vector<unsigned char> tile((size_t)(H * R * D));
    QArgs q{};
    q.x.p = (char*)const_cast<void*>(pend); q.x.esz = esz;
    q.x.n[0] = 1; q.x.n[1] = H; q.x.n[2] = 1; q.x.n[3] = D;
    q.x.s[0] = H * D; q.x.s[1] = D; q.x.s[2] = D; q.x.s[3] = 1;
    q.out.p = (char*)tile.data(); q.out.esz = 1;
    q.out.n[0] = 1; q.out.n[1] = H; q.out.n[2] = R; q.out.n[3] = D;
    q.out.s[0] = H * R * D; q.out.s[1] = R * D; q.out.s[2] = D; q.out.s[3] = 1;
    for (View4* v : {&q.delta, &q.mn}) {
        v->p = (char*)(v == &q.delta ? a.delta : a.mn) + (size_t)(t * a.ps[2]) * esz;
        v->esz = esz;
        v->n[0] = 1; v->n[1] = H / a.bh; v->n[2] = 1; v->n[3] = D / a.bl;
        for (int i = 0; i < 4; ++i) v->s[i] = a.ps[i];
    }
    q.bh = a.bh; q.bt = 1; q.bl = a.bl; q.offset = off; q.bits = (int)a.bits; q.x16 = (int)a.e16;
#ifdef KV_HAVE_AVX2
    if (use_avx2()) k_avx2::quantize_pack(q); else
#endif
    k_base::quantize_pack(q);
    for (long h = 0; h < H; ++h)
        for (long r = 0; r < R; ++r) {
            unsigned char* dst = (unsigned char*)a.buf + h * a.bs[1] + (row0 + r) * a.bs[2];
            const unsigned char* src = tile.data() + (h * R + r) * D;
            if (off == 0) { std::memcpy(dst, src, (size_t)D); continue; }
            const unsigned char m = (unsigned char)((word >> (8 * r)) & 255u);
            for (long l = 0; l < D; ++l) dst[l] = (unsigned char)((dst[l] & (unsigned char)~m) | src[l]);
        }
    ++a.n;
    s.nq = a.n;
}

// Both sides can take the token (either alone would leave the store's two sides at different lengths).
inline bool can_append(const KvSlotC& slot) {
    return slot.ka.kind && slot.va.kind && slot.ka.n < slot.ka.cap && slot.va.n < slot.va.cap &&
           slot.ka.e16 == slot.pend16 && slot.va.e16 == slot.pend16;
}

void append_side(KvAppendC& a, KvSideC& s, const void* pend, long H, long D) {
    if (a.kind == 1) append_exact(a, s, pend, H, D);
    else append_codes(a, s, pend, H, D);
}

KvTensorC describe(const ov::Tensor& t) {
    KvTensorC d{};
    d.data = const_cast<void*>(t.data());
    d.etype = etype_code(t.get_element_type());
    const ov::Shape& s = t.get_shape();
    d.ndim = (int64_t)s.size();
    for (size_t i = 0; i < s.size() && i < 4; ++i) d.shape[i] = (int64_t)s[i];
    return d;
}

class PackedKVAttention : public ov::op::Op {
public:
    OPENVINO_OP("KvtoolPackedKVAttention", "kvtool");

    PackedKVAttention() = default;
    PackedKVAttention(const ov::OutputVector& args, int64_t slot) : Op(args), m_slot(slot) {
        constructor_validate_and_infer_types();
    }

    void validate_and_infer_types() override {
        const size_t n = get_input_size();
        NODE_VALIDATION_CHECK(this, n == 3 || n == 4, "KvtoolPackedKVAttention: expected 3 or 4 inputs (q, k_new, "
                              "v_new[, sdpa_out]), got ", n);
        if (n == 4) {
            set_output_type(0, get_input_element_type(3), get_input_partial_shape(3));
            return;
        }
        ov::PartialShape s = get_input_partial_shape(0);  // [1, Hq, T, Dv]: q's, with v_new's head size
        const ov::PartialShape& vs = get_input_partial_shape(2);
        if (s.rank().is_static() && vs.rank().is_static() && s.size() == 4 && vs.size() == 4) s[3] = vs[3];
        set_output_type(0, get_input_element_type(0), s);
    }

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& new_args) const override {
        return std::make_shared<PackedKVAttention>(new_args, m_slot);
    }

    bool visit_attributes(ov::AttributeVisitor& visitor) override {
        visitor.on_attribute("slot", m_slot);
        return true;
    }

    bool has_evaluate() const override { return true; }

    bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
        OPENVINO_ASSERT(m_slot != 0, "KvtoolPackedKVAttention: no slot (the op must be made by kvtool's engine)");
        KvSlotC& slot = *reinterpret_cast<KvSlotC*>(m_slot);
        const ov::Tensor &q = inputs[0], &kn = inputs[1], &vn = inputs[2];
        const bool has_sd = inputs.size() > 3;
        ov::Tensor& out = outputs[0];
        if (has_sd) {
            out.set_shape(inputs[3].get_shape());
        } else {
            ov::Shape os = q.get_shape();
            if (os.size() == 4 && vn.get_shape().size() == 4) os[3] = vn.get_shape()[3];
            out.set_shape(os);
        }
        const ov::Shape& qs = q.get_shape();
        const int64_t et_q = etype_code(q.get_element_type()), et_k = etype_code(kn.get_element_type()),
                      et_v = etype_code(vn.get_element_type()), et_o = etype_code(out.get_element_type());
        OPENVINO_ASSERT(et_q >= 0 && et_k >= 0 && et_v >= 0 && et_o >= 0 && et_k == et_v,
                        "KvtoolPackedKVAttention: expected f32 / f16 / bf16 tensors (K and V of one type)");
        if (slot.fast && qs.size() == 4 && qs[0] == 1 && qs[2] == 1) {
            const long Hq = (long)qs[1], D = (long)qs[3], H = (long)slot.H;
            OPENVINO_ASSERT(D == slot.D && kn.get_shape() == ov::Shape({1, (size_t)H, 1, (size_t)D}) && Hq % H == 0,
                            "KvtoolPackedKVAttention: q / k_new do not match the layer's store");
            std::vector<float> qf, of, kf, vf;
            const float* qp = (const float*)q.data();
            if (et_q != 0) { qf.resize(Hq * D); load_f32(q.data(), et_q, qf.data(), qf.size()); qp = qf.data(); }
            float* op = (float*)out.data();
            if (et_o != 0) { of.resize(Hq * D); op = of.data(); }
            const void *kx = kn.data(), *vx = vn.data();
            int x16 = et_k == 1;
            if (et_k == 2) {  // bf16 new token: widened to f32 for the kernel
                kf.resize(H * D); vf.resize(H * D);
                load_f32(kx, 2, kf.data(), kf.size()); load_f32(vx, 2, vf.data(), vf.size());
                kx = kf.data(); vx = vf.data(); x16 = 0;
            }
            run_kernel(slot, qp, op, Hq, kx, vx, x16);
            if (et_o != 0) store_f32(of.data(), et_o, out.data(), of.size());
            to_pending(kn.data(), et_k, slot.pend_k, (int)slot.pend16, (size_t)(H * D));
            to_pending(vn.data(), et_v, slot.pend_v, (int)slot.pend16, (size_t)(H * D));
            if (can_append(slot)) {  // the store takes the token here; the slot describes it for the next step
                append_side(slot.ka, slot.k, slot.pend_k, H, D);
                append_side(slot.va, slot.v, slot.pend_v, H, D);
                ++slot.appended;
            } else {
                slot.pending = 1;  // Python appends it after the inference
            }
            slot.hq = Hq;
            ++slot.fast_calls;
            return true;
        }
        OPENVINO_ASSERT(slot.callback != nullptr, "KvtoolPackedKVAttention: no Python callback registered");
        KvTensorC in[4] = {describe(q), describe(kn), describe(vn), KvTensorC{}};
        if (has_sd) in[3] = describe(inputs[3]);
        else in[3].etype = -1;  // no sdpa_out: the callback computes every case
        KvTensorC o = describe(out);
        const int64_t r = slot.callback(slot.key, in, &o);
        OPENVINO_ASSERT(r >= 0, "KvtoolPackedKVAttention: the Python fallback of layer key ", slot.key,
                        " raised (the engine re-raises its error)");
        OPENVINO_ASSERT(r == 1 || has_sd, "KvtoolPackedKVAttention: the Python fallback of layer key ", slot.key,
                        " wrote no output and the op has no sdpa_out input");
        if (r == 0) std::memcpy(out.data(), inputs[3].data(), inputs[3].get_byte_size());
        return true;
    }

private:
    int64_t m_slot = 0;
};

}  // namespace

// A failed inference appends nothing: clear the codes the op packed for the tokens Python has not accounted for
// (a later append, Python's own included, ORs into a partly filled tile's zero bits) and forget them; Python then
// re-describes the slot from the store.
extern "C" __attribute__((visibility("default"))) void kvtool_ov_unappend(KvSlotC* slot) {
    const long H = (long)slot->H, D = (long)slot->D;
    for (KvAppendC* a : {&slot->ka, &slot->va}) {
        if (a->kind == 2) {
            const long R = tile_rows((int)a->bits);
            for (long t = a->n - slot->appended; t < a->n; ++t) {
                long row0, off;
                uint32_t word;
                tile_slot(*a, t, row0, off, word);
                for (long h = 0; h < H; ++h)
                    for (long r = 0; r < R; ++r) {
                        unsigned char* dst = (unsigned char*)a->buf + h * a->bs[1] + (row0 + r) * a->bs[2];
                        const unsigned char m = (unsigned char)((word >> (8 * r)) & 255u);
                        for (long l = 0; l < D; ++l) dst[l] = (unsigned char)(dst[l] & (unsigned char)~m);
                    }
            }
        }
        if (a->kind) a->n -= slot->appended;
    }
    slot->appended = 0;
}

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({std::make_shared<ov::OpExtension<PackedKVAttention>>()}));
