/* x86.c: AVX2 and AVX-512 VNNI variants. Each function carries its ISA in a target attribute,
 * so this file builds with the baseline x86-64 flags and dispatch.c runs a function only on a
 * CPU (and OS) that supports it. Loops work on whole 32-value blocks and end in ref.c's scalar
 * code for a partial block. */
#if defined(__x86_64__) || defined(_M_X64)

#include <float.h>
#include <immintrin.h>
#include <math.h>

#include "kernels.h"

#define AVX2 __attribute__((target("avx2")))
#define AVX512VNNI __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vnni")))

/* ---- helpers ------------------------------------------------------------------------------ */

static inline AVX2 int32_t hsum_i32x8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* out[k] = the sum of the 8 lanes of p[k], for k = 0..7 (one reduction tree for 8 blocks). */
static inline AVX2 void hsum8_i32x8(int32_t *out, const __m256i p[8]) {
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    /* a = [sums of lanes 0-3 of p0..p3 | lanes 4-7 of p0..p3], b the same for p4..p7 */
    __m256i sum = _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
    _mm256_storeu_si256((__m256i *)out, sum);
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

/* Same arithmetic as el_quantize_block_ref: IEEE division, round half away from zero done as
 * trunc + (|frac| >= 0.5 ? sign : 0) (the hardware's nearest rounding goes to even). */
static AVX2 void quantize_q8a_avx2(el_block_q8a *out, const float *x, int32_t n) {
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
        float d = hmax_f32x8(vmax) / 127.0f;
        out->d = d;
        if (d == 0.0f) {
            _mm256_storeu_si256((__m256i *)out->q, _mm256_setzero_si256());
            out->sum = 0;
            continue;
        }
        const __m256 vd = _mm256_set1_ps(d), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
        __m256i qi[4];
        for (int k = 0; k < 4; k++) {
            __m256 s = _mm256_div_ps(v[k], vd);
            __m256 t = _mm256_round_ps(s, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            __m256 frac = _mm256_andnot_ps(sign_bit, _mm256_sub_ps(s, t));
            __m256 away = _mm256_or_ps(_mm256_and_ps(s, sign_bit), one); /* copysign(1, s) */
            __m256 r = _mm256_add_ps(t, _mm256_and_ps(_mm256_cmp_ps(frac, half, _CMP_GE_OQ), away));
            r = _mm256_max_ps(_mm256_set1_ps(-127.0f), _mm256_min_ps(_mm256_set1_ps(127.0f), r));
            qi[k] = _mm256_cvtps_epi32(r);
        }
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
        out->sum = hsum_i32x8(sum);
        /* int32 -> int8 packs interleave 128-bit lanes; the permute puts the values back in order */
        __m256i p16 = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
        p16 = _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)out->q, p16);
    }
    if (i < n) el_quantize_block_ref(out, x + i, n - i);
}

/* unsigned codes 0..15 times signed q: maddubs pairs stay below 2*15*127, no saturation */
static inline AVX2 __m256i dot_q4_avx2(const uint8_t *codes16, const int8_t *q32) {
    __m256i q = _mm256_loadu_si256((const __m256i *)q32);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(unpack_q4(codes16), q), _mm256_set1_epi16(1));
}

static AVX2 void isums_q4_avx2(int32_t *isum, const uint8_t *codes, const el_block_q8a *x, int32_t nb) {
    int32_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        __m256i p[8];
        for (int k = 0; k < 8; k++) p[k] = dot_q4_avx2(codes + 16 * (j + k), x[j + k].q);
        hsum8_i32x8(isum + j, p);
    }
    for (; j < nb; j++) isum[j] = hsum_i32x8(dot_q4_avx2(codes + 16 * j, x[j].q));
}

/* (code - 128) is signed: maddubs takes |w| (unsigned, up to 128) times q with w's sign, so pairs
 * stay below 2*128*127 = 32512, no saturation */
static inline AVX2 __m256i dot_q8_avx2(const uint8_t *codes32, const int8_t *q32) {
    __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)codes32), _mm256_set1_epi8((char)0x80));
    __m256i q = _mm256_loadu_si256((const __m256i *)q32);
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

static AVX2 void isums_q8_avx2(int32_t *isum, const uint8_t *codes, const el_block_q8a *x, int32_t nb) {
    int32_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        __m256i p[8];
        for (int k = 0; k < 8; k++) p[k] = dot_q8_avx2(codes + 32 * (j + k), x[j + k].q);
        hsum8_i32x8(isum + j, p);
    }
    for (; j < nb; j++) isum[j] = hsum_i32x8(dot_q8_avx2(codes + 32 * j, x[j].q));
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

const el_kernels el_kernels_avx2 = {
    .name = "avx2",
    .quantize_q8a = quantize_q8a_avx2,
    .isums_q4 = isums_q4_avx2,
    .isums_q8 = isums_q8_avx2,
    .rms_norm = rms_norm_avx2,
    .rope = rope_avx2,
    .softmax = softmax_avx2,
    .silu_mul = silu_mul_avx2,
    .add = add_avx2,
};

/* ---- AVX-512 VNNI: vpdpbusd (unsigned codes x signed q, four products into each int32 lane,
 * no saturation) in its 256-bit EVEX form, one block per instruction. On the cores measured
 * (Zen 4) 512-bit vectors run as two 256-bit halves and gathering two 40-byte activation blocks
 * into one costs more than it saves. -------------------------------------------------------- */

static inline AVX512VNNI __m256i dot_q4_vnni(const uint8_t *codes16, const int8_t *q32) {
    __m256i q = _mm256_loadu_si256((const __m256i *)q32);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), unpack_q4(codes16), q);
}

static inline AVX512VNNI __m256i dot_q8_vnni(const uint8_t *codes32, const int8_t *q32) {
    __m256i q = _mm256_loadu_si256((const __m256i *)q32);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_loadu_si256((const __m256i *)codes32), q);
}

static AVX512VNNI void isums_q4_avx512vnni(int32_t *isum, const uint8_t *codes, const el_block_q8a *x, int32_t nb) {
    int32_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        __m256i p[8];
        for (int k = 0; k < 8; k++) p[k] = dot_q4_vnni(codes + 16 * (j + k), x[j + k].q);
        hsum8_i32x8(isum + j, p);
    }
    for (; j < nb; j++) isum[j] = hsum_i32x8(dot_q4_vnni(codes + 16 * j, x[j].q));
}

/* vpdpbusd takes the raw codes 0..255; sum (code - 128) * q = sum code * q - 128 * sum q, exactly */
static AVX512VNNI void isums_q8_avx512vnni(int32_t *isum, const uint8_t *codes, const el_block_q8a *x, int32_t nb) {
    int32_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        __m256i p[8];
        for (int k = 0; k < 8; k++) p[k] = dot_q8_vnni(codes + 32 * (j + k), x[j + k].q);
        hsum8_i32x8(isum + j, p);
    }
    for (; j < nb; j++) isum[j] = hsum_i32x8(dot_q8_vnni(codes + 32 * j, x[j].q));
    for (j = 0; j < nb; j++) isum[j] -= 128 * x[j].sum;
}

const el_kernels el_kernels_avx512vnni = {
    .name = "avx512vnni",
    .quantize_q8a = quantize_q8a_avx2,
    .isums_q4 = isums_q4_avx512vnni,
    .isums_q8 = isums_q8_avx512vnni,
    .rms_norm = rms_norm_avx2,
    .rope = rope_avx2,
    .softmax = softmax_avx2,
    .silu_mul = silu_mul_avx2,
    .add = add_avx2,
};

#endif /* x86-64 */
