// AVX2 + F16C quantize + pack of kvtool's native quant_ops (eq. (2), bit-identical to kvtool.quant_ops.affine):
// the common layouts only (L % 8 == 0; per-column params, bl == 1, or groups of bl % 8 == 0 columns). Included
// by _native_impl.h inside its KV_IMPL_AVX2 section (after ld8 / store_bytes8 / hmin8 / hmax8); must not
// include headers. Here: the min/max pass, the params 8 groups at a time (params_avx2, the operations of
// _native_impl.h's params_run), the codes of full token tiles by the reciprocal (below) and of edge tiles by the
// division, and the prefetch of the next chunk. Not here: the chunking (_native_impl.h's quantize_pack_t), the
// portable code, dequantize.
//
// Eq. (2)'s code is q = clip(rint((x - m) / d), 0, qmax) with an IEEE float32 division. A division per value
// is the slowest operation of the loop (vdivps: one per 3.5-5 cycles), so full token tiles take
//
//   t = clamp(s * r, 0, qmax),  s = x - m (the same float32 subtraction),  r = fl(1 / d) per group,
//   k = rint(t), accepted unless |t - k| >= lim = 1/2 - qmax 2^-21 or t is NaN; a vector with any such lane
//   is recomputed with the division (`code8_div`, the portable operations), so every code equals eq. (2)'s.
//
// Why an accepted k is eq. (2)'s code. Let q = s / d (exact), Q = fl(q) (eq. (2)'s rounded quotient) and
// u = 2^-24. r is used only when |d| is in [2^-125, 2^125] (else r = NaN: every lane of the group goes to the
// division), so r is normal and non-zero, and round-to-nearest gives r = (1/d)(1 + e1), T := fl(s * r) =
// s r (1 + e2), |e1|, |e2| <= u while T does not underflow: T = q (1 + e), |e| <= 2u + u^2, with q's sign, and
// |Q - q| <= u |q|. Cases:
// - 0 <= T <= qmax: |T - Q| <= (3u + u^2)|q| <= 3.01u qmax < 0.19 qmax 2^-21. t = T, and t - k is exact
//   (Sterbenz: k = rint(t) is 0 or within [t/2, 2t]), so an accepted t is more than qmax 2^-21 from every
//   half-integer; Q lies on the same side of each half-integer as t, and is not one (no tie): rint(Q) = k.
// - T < 0 (or -0): Q <= 0, eq. (2) gives 0; t = 0 (or -0), k = 0.
// - T > qmax (+inf included: s = +inf, or an overflow): Q >= T (1 - 4u) > qmax - 1/2, eq. (2) gives qmax
//   (s / d = +inf clips to qmax too); t = k = qmax. s = -inf: T = -inf, both give 0.
// - T NaN (s NaN: x or m NaN, or r NaN for an unsafe d): the clamp keeps NaN (max / min return their second
//   operand, t, on NaN) and the lane is flagged.
// - T underflowing (|T| < 2^-126): |q| < 2^-125, Q and T both give 0.
// Clamping to the integers 0 and qmax commutes with rint, so clip(rint(Q)) = rint(clamp(T)) when accepted.
// Only values within qmax 2^-21 of a half-integer quotient take the division (about 2 qmax 2^-21 of them).
// tests/quant_ops/test_native_ties.py feeds values at, and 0-3 ulp either side of, the half-integer quotients
// (a kernel without the fix-up fails it), zero ranges, constant groups, subnormal deltas, float32 ranges with
// non-normal reciprocals and +-inf, on this path and on the baseline code.

// min/max of one row x's G groups of bl (% 8 == 0) columns folded into mnr / mxr [G] (the same operations in
// the same order for per-token groups and for groups of columns spanning several rows)
template <typename TX>
static inline void group_minmax_row(const TX* x, long G, long bl, float* mnr, float* mxr) {
    for (long j = 0; j < G; ++j) {
        __m256 lo = ld8(x + j * bl), hi = lo;
        for (long c = 8; c < bl; c += 8) {
            __m256 v = ld8(x + j * bl + c);
            lo = _mm256_min_ps(lo, v);
            hi = _mm256_max_ps(hi, v);
        }
        const float l1 = hmin8(lo), h1 = hmax8(hi);
        mnr[j] = l1 < mnr[j] ? l1 : mnr[j];
        mxr[j] = h1 > mxr[j] ? h1 : mxr[j];
    }
}

// min/max of rows [t0, t1) of heads [h0, h0 + bh) into chunk accumulators (param row pr at (pr - p0) * G)
template <typename TX>
static void minmax_avx2(const QArgs& a, long b, long h0, long t0, long t1, long p0, float* mn, float* mx) {
    const long L = a.x.n[3], bt = a.bt, bl = a.bl, G = L / bl;
    if (bl != 1 && bt == 1 && a.bh == 1) {  // per-token groups: a param row per token, the same operations
        for (long t = t0; t < t1; ++t) {
            group_minmax_row((const TX*)a.x.at(b, h0, t, 0), G, bl, mn + (t - p0) * G, mx + (t - p0) * G);
        }
        return;
    }
    for (long pr = p0; pr * bt < t1; ++pr) {
        const long s = pr * bt > t0 ? pr * bt : t0, e = (pr + 1) * bt < t1 ? (pr + 1) * bt : t1;
        float* mnr = mn + (pr - p0) * G;
        float* mxr = mx + (pr - p0) * G;
        if (bl == 1) {
            long c = 0;
            for (; c + 32 <= L; c += 32) {  // a 64-byte line of float16 per row per pass
                __m256 lo[4], hi[4];
                for (int k = 0; k < 4; ++k) { lo[k] = _mm256_loadu_ps(mnr + c + 8 * k); hi[k] = _mm256_loadu_ps(mxr + c + 8 * k); }
                for (long h = h0; h < h0 + a.bh; ++h)
                    for (long t = s; t < e; ++t) {
                        const TX* x = (const TX*)a.x.at(b, h, t, c);
                        for (int k = 0; k < 4; ++k) {
                            __m256 v = ld8(x + 8 * k);
                            lo[k] = _mm256_min_ps(lo[k], v);
                            hi[k] = _mm256_max_ps(hi[k], v);
                        }
                    }
                for (int k = 0; k < 4; ++k) { _mm256_storeu_ps(mnr + c + 8 * k, lo[k]); _mm256_storeu_ps(mxr + c + 8 * k, hi[k]); }
            }
            for (; c < L; c += 8) {
                __m256 lo = _mm256_loadu_ps(mnr + c), hi = _mm256_loadu_ps(mxr + c);
                for (long h = h0; h < h0 + a.bh; ++h)
                    for (long t = s; t < e; ++t) {
                        __m256 v = ld8((const TX*)a.x.at(b, h, t, c));
                        lo = _mm256_min_ps(lo, v);
                        hi = _mm256_max_ps(hi, v);
                    }
                _mm256_storeu_ps(mnr + c, lo);
                _mm256_storeu_ps(mxr + c, hi);
            }
        } else {
            for (long h = h0; h < h0 + a.bh; ++h)
                for (long t = s; t < e; ++t) {
                    group_minmax_row((const TX*)a.x.at(b, h, t, 0), G, bl, mnr, mxr);
                }
        }
    }
}

// ---- codes of full token tiles: reciprocal + exact fix-up (see the top of this file) ----------------------
// r = 1/d where that reciprocal is normal with room to spare, else NaN (every value of the group then takes the
// division). d is the divisor eq. (2) divides by (the stored delta as float32, 1 where it is 0).
static inline float safe_recip(float d) {
    const float ad = d < 0.0f ? -d : d;
    return ad >= 0x1p-125f && ad <= 0x1p125f ? 1.0f / d : __builtin_nanf("");
}

// params_run (_native_impl.h) 8 groups at a time, the same float32 operations and conversions (F16C rounds
// to nearest even, as the scalar conversion does), plus the reciprocals rc = safe_recip(divisor)
static inline __m256 st_param(_Float16* p, __m256 v) {  // store as TP, return the stored value as float32
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128((__m128i*)p, h);
    return _mm256_cvtph_ps(h);
}
static inline __m256 st_param(float* p, __m256 v) {
    _mm256_storeu_ps(p, v);
    return v;
}

template <typename TP>
static void params_avx2(float* mn, float* mx, float* rc, long n, float qmax, TP* dp, TP* mp) {
    const __m256 q = _mm256_set1_ps(qmax), one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    const __m256 lo_ok = _mm256_set1_ps(0x1p-125f), hi_ok = _mm256_set1_ps(0x1p125f);
    const __m256 nan = _mm256_set1_ps(__builtin_nanf(""));
    long j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 lo = _mm256_loadu_ps(mn + j), hi = _mm256_loadu_ps(mx + j);
        const __m256 d = st_param(dp + j, _mm256_div_ps(_mm256_sub_ps(hi, lo), q));
        const __m256 m = st_param(mp + j, lo);
        const __m256 dv = _mm256_blendv_ps(d, one, _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ));
        _mm256_storeu_ps(mx + j, dv);
        _mm256_storeu_ps(mn + j, m);
        const __m256 ad = _mm256_andnot_ps(sign, dv);
        const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(ad, lo_ok, _CMP_GE_OQ), _mm256_cmp_ps(ad, hi_ok, _CMP_LE_OQ));
        _mm256_storeu_ps(rc + j, _mm256_blendv_ps(nan, _mm256_div_ps(one, dv), ok));
    }
    params_run(mn + j, mx + j, n - j, qmax, dp + j, mp + j);
    for (; j < n; ++j) rc[j] = safe_recip(mx[j]);
}

// eq. (2)'s code of 8 values by the reciprocal; lanes that may differ from it (or are NaN) are OR-ed into bad
static inline __m256 code8_rcp(__m256 s, __m256 r, __m256 qmax, __m256 lim, __m256& bad) {
    __m256 t = _mm256_mul_ps(s, r);
    t = _mm256_min_ps(qmax, _mm256_max_ps(_mm256_setzero_ps(), t));  // NaN t stays NaN (second operand)
    const __m256 k = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 e = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_sub_ps(t, k));  // |t - k|, exact
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(e, lim, _CMP_NLT_UQ));                    // >= lim, or NaN
    return k;
}

// eq. (2)'s code of 8 values with the division, the portable code's operations (NaN -> 0 as max(v, 0) gives)
static inline __m256 code8_div(__m256 s, __m256 d, __m256 qmax) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(s, d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), qmax);
}

// 32 bytes: the low byte of each int32 lane of w[0..3] (columns c .. c+31), in column order
static inline void store_bytes32(unsigned char* dst, const __m256i* w) {
    const __m256i p01 = _mm256_packus_epi32(w[0], w[1]), p23 = _mm256_packus_epi32(w[2], w[3]);
    const __m256i b = _mm256_packus_epi16(p01, p23);  // dwords: w0 lo, w1 lo, w2 lo, w3 lo | w0 hi, ...
    _mm256_storeu_si256((__m256i*)dst, _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

// one full tile's codes of NV * 8 columns at c (param group j) as tile words (code i at bit SH * i): the
// float sum of k_i * 2^(SH i) is exact (integers below 2^24), one conversion per word.
template <typename TX, int BITS, bool PERCOL, int NV, bool EXACT>
static inline void tile_words(const TX* const* xr, const float* const* dr, const float* const* mr,
                              const float* const* rr, long c, long j, __m256* acc, __m256& bad) {
    constexpr int P = BITS == 2 ? 4 : BITS == 3 ? 8 : BITS == 4 ? 2 : 1, SH = BITS == 3 ? 3 : BITS;
    const __m256 qmax = _mm256_set1_ps((float)((1 << BITS) - 1)), lim = _mm256_set1_ps(0.5f - ((1 << BITS) - 1) * 0x1p-21f);
#pragma GCC unroll 8
    for (int i = 0; i < P; ++i) {
        const __m256 sc = _mm256_set1_ps((float)(1 << (SH * i)));
        // per-group params: broadcast once per token and group (per-column ones are loaded per column block)
        const __m256 mb = _mm256_broadcast_ss(mr[i] + j), pb = _mm256_broadcast_ss((EXACT ? dr : rr)[i] + j);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
            const long cv = c + 8 * v;
            const __m256 s = _mm256_sub_ps(ld8(xr[i] + cv), PERCOL ? _mm256_loadu_ps(mr[i] + cv) : mb);
            const __m256 k = EXACT ? code8_div(s, PERCOL ? _mm256_loadu_ps(dr[i] + cv) : pb, qmax)
                                   : code8_rcp(s, PERCOL ? _mm256_loadu_ps(rr[i] + cv) : pb, qmax, lim, bad);
            acc[v] = i == 0 ? k : _mm256_fmadd_ps(k, sc, acc[v]);
        }
    }
}

template <typename TX, int BITS, bool PERCOL, int NV>
__attribute__((noinline, cold)) static void tile_words_exact(const TX* const* xr, const float* const* dr,
                                                              const float* const* mr, long c, long j, __m256* acc) {
    __m256 unused = _mm256_setzero_ps();
    tile_words<TX, BITS, PERCOL, NV, true>(xr, dr, mr, nullptr, c, j, acc, unused);
}

// the codes of one full tile (P token rows xr, their param rows) into its R packed rows at o (row stride os)
template <typename TX, int BITS, bool PERCOL, int NV>
static void full_tile(const TX* const* xr, const float* const* dr, const float* const* mr, const float* const* rr,
                      long L, long bl, unsigned char* o, long os) {
    const long cb = PERCOL ? L : bl, ng = PERCOL ? 1 : L / bl;
    for (long j = 0; j < ng; ++j)
        for (long c = j * cb; c < (j + 1) * cb; c += 8 * NV) {
            __m256 acc[NV], bad = _mm256_setzero_ps();
            tile_words<TX, BITS, PERCOL, NV, false>(xr, dr, mr, rr, c, j, acc, bad);
            if (__builtin_expect(_mm256_movemask_ps(bad) != 0, 0))
                tile_words_exact<TX, BITS, PERCOL, NV>(xr, dr, mr, c, j, acc);
            __m256i w[NV];
            for (int v = 0; v < NV; ++v) w[v] = _mm256_cvttps_epi32(acc[v]);
            const __m256i m8 = _mm256_set1_epi32(255);
            for (int r = 0; r < (BITS == 3 ? 3 : 1); ++r) {
                __m256i p[NV];
                for (int v = 0; v < NV; ++v)
                    p[v] = BITS == 3 ? _mm256_and_si256(_mm256_srli_epi32(w[v], 8 * r), m8) : w[v];
                if (NV == 4) store_bytes32(o + r * os + c, p);
                else for (int v = 0; v < NV; ++v) store_bytes8(o + r * os + c + 8 * v, p[v]);
            }
        }
}

// The chunk after the one being coded: batch b, heads from h0, tokens [t0, t1) (t1 = 0: none)
struct Next {
    long b, h0, t0, t1;
};

// codes of rows [t0, t1) (tile position t + off) packed into a.out; dv / mv / rv: divisor, min and reciprocal
// per param row. Full tiles take full_tile; tiles cut by the chunk edges (an offset, the last partial tile)
// the division below, skipping their missing tokens (code 0). BITS and the param layout (PERCOL: bl == 1)
// are compile-time, so a tile's P tokens unroll with immediate shifts.
template <typename TX, int BITS, bool PERCOL>
static void codes_avx2_t(const QArgs& a, long b, long h, long t0, long t1, long p0, const float* dv,
                         const float* mv, const float* rv, const Next& nx, long nh) {
    constexpr long P = BITS == 2 ? 4 : BITS == 3 ? 8 : BITS == 4 ? 2 : 1;
    constexpr int SH = BITS == 3 ? 3 : BITS;
    const long L = a.x.n[3], bt = a.bt, bl = a.bl, G = L / bl, R = tile_rows(BITS);
    const long off = a.offset, v0 = t0 + off, v1 = t1 + off;
    const bool wide = (PERCOL ? L : bl) % 32 == 0;
    const __m256 zero = _mm256_setzero_ps(), qmax = _mm256_set1_ps((float)((1 << BITS) - 1));
    const TX* xr[P];
    const float* dr[P];
    const float* mr[P];
    const float* rr[P];
    for (long tile = v0 / P; tile * P < v1; ++tile) {
        unsigned char* o = (unsigned char*)a.out.at(b, h, tile * R, 0);
        const long tf = tile * P - off;  // the tile's first token
        for (long i = 0; i < P; ++i) {  // row (nh, t - t0 + nx.t0) of the next chunk for each row of this tile
            const long t = tf + i - t0 + nx.t0;
            if (t < nx.t0 || t >= nx.t1) continue;
            const char* q = a.x.at(nx.b, nh, t, 0);
            for (long k = 0; k < L * (long)sizeof(TX); k += 64) _mm_prefetch(q + k, _MM_HINT_T0);
        }
        if (tf >= t0 && tf + P <= t1) {  // a full tile: its rows and param rows (one division per tile)
            long q = bt == 1 ? tf : tf / bt, r = bt == 1 ? 0 : tf - q * bt;
            for (long i = 0; i < P; ++i) {
                xr[i] = (const TX*)a.x.at(b, h, tf + i, 0);
                const long pr = (q - p0) * G;
                dr[i] = dv + pr;
                mr[i] = mv + pr;
                rr[i] = rv + pr;
                if (++r == bt) { r = 0; ++q; }
            }
            if (wide) full_tile<TX, BITS, PERCOL, 4>(xr, dr, mr, rr, L, bl, o, a.out.s[2]);
            else full_tile<TX, BITS, PERCOL, 1>(xr, dr, mr, rr, L, bl, o, a.out.s[2]);
            continue;
        }
        for (long i = 0; i < P; ++i) {  // an edge tile: its tokens in [t0, t1)
            const long t = tf + i;
            const bool in = t >= t0 && t < t1;
            xr[i] = in ? (const TX*)a.x.at(b, h, t, 0) : nullptr;
            const long pr = in ? (t / bt - p0) * G : 0;
            dr[i] = dv + pr;
            mr[i] = mv + pr;
        }
        for (long c = 0; c < L; c += 8) {
            __m256i acc = _mm256_setzero_si256();
            for (long i = 0; i < P; ++i) {
                if (!xr[i]) continue;
                const __m256 d = PERCOL ? _mm256_loadu_ps(dr[i] + c) : _mm256_set1_ps(dr[i][c / bl]);
                const __m256 m = PERCOL ? _mm256_loadu_ps(mr[i] + c) : _mm256_set1_ps(mr[i][c / bl]);
                __m256 v = _mm256_div_ps(_mm256_sub_ps(ld8(xr[i] + c), m), d);
                v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                v = _mm256_min_ps(_mm256_max_ps(v, zero), qmax);
                acc = _mm256_or_si256(acc, _mm256_slli_epi32(_mm256_cvttps_epi32(v), SH * (int)i));
            }
            if (BITS == 3) {
                const __m256i m8 = _mm256_set1_epi32(255);
                store_bytes8(o + c, _mm256_and_si256(acc, m8));
                store_bytes8(o + a.out.s[2] + c, _mm256_and_si256(_mm256_srli_epi32(acc, 8), m8));
                store_bytes8(o + 2 * a.out.s[2] + c, _mm256_srli_epi32(acc, 16));
            } else {
                store_bytes8(o + c, acc);
            }
        }
    }
}

template <typename TX>
static void codes_avx2(const QArgs& a, long b, long h, long t0, long t1, long p0, const float* dv,
                       const float* mv, const float* rv, const Next& nx, long nh) {
    const bool pc = a.bl == 1;
    switch (a.bits) {
        case 2: pc ? codes_avx2_t<TX, 2, true>(a, b, h, t0, t1, p0, dv, mv, rv, nx, nh)
                   : codes_avx2_t<TX, 2, false>(a, b, h, t0, t1, p0, dv, mv, rv, nx, nh); break;
        case 3: pc ? codes_avx2_t<TX, 3, true>(a, b, h, t0, t1, p0, dv, mv, rv, nx, nh)
                   : codes_avx2_t<TX, 3, false>(a, b, h, t0, t1, p0, dv, mv, rv, nx, nh); break;
        case 4: pc ? codes_avx2_t<TX, 4, true>(a, b, h, t0, t1, p0, dv, mv, rv, nx, nh)
                   : codes_avx2_t<TX, 4, false>(a, b, h, t0, t1, p0, dv, mv, rv, nx, nh); break;
        default: pc ? codes_avx2_t<TX, 8, true>(a, b, h, t0, t1, p0, dv, mv, rv, nx, nh)
                    : codes_avx2_t<TX, 8, false>(a, b, h, t0, t1, p0, dv, mv, rv, nx, nh); break;
    }
}
