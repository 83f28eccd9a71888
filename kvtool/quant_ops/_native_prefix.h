// Hand-written multi-query exact-prefix attention of kvtool's native quant_ops (the packed engine's chunked
// prefill: T new queries over P exact past tokens held token-major [P, H, D] in f16/f32, plus the T new tokens
// causally, in one softmax). Included twice by _native.cpp after _native_impl.h and _native_attention.h, in
// the same two namespaces (baseline and AVX2+FMA+F16C); uses their row_ld and exp_neg. Must not include headers.
//
// One task = (kv head h, block of queries): its rows are the block's queries of the h's `rep` query heads (GQA:
// they share every key/value block loaded). The block is as large as the threads allow (prefix_rows: up to
// KV_PREFIX_ROWS rows, >= 2 tasks per thread, not under KV_PREFIX_ROWS_MIN): loading a key block (f16 convert,
// transpose) costs as much as ~100 rows' tiles, so 512 rows run the kernel ~1.3x faster than 128. Keys are walked in blocks of KB: each block is loaded
// once (converted from f16), K transposed [D][KB] so the score tile is a broadcast-FMA GEMM with no horizontal
// sums; then an online softmax (running max m, running sum l, the accumulator rescaled when m grows) and the
// P.V tile. Keys past a row's causal limit (key j > P + t) get weight exactly 0; key blocks past the block's
// last query are never loaded. Accumulation in float32 (FMA on the AVX2 path: the multiply-adds here are
// attention, not eq. (2), which stays unfused).

#ifndef KV_PREFIX_KB
#define KV_PREFIX_KB 64   // keys per block (a multiple of 16: the AVX2 score tile's width)
#define KV_PREFIX_ROWS 512 // most query rows per task (rep x queries): each key block loaded is shared by them
#define KV_PREFIX_ROWS_MIN 128 // fewest, where more tasks are wanted for the threads
#endif

// queries per task (module comment): T queries of rep heads, H kv heads, nth threads
static inline long prefix_rows(long T, long rep, long H, long nth) {
    const long lo = rep >= KV_PREFIX_ROWS_MIN ? 1 : KV_PREFIX_ROWS_MIN / rep;
    const long hi = rep >= KV_PREFIX_ROWS ? 1 : KV_PREFIX_ROWS / rep;
    const long want = (2 * nth + H - 1) / H;  // query blocks per kv head for >= 2 tasks per thread
    long qb = (T + want - 1) / want;
    if (qb > hi) qb = hi;
    if (qb < lo) qb = lo;
    return qb < T ? qb : T;
}

// per-thread scratch floats of one task: qs, acc [R][D]; kt, vb [KB][D]; s [R][KB]; m, l [R]; tmp [D]
static inline long prefix_scratch(long R, long D) {
    return 2 * R * D + 2 * KV_PREFIX_KB * D + R * KV_PREFIX_KB + 2 * R + D + 64;
}

// row j of the key/value sequence (past rows, then the call's new tokens) of kv head h -> dst[D] float32
static inline void prefix_row(const PArgs& a, bool value, long h, long j, float* dst) {
    if (j < a.P) {
        const long o = j * (value ? a.vps_n : a.kps_n) + h * (value ? a.vps_h : a.kps_h);
        row_ld(value ? a.vp : a.kp, o, value ? a.vp16 : a.kp16, dst, a.D);
    } else {
        const long o = h * (value ? a.vns_h : a.kns_h) + (j - a.P) * (value ? a.vns_t : a.kns_t);
        row_ld(value ? a.vn : a.kn, o, value ? a.vn16 : a.kn16, dst, a.D);
    }
}

#ifdef KV_IMPL_AVX2
// s[r][j0 + 0..15] = qs[r] . k_(j0 + 0..15) for MR rows: kt is the key block transposed [D][KB]
template <int MR>
static inline void qk_tile(const float* qs, long D, const float* kt, long j0, float* s) {
    __m256 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (long d = 0; d < D; ++d) {
        const __m256 k0 = _mm256_loadu_ps(kt + d * KV_PREFIX_KB + j0);
        const __m256 k1 = _mm256_loadu_ps(kt + d * KV_PREFIX_KB + j0 + 8);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
            const __m256 qv = _mm256_broadcast_ss(qs + r * D + d);
            acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
        }
    }
    for (int r = 0; r < MR; ++r) {
        _mm256_storeu_ps(s + r * KV_PREFIX_KB + j0, acc[r][0]);
        _mm256_storeu_ps(s + r * KV_PREFIX_KB + j0 + 8, acc[r][1]);
    }
}

// acc[r][d0 + 0..15] += sum_j p[r][j] v_j[d0 + 0..15], j < nk, for MR rows (vb: the value block [KB][D])
template <int MR>
static inline void pv_tile(const float* p, long nk, const float* vb, long D, long d0, float* acc) {
    __m256 a[MR][2];
    for (int r = 0; r < MR; ++r) {
        a[r][0] = _mm256_loadu_ps(acc + r * D + d0);
        a[r][1] = _mm256_loadu_ps(acc + r * D + d0 + 8);
    }
    for (long j = 0; j < nk; ++j) {
        const __m256 v0 = _mm256_loadu_ps(vb + j * D + d0);
        const __m256 v1 = _mm256_loadu_ps(vb + j * D + d0 + 8);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
            const __m256 pb = _mm256_broadcast_ss(p + r * KV_PREFIX_KB + j);
            a[r][0] = _mm256_fmadd_ps(pb, v0, a[r][0]);
            a[r][1] = _mm256_fmadd_ps(pb, v1, a[r][1]);
        }
    }
    for (int r = 0; r < MR; ++r) {
        _mm256_storeu_ps(acc + r * D + d0, a[r][0]);
        _mm256_storeu_ps(acc + r * D + d0 + 8, a[r][1]);
    }
}

// (exp_neg8: _native_attention.h's, each lane bit-identical to the scalar exp_neg)

// sr[j] = exp_neg(sr[j] - mx) for j < nv, 0 for nv <= j < n16 (n16 a multiple of 8) -> the sum over j < nv
// (8 lane sums, then the lanes in order)
static inline float softmax_row8(float* sr, long nv, long n16, float mx) {
    const __m256 m8 = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    long j = 0;
    for (; j + 8 <= nv; j += 8) {
        const __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), m8));
        _mm256_storeu_ps(sr + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    if (j < nv) {  // the ragged lanes: exp where visible, exactly 0 beyond
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(nv - j)), lane));
        const __m256 e = _mm256_and_ps(exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), m8)), keep);
        _mm256_storeu_ps(sr + j, e);
        acc = _mm256_add_ps(acc, e);
        j += 8;
    }
    for (; j < n16; j += 8) _mm256_storeu_ps(sr + j, _mm256_setzero_ps());
    alignas(32) float l8[8];
    _mm256_store_ps(l8, acc);
    float sum = 0.0f;
    for (int i = 0; i < 8; ++i) sum += l8[i];
    return sum;
}

// the tiles for R rows (blocks of 6, then the rest): scores over nk16 keys (a multiple of 16), P.V over nk
static void prefix_tiles(const float* qs, const float* kt, const float* vb, float* s, float* acc, long R,
                         long D, long nk16, long nk, bool scores) {
    for (long r0 = 0; r0 < R; r0 += 6) {
        const long mr = R - r0 < 6 ? R - r0 : 6;
        if (scores) {
            for (long j = 0; j < nk16; j += 16) {
                const float* q = qs + r0 * D;
                float* sr = s + r0 * KV_PREFIX_KB;
                switch (mr) {
                    case 6: qk_tile<6>(q, D, kt, j, sr); break;
                    case 5: qk_tile<5>(q, D, kt, j, sr); break;
                    case 4: qk_tile<4>(q, D, kt, j, sr); break;
                    case 3: qk_tile<3>(q, D, kt, j, sr); break;
                    case 2: qk_tile<2>(q, D, kt, j, sr); break;
                    default: qk_tile<1>(q, D, kt, j, sr); break;
                }
            }
        } else {
            for (long d = 0; d < D; d += 16) {
                const float* p = s + r0 * KV_PREFIX_KB;
                float* ar = acc + r0 * D;
                switch (mr) {
                    case 6: pv_tile<6>(p, nk, vb, D, d, ar); break;
                    case 5: pv_tile<5>(p, nk, vb, D, d, ar); break;
                    case 4: pv_tile<4>(p, nk, vb, D, d, ar); break;
                    case 3: pv_tile<3>(p, nk, vb, D, d, ar); break;
                    case 2: pv_tile<2>(p, nk, vb, D, d, ar); break;
                    default: pv_tile<1>(p, nk, vb, D, d, ar); break;
                }
            }
        }
    }
}
#endif

// One (kv head h, queries [t0, t1)) task. Rows r = tt * rep + i: query t0 + tt of query head h * rep + i.
static void prefix_task(const PArgs& a, long h, long t0, long t1, float* work) {
    const long D = a.D, rep = a.rep, nt = t1 - t0, R = nt * rep, KB = KV_PREFIX_KB;
    float* qs = work;             // [R][D] scaled queries
    float* acc = qs + R * D;      // [R][D] output accumulators
    float* kt = acc + R * D;      // [D][KB] key block, transposed
    float* vb = kt + D * KB;      // [KB][D] value block
    float* s = vb + KB * D;       // [R][KB] scores, then weights
    float* m = s + R * KB;        // [R] running max
    float* l = m + R;             // [R] running sum
    float* tmp = l + R;           // [D]
    for (long tt = 0; tt < nt; ++tt)
        for (long i = 0; i < rep; ++i) {
            const float* q = a.q + (h * rep + i) * a.qs_h + (t0 + tt) * a.qs_t;
            float* d = qs + (tt * rep + i) * D;
            for (long x = 0; x < D; ++x) d[x] = q[x] * a.scale;
        }
    for (long k = 0; k < R * D; ++k) acc[k] = 0.0f;
    for (long r = 0; r < R; ++r) { m[r] = -__builtin_inff(); l[r] = 0.0f; }
    const long nkeys = a.P + t1;  // the last query (t1 - 1) sees keys [0, P + t1)
#ifdef KV_IMPL_AVX2
    const bool tiles = D % 16 == 0;
#endif
    for (long j0 = 0; j0 < nkeys; j0 += KB) {
        const long nk = nkeys - j0 < KB ? nkeys - j0 : KB;
        for (long jj = 0; jj < nk; ++jj) {  // the block: K transposed, V as rows
            prefix_row(a, false, h, j0 + jj, tmp);
            for (long d = 0; d < D; ++d) kt[d * KB + jj] = tmp[d];
            prefix_row(a, true, h, j0 + jj, vb + jj * D);
        }
        const long nk16 = (nk + 15) / 16 * 16;
        for (long jj = nk; jj < nk16; ++jj)
            for (long d = 0; d < D; ++d) kt[d * KB + jj] = 0.0f;
        // scores
#ifdef KV_IMPL_AVX2
        if (tiles) prefix_tiles(qs, kt, vb, s, acc, R, D, nk16, nk, true); else
#endif
        for (long r = 0; r < R; ++r) {
            float* sr = s + r * KB;
            for (long jj = 0; jj < nk; ++jj) sr[jj] = 0.0f;
            for (long d = 0; d < D; ++d) {
                const float qd = qs[r * D + d];
                const float* kd = kt + d * KB;
#pragma omp simd
                for (long jj = 0; jj < nk; ++jj) sr[jj] = KV_MADD(qd, kd[jj], sr[jj]);
            }
        }
        // online softmax: causal limit, running max / sum, accumulator rescale
        const bool diag = j0 + nk - 1 > a.P + t0;  // some key of the block is beyond some row's limit
        for (long r = 0; r < R; ++r) {
            float* sr = s + r * KB;
            const long lim = diag ? a.P + t0 + r / rep - j0 + 1 : nk;  // keys [0, lim) of the block visible
            const long nv = lim < nk ? (lim > 0 ? lim : 0) : nk;
            float mx = -__builtin_inff();
#pragma omp simd reduction(max : mx)
            for (long jj = 0; jj < nv; ++jj) mx = sr[jj] > mx ? sr[jj] : mx;
            if (nv == 0 || !(mx > m[r])) mx = m[r];
            if (mx != m[r]) {
                const float c = exp_neg(m[r] - mx);  // m = -inf (first block): c -> e^-87, acc and l are 0
                float* ar = acc + r * D;
                for (long d = 0; d < D; ++d) ar[d] *= c;
                l[r] *= c;
                m[r] = mx;
            }
#ifdef KV_IMPL_AVX2
            if (tiles) { l[r] += softmax_row8(sr, nv, (nk + 7) / 8 * 8, mx); continue; }
#endif
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (long jj = 0; jj < nk; ++jj) {
                const float e = jj < nv ? exp_neg(sr[jj] - mx) : 0.0f;
                sr[jj] = e;
                sum += e;
            }
            l[r] += sum;
        }
        // P.V
#ifdef KV_IMPL_AVX2
        if (tiles) prefix_tiles(qs, kt, vb, s, acc, R, D, nk16, nk, false); else
#endif
        for (long r = 0; r < R; ++r) {
            float* ar = acc + r * D;
            const float* pr = s + r * KB;
            for (long jj = 0; jj < nk; ++jj) {
                const float p = pr[jj];
                const float* v = vb + jj * D;
#pragma omp simd
                for (long d = 0; d < D; ++d) ar[d] = KV_MADD(p, v[d], ar[d]);
            }
        }
    }
    for (long tt = 0; tt < nt; ++tt)
        for (long i = 0; i < rep; ++i) {
            const long r = tt * rep + i;
            float* o = a.out + (h * rep + i) * a.os_h + (t0 + tt) * a.os_t;
            const float inv = 1.0f / l[r];
            for (long d = 0; d < D; ++d) o[d] = acc[r * D + d] * inv;
        }
}
