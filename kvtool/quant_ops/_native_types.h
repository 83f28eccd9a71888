// The kernels' argument types (array views, the quantizers' and the attention's arguments, one side of a store)
// and the tile sizes of the token-tile packing, shared by kvtool/quant_ops/_native.cpp (the Python extension) and
// kvtool/runtime/engines/_ov_packed_op.cpp (the OpenVINO extension op): both include this inside an anonymous
// namespace before _native_impl.h / _native_attention.h. Must not include headers.

struct View4 {
    char* p = nullptr;
    long n[4] = {0, 0, 0, 0};
    long s[4] = {0, 0, 0, 0};  // strides in elements
    int esz = 1;
    inline char* at(long a, long b, long c, long d) const {
        return p + (a * s[0] + b * s[1] + c * s[2] + d * s[3]) * esz;
    }
};

struct QArgs {
    View4 x, out, delta, mn;
    long bh, bt, bl, offset;
    int bits, x16;
};

struct DArgs {
    View4 packed, delta, mn, out;
    long bh, bt, bl;
    int bits, p16, o16;
};

struct SegEntry {
    long long d0, d1, base;
};

struct Side {
    int mode = 2;  // 0 per-channel groups of g tokens, 1 per-token segments, 2 no quantized tokens
    int bits = 2, p16 = 1, r16 = 1;
    long nq = 0, g = 1;
    const unsigned char* codes = nullptr;
    long cs[3] = {0, 0, 0};  // codes strides (bytes) over batch, head, row
    const void* delta = nullptr;
    const void* mn = nullptr;
    long pstride_b = 0, pstride_h = 0, pstride_n = 0;
    const SegEntry* seg = nullptr;
    const long long* nseg = nullptr;
    long nseg_max = 0;
    const void* resid = nullptr;
    long rs[3] = {0, 0, 0};  // residual strides (elements) over batch, head, token
    long nres = 0;           // residual tokens; tokens after them are the caller's extra exact tokens
    const void* extra = nullptr;
    long xs[3] = {0, 0, 0};  // extra tokens' strides (elements) over batch, head, token
    int x16 = 0;
};

struct AArgs {
    const float* q;
    float* out;
    long B, Hq, H, rep, D, N;
    float scale;
    Side k, v;
};

inline long tile_tokens(int bits) { return bits == 2 ? 4 : bits == 3 ? 8 : bits == 4 ? 2 : 1; }
inline long tile_rows(int bits) { return bits == 3 ? 3 : 1; }
