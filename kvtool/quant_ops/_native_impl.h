// Hand-written kernels of kvtool's native quant_ops (no library offers these: 3-bit token-tile packing,
// eq. (2) bit-identical to kvtool.quant_ops.affine, and decode attention straight from the packed codes).
//
// This file is included twice by _native.cpp, inside two namespaces: once compiled for the baseline ISA and
// once under `#pragma GCC target("avx2,f16c")` (chosen at run time by cpuid). It must not include headers.
// Loops are written for the auto-vectoriser; no -ffast-math: quantization must match numpy bit for bit, so
// the build uses -ffp-contract=off (no fused multiply-add) and plain IEEE float32 division.

// ---- element access ----------------------------------------------------------------------------------
static inline float ld(const void* p, long i, int f16) {
    return f16 ? (float)((const _Float16*)p)[i] : ((const float*)p)[i];
}

// float16 <-> float32 rows (round to nearest even). GCC 12 does not vectorise _Float16, so the AVX2 build
// converts 8 at a time with F16C; the arithmetic then runs on float32 rows the compiler vectorises.
static inline void row_to_f32(const _Float16* src, float* dst, long n) {
    long i = 0;
#ifdef KV_IMPL_AVX2
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
#endif
    for (; i < n; ++i) dst[i] = (float)src[i];
}

static inline void row_to_f32(const float* src, float* dst, long n) {
    for (long i = 0; i < n; ++i) dst[i] = src[i];
}

static inline void row_from_f32(const float* src, _Float16* dst, long n) {
    long i = 0;
#ifdef KV_IMPL_AVX2
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i*)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; ++i) dst[i] = (_Float16)src[i];
}

static inline void row_from_f32(const float* src, float* dst, long n) {
    for (long i = 0; i < n; ++i) dst[i] = src[i];
}

static inline void row_ld(const void* p, long off, int f16, float* dst, long n) {
    if (f16) row_to_f32((const _Float16*)p + off, dst, n);
    else row_to_f32((const float*)p + off, dst, n);
}

// codes of token `i` (0 <= i < P) of one tile: rows of L bytes at `row` (R rows for 3-bit) -> dst[L]
template <typename T>
static inline void unpack_row(const unsigned char* row, long row_stride, int bits, int i, long L, T* dst) {
    if (bits == 8) {
        for (long l = 0; l < L; ++l) dst[l] = (T)row[l];
    } else if (bits == 3) {
        const unsigned char* r1 = row + row_stride;
        const unsigned char* r2 = r1 + row_stride;
        const int s = 3 * i;
        for (long l = 0; l < L; ++l) {
            unsigned w = (unsigned)row[l] | ((unsigned)r1[l] << 8) | ((unsigned)r2[l] << 16);
            dst[l] = (T)((w >> s) & 7u);
        }
    } else {
        const unsigned s = (unsigned)(bits * i), mask = (1u << bits) - 1u;
        for (long l = 0; l < L; ++l) dst[l] = (T)(((unsigned)row[l] >> s) & mask);
    }
}

// ---- quantize + pack ---------------------------------------------------------------------------------
// One code row: q = clip(rint((x - m) / d), 0, qmax) with d, m per column (bl == 1) or per group of bl.
static inline void code_row(const float* x, long L, long bl, const float* d, const float* m, float qmax,
                            unsigned char* c) {
    if (bl == 1) {
        for (long l = 0; l < L; ++l) {
            float t = ((float)x[l] - m[l]) / d[l];
            t = __builtin_rintf(t);
            t = t < 0.0f ? 0.0f : t;
            t = t > qmax ? qmax : t;
            c[l] = (unsigned char)(int)t;
        }
        return;
    }
    for (long j = 0; j < L / bl; ++j) {
        const float dj = d[j], mj = m[j];
        const float* xj = x + j * bl;
        unsigned char* cj = c + j * bl;
        for (long l = 0; l < bl; ++l) {
            float t = ((float)xj[l] - mj) / dj;
            t = __builtin_rintf(t);
            t = t < 0.0f ? 0.0f : t;
            t = t > qmax ? qmax : t;
            cj[l] = (unsigned char)(int)t;
        }
    }
}

static inline void pack_tile(unsigned char* const* c, int bits, long L, unsigned char* out, long out_stride) {
    if (bits == 8) {
        for (long l = 0; l < L; ++l) out[l] = c[0][l];
    } else if (bits == 4) {
        for (long l = 0; l < L; ++l) out[l] = (unsigned char)(c[0][l] | (c[1][l] << 4));
    } else if (bits == 2) {
        for (long l = 0; l < L; ++l)
            out[l] = (unsigned char)(c[0][l] | (c[1][l] << 2) | (c[2][l] << 4) | (c[3][l] << 6));
    } else {  // 3-bit: the 24-bit little-endian word of 8 codes over 3 rows
        unsigned char* o1 = out + out_stride;
        unsigned char* o2 = o1 + out_stride;
        for (long l = 0; l < L; ++l) {
            unsigned w = (unsigned)c[0][l] | ((unsigned)c[1][l] << 3) | ((unsigned)c[2][l] << 6) |
                         ((unsigned)c[3][l] << 9) | ((unsigned)c[4][l] << 12) | ((unsigned)c[5][l] << 15) |
                         ((unsigned)c[6][l] << 18) | ((unsigned)c[7][l] << 21);
            out[l] = (unsigned char)(w & 255u);
            o1[l] = (unsigned char)((w >> 8) & 255u);
            o2[l] = (unsigned char)(w >> 16);
        }
    }
}

// Min/max of one input row into per-group accumulators (bl == 1: per column).
static inline void minmax_row(const float* x, long L, long bl, float* mn, float* mx) {
    if (bl == 1) {
        for (long l = 0; l < L; ++l) {
            float v = (float)x[l];
            mn[l] = v < mn[l] ? v : mn[l];
            mx[l] = v > mx[l] ? v : mx[l];
        }
        return;
    }
    for (long j = 0; j < L / bl; ++j) {
        const float* xj = x + j * bl;
        float a = mn[j], b = mx[j];
        for (long l = 0; l < bl; ++l) {
            float v = (float)xj[l];
            a = v < a ? v : a;
            b = v > b ? v : b;
        }
        mn[j] = a;
        mx[j] = b;
    }
}


#ifdef KV_IMPL_AVX2
// ---- AVX2 + F16C paths of the common layouts (L % 8 == 0; bl == 1 or bl % 8 == 0) ----------------------
// The same float32 operations as the portable loops (sub, IEEE div, round-half-even, clamp; mul then add),
// 8 columns at a time, codes shifted into their tile word in registers (no code rows, no separate pack).
static inline __m256 ld8(const _Float16* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
static inline void st8(_Float16* p, __m256 v) {
    _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
static inline void st8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
static inline float ld1(const _Float16* p) { return (float)*p; }
static inline float ld1(const float* p) { return *p; }

static inline void store_bytes8(unsigned char* dst, __m256i w) {  // low byte of each lane (values < 256)
    __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storel_epi64((__m128i*)dst, _mm_packus_epi16(p16, p16));
}
static inline __m256i load_bytes8(const unsigned char* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
}
static inline float hmin8(__m256 v) {
    __m128 x = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_min_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_min_ss(x, _mm_shuffle_ps(x, x, 1)));
}
static inline float hmax8(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
}

// min/max of rows [t0, t1) of heads [h0, h0 + bh) into chunk accumulators (param row pr at (pr - p0) * G)
template <typename TX>
static void minmax_avx2(const QArgs& a, long b, long h0, long t0, long t1, long p0, float* mn, float* mx) {
    const long L = a.x.n[3], bt = a.bt, bl = a.bl, G = L / bl;
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
                    const TX* x = (const TX*)a.x.at(b, h, t, 0);
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
        }
    }
}

// codes of rows [t0, t1) (tile position t + off) packed into a.out; dv / mv: divisor and min per param row.
// BITS and the param layout (PERCOL: bl == 1) are compile-time, so a tile's P tokens unroll with immediate
// shifts; tiles cut by the chunk edges (an offset, the last partial tile) skip their missing tokens (code 0).
template <typename TX, int BITS, bool PERCOL>
static void codes_avx2_t(const QArgs& a, long b, long h, long t0, long t1, long p0, const float* dv,
                         const float* mv) {
    constexpr long P = BITS == 2 ? 4 : BITS == 3 ? 8 : BITS == 4 ? 2 : 1;
    constexpr int SH = BITS == 3 ? 3 : BITS;
    const long L = a.x.n[3], bt = a.bt, bl = a.bl, G = L / bl, R = tile_rows(BITS);
    const long off = a.offset, v0 = t0 + off, v1 = t1 + off;
    const __m256 zero = _mm256_setzero_ps(), qmax = _mm256_set1_ps((float)((1 << BITS) - 1));
    const TX* xr[P];
    const float* dr[P];
    const float* mr[P];
    for (long tile = v0 / P; tile * P < v1; ++tile) {
        unsigned char* o = (unsigned char*)a.out.at(b, h, tile * R, 0);
        bool full = true;
        for (long i = 0; i < P; ++i) {  // row pointers and param rows of the tile's tokens, once per tile
            const long t = tile * P + i - off;
            const bool in = t >= t0 && t < t1;
            full = full && in;
            xr[i] = in ? (const TX*)a.x.at(b, h, t, 0) : nullptr;
            dr[i] = dv + (in ? (t / bt - p0) * G : 0);
            mr[i] = mv + (in ? (t / bt - p0) * G : 0);
        }
        for (long c = 0; c < L; c += 8) {
            __m256i acc = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (long i = 0; i < P; ++i) {
                if (!full && !xr[i]) continue;
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
                       const float* mv) {
    const bool pc = a.bl == 1;
    switch (a.bits) {
        case 2: pc ? codes_avx2_t<TX, 2, true>(a, b, h, t0, t1, p0, dv, mv)
                   : codes_avx2_t<TX, 2, false>(a, b, h, t0, t1, p0, dv, mv); break;
        case 3: pc ? codes_avx2_t<TX, 3, true>(a, b, h, t0, t1, p0, dv, mv)
                   : codes_avx2_t<TX, 3, false>(a, b, h, t0, t1, p0, dv, mv); break;
        case 4: pc ? codes_avx2_t<TX, 4, true>(a, b, h, t0, t1, p0, dv, mv)
                   : codes_avx2_t<TX, 4, false>(a, b, h, t0, t1, p0, dv, mv); break;
        default: pc ? codes_avx2_t<TX, 8, true>(a, b, h, t0, t1, p0, dv, mv)
                    : codes_avx2_t<TX, 8, false>(a, b, h, t0, t1, p0, dv, mv); break;
    }
}

template <typename TP, typename TO, int BITS, bool PERCOL>
static void dequantize_avx2_t(const DArgs& a) {
    constexpr long P = BITS == 2 ? 4 : BITS == 3 ? 8 : BITS == 4 ? 2 : 1;
    const long B = a.out.n[0], H = a.out.n[1], T = a.out.n[2], L = a.out.n[3];
    const long bt = a.bt, bl = a.bl, R = tile_rows(BITS);
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    const TP* dp[P];
    const TP* mp[P];
    TO* op[P];
    for (long b = 0; b < B; ++b)
        for (long h = 0; h < H; ++h)
            for (long tile = 0; tile * P < T; ++tile) {
                const unsigned char* row = (const unsigned char*)a.packed.at(b, h, tile * R, 0);
                const long n = T - tile * P < P ? T - tile * P : P;
                for (long i = 0; i < n; ++i) {
                    const long t = tile * P + i, pr = t / bt;
                    dp[i] = (const TP*)a.delta.at(b, h / a.bh, pr, 0);
                    mp[i] = (const TP*)a.mn.at(b, h / a.bh, pr, 0);
                    op[i] = (TO*)a.out.at(b, h, t, 0);
                }
                __m256 dg[P], mg[P];  // per-token groups: the group's params, broadcast once per group
                for (long c = 0; c < L; c += 8) {
                    if (!PERCOL && c % bl == 0)
                        for (long i = 0; i < n; ++i) {
                            dg[i] = _mm256_set1_ps(ld1(dp[i] + c / bl));
                            mg[i] = _mm256_set1_ps(ld1(mp[i] + c / bl));
                        }
                    __m256i w = load_bytes8(row + c);
                    if (BITS == 3)
                        w = _mm256_or_si256(w, _mm256_or_si256(
                            _mm256_slli_epi32(load_bytes8(row + a.packed.s[2] + c), 8),
                            _mm256_slli_epi32(load_bytes8(row + 2 * a.packed.s[2] + c), 16)));
#pragma GCC unroll 8
                    for (long i = 0; i < P; ++i) {
                        if (i >= n) break;
                        const __m256 d = PERCOL ? ld8(dp[i] + c) : dg[i];
                        const __m256 m = PERCOL ? ld8(mp[i] + c) : mg[i];
                        const __m256i q = BITS == 8 ? w : _mm256_and_si256(_mm256_srli_epi32(w, BITS * (int)i), mask);
                        const __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), d), m);
                        st8(op[i] + c, v);
                    }
                }
            }
}

template <typename TP, typename TO, int BITS>
static void dequantize_avx2_b(const DArgs& a) {
    if (a.bl == 1) dequantize_avx2_t<TP, TO, BITS, true>(a);
    else dequantize_avx2_t<TP, TO, BITS, false>(a);
}

template <typename TP, typename TO>
static void dequantize_avx2(const DArgs& a) {
    switch (a.bits) {
        case 2: dequantize_avx2_b<TP, TO, 2>(a); break;
        case 3: dequantize_avx2_b<TP, TO, 3>(a); break;
        case 4: dequantize_avx2_b<TP, TO, 4>(a); break;
        default: dequantize_avx2_b<TP, TO, 8>(a); break;
    }
}
#endif

template <typename TX, typename TP>
static void quantize_pack_t(const QArgs& a) {
    const long B = a.x.n[0], H = a.x.n[1], T = a.x.n[2], L = a.x.n[3];
    const long bh = a.bh, bt = a.bt, bl = a.bl, P = tile_tokens(a.bits), R = tile_rows(a.bits);
    const long G = L / bl;  // param columns
    const float qmax = (float)((1 << a.bits) - 1);
    const long off = a.offset;
    const bool fast = L % 8 == 0 && (bl == 1 || bl % 8 == 0);
    (void)fast;
    // token span of one chunk: whole param rows and whole tiles (one chunk when an offset is given)
    long span = T;
    if (!off && bt < T) {
        long g = bt, p = P;
        while (p) { long r = g % p; g = p; p = r; }  // gcd
        span = bt / g * P;
        while (span < 64 && span < T) span *= 2;
    }
    const long prow_max = (span + bt - 1) / bt + 1;
    float* mn = new float[prow_max * G];
    float* mx = new float[prow_max * G];
    unsigned char* codes = new unsigned char[8 * L];
    float* xf = new float[L];
    unsigned char* cptr[8];
    for (int i = 0; i < 8; ++i) cptr[i] = codes + i * L;
    for (long b = 0; b < B; ++b) {
        for (long h0 = 0; h0 < H; h0 += bh) {
            for (long t0 = 0; t0 < T; t0 += span) {
                const long t1 = t0 + span < T ? t0 + span : T;
                const long p0 = t0 / bt, p1 = (t1 - 1) / bt + 1;  // param rows of this chunk
                for (long k = 0; k < (p1 - p0) * G; ++k) { mn[k] = __builtin_inff(); mx[k] = -__builtin_inff(); }
#ifdef KV_IMPL_AVX2
                if (fast) minmax_avx2<TX>(a, b, h0, t0, t1, p0, mn, mx); else
#endif
                for (long h = h0; h < h0 + bh; ++h)
                    for (long t = t0; t < t1; ++t) {
                        row_to_f32((const TX*)a.x.at(b, h, t, 0), xf, L);
                        minmax_row(xf, L, bl, mn + (t / bt - p0) * G, mx + (t / bt - p0) * G);
                    }
                // params: delta = (max - min) / qmax in float32, stored in TP; quantize with the stored values
                for (long pr = p0; pr < p1; ++pr) {
                    TP* dp = (TP*)a.delta.at(b, h0 / bh, pr, 0);
                    TP* mp = (TP*)a.mn.at(b, h0 / bh, pr, 0);
                    float* mnr = mn + (pr - p0) * G;
                    float* mxr = mx + (pr - p0) * G;
                    for (long j = 0; j < G; ++j) {
                        TP d = (TP)((mxr[j] - mnr[j]) / qmax);
                        TP m = (TP)mnr[j];
                        dp[j] = d;
                        mp[j] = m;
                        float d32 = (float)d;
                        mxr[j] = d32 == 0.0f ? 1.0f : d32;  // mx now holds the divisor
                        mnr[j] = (float)m;
                    }
                }
                // codes, packed in token tiles (virtual token index t + off)
                const long v0 = t0 + off, v1 = t1 + off;
#ifdef KV_IMPL_AVX2
                if (fast) {
                    for (long h = h0; h < h0 + bh; ++h) codes_avx2<TX>(a, b, h, t0, t1, p0, mx, mn);
                    continue;
                }
#endif
                for (long h = h0; h < h0 + bh; ++h) {
                    for (long tile = v0 / P; tile * P < v1; ++tile) {
                        for (long i = 0; i < P; ++i) {
                            const long t = tile * P + i - off;
                            if (t < t0 || t >= t1) {
                                for (long l = 0; l < L; ++l) cptr[i][l] = 0;
                                continue;
                            }
                            const long pr = t / bt - p0;
                            row_to_f32((const TX*)a.x.at(b, h, t, 0), xf, L);
                            code_row(xf, L, bl, mx + pr * G, mn + pr * G, qmax, cptr[i]);
                        }
                        pack_tile(cptr, a.bits, L, (unsigned char*)a.out.at(b, h, tile * R, 0), a.out.s[2]);
                    }
                }
            }
        }
    }
    delete[] mn;
    delete[] mx;
    delete[] codes;
    delete[] xf;
}

// ---- unpack + dequantize -----------------------------------------------------------------------------
// x = (float)q * d + m: a float32 multiply, then a float32 add (no FMA), then one conversion to TO.
template <typename TP, typename TO>
static void dequantize_t(const DArgs& a) {
#ifdef KV_IMPL_AVX2
    if (a.out.n[3] % 8 == 0 && (a.bl == 1 || a.bl % 8 == 0)) {
        dequantize_avx2<TP, TO>(a);
        return;
    }
#endif
    const long B = a.out.n[0], H = a.out.n[1], T = a.out.n[2], L = a.out.n[3];
    const long bh = a.bh, bt = a.bt, bl = a.bl, P = tile_tokens(a.bits), R = tile_rows(a.bits);
    const long G = L / bl;
    float* cf = new float[L];
    float* d32 = new float[G];
    float* m32 = new float[G];
    long cached = -1;
    for (long b = 0; b < B; ++b)
        for (long h = 0; h < H; ++h) {
            cached = -1;
            for (long t = 0; t < T; ++t) {
                const long pr = t / bt;
                if (pr != cached) {
                    row_to_f32((const TP*)a.delta.at(b, h / bh, pr, 0), d32, G);
                    row_to_f32((const TP*)a.mn.at(b, h / bh, pr, 0), m32, G);
                    cached = pr;
                }
                const unsigned char* row = (const unsigned char*)a.packed.at(b, h, (t / P) * R, 0);
                unpack_row(row, a.packed.s[2], a.bits, (int)(t % P), L, cf);
                if (bl == 1) {
                    for (long l = 0; l < L; ++l) {
                        float v = cf[l] * d32[l];
                        cf[l] = v + m32[l];
                    }
                } else {
                    for (long j = 0; j < G; ++j) {
                        const float dj = d32[j], mj = m32[j];
                        float* c = cf + j * bl;
                        for (long l = 0; l < bl; ++l) {
                            float v = c[l] * dj;
                            c[l] = v + mj;
                        }
                    }
                }
                row_from_f32(cf, (TO*)a.out.at(b, h, t, 0), L);
            }
        }
    delete[] cf;
    delete[] d32;
    delete[] m32;
}

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

static inline void resid_row(const Side& s, long b, long h, long r, long D, float* dst) {
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
        c[i] = _mm256_cvtepi32_ps(BITS == 8 ? w : _mm256_and_si256(_mm256_srli_epi32(w, BITS * (int)i), mask));
}

// s[r][n] = c0[r] + qf[r] . codes_n for the whole tiles of tokens [n0, n1) of a per-channel K group
template <int BITS>
static void k_scores_tiles(const Side& K, long b, long h, long n0, long n1, long D, long rep, long N,
                           const float* qf, const float* c0, float* s) {
    constexpr long P = BITS == 2 ? 4 : BITS == 4 ? 2 : 1;
    constexpr long RB = P >= 4 ? 2 : 4;
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
template <int BITS, bool PT>
static void v_tiles(const Side& V, long b, long h, long n0, long n1, long D, long rep, long N, const float* s,
                    float* acc, float* sums, long ss) {
    constexpr long P = BITS == 2 ? 4 : BITS == 4 ? 2 : 1;
    float w[64 * 4];
    for (long n = n0; n < n1; n += P) {
        for (long i = 0; i < P; ++i) {
            float dj = 1.0f, mj = 1.0f;
            if (PT) side_params(V, b, h, n + i, 0, &dj, &mj);
            for (long r = 0; r < rep; ++r) {
                const float p = s[r * N + n + i];
                w[r * P + i] = PT ? p * dj : p;
                sums[r * ss] += PT ? p * mj : p;
            }
        }
        const unsigned char* row = V.codes + b * V.cs[0] + h * V.cs[1] + (n / P) * V.cs[2];
        for (long d = 0; d < D; d += 8) {
            __m256 c[P];
            tile_codes<BITS>(load_bytes8(row + d), c);
            for (long r = 0; r < rep; ++r) {
                __m256 a = _mm256_loadu_ps(acc + r * D + d);
#pragma GCC unroll 4
                for (long i = 0; i < P; ++i) a = _mm256_fmadd_ps(_mm256_set1_ps(w[r * P + i]), c[i], a);
                _mm256_storeu_ps(acc + r * D + d, a);
            }
        }
    }
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
        for (long n = 0; n < N; ++n) mx = sr[n] > mx ? sr[n] : mx;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (long n = 0; n < N; ++n) {
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

static void quantize_pack(const QArgs& a) {
    if (a.x16) {
        quantize_pack_t<_Float16, _Float16>(a);
    } else {
        quantize_pack_t<float, float>(a);
    }
}

static void dequantize(const DArgs& a) {
    if (a.p16 && a.o16) dequantize_t<_Float16, _Float16>(a);
    else if (a.p16) dequantize_t<_Float16, float>(a);
    else if (a.o16) dequantize_t<float, _Float16>(a);
    else dequantize_t<float, float>(a);
}
