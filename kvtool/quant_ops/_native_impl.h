// Hand-written kernels of kvtool's native quant_ops (no library offers these: 3-bit token-tile packing,
// eq. (2) bit-identical to kvtool.quant_ops.affine, and decode attention straight from the packed codes).
//
// The quantizers (eq. (2) quantize + pack, unpack + dequantize); the attention is in _native_attention.h.
// This file is included twice by _native.cpp, inside two namespaces: once compiled for the baseline ISA and
// once under `#pragma GCC target("avx2,fma,f16c")` (chosen at run time by cpuid). It must not include headers.
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

// Params of n groups from their min / max: delta = (max - min) / qmax in float32 stored as TP (dp), the min
// stored as TP (mp); then mx holds the divisor (the stored delta as float32, 1 where it is 0), mn the stored min.
template <typename TP>
static inline void params_run(float* mn, float* mx, long n, float qmax, TP* dp, TP* mp) {
    for (long j = 0; j < n; ++j) {
        TP d = (TP)((mx[j] - mn[j]) / qmax);
        TP m = (TP)mn[j];
        dp[j] = d;
        mp[j] = m;
        float d32 = (float)d;
        mx[j] = d32 == 0.0f ? 1.0f : d32;
        mn[j] = (float)m;
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

#include "_native_quantize_avx2.h"  // the AVX2 quantize + pack kernels

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
    float* rc = new float[prow_max * G];  // the AVX2 code's reciprocals of the divisors
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
                // params: delta = (max - min) / qmax in float32, stored in TP; quantize with the stored values.
                // One run over the chunk's param rows where they are adjacent in delta and mn (per-token groups)
                const bool run = a.delta.s[2] == G && a.mn.s[2] == G;
                for (long pr = p0; pr < p1; pr = run ? p1 : pr + 1) {
                    const long n = (run ? p1 - pr : 1) * G, k = (pr - p0) * G;
                    TP* dp = (TP*)a.delta.at(b, h0 / bh, pr, 0);
                    TP* mp = (TP*)a.mn.at(b, h0 / bh, pr, 0);
#ifdef KV_IMPL_AVX2
                    if (fast) { params_avx2(mn + k, mx + k, rc + k, n, qmax, dp, mp); continue; }
#endif
                    params_run(mn + k, mx + k, n, qmax, dp, mp);
                }
                // codes, packed in token tiles (virtual token index t + off)
                const long v0 = t0 + off, v1 = t1 + off;
#ifdef KV_IMPL_AVX2
                if (fast) {
                    // the next chunk's rows are prefetched while this one is coded (its min/max pass then reads
                    // them from cache: the memory reads overlap the arithmetic)
                    Next nx{b, h0, t1, 0};
                    if (nx.t0 >= T) { nx.t0 = 0; nx.h0 += bh; if (nx.h0 >= H) { nx.h0 = 0; ++nx.b; } }
                    nx.t1 = nx.b < B ? (nx.t0 + span < T ? nx.t0 + span : T) : 0;
                    for (long h = h0; h < h0 + bh; ++h)
                        codes_avx2<TX>(a, b, h, t0, t1, p0, mx, mn, rc, nx, nx.h0 - h0 + h);
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
    delete[] rc;
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
