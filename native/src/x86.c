/* x86.c: AVX2 and AVX-512 VNNI variants. Each function carries its ISA in a target attribute,
 * so this file builds with the baseline x86-64 flags and dispatch.c runs a function only on a
 * CPU (and OS) that supports it. Loops work on whole 32-value blocks and end in ref.c's scalar
 * code for a partial block. */
#if defined(__x86_64__) || defined(_M_X64)

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "kernels.h"
#include "x86_sums.h"

#define AVX2 __attribute__((target("avx2,f16c")))
#define AVX512VNNI __attribute__((target("avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
/* the one-row kernels, inlined into their many-row loops (ROWS_Q4, ROWS_Q8): a call per row, with its
 * frame and its reloaded constants, cost decode ~13% (docs/performance.md, "Measured and kept") */
#define INLINE inline __attribute__((always_inline))
/* Decode streams each matrix from memory once per token, and the row kernels did not overlap their
 * arithmetic with those loads: each row's codes, scales and mins are asked for PREFETCH_ROWS rows ahead
 * (the rows after a unit's are usually the same thread's next unit, claimed from the front of its
 * share). 3 to 12 rows ahead measured the same (docs/performance.md, "Measured and kept"). */
#define PREFETCH_ROWS 6
/* Row `row` of codes, scales and mins (NULL: none) into L1. The addresses are integers: past the
 * matrix's last row they point nowhere, which a prefetch ignores (and pointer arithmetic may not do). */
static inline void prefetch_row(const uint8_t *codes, size_t row_bytes, const el_half *scales, const el_half *mins,
                                size_t n_wblocks, size_t row) {
    uintptr_t c = (uintptr_t)codes + row * row_bytes, half_row = n_wblocks * sizeof(el_half);
    for (size_t b = 0; b < row_bytes; b += 64) _mm_prefetch((const char *)(c + b), _MM_HINT_T0);
    _mm_prefetch((const char *)((uintptr_t)scales + row * half_row), _MM_HINT_T0);
    if (mins) _mm_prefetch((const char *)((uintptr_t)mins + row * half_row), _MM_HINT_T0);
}

/* Rows of a matrix against one token, each y exactly its one-row kernel's. Macros, not a function
 * taking the row kernel as a pointer: GCC inlines an always_inline kernel only into a direct call, and a
 * per-row call is what the inlining above removed. */
#define ROWS_Q4(NAME, ROW, TARGET)                                                                            \
    static TARGET void NAME(float *y, int32_t n_rows, int32_t format, const uint8_t *codes, size_t row_bytes,  \
                            const el_half *scales, const el_half *mins, size_t n_wblocks, const int8_t *quads,  \
                            const float *xd, const int32_t *xsum, int32_t nb) {                                \
        for (int32_t i = 0; i < n_rows; i++) {                                                                \
            prefetch_row(codes, row_bytes, scales, mins, n_wblocks, (size_t)i + PREFETCH_ROWS);               \
            y[i] = ROW(format, codes + (size_t)i * row_bytes, scales + (size_t)i * n_wblocks,                 \
                       mins ? mins + (size_t)i * n_wblocks : NULL, quads, xd, xsum, nb);                      \
        }                                                                                                     \
    }
#define ROWS_Q8(NAME, ROW, TARGET)                                                                            \
    static TARGET void NAME(float *y, int32_t n_rows, const uint8_t *codes, size_t row_bytes,                  \
                            const el_half *scales, size_t n_wblocks, const el_block_q16a *x, const float *xd,   \
                            const int32_t *xsum, int32_t nb) {                                                \
        for (int32_t i = 0; i < n_rows; i++) {                                                                \
            prefetch_row(codes, row_bytes, scales, NULL, n_wblocks, (size_t)i + PREFETCH_ROWS);               \
            y[i] = ROW(codes + (size_t)i * row_bytes, scales + (size_t)i * n_wblocks, x, xd, xsum, nb);        \
        }                                                                                                     \
    }

/* ---- helpers ------------------------------------------------------------------------------ */

/* lane k = the sum of the 8 lanes of p[k], for k = 0..7 (one reduction tree for 8 blocks). */
static inline AVX2 __m256i hsum8_vec(const __m256i p[8]) {
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    /* a = [sums of lanes 0-3 of p0..p3 | lanes 4-7 of p0..p3], b the same for p4..p7 */
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

static inline AVX2 void hsum8_i32x8(int32_t *out, const __m256i p[8]) {
    _mm256_storeu_si256((__m256i *)out, hsum8_vec(p));
}

/* Four vectors of a pair of blocks each (block 2k in lanes 0-3 of p[k], block 2k+1 in lanes 4-7)
 * -> the eight block sums in order. */
static inline AVX2 __m256i hsum_pairs(const __m256i p[4]) {
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    return _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); /* [b0 b2 b4 b6 | b1 b3 b5 b7] */
}

static inline AVX2 float hsum_f32x8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline AVX2 float hmax_f32x8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 bytes of packed nibbles -> the block's 32 codes in order (byte k = code 2k | code 2k+1 << 4). */
static inline AVX2 __m256i unpack_q4(const uint8_t *codes16) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128((const __m128i *)codes16);
    __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
    return _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
}

/* exp(x) for float32 lanes (Cephes' expf: range reduction by ln 2 and a degree-5 polynomial,
 * ~2 ulp). NaN stays NaN: the clamps put x second, which min/max return when it is NaN. */
static inline AVX2 __m256 exp_f32x8(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.3365447f), _mm256_min_ps(_mm256_set1_ps(88.3762626f), x));
    __m256 fx = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                              _mm256_set1_ps(0.5f)));
    x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
    x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_add_ps(_mm256_mul_ps(y, _mm256_mul_ps(x, x)), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* ---- AVX2 ------------------------------------------------------------------------------------ */

/* roundf: round half away from zero, as trunc + (|frac| >= 0.5 ? copysign(1, s) : 0) (the
 * hardware's nearest rounding goes to even), then clamped to [-127, 127]. */
static inline AVX2 __m256 round_q_avx2(__m256 s) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256 t = _mm256_round_ps(s, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m256 frac = _mm256_andnot_ps(sign_bit, _mm256_sub_ps(s, t));
    __m256 away = _mm256_or_ps(_mm256_and_ps(s, sign_bit), _mm256_set1_ps(1.0f)); /* copysign(1, s) */
    __m256 r = _mm256_add_ps(t, _mm256_and_ps(_mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ), away));
    return _mm256_max_ps(_mm256_set1_ps(-127.0f), _mm256_min_ps(_mm256_set1_ps(127.0f), r));
}

/* four vectors of eight int32 in [-127, 127] -> 32 int8 in order (the packs interleave 128-bit
 * lanes; the permute puts the values back) */
static inline AVX2 void store_q32(int8_t *out, const __m256i q[4]) {
    __m256i p16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    p16 = _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)out, p16);
}

/* Same arithmetic as el_quantize_block_ref: IEEE division, the same roundings and clamps. */
static AVX2 void quantize_q16a_avx2(el_block_q16a *out, const float *x, int32_t n) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    int32_t i = 0;
    for (; i + EL_QBLOCK <= n; i += EL_QBLOCK, out++) {
        __m256 v[4], vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(x + i + 8 * k);
            __m256 a = _mm256_andnot_ps(sign_bit, v[k]);
            vmax = _mm256_max_ps(vmax, a);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, _mm256_set1_ps(FLT_MAX), _CMP_NLE_UQ));
        }
        if (_mm256_movemask_ps(bad)) {
            el_quantize_block_ref(out, x + i, EL_QBLOCK); /* NaN or inf: the ref's NaN block */
            continue;
        }
        float c = hmax_f32x8(vmax) / 127.0f;
        out->d = c / 256.0f;
        if (c == 0.0f) {
            _mm256_storeu_si256((__m256i *)out->qh, _mm256_setzero_si256());
            _mm256_storeu_si256((__m256i *)out->ql, _mm256_setzero_si256());
            out->sum = 0;
            continue;
        }
        const __m256 vc = _mm256_set1_ps(c), v256 = _mm256_set1_ps(256.0f);
        __m256i qh[4], ql[4], sum = _mm256_setzero_si256();
        for (int k = 0; k < 4; k++) {
            __m256 s = _mm256_div_ps(v[k], vc);
            __m256 h = round_q_avx2(s);
            __m256 l = round_q_avx2(_mm256_mul_ps(_mm256_sub_ps(s, h), v256));
            qh[k] = _mm256_cvtps_epi32(h);
            ql[k] = _mm256_cvtps_epi32(l);
            sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_slli_epi32(qh[k], 8), ql[k]));
        }
        out->sum = hsum_i32x8(sum);
        store_q32(out->qh, qh);
        store_q32(out->ql, ql);
    }
    if (i < n) el_quantize_block_ref(out, x + i, n - i);
}

/* int16 pair sums of the high plane and the low plane -> int32 lanes of 256 * high + low */
static inline AVX2 __m256i planes_i32(__m256i hi16, __m256i lo16) {
    return _mm256_add_epi32(_mm256_madd_epi16(hi16, _mm256_set1_epi16(256)), _mm256_madd_epi16(lo16, _mm256_set1_epi16(1)));
}

/* unsigned codes 0..15 times signed q: maddubs pairs stay below 2*15*127, no saturation */
static inline AVX2 __m256i dot_q4_avx2(const uint8_t *codes16, const el_block_q16a *x) {
    __m256i c = unpack_q4(codes16);
    __m256i qh = _mm256_loadu_si256((const __m256i *)x->qh), ql = _mm256_loadu_si256((const __m256i *)x->ql);
    return planes_i32(_mm256_maddubs_epi16(c, qh), _mm256_maddubs_epi16(c, ql));
}

static AVX2 void isums_q4_avx2(int32_t *isum, const uint8_t *codes, const el_block_q16a *x, int32_t nb) {
    int32_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        __m256i p[8];
        for (int k = 0; k < 8; k++) p[k] = dot_q4_avx2(codes + 16 * (j + k), x + j + k);
        hsum8_i32x8(isum + j, p);
    }
    for (; j < nb; j++) isum[j] = hsum_i32x8(dot_q4_avx2(codes + 16 * j, x + j));
}

/* (code - 128) is signed: maddubs takes |w| (unsigned, up to 128) times q with w's sign, so pairs
 * stay below 2*128*127 = 32512, no saturation */
static inline AVX2 __m256i dot_q8_avx2(const uint8_t *codes32, const el_block_q16a *x) {
    __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)codes32), _mm256_set1_epi8((char)0x80));
    __m256i aw = _mm256_sign_epi8(w, w);
    __m256i qh = _mm256_loadu_si256((const __m256i *)x->qh), ql = _mm256_loadu_si256((const __m256i *)x->ql);
    return planes_i32(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(qh, w)), _mm256_maddubs_epi16(aw, _mm256_sign_epi8(ql, w)));
}

static AVX2 void isums_q8_avx2(int32_t *isum, const uint8_t *codes, const el_block_q16a *x, int32_t nb) {
    int32_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        __m256i p[8];
        for (int k = 0; k < 8; k++) p[k] = dot_q8_avx2(codes + 32 * (j + k), x + j + k);
        hsum8_i32x8(isum + j, p);
    }
    for (; j < nb; j++) isum[j] = hsum_i32x8(dot_q8_avx2(codes + 32 * j, x + j));
}

/* n <= 8 float16 scales as float32 (vcvtph2ps: exact, like el_half_to_float), lanes past n +0.0.
 * h is block j of its row. A row's last group (n < 8) is loaded as the eight halves that END at it,
 * inside the row when j + n >= 8, and shifted into place: copying it to the stack instead would make
 * the vector load wait on the copy's narrow stores at every row's end (it halved the prefill). */
static inline AVX2 __m256 halves8(const el_half *h, int32_t n, int32_t j) {
    if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
    if (j + n >= 8) {
        __m256 last8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + n - 8)));
        return _mm256_and_ps(_mm256_permutevar8x32_ps(last8, _mm256_add_epi32(lane, _mm256_set1_epi32(8 - n))), mask);
    }
    el_half part[8] = {0}; /* a row of fewer than 8 blocks (small test models) */
    memcpy(part, h, sizeof(el_half) * (size_t)n);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)part));
}

/* Eight blocks per step, one per lane: the reference's float operations, in its order. */
static AVX2 void combine_avx2(float *lanes, int32_t format, const int32_t *isum, const float *xd, const int32_t *xsum,
                              const el_half *scales, const el_half *mins, int32_t n, int32_t shift) {
    if (shift != 0) { /* blocks of 64 or 128 weights: one scale per 2 or 4 lanes; not a hot path */
        el_combine_ref(lanes, format, isum, xd, xsum, scales, mins, n, shift);
        return;
    }
    __m256 acc = _mm256_loadu_ps(lanes);
    int32_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 d = _mm256_loadu_ps(xd + j);
        __m256i is = _mm256_loadu_si256((const __m256i *)(isum + j));
        __m256 sd = _mm256_mul_ps(halves8(scales + j, 8, j), d);
        __m256 t;
        if (format == EL_INT4_ASYM) {
            __m256 sum = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(xsum + j)));
            t = _mm256_add_ps(_mm256_mul_ps(sd, _mm256_cvtepi32_ps(is)), _mm256_mul_ps(_mm256_mul_ps(halves8(mins + j, 8, j), d), sum));
        } else if (format == EL_INT4_SYM) {
            __m256i sum8 = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(xsum + j)), 3);
            t = _mm256_mul_ps(sd, _mm256_cvtepi32_ps(_mm256_sub_epi32(is, sum8)));
        } else {
            t = _mm256_mul_ps(sd, _mm256_cvtepi32_ps(is));
        }
        acc = _mm256_add_ps(acc, t);
    }
    _mm256_storeu_ps(lanes, acc);
    for (; j < n; j++)
        lanes[j % 8] += el_block_term(format, isum[j], xd[j], xsum[j], el_half_to_float(scales[j]),
                                      mins ? el_half_to_float(mins[j]) : 0.0f);
}

static AVX2 void rms_norm_avx2(float *out, const float *x, const float *weight, int32_t n, float eps) {
    __m256 acc = _mm256_setzero_ps();
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    float ss = hsum_f32x8(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    __m256 vs = _mm256_set1_ps(scale);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs), _mm256_loadu_ps(weight + i)));
    for (; i < n; i++) out[i] = x[i] * scale * weight[i];
}

static AVX2 void rope_avx2(float *out, const float *x, const float *cos_t, const float *sin_t, int32_t n_heads,
                           int32_t head_dim) {
    int32_t half = head_dim / 2;
    for (int32_t h = 0; h < n_heads; h++) {
        const float *xh = x + (size_t)h * head_dim;
        float *oh = out + (size_t)h * head_dim;
        int32_t i = 0;
        for (; i + 8 <= half; i += 8) {
            __m256 x1 = _mm256_loadu_ps(xh + i), x2 = _mm256_loadu_ps(xh + i + half);
            __m256 c = _mm256_loadu_ps(cos_t + i), s = _mm256_loadu_ps(sin_t + i);
            _mm256_storeu_ps(oh + i, _mm256_sub_ps(_mm256_mul_ps(x1, c), _mm256_mul_ps(x2, s)));
            _mm256_storeu_ps(oh + i + half, _mm256_add_ps(_mm256_mul_ps(x2, c), _mm256_mul_ps(x1, s)));
        }
        for (; i < half; i++) {
            float x1 = xh[i], x2 = xh[i + half];
            oh[i] = x1 * cos_t[i] - x2 * sin_t[i];
            oh[i + half] = x2 * cos_t[i] + x1 * sin_t[i];
        }
    }
}

static AVX2 void softmax_avx2(float *out, const float *x, int32_t n) {
    float max = -INFINITY;
    for (int32_t i = 0; i < n; i++) max = x[i] > max ? x[i] : max;
    __m256 vmax = _mm256_set1_ps(max), acc = _mm256_setzero_ps();
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp_f32x8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmax));
        _mm256_storeu_ps(out + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum_f32x8(acc);
    for (; i < n; i++) {
        out[i] = expf(x[i] - max);
        sum += out[i];
    }
    __m256 vsum = _mm256_set1_ps(sum);
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_div_ps(_mm256_loadu_ps(out + i), vsum));
    for (; i < n; i++) out[i] = out[i] / sum;
}

static AVX2 void silu_mul_avx2(float *out, const float *gate, const float *up, int32_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign_bit = _mm256_set1_ps(-0.0f);
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 e = exp_f32x8(_mm256_xor_ps(g, sign_bit));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

static AVX2 void add_avx2(float *out, const float *a, const float *b, int32_t n) {
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    for (; i < n; i++) out[i] = a[i] + b[i];
}

/* ---- fused rows (blocks of 32 weights): block sums, the lanes' terms and their reduction in
 * registers; bit for bit isums + combine + the reduction of api.c ------------------------------- */

/* a row's scales and mins of blocks j .. j+n-1 (n <= 8) as float32, for terms8; mins may be NULL */
typedef struct { __m256 scale, min; } weights8;
static inline AVX2 weights8 row_weights8(const el_half *scales, const el_half *mins, int32_t j, int32_t n) {
    return (weights8){halves8(scales + j, n, j), mins ? halves8(mins + j, n, j) : _mm256_setzero_ps()};
}

/* the eight lanes' terms t_j of edgellm.h for blocks j .. j+7 (w: their scales and mins), lanes at or
 * past n left +0.0 (which leaves a lane unchanged: a lane that starts at +0.0 is never -0.0) */
static inline AVX2 __m256 terms8(int32_t format, __m256i is, weights8 w, const float *xd, const int32_t *xsum,
                                 int32_t n) {
    __m256 d, sc = w.scale, mn = w.min;
    __m256i sum;
    if (n >= 8) {
        d = _mm256_loadu_ps(xd);
        sum = _mm256_loadu_si256((const __m256i *)xsum);
    } else {
        __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        d = _mm256_maskload_ps(xd, mask);
        sum = _mm256_maskload_epi32(xsum, mask);
    }
    __m256 sd = _mm256_mul_ps(sc, d);
    if (format == EL_INT4_ASYM)
        return _mm256_add_ps(_mm256_mul_ps(sd, _mm256_cvtepi32_ps(is)), _mm256_mul_ps(_mm256_mul_ps(mn, d), _mm256_cvtepi32_ps(sum)));
    if (format == EL_INT4_SYM) return _mm256_mul_ps(sd, _mm256_cvtepi32_ps(_mm256_sub_epi32(is, _mm256_slli_epi32(sum, 3))));
    return _mm256_mul_ps(sd, _mm256_cvtepi32_ps(is));
}

/* codes of blocks j, j+1 (32 bytes; 16 zero-extended for a lone last block) -> low and high nibbles */
static inline AVX2 void nibbles2(const uint8_t *codes, int both, __m256i *lo, __m256i *hi) {
    const __m256i m = _mm256_set1_epi8(0x0F);
    __m256i b = both ? _mm256_loadu_si256((const __m256i *)codes)
                     : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)codes));
    *lo = _mm256_and_si256(b, m);
    *hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
}

/* 256 * sum(code * qh) + sum(code * ql) for a pair of blocks (lanes 0-3: block j, 4-7: block j+1);
 * the pair's four planes are 64 bytes apart (half a quad, kernels.h) */
static inline AVX2 __m256i planes_avx2(__m256i lo, __m256i hi, const int8_t *pair) {
    const __m256i *p = (const __m256i *)pair;
    __m256i h16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(p)), _mm256_maddubs_epi16(hi, _mm256_loadu_si256(p + 2)));
    __m256i l16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(p + 4)), _mm256_maddubs_epi16(hi, _mm256_loadu_si256(p + 6)));
    return planes_i32(h16, l16); /* int16 sums below 2 * 2 * 15 * 127: no saturation */
}

static inline AVX2 __m256i pair_avx2(const uint8_t *codes, int both, const int8_t *pair) {
    __m256i lo, hi;
    nibbles2(codes, both, &lo, &hi);
    return planes_avx2(lo, hi, pair);
}

/* rows of 4-bit codes: eight blocks (four pairs) per step, then the last 1..7 blocks */
static INLINE AVX2 float row_q4_avx2(int32_t format, const uint8_t *codes, const el_half *scales, const el_half *mins,
                              const int8_t *quads, const float *xd, const int32_t *xsum, int32_t nb) {
    __m256 acc = _mm256_setzero_ps();
    int32_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        __m256i p[4] = {pair_avx2(codes + 16 * j, 1, el_pair_at(quads, j)),
                        pair_avx2(codes + 16 * j + 32, 1, el_pair_at(quads, j + 2)),
                        pair_avx2(codes + 16 * j + 64, 1, el_pair_at(quads, j + 4)),
                        pair_avx2(codes + 16 * j + 96, 1, el_pair_at(quads, j + 6))};
        acc = _mm256_add_ps(acc, terms8(format, hsum_pairs(p), row_weights8(scales, mins, j, 8), xd + j, xsum + j, 8));
    }
    if (j < nb) {
        int32_t n = nb - j;
        __m256i p[4];
        for (int k = 0; k < 4; k++)
            p[k] = 2 * k < n ? pair_avx2(codes + 16 * (j + 2 * k), 2 * k + 1 < n, el_pair_at(quads, j + 2 * k))
                             : _mm256_setzero_si256();
        acc = _mm256_add_ps(acc, terms8(format, hsum_pairs(p), row_weights8(scales, mins, j, n), xd + j, xsum + j, n));
    }
    return hsum_f32x8(acc); /* ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)), the order of api.c */
}

/* One row against four tokens (prefill): the codes are unpacked once for the four, each token's
 * eight-block groups are reduced and accumulated exactly as row_q4_avx2 does for one, so every y is
 * bit-identical to its. y[t * y_stride] for t = 0..3; the tokens' quads are quad_stride bytes apart,
 * their d and sum x_stride values apart. */
#define UNROLL4 _Pragma("GCC unroll 4")
static AVX2 void row4_q4_avx2(float *y, size_t y_stride, int32_t format, const uint8_t *codes, const el_half *scales,
                              const el_half *mins, const int8_t *quads, size_t quad_stride, const float *xd,
                              const int32_t *xsum, size_t x_stride, int32_t nb) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int32_t j = 0; j < nb; j += 8) {
        int32_t n = nb - j < 8 ? nb - j : 8;
        __m256i p[4][4];
        UNROLL4 for (int k = 0; k < 4; k++) {
            if (2 * k < n) {
                __m256i lo, hi;
                nibbles2(codes + 16 * (j + 2 * k), 2 * k + 1 < n, &lo, &hi);
                UNROLL4 for (int t = 0; t < 4; t++)
                    p[t][k] = planes_avx2(lo, hi, el_pair_at(quads + t * quad_stride, j + 2 * k));
            } else {
                UNROLL4 for (int t = 0; t < 4; t++) p[t][k] = _mm256_setzero_si256();
            }
        }
        weights8 w = row_weights8(scales, mins, j, n);
        UNROLL4 for (int t = 0; t < 4; t++)
            acc[t] = _mm256_add_ps(acc[t], terms8(format, hsum_pairs(p[t]), w, xd + t * x_stride + j,
                                                  xsum + t * x_stride + j, n));
    }
    UNROLL4 for (int t = 0; t < 4; t++) y[t * y_stride] = hsum_f32x8(acc[t]);
}

/* rows of 8-bit codes, in the blocks' natural order: eight blocks per step, then the last 1..7 */
static INLINE AVX2 float row_q8_avx2(const uint8_t *codes, const el_half *scales, const el_block_q16a *x, const float *xd,
                                     const int32_t *xsum, int32_t nb) {
    __m256 acc = _mm256_setzero_ps();
    int32_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        __m256i p[8];
        for (int k = 0; k < 8; k++) p[k] = dot_q8_avx2(codes + 32 * (j + k), x + j + k);
        acc = _mm256_add_ps(acc, terms8(EL_INT8_SYM, hsum8_vec(p), row_weights8(scales, NULL, j, 8), xd + j, xsum + j, 8));
    }
    if (j < nb) {
        const int32_t n = nb - j;
        __m256i p[8];
        for (int k = 0; k < 8; k++) p[k] = k < n ? dot_q8_avx2(codes + 32 * (j + k), x + j + k) : _mm256_setzero_si256();
        acc = _mm256_add_ps(acc, terms8(EL_INT8_SYM, hsum8_vec(p), row_weights8(scales, NULL, j, n), xd + j, xsum + j, n));
    }
    return hsum_f32x8(acc);
}

/* lane k = the sum of the 8 lanes of v[k] (the float twin of hsum8_vec) */
static inline AVX2 __m256 hsum8_f32(const __m256 v[8]) {
    __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* One query head over a chunk of keys. The attention is float math checked against ref to a
 * tolerance, not bit for bit, so it may use FMA (the avx2 variant requires it: dispatch.c). The
 * head_dim is a compile-time constant of each body (64, 128: query and output in registers);
 * other head_dims multiple of 8 take the generic body, the rest ref. */
#define AVX2_FMA __attribute__((target("avx2,fma,f16c")))
#define AVX512_FMA __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
/* eight values of the keys or values at element i: float16 of the cache (`halves`, converted exactly),
 * or float32 converted before (el_kernels.attend_part_f32) */
static INLINE AVX2_FMA __m256 load8(const void *p, size_t i, const int halves) {
    return halves ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const el_half *)p + i)))
                  : _mm256_loadu_ps((const float *)p + i);
}

#define UNROLL8 _Pragma("GCC unroll 8")
#define UNROLL16 _Pragma("GCC unroll 16")
/* head_dim 8 * nv (nv 8 or 16), inlined with constant nv and halves: one body per case */
static INLINE AVX2_FMA void attend_body(float *out, float *max, float *sum, float *scores, const float *q,
                                        const void *keys, const void *values, int32_t n_keys, int32_t stride,
                                        float scale, const int nv, const int halves) {
    __m256 qv[16];
    UNROLL16 for (int i = 0; i < nv; i++) qv[i] = _mm256_loadu_ps(q + 8 * i);
    const __m256 vscale = _mm256_set1_ps(scale);
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int32_t j = 0;
    for (; j + 8 <= n_keys; j += 8) {
        __m256 part[8];
        UNROLL8 for (int k = 0; k < 8; k++) {
            const size_t key = (size_t)(j + k) * stride;
            __m256 acc0 = _mm256_mul_ps(qv[0], load8(keys, key, halves)), acc1 = _mm256_setzero_ps();
            UNROLL16 for (int i = 1; i < nv; i += 2) {
                acc1 = _mm256_fmadd_ps(qv[i], load8(keys, key + 8 * i, halves), acc1);
                if (i + 1 < nv) acc0 = _mm256_fmadd_ps(qv[i + 1], load8(keys, key + 8 * i + 8, halves), acc0);
            }
            part[k] = _mm256_add_ps(acc0, acc1);
        }
        __m256 s8 = _mm256_mul_ps(hsum8_f32(part), vscale);
        vmax = _mm256_max_ps(vmax, s8);
        _mm256_storeu_ps(scores + j, s8);
    }
    float m = hmax_f32x8(vmax);
    for (; j < n_keys; j++) {
        const size_t key = (size_t)j * stride;
        __m256 acc = _mm256_setzero_ps();
        UNROLL16 for (int i = 0; i < nv; i++) acc = _mm256_fmadd_ps(qv[i], load8(keys, key + 8 * i, halves), acc);
        scores[j] = hsum_f32x8(acc) * scale;
        m = scores[j] > m ? scores[j] : m;
    }
    __m256 vm = _mm256_set1_ps(m), vsum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n_keys; j += 8) {
        __m256 e = exp_f32x8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), vm));
        _mm256_storeu_ps(scores + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float l = hsum_f32x8(vsum);
    for (; j < n_keys; j++) {
        scores[j] = expf(scores[j] - m);
        l += scores[j];
    }
    __m256 o[16];
    UNROLL16 for (int i = 0; i < nv; i++) o[i] = _mm256_setzero_ps();
    for (j = 0; j < n_keys; j++) {
        const size_t value = (size_t)j * stride;
        __m256 p = _mm256_set1_ps(scores[j]);
        UNROLL16 for (int i = 0; i < nv; i++) o[i] = _mm256_fmadd_ps(p, load8(values, value + 8 * i, halves), o[i]);
    }
    UNROLL16 for (int i = 0; i < nv; i++) _mm256_storeu_ps(out + 8 * i, o[i]);
    *max = m;
    *sum = l;
}

/* head_dim 64 and 128 through the body, the others through ref (each variant below is this dispatch,
 * compiled for its own instruction set) */
static AVX2_FMA void attend_part_avx2(float *out, float *max, float *sum, float *scores, const float *q,
                                      const el_half *keys, const el_half *values, int32_t n_keys, int32_t d,
                                      int32_t stride, float scale) {
    if (d == 64) attend_body(out, max, sum, scores, q, keys, values, n_keys, stride, scale, 8, 1);
    else if (d == 128) attend_body(out, max, sum, scores, q, keys, values, n_keys, stride, scale, 16, 1);
    else el_attend_part_ref(out, max, sum, scores, q, keys, values, n_keys, d, stride, scale);
}

static AVX2_FMA void attend_part_f32_avx2(float *out, float *max, float *sum, float *scores, const float *q,
                                          const float *keys, const float *values, int32_t n_keys, int32_t d,
                                          int32_t stride, float scale) {
    if (d == 64) attend_body(out, max, sum, scores, q, keys, values, n_keys, stride, scale, 8, 0);
    else if (d == 128) attend_body(out, max, sum, scores, q, keys, values, n_keys, stride, scale, 16, 0);
    else el_attend_part_f32_ref(out, max, sum, scores, q, keys, values, n_keys, d, stride, scale);
}

/* vcvtph2ps: exact, the bits of el_half_to_float */
static AVX2 void to_float_avx2(float *out, const el_half *x, int32_t n) {
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
    for (; i < n; i++) out[i] = el_half_to_float(x[i]);
}

/* el_combine_parts_ref's operations, eight values per vector (the same bits) */
static AVX2 void combine_parts_avx2(float *out, const float *parts, int32_t n_parts, int32_t d) {
    const int32_t stride = d + 2;
    if (d % 8) {
        el_combine_parts_ref(out, parts, n_parts, d);
        return;
    }
    float max = -INFINITY, sum = 0.0f;
    for (int32_t c = 0; c < n_parts; c++) max = parts[c * stride + d] > max ? parts[c * stride + d] : max;
    for (int32_t i = 0; i < d; i += 8) _mm256_storeu_ps(out + i, _mm256_setzero_ps());
    for (int32_t c = 0; c < n_parts; c++) {
        const float *part = parts + (size_t)c * stride;
        float w = expf(part[d] - max);
        sum += part[d + 1] * w;
        const __m256 vw = _mm256_set1_ps(w);
        for (int32_t i = 0; i < d; i += 8)
            _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i), _mm256_mul_ps(vw, _mm256_loadu_ps(part + i))));
    }
    const __m256 vsum = _mm256_set1_ps(sum);
    for (int32_t i = 0; i < d; i += 8) _mm256_storeu_ps(out + i, _mm256_div_ps(_mm256_loadu_ps(out + i), vsum));
}

/* vcvtps2ph rounding to nearest even: the bits of el_float_to_half, NaN included */
static AVX2 void to_half_avx2(el_half *out, const float *x, int32_t n) {
    int32_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) out[i] = el_float_to_half(x[i]);
}

ROWS_Q4(rows_q4_avx2, row_q4_avx2, AVX2)
ROWS_Q8(rows_q8_avx2, row_q8_avx2, AVX2)

const el_kernels el_kernels_avx2 = {
    .name = "avx2",
    .quantize_q16a = quantize_q16a_avx2,
    .quantize_q8a = el_quantize_q8a_ref,
    .products_q8a = el_products_q8a_avx2,
    .isums_q4 = isums_q4_avx2,
    .isums_q8 = isums_q8_avx2,
    .combine = combine_avx2,
    .row_q4 = row_q4_avx2,
    .row4_q4 = row4_q4_avx2,
    .rows_q4 = rows_q4_avx2,
    .row_q8 = row_q8_avx2,
    .rows_q8 = rows_q8_avx2,
    .rms_norm = rms_norm_avx2,
    .rope = rope_avx2,
    .softmax = softmax_avx2,
    .silu_mul = silu_mul_avx2,
    .add = add_avx2,
    .attend_part = attend_part_avx2,
    .attend_part_f32 = attend_part_f32_avx2,
    .combine_parts = combine_parts_avx2,
    .to_half = to_half_avx2,
    .to_float = to_float_avx2,
};

/* ---- AVX-512 VNNI: vpdpbusd (unsigned codes x signed q, four products into each int32 lane,
 * no saturation). 8-bit rows and the isums use its 256-bit EVEX form, one block per instruction:
 * el_block_q16a's planes are 72 bytes apart, and gathering two blocks into one 512-bit vector
 * costs more than it saves. 4-bit rows read the quads (below). ------------------------------- */

/* 256 * sum(code * qh) + sum(code * ql): two vpdpbusd with a shift between them */
static inline AVX512VNNI __m256i dot_planes_vnni(__m256i codes, const el_block_q16a *x) {
    __m256i qh = _mm256_loadu_si256((const __m256i *)x->qh), ql = _mm256_loadu_si256((const __m256i *)x->ql);
    __m256i hi = _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes, qh);
    return _mm256_dpbusd_epi32(_mm256_slli_epi32(hi, 8), codes, ql);
}

static AVX512VNNI void isums_q4_avx512vnni(int32_t *isum, const uint8_t *codes, const el_block_q16a *x, int32_t nb) {
    int32_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        __m256i p[8];
        for (int k = 0; k < 8; k++) p[k] = dot_planes_vnni(unpack_q4(codes + 16 * (j + k)), x + j + k);
        hsum8_i32x8(isum + j, p);
    }
    for (; j < nb; j++) isum[j] = hsum_i32x8(dot_planes_vnni(unpack_q4(codes + 16 * j), x + j));
}

/* vpdpbusd takes the raw codes 0..255; sum (code - 128) * q16 = sum code * q16 - 128 * sum, exactly
 * (|sum code * q16| <= 32 * 255 * 32767 < 2^31) */
static AVX512VNNI void isums_q8_avx512vnni(int32_t *isum, const uint8_t *codes, const el_block_q16a *x, int32_t nb) {
    int32_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        __m256i p[8];
        for (int k = 0; k < 8; k++)
            p[k] = dot_planes_vnni(_mm256_loadu_si256((const __m256i *)(codes + 32 * (j + k))), x + j + k);
        hsum8_i32x8(isum + j, p);
    }
    for (; j < nb; j++) isum[j] = hsum_i32x8(dot_planes_vnni(_mm256_loadu_si256((const __m256i *)(codes + 32 * j)), x + j));
    for (j = 0; j < nb; j++) isum[j] -= 128 * x[j].sum;
}

/* |x| and copysign(1, x) with integer logic (the float forms need AVX-512 DQ) */
static inline AVX512VNNI __m512 abs512(__m512 x) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)));
}
static inline AVX512VNNI __m512 sign_one512(__m512 x) {
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000),
                                                         _mm512_set1_epi32(0x3F800000), 0xEA)); /* (x & sign) | 1.0 */
}

/* round half away from zero (as round_q_avx2), 16 lanes: the masked add needs no blend */
static inline AVX512VNNI __m512 round_q_avx512(__m512 s) {
    __m512 t = _mm512_roundscale_ps(s, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m512 frac = abs512(_mm512_sub_ps(s, t));
    __m512 away = sign_one512(s);
    __m512 r = _mm512_mask_add_ps(t, _mm512_cmp_ps_mask(frac, _mm512_set1_ps(0.5f), _CMP_GE_OQ), t, away);
    return _mm512_max_ps(_mm512_set1_ps(-127.0f), _mm512_min_ps(_mm512_set1_ps(127.0f), r));
}

/* quantize_q16a_avx2's arithmetic (el_quantize_block_ref's) on two 16-value halves of a block */
static AVX512VNNI void quantize_q16a_avx512(el_block_q16a *out, const float *x, int32_t n) {
    int32_t i = 0;
    for (; i + EL_QBLOCK <= n; i += EL_QBLOCK, out++) {
        __m512 v[2] = {_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i + 16)};
        __m512 a0 = abs512(v[0]), a1 = abs512(v[1]);
        if (_mm512_cmp_ps_mask(a0, _mm512_set1_ps(FLT_MAX), _CMP_NLE_UQ) |
            _mm512_cmp_ps_mask(a1, _mm512_set1_ps(FLT_MAX), _CMP_NLE_UQ)) {
            el_quantize_block_ref(out, x + i, EL_QBLOCK); /* NaN or inf: the ref's NaN block */
            continue;
        }
        float c = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1)) / 127.0f;
        out->d = c / 256.0f;
        if (c == 0.0f) {
            memset(out->qh, 0, sizeof out->qh);
            memset(out->ql, 0, sizeof out->ql);
            out->sum = 0;
            continue;
        }
        const __m512 vc = _mm512_set1_ps(c);
        __m512i sum = _mm512_setzero_si512();
        for (int k = 0; k < 2; k++) {
            __m512 s = _mm512_div_ps(v[k], vc);
            __m512 h = round_q_avx512(s);
            __m512 l = round_q_avx512(_mm512_mul_ps(_mm512_sub_ps(s, h), _mm512_set1_ps(256.0f)));
            __m512i qh = _mm512_cvtps_epi32(h), ql = _mm512_cvtps_epi32(l);
            sum = _mm512_add_epi32(sum, _mm512_add_epi32(_mm512_slli_epi32(qh, 8), ql));
            _mm_storeu_si128((__m128i *)(out->qh + 16 * k), _mm512_cvtepi32_epi8(qh)); /* in [-127, 127]: exact */
            _mm_storeu_si128((__m128i *)(out->ql + 16 * k), _mm512_cvtepi32_epi8(ql));
        }
        out->sum = _mm512_reduce_add_epi32(sum);
    }
    if (i < n) el_quantize_block_ref(out, x + i, n - i);
}

/* ---- 4-bit rows a quad (four blocks, kernels.h) per 512-bit vector: on the cores measured (Zen 5
 * in a VM: 512-bit ops issue at half the 256-bit rate) they do the same integer work as 256-bit
 * pairs with half the instructions, and the eight block sums of two quads come out of one short
 * reduction instead of three vphaddd. ------------------------------------------------------- */

/* codes of blocks j .. j+n-1 (n <= 4; the bytes of missing blocks load as zeros, never read) */
static inline AVX512VNNI void nibbles4(const uint8_t *codes, int32_t n, __m512i *lo, __m512i *hi) {
    const __m512i m = _mm512_set1_epi8(0x0F);
    __m512i b = n >= 4 ? _mm512_loadu_si512(codes) : _mm512_maskz_loadu_epi8((__mmask64)((1ull << (16 * n)) - 1), codes);
    *lo = _mm512_and_si512(b, m);
    *hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m);
}

/* 256 * sum(code * qh) + sum(code * ql) of a quad: lanes 4k .. 4k+3 hold block k's partial sums */
static inline AVX512VNNI __m512i quad_vnni(__m512i lo, __m512i hi, const int8_t *quad) {
    const __m512i *p = (const __m512i *)quad;
    __m512i h = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(p)), hi,
                                    _mm512_loadu_si512(p + 1));
    __m512i l = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(p + 2)), hi,
                                    _mm512_loadu_si512(p + 3));
    return _mm512_add_epi32(_mm512_slli_epi32(h, 8), l);
}

/* z0 (blocks 0-3) and z1 (blocks 4-7) -> the eight block sums in order (exact int32 adds) */
static inline AVX512VNNI __m256i reduce_quads(__m512i z0, __m512i z1) {
    __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi32(z0, z1), _mm512_unpackhi_epi32(z0, z1));
    __m512i u = _mm512_add_epi32(t, _mm512_shuffle_epi32(t, _MM_PERM_BADC)); /* per 128 bits: z0's, z1's, z0's, z1's */
    return _mm512_castsi512_si256(
        _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0), u));
}

/* One row against four tokens: the codes of eight blocks are unpacked once for the four, and each
 * token's sums and terms go exactly as row_q4_avx512vnni's (so each y is bit-identical to it). */
static AVX512VNNI void row4_q4_avx512vnni(float *y, size_t y_stride, int32_t format, const uint8_t *codes,
                                          const el_half *scales, const el_half *mins, const int8_t *quads,
                                          size_t quad_stride, const float *xd, const int32_t *xsum, size_t x_stride,
                                          int32_t nb) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int32_t j = 0; j < nb; j += 8) {
        int32_t n = nb - j < 8 ? nb - j : 8;
        __m512i lo0, hi0, lo1 = _mm512_setzero_si512(), hi1 = _mm512_setzero_si512();
        nibbles4(codes + 16 * j, n, &lo0, &hi0);
        if (n > 4) nibbles4(codes + 16 * j + 64, n - 4, &lo1, &hi1);
        weights8 w = row_weights8(scales, mins, j, n);
        UNROLL4 for (int t = 0; t < 4; t++) {
            const int8_t *q = quads + t * quad_stride + 64 * j;
            __m512i z0 = quad_vnni(lo0, hi0, q), z1 = n > 4 ? quad_vnni(lo1, hi1, q + EL_QUAD_BYTES) : _mm512_setzero_si512();
            acc[t] = _mm256_add_ps(acc[t], terms8(format, reduce_quads(z0, z1), w, xd + t * x_stride + j,
                                                  xsum + t * x_stride + j, n));
        }
    }
    UNROLL4 for (int t = 0; t < 4; t++) y[t * y_stride] = hsum_f32x8(acc[t]);
}

static INLINE AVX512VNNI float row_q4_avx512vnni(int32_t format, const uint8_t *codes, const el_half *scales, const el_half *mins,
                                         const int8_t *quads, const float *xd, const int32_t *xsum, int32_t nb) {
    __m256 acc = _mm256_setzero_ps();
    for (int32_t j = 0; j < nb; j += 8) {
        int32_t n = nb - j < 8 ? nb - j : 8;
        __m512i lo, hi, z0, z1 = _mm512_setzero_si512();
        nibbles4(codes + 16 * j, n, &lo, &hi);
        z0 = quad_vnni(lo, hi, quads + 64 * j); /* quads + (j / 4) * EL_QUAD_BYTES */
        if (n > 4) {
            nibbles4(codes + 16 * j + 64, n - 4, &lo, &hi);
            z1 = quad_vnni(lo, hi, quads + 64 * j + EL_QUAD_BYTES);
        }
        acc = _mm256_add_ps(acc, terms8(format, reduce_quads(z0, z1), row_weights8(scales, mins, j, n), xd + j,
                                        xsum + j, n));
    }
    return hsum_f32x8(acc); /* ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)), the order of api.c */
}

static inline AVX512VNNI __m256i block_q8_vnni(const uint8_t *codes32, const el_block_q16a *x) {
    return dot_planes_vnni(_mm256_loadu_si256((const __m256i *)codes32), x);
}

/* The blocks' sums of raw codes (0..255) made the codes' own (code - 128): sum code * q16 - 128 * sum,
 * for the n (1..8) blocks of one step. */
static inline AVX2 __m256i signed_q8_sums(__m256i raw, const int32_t *xsum, int32_t n) {
    const __m256i sums = n == 8 ? _mm256_loadu_si256((const __m256i *)xsum)
                                : _mm256_maskload_epi32(xsum, _mm256_cmpgt_epi32(_mm256_set1_epi32(n),
                                                                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    return _mm256_sub_epi32(raw, _mm256_slli_epi32(sums, 7));
}

/* row_q8_avx2's loop over vpdpbusd's unsigned-by-signed products of the raw codes */
static INLINE AVX512VNNI float row_q8_avx512vnni(const uint8_t *codes, const el_half *scales, const el_block_q16a *x,
                                                 const float *xd, const int32_t *xsum, int32_t nb) {
    __m256 acc = _mm256_setzero_ps();
    int32_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        __m256i p[8];
        for (int k = 0; k < 8; k++) p[k] = block_q8_vnni(codes + 32 * (j + k), x + j + k);
        acc = _mm256_add_ps(acc, terms8(EL_INT8_SYM, signed_q8_sums(hsum8_vec(p), xsum + j, 8),
                                        row_weights8(scales, NULL, j, 8), xd + j, xsum + j, 8));
    }
    if (j < nb) {
        const int32_t n = nb - j;
        __m256i p[8];
        for (int k = 0; k < 8; k++) p[k] = k < n ? block_q8_vnni(codes + 32 * (j + k), x + j + k) : _mm256_setzero_si256();
        acc = _mm256_add_ps(acc, terms8(EL_INT8_SYM, signed_q8_sums(hsum8_vec(p), xsum + j, n),
                                        row_weights8(scales, NULL, j, n), xd + j, xsum + j, n));
    }
    return hsum_f32x8(acc);
}

static AVX512_FMA void attend_part_avx512(float *out, float *max, float *sum, float *scores, const float *q,
                                          const el_half *keys, const el_half *values, int32_t n_keys, int32_t d,
                                          int32_t stride, float scale) {
    if (d == 64) attend_body(out, max, sum, scores, q, keys, values, n_keys, stride, scale, 8, 1);
    else if (d == 128) attend_body(out, max, sum, scores, q, keys, values, n_keys, stride, scale, 16, 1);
    else el_attend_part_ref(out, max, sum, scores, q, keys, values, n_keys, d, stride, scale);
}

static AVX512_FMA void attend_part_f32_avx512(float *out, float *max, float *sum, float *scores, const float *q,
                                              const float *keys, const float *values, int32_t n_keys, int32_t d,
                                              int32_t stride, float scale) {
    if (d == 64) attend_body(out, max, sum, scores, q, keys, values, n_keys, stride, scale, 8, 0);
    else if (d == 128) attend_body(out, max, sum, scores, q, keys, values, n_keys, stride, scale, 16, 0);
    else el_attend_part_f32_ref(out, max, sum, scores, q, keys, values, n_keys, d, stride, scale);
}

ROWS_Q4(rows_q4_avx512vnni, row_q4_avx512vnni, AVX512VNNI)
ROWS_Q8(rows_q8_avx512vnni, row_q8_avx512vnni, AVX512VNNI)

const el_kernels el_kernels_avx512vnni = {
    .name = "avx512vnni",
    .quantize_q16a = quantize_q16a_avx512,
    .quantize_q8a = el_quantize_q8a_ref,
    .products_q8a = el_products_q8a_avx2,
    .isums_q4 = isums_q4_avx512vnni,
    .isums_q8 = isums_q8_avx512vnni,
    .combine = combine_avx2,
    .row_q4 = row_q4_avx512vnni,
    .row4_q4 = row4_q4_avx512vnni,
    .rows_q4 = rows_q4_avx512vnni,
    .row_q8 = row_q8_avx512vnni,
    .rows_q8 = rows_q8_avx512vnni,
    .panels = el_panels_avx512vnni,
    .rms_norm = rms_norm_avx2,
    .rope = rope_avx2,
    .softmax = softmax_avx2,
    .silu_mul = silu_mul_avx2,
    .add = add_avx2,
    .attend_part = attend_part_avx512,
    .attend_part_f32 = attend_part_f32_avx512,
    .combine_parts = combine_parts_avx2,
    .to_half = to_half_avx2,
    .to_float = to_float_avx2,
};

#endif /* x86-64 */
