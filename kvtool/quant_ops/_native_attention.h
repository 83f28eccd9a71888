// Hand-written fused decode attention of kvtool's native quant_ops: softmax(q K^T * scale) V straight from
// packed codes + (delta, min) + the fp16 residual (see kvtool/quant_ops/attention.py for the folding).
// Included twice by _native.cpp after _native_impl.h, in the same two namespaces (baseline and AVX2+FMA);
// uses its element helpers (row_ld, unpack_row, load_bytes8). Must not include headers.

// ---- fused decode attention over packed codes ---------------------------------------------------------
// exp(x) for x <= 0 (softmax after subtracting the max): Cody-Waite range reduction x = k ln2 + r,
// |r| <= ln2/2 (ln2 split in a 9-bit head, so k * head is exact), degree-7 Taylor/Horner polynomial for e^r
// (truncation < (ln2/2)^8 / 8! = 5e-9 relative), 2^k from the exponent bits. About 10 float32 roundings:
// relative error below 6e-7 (the bound the tests use). Vectorises (no libm call). exp(x < -87) -> exp(-87).
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float k = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { float f; int i; } u;
    u.i = ((int)k + 127) << 23;
    return p * u.f;
}

#ifdef KV_IMPL_AVX2
// exp_neg on 8 lanes: the same float32 operations in the same order (no contraction), so each lane equals
// exp_neg of it bit for bit
static inline __m256 exp_neg8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(k, _mm256_set1_ps(0.693359375f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(k, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(0.5f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// multiply-add of the attention loops: fused on the AVX2+FMA path (the quantizers never use it: eq. (2)
// is a separate multiply and add, and the build forbids contraction).
#undef KV_MADD
#ifdef KV_IMPL_AVX2
#define KV_MADD(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define KV_MADD(a, b, c) ((a) * (b) + (c))
#endif

static inline float dot(const float* a, const float* b, long n) {
    float s0 = 0.0f, s1 = 0.0f;
    long i = 0;
    if (n % 16 == 0) {  // two independent accumulator vectors
#pragma omp simd reduction(+ : s0, s1)
        for (i = 0; i < n / 2; ++i) {
            s0 = KV_MADD(a[i], b[i], s0);
            s1 = KV_MADD(a[i + n / 2], b[i + n / 2], s1);
        }
        return s0 + s1;
    }
#pragma omp simd reduction(+ : s0)
    for (i = 0; i < n; ++i) s0 = KV_MADD(a[i], b[i], s0);
    return s0;
}

static inline void side_params(const Side& s, long b, long h, long n, long seg, float* d, float* m) {
    const SegEntry& e = s.seg[h * s.nseg_max + seg];
    const long o = b * s.pstride_b + e.base + n * s.pstride_n;
    *d = ld(s.delta, o, s.p16);
    *m = ld(s.mn, o, s.p16);
}

// token n (< nq) of side s at (b, h) -> float codes cf[D]
static inline void side_codes(const Side& s, long b, long h, long n, long D, float* cf) {
    const long P = tile_tokens(s.bits), R = tile_rows(s.bits);
    const unsigned char* row = s.codes + b * s.cs[0] + h * s.cs[1] + (n / P) * R * s.cs[2];
    unpack_row(row, s.cs[2], s.bits, (int)(n % P), D, cf);
}

// token r of the exact tail: the residual's tokens, then the caller's extra tokens
static inline void resid_row(const Side& s, long b, long h, long r, long D, float* dst) {
    if (r >= s.nres) {
        r -= s.nres;
        const char* p = (const char*)s.extra + (b * s.xs[0] + h * s.xs[1] + r * s.xs[2]) * (s.x16 ? 2 : 4);
        row_ld(p, 0, s.x16, dst, D);
        return;
    }
    const char* p = (const char*)s.resid + (b * s.rs[0] + h * s.rs[1] + r * s.rs[2]) * (s.r16 ? 2 : 4);
    row_ld(p, 0, s.r16, dst, D);
}

#ifdef KV_IMPL_AVX2
// ---- AVX2+FMA tiles of the two KIVI layouts: per-channel K scores, per-token V accumulation -----------
// A tile's bytes are loaded once per 8 columns and every token of the tile is shifted out of them in
// registers; RB query heads share each unpacked code vector.
static inline float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}

template <int BITS>
static inline void tile_codes(__m256i w, __m256* c) {
    constexpr long P = BITS == 2 ? 4 : BITS == 4 ? 2 : 1;
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
#pragma GCC unroll 4
    for (long i = 0; i < P; ++i)
        c[i] = _mm256_cvtepi32_ps(BITS == 8             ? w
                                  : i == P - 1          ? _mm256_srli_epi32(w, BITS * (int)i)  // lanes < 256: no mask
                                  : i == 0              ? _mm256_and_si256(w, mask)
                                                        : _mm256_and_si256(_mm256_srli_epi32(w, BITS * (int)i), mask));
}

// the 4 horizontal sums of a, b, c, d as one vector (a tree; the order differs from hsum8's)
static inline __m128 hsum4x8(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// s[r][n] = c0[r] + qf[r] . codes_n for the whole tiles of tokens [n0, n1) of a per-channel K group.
// One query head per kv head (rep = 1, MHA): two accumulators per token (even / odd column blocks), so the
// tile's FMA chains are 8, not 4, and latency does not bound the loop; 2-bit tiles end in one 4-way sum.
template <int BITS>
static void k_scores_tiles(const Side& K, long b, long h, long n0, long n1, long D, long rep, long N,
                           const float* qf, const float* c0, float* s) {
    constexpr long P = BITS == 2 ? 4 : BITS == 4 ? 2 : 1;
    constexpr long RB = P >= 4 ? 2 : 4;
    if (rep == 1 && D % 16 == 0) {
        for (long n = n0; n < n1; n += P) {
            const unsigned char* row = K.codes + b * K.cs[0] + h * K.cs[1] + (n / P) * K.cs[2];
            __m256 a0[P], a1[P];
            for (long i = 0; i < P; ++i) { a0[i] = _mm256_setzero_ps(); a1[i] = _mm256_setzero_ps(); }
            for (long d = 0; d < D; d += 16) {
                __m256 c[P], e[P];
                tile_codes<BITS>(load_bytes8(row + d), c);
                tile_codes<BITS>(load_bytes8(row + d + 8), e);
                const __m256 q0 = _mm256_loadu_ps(qf + d), q1 = _mm256_loadu_ps(qf + d + 8);
#pragma GCC unroll 4
                for (long i = 0; i < P; ++i) {
                    a0[i] = _mm256_fmadd_ps(q0, c[i], a0[i]);
                    a1[i] = _mm256_fmadd_ps(q1, e[i], a1[i]);
                }
            }
            if (P == 4) {
                const __m128 t = hsum4x8(_mm256_add_ps(a0[0], a1[0]), _mm256_add_ps(a0[1 % P], a1[1 % P]),
                                         _mm256_add_ps(a0[2 % P], a1[2 % P]), _mm256_add_ps(a0[3 % P], a1[3 % P]));
                _mm_storeu_ps(s + n, _mm_add_ps(_mm_set1_ps(c0[0]), t));
            } else {
                for (long i = 0; i < P; ++i) s[n + i] = c0[0] + hsum8(_mm256_add_ps(a0[i], a1[i]));
            }
        }
        return;
    }
    for (long n = n0; n < n1; n += P) {
        const unsigned char* row = K.codes + b * K.cs[0] + h * K.cs[1] + (n / P) * K.cs[2];
        for (long r0 = 0; r0 < rep; r0 += RB) {
            const long rb = rep - r0 < RB ? rep - r0 : RB;
            __m256 acc[RB][P];
            for (long r = 0; r < RB; ++r)
                for (long i = 0; i < P; ++i) acc[r][i] = _mm256_setzero_ps();
            for (long d = 0; d < D; d += 8) {
                __m256 c[P];
                tile_codes<BITS>(load_bytes8(row + d), c);
#pragma GCC unroll 4
                for (long r = 0; r < RB; ++r) {
                    if (r >= rb) break;
                    const __m256 qv = _mm256_loadu_ps(qf + (r0 + r) * D + d);
#pragma GCC unroll 4
                    for (long i = 0; i < P; ++i) acc[r][i] = _mm256_fmadd_ps(qv, c[i], acc[r][i]);
                }
            }
            for (long r = 0; r < rb; ++r)
                for (long i = 0; i < P; ++i) s[(r0 + r) * N + n + i] = c0[r0 + r] + hsum8(acc[r][i]);
        }
    }
}

// acc[r] += sum_n w_rn codes_n over the whole tiles of tokens [n0, n1) of a V side. PT (per-token V whose
// heads have one (delta, min) per token, g a multiple of D): w = p delta_n and sums[r * ss] += p min_n;
// otherwise (per-channel V, one group): w = p and sums[r * ss] += p (delta and min apply per group after).
// acc[d0 .. d0 + 8 JB) += sum_n w_n codes_n over the whole tiles of tokens [n0, n1) (one query head): the
// JB column blocks' accumulators stay in registers over all the tiles, each a chain of FMAs in token order
// (the same order, so the same bits, as one accumulator row updated tile by tile)
template <int BITS, int JB>
static void v_cols(const unsigned char* base, long cs2, long n0, long n1, const float* w, float* acc, long d0) {
    constexpr long P = BITS == 2 ? 4 : BITS == 4 ? 2 : 1;
    __m256 a[JB];
    for (int j = 0; j < JB; ++j) a[j] = _mm256_loadu_ps(acc + d0 + 8 * j);
    for (long n = n0; n < n1; n += P) {
        const unsigned char* row = base + (n / P) * cs2 + d0;
        __m256 wv[P];
        for (long i = 0; i < P; ++i) wv[i] = _mm256_broadcast_ss(w + n + i);
#pragma GCC unroll 8
        for (int j = 0; j < JB; ++j) {
            __m256 c[P];
            tile_codes<BITS>(load_bytes8(row + 8 * j), c);
#pragma GCC unroll 4
            for (long i = 0; i < P; ++i) a[j] = _mm256_fmadd_ps(wv[i], c[i], a[j]);
        }
    }
    for (int j = 0; j < JB; ++j) _mm256_storeu_ps(acc + d0 + 8 * j, a[j]);
}

// v_tiles for rep <= R query heads: each tile's weights w = p delta_n (or p) broadcast once per tile into w[r][i]
// (registers for R = 2), the weight sums accumulated per row in token order (the same order, so the same bits,
// whatever R), then the tile's codes unpacked once per 8 columns for all the rows
template <int BITS, bool PT, int R>
static void v_rows(const Side& V, long b, long h, long n0, long n1, long D, long rep, long N, const float* s,
                   float* acc, float* sums, long ss) {
    constexpr long P = BITS == 2 ? 4 : BITS == 4 ? 2 : 1;
    float sum[R];
    for (long r = 0; r < rep; ++r) sum[r] = sums[r * ss];
    for (long n = n0; n < n1; n += P) {
        __m256 w[R][P];
        for (long i = 0; i < P; ++i) {
            float dj = 1.0f, mj = 1.0f;
            if (PT) side_params(V, b, h, n + i, 0, &dj, &mj);
            for (long r = 0; r < rep; ++r) {
                const float p = s[r * N + n + i];
                w[r][i] = _mm256_set1_ps(PT ? p * dj : p);
                sum[r] += PT ? p * mj : p;
            }
        }
        const unsigned char* row = V.codes + b * V.cs[0] + h * V.cs[1] + (n / P) * V.cs[2];
        for (long d = 0; d < D; d += 8) {
            __m256 c[P];
            tile_codes<BITS>(load_bytes8(row + d), c);
            for (long r = 0; r < rep; ++r) {
                __m256 a = _mm256_loadu_ps(acc + r * D + d);
#pragma GCC unroll 4
                for (long i = 0; i < P; ++i) a = _mm256_fmadd_ps(w[r][i], c[i], a);
                _mm256_storeu_ps(acc + r * D + d, a);
            }
        }
    }
    for (long r = 0; r < rep; ++r) sums[r * ss] = sum[r];
}

template <int BITS, bool PT>
static void v_tiles(const Side& V, long b, long h, long n0, long n1, long D, long rep, long N, const float* s,
                    float* acc, float* sums, long ss) {
    constexpr long P = BITS == 2 ? 4 : BITS == 4 ? 2 : 1;
    if (rep == 1) {  // the weights first (in place over s: p delta_n), then columns outer, accumulators in registers
        float* ws = const_cast<float*>(s);
        float sum = sums[0];
        for (long n = n0; n < n1; ++n) {
            float dj = 1.0f, mj = 1.0f;
            if (PT) side_params(V, b, h, n, 0, &dj, &mj);
            const float p = s[n];
            if (PT) ws[n] = p * dj;
            sum += PT ? p * mj : p;
        }
        sums[0] = sum;
        const unsigned char* base = V.codes + b * V.cs[0] + h * V.cs[1];
        long d = 0;
        for (; d + 64 <= D; d += 64) v_cols<BITS, 8>(base, V.cs[2], n0, n1, ws, acc, d);
        switch ((D - d) / 8) {
            case 7: v_cols<BITS, 7>(base, V.cs[2], n0, n1, ws, acc, d); break;
            case 6: v_cols<BITS, 6>(base, V.cs[2], n0, n1, ws, acc, d); break;
            case 5: v_cols<BITS, 5>(base, V.cs[2], n0, n1, ws, acc, d); break;
            case 4: v_cols<BITS, 4>(base, V.cs[2], n0, n1, ws, acc, d); break;
            case 3: v_cols<BITS, 3>(base, V.cs[2], n0, n1, ws, acc, d); break;
            case 2: v_cols<BITS, 2>(base, V.cs[2], n0, n1, ws, acc, d); break;
            case 1: v_cols<BITS, 1>(base, V.cs[2], n0, n1, ws, acc, d); break;
            default: break;
        }
        return;
    }
    if (rep <= 2) v_rows<BITS, PT, 2>(V, b, h, n0, n1, D, rep, N, s, acc, sums, ss);  // (weights in registers)
    else v_rows<BITS, PT, 256 / P>(V, b, h, n0, n1, D, rep, N, s, acc, sums, ss);  // rep * P <= 256 (v_tiles_any)
}

template <bool PT>
static bool v_tiles_any(const Side& V, long b, long h, long n0, long n1, long D, long rep, long N,
                        const float* s, float* acc, float* sums, long ss) {
    if (D % 8 || V.bits == 3 || rep * tile_tokens(V.bits) > 256 || n0 % tile_tokens(V.bits)) return false;
    if (V.bits == 2) v_tiles<2, PT>(V, b, h, n0, n1, D, rep, N, s, acc, sums, ss);
    else if (V.bits == 4) v_tiles<4, PT>(V, b, h, n0, n1, D, rep, N, s, acc, sums, ss);
    else v_tiles<8, PT>(V, b, h, n0, n1, D, rep, N, s, acc, sums, ss);
    return true;
}

static bool k_tiles_any(const Side& K, long b, long h, long n0, long n1, long D, long rep, long N,
                        const float* qf, const float* c0, float* s) {
    if (D % 8 || K.bits == 3 || n0 % tile_tokens(K.bits)) return false;
    if (K.bits == 2) k_scores_tiles<2>(K, b, h, n0, n1, D, rep, N, qf, c0, s);
    else if (K.bits == 4) k_scores_tiles<4>(K, b, h, n0, n1, D, rep, N, qf, c0, s);
    else k_scores_tiles<8>(K, b, h, n0, n1, D, rep, N, qf, c0, s);
    return true;
}
#endif

// One (batch row, kv head): its `rep` query heads. work: scratch of at least rep*N + (6*rep + 4)*D floats.
static void attention_task(const AArgs& a, long b, long h, float* work) {
    const long D = a.D, N = a.N, rep = a.rep;
    const Side& K = a.k;
    const Side& V = a.v;
    float* s = work;                 // [rep][N] scores, then weights
    float* qs = s + rep * N;         // [rep][D] scaled queries
    float* qf = qs + rep * D;        // [rep][D] folded queries / group accumulators
    float* acc = qf + rep * D;       // [rep][D] output accumulators
    float* bias = acc + rep * D;     // [rep][D] per-token-V min terms
    float* cf = bias + rep * D;      // [D] one token's codes (or residual values)
    float* tmp = cf + D;             // [D]
    float* c0 = tmp + D;             // [rep]
    float* psum = c0 + rep;          // [rep]
    for (long r = 0; r < rep; ++r) {
        const float* q = a.q + ((b * a.Hq) + h * rep + r) * D;
        for (long d = 0; d < D; ++d) qs[r * D + d] = q[d] * a.scale;
    }
    // scores over the quantized K tokens
    if (K.mode == 0) {  // per-channel groups of g tokens: fold delta into q, q.min into a constant
        for (long gi = 0; gi < K.nq / K.g; ++gi) {
            const long o = b * K.pstride_b + h * K.pstride_h + gi * K.pstride_n;
            row_ld(K.delta, o, K.p16, cf, D);
            row_ld(K.mn, o, K.p16, tmp, D);
            for (long r = 0; r < rep; ++r) {
                for (long d = 0; d < D; ++d) qf[r * D + d] = qs[r * D + d] * cf[d];
                c0[r] = dot(qs + r * D, tmp, D);
            }
            long n = gi * K.g;
#ifdef KV_IMPL_AVX2
            if (K.g % tile_tokens(K.bits) == 0 && k_tiles_any(K, b, h, n, n + K.g, D, rep, N, qf, c0, s)) n += K.g;
#endif
            for (; n < (gi + 1) * K.g; ++n) {
                side_codes(K, b, h, n, D, cf);
                for (long r = 0; r < rep; ++r) s[r * N + n] = c0[r] + dot(qf + r * D, cf, D);
            }
        }
    } else if (K.mode == 1) {  // per-token groups: segments of D with one (delta, min) each
        const long ns = K.nseg[h];
        for (long r = 0; r < rep; ++r)
            for (long j = 0; j < ns; ++j) {
                const SegEntry& e = K.seg[h * K.nseg_max + j];
                float t = 0.0f;
                for (long d = e.d0; d < e.d1; ++d) t += qs[r * D + d];
                bias[r * D + j] = t;  // sum of q over the segment
            }
        long n = 0;
#ifdef KV_IMPL_AVX2
        if (ns == 1) {  // one (delta, min) per token: scores q . codes in tiles, then delta * . + min * sum q
            const long n1 = K.nq / tile_tokens(K.bits) * tile_tokens(K.bits);
            for (long r = 0; r < rep; ++r) psum[r] = 0.0f;
            if (k_tiles_any(K, b, h, 0, n1, D, rep, N, qs, psum, s)) {
                for (; n < n1; ++n) {
                    float dj, mj;
                    side_params(K, b, h, n, 0, &dj, &mj);
                    for (long r = 0; r < rep; ++r) s[r * N + n] = dj * s[r * N + n] + mj * bias[r * D];
                }
            }
        }
#endif
        for (; n < K.nq; ++n) {
            side_codes(K, b, h, n, D, cf);
            for (long r = 0; r < rep; ++r) s[r * N + n] = 0.0f;
            for (long j = 0; j < ns; ++j) {
                const SegEntry& e = K.seg[h * K.nseg_max + j];
                float dj, mj;
                side_params(K, b, h, n, j, &dj, &mj);
                for (long r = 0; r < rep; ++r)
                    s[r * N + n] += dj * dot(qs + r * D + e.d0, cf + e.d0, e.d1 - e.d0) + mj * bias[r * D + j];
            }
        }
    }
    for (long n = K.nq; n < N; ++n) {  // full-precision residual tokens
        resid_row(K, b, h, n - K.nq, D, cf);
        for (long r = 0; r < rep; ++r) s[r * N + n] = dot(qs + r * D, cf, D);
    }
    // softmax numerators (normalised at the end)
    for (long r = 0; r < rep; ++r) {
        float* sr = s + r * N;
        float mx = -__builtin_inff();
        long n = 0;
#ifdef KV_IMPL_AVX2
        if (N >= 8) {  // exact in any order (a max)
            __m256 m8 = _mm256_loadu_ps(sr);
            for (n = 8; n + 8 <= N; n += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(sr + n));
            mx = hmax8(m8);
        }
#endif
        for (; n < N; ++n) mx = sr[n] > mx ? sr[n] : mx;
        float sum = 0.0f;
        n = 0;
#ifdef KV_IMPL_AVX2
        {  // exp_neg8 is exp_neg lane by lane (the same operations); the sum runs in 8 lanes
            const __m256 m8 = _mm256_set1_ps(mx);
            __m256 s8 = _mm256_setzero_ps();
            for (; n + 8 <= N; n += 8) {
                const __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(sr + n), m8));
                _mm256_storeu_ps(sr + n, e);
                s8 = _mm256_add_ps(s8, e);
            }
            sum = hsum8(s8);
        }
#endif
        for (; n < N; ++n) {
            float e = exp_neg(sr[n] - mx);
            sr[n] = e;
            sum += e;
        }
        c0[r] = sum;
    }
    for (long k = 0; k < rep * D; ++k) { acc[k] = 0.0f; bias[k] = 0.0f; }
    if (V.mode == 0) {  // per-channel: sum p*q over a group, then scale by delta and add min * sum p
        for (long gi = 0; gi < V.nq / V.g; ++gi) {
            for (long k = 0; k < rep * D; ++k) qf[k] = 0.0f;
            for (long r = 0; r < rep; ++r) psum[r] = 0.0f;
            long n = gi * V.g;
#ifdef KV_IMPL_AVX2
            if (V.g % tile_tokens(V.bits) == 0 && v_tiles_any<false>(V, b, h, n, n + V.g, D, rep, N, s, qf, psum, 1))
                n += V.g;
#endif
            for (; n < (gi + 1) * V.g; ++n) {
                side_codes(V, b, h, n, D, cf);
                for (long r = 0; r < rep; ++r) {
                    const float p = s[r * N + n];
                    float* q = qf + r * D;
                    for (long d = 0; d < D; ++d) q[d] = KV_MADD(p, cf[d], q[d]);
                    psum[r] += p;
                }
            }
            const long o = b * V.pstride_b + h * V.pstride_h + gi * V.pstride_n;
            row_ld(V.delta, o, V.p16, cf, D);
            row_ld(V.mn, o, V.p16, tmp, D);
            for (long r = 0; r < rep; ++r)
                for (long d = 0; d < D; ++d) acc[r * D + d] += cf[d] * qf[r * D + d] + tmp[d] * psum[r];
        }
    } else if (V.mode == 1) {  // per-token: the token's delta folds into its weight
        const long ns = V.nseg[h];
        long n = 0;
#ifdef KV_IMPL_AVX2
        const long n1 = V.nq / tile_tokens(V.bits) * tile_tokens(V.bits);
        if (ns == 1 && v_tiles_any<true>(V, b, h, 0, n1, D, rep, N, s, acc, bias, D)) n = n1;
#endif
        for (; n < V.nq; ++n) {
            side_codes(V, b, h, n, D, cf);
            for (long j = 0; j < ns; ++j) {
                const SegEntry& e = V.seg[h * V.nseg_max + j];
                float dj, mj;
                side_params(V, b, h, n, j, &dj, &mj);
                for (long r = 0; r < rep; ++r) {
                    const float p = s[r * N + n];
                    const float w = p * dj;
                    float* o = acc + r * D;
                    for (long d = e.d0; d < e.d1; ++d) o[d] = KV_MADD(w, cf[d], o[d]);
                    bias[r * D + j] += p * mj;
                }
            }
        }
        for (long r = 0; r < rep; ++r)
            for (long j = 0; j < ns; ++j) {
                const SegEntry& e = V.seg[h * V.nseg_max + j];
                for (long d = e.d0; d < e.d1; ++d) acc[r * D + d] += bias[r * D + j];
            }
    }
    for (long n = V.nq; n < N; ++n) {
        resid_row(V, b, h, n - V.nq, D, cf);
        for (long r = 0; r < rep; ++r) {
            const float p = s[r * N + n];
            float* o = acc + r * D;
            for (long d = 0; d < D; ++d) o[d] = KV_MADD(p, cf[d], o[d]);
        }
    }
    for (long r = 0; r < rep; ++r) {
        float* o = a.out + ((b * a.Hq) + h * rep + r) * D;
        const float inv = 1.0f / c0[r];
        for (long d = 0; d < D; ++d) o[d] = acc[r * D + d] * inv;
    }
}

