/* arm.c: aarch64 variants. NEON (ASIMD) is baseline on aarch64; the dot-product (SDOT) and
 * int8 matrix-multiply (SMMLA) functions carry their ISA in a target attribute (GCC 12 wants
 * "arch=...", not "+dotprod"), and dispatch.c runs them only where getauxval says the CPU has
 * them. Loops work on whole 32-value blocks and end in ref.c's scalar code for a partial block. */
#if defined(__aarch64__)

#include <arm_neon.h>
#include <float.h>
#include <math.h>

#include "kernels.h"

#define DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#define I8MM __attribute__((target("arch=armv8.6-a+i8mm")))

/* 16 bytes of packed nibbles -> codes 0..15 and 16..31 of the block, in order. */
static inline void unpack_q4(const uint8_t *codes16, int8x16_t *c0, int8x16_t *c1) {
    uint8x16_t b = vld1q_u8(codes16);
    uint8x16_t lo = vandq_u8(b, vdupq_n_u8(0x0F)), hi = vshrq_n_u8(b, 4);
    *c0 = vreinterpretq_s8_u8(vzip1q_u8(lo, hi));
    *c1 = vreinterpretq_s8_u8(vzip2q_u8(lo, hi));
}

static inline int8x16_t signed_q8(const uint8_t *codes16) { /* code - 128 as int8 */
    return vreinterpretq_s8_u8(veorq_u8(vld1q_u8(codes16), vdupq_n_u8(0x80)));
}

/* Cephes' expf (see x86.c); NaN propagates through FMIN/FMAX. */
static inline float32x4_t exp_f32x4(float32x4_t x) {
    x = vmaxq_f32(vdupq_n_f32(-87.3365447f), vminq_f32(vdupq_n_f32(88.3762626f), x));
    float32x4_t fx = vrndmq_f32(vaddq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)), vdupq_n_f32(0.5f)));
    x = vsubq_f32(x, vmulq_f32(fx, vdupq_n_f32(0.693359375f)));
    x = vsubq_f32(x, vmulq_f32(fx, vdupq_n_f32(-2.12194440e-4f)));
    float32x4_t y = vdupq_n_f32(1.9875691500E-4f);
    y = vaddq_f32(vmulq_f32(y, x), vdupq_n_f32(1.3981999507E-3f));
    y = vaddq_f32(vmulq_f32(y, x), vdupq_n_f32(8.3334519073E-3f));
    y = vaddq_f32(vmulq_f32(y, x), vdupq_n_f32(4.1665795894E-2f));
    y = vaddq_f32(vmulq_f32(y, x), vdupq_n_f32(1.6666665459E-1f));
    y = vaddq_f32(vmulq_f32(y, x), vdupq_n_f32(5.0000001201E-1f));
    y = vaddq_f32(vmulq_f32(y, vmulq_f32(x, x)), vaddq_f32(x, vdupq_n_f32(1.0f)));
    int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(fx), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(e));
}

/* ---- NEON ------------------------------------------------------------------------------------ */

/* roundf (FCVTAS rounds half away from zero), clamped to [-127, 127], as float and as int32 */
static inline int32x4_t round_q_neon(float32x4_t s, float32x4_t *as_float) {
    int32x4_t q = vmaxq_s32(vminq_s32(vcvtaq_s32_f32(s), vdupq_n_s32(127)), vdupq_n_s32(-127));
    *as_float = vcvtq_f32_s32(q);
    return q;
}

/* eight int32x4 in [-127, 127] -> 32 int8 in order */
static inline void store_q32(int8_t *out, const int32x4_t q[8]) {
    int16x8_t a = vcombine_s16(vmovn_s32(q[0]), vmovn_s32(q[1])), b = vcombine_s16(vmovn_s32(q[2]), vmovn_s32(q[3]));
    int16x8_t c = vcombine_s16(vmovn_s32(q[4]), vmovn_s32(q[5])), d = vcombine_s16(vmovn_s32(q[6]), vmovn_s32(q[7]));
    vst1q_s8(out, vcombine_s8(vmovn_s16(a), vmovn_s16(b)));
    vst1q_s8(out + 16, vcombine_s8(vmovn_s16(c), vmovn_s16(d)));
}

/* Same arithmetic as el_quantize_block_ref: IEEE division, the same roundings and clamps. */
static void quantize_q16a_neon(el_block_q16a *out, const float *x, int32_t n) {
    int32_t i = 0;
    for (; i + EL_QBLOCK <= n; i += EL_QBLOCK, out++) {
        float32x4_t v[8], vmax = vdupq_n_f32(0.0f);
        uint32x4_t ok = vdupq_n_u32(0xFFFFFFFFu);
        for (int k = 0; k < 8; k++) {
            v[k] = vld1q_f32(x + i + 4 * k);
            float32x4_t a = vabsq_f32(v[k]);
            vmax = vmaxq_f32(vmax, a);
            ok = vandq_u32(ok, vcleq_f32(a, vdupq_n_f32(FLT_MAX))); /* false for NaN and inf */
        }
        if (vminvq_u32(ok) == 0) {
            el_quantize_block_ref(out, x + i, EL_QBLOCK);
            continue;
        }
        float c = vmaxvq_f32(vmax) / 127.0f;
        out->d = c / 256.0f;
        if (c == 0.0f) {
            for (int k = 0; k < 2; k++) {
                vst1q_s8(out->qh + 16 * k, vdupq_n_s8(0));
                vst1q_s8(out->ql + 16 * k, vdupq_n_s8(0));
            }
            out->sum = 0;
            continue;
        }
        float32x4_t vc = vdupq_n_f32(c);
        int32x4_t qh[8], ql[8], sum = vdupq_n_s32(0);
        for (int k = 0; k < 8; k++) {
            float32x4_t s = vdivq_f32(v[k], vc), h, l;
            qh[k] = round_q_neon(s, &h);
            ql[k] = round_q_neon(vmulq_f32(vsubq_f32(s, h), vdupq_n_f32(256.0f)), &l);
            sum = vaddq_s32(sum, vaddq_s32(vshlq_n_s32(qh[k], 8), ql[k]));
        }
        store_q32(out->qh, qh);
        store_q32(out->ql, ql);
        out->sum = vaddvq_s32(sum);
    }
    if (i < n) el_quantize_block_ref(out, x + i, n - i);
}

/* widening multiplies: a lane of int16 takes two products, |2 * 128 * 127| < 32768 */
static inline int32_t dot32_neon(int8x16_t c0, int8x16_t c1, const int8_t *q) {
    int8x16_t q0 = vld1q_s8(q), q1 = vld1q_s8(q + 16);
    int16x8_t p0 = vmlal_s8(vmull_s8(vget_low_s8(c0), vget_low_s8(q0)), vget_high_s8(c0), vget_high_s8(q0));
    int16x8_t p1 = vmlal_s8(vmull_s8(vget_low_s8(c1), vget_low_s8(q1)), vget_high_s8(c1), vget_high_s8(q1));
    return vaddvq_s32(vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1)));
}

static void isums_q4_neon(int32_t *isum, const uint8_t *codes, const el_block_q16a *x, int32_t nb) {
    for (int32_t j = 0; j < nb; j++) {
        int8x16_t c0, c1;
        unpack_q4(codes + 16 * j, &c0, &c1);
        isum[j] = 256 * dot32_neon(c0, c1, x[j].qh) + dot32_neon(c0, c1, x[j].ql);
    }
}

static void isums_q8_neon(int32_t *isum, const uint8_t *codes, const el_block_q16a *x, int32_t nb) {
    for (int32_t j = 0; j < nb; j++) {
        int8x16_t c0 = signed_q8(codes + 32 * j), c1 = signed_q8(codes + 32 * j + 16);
        isum[j] = 256 * dot32_neon(c0, c1, x[j].qh) + dot32_neon(c0, c1, x[j].ql);
    }
}

/* four float16 scales as float32 (fcvtl: exact, like el_half_to_float) */
static inline float32x4_t halves4(const el_half *h) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
}

/* Eight blocks per step in two vectors of four lanes: the reference's float operations, in its order. */
static void combine_neon(float *lanes, int32_t format, const int32_t *isum, const float *xd, const int32_t *xsum,
                         const el_half *scales, const el_half *mins, int32_t n, int32_t shift) {
    if (shift != 0) { /* blocks of 64 or 128 weights: not a hot path */
        el_combine_ref(lanes, format, isum, xd, xsum, scales, mins, n, shift);
        return;
    }
    float32x4_t acc[2] = {vld1q_f32(lanes), vld1q_f32(lanes + 4)};
    int32_t j = 0;
    for (; j + 8 <= n; j += 8) {
        for (int h = 0; h < 2; h++) {
            int32_t o = j + 4 * h;
            float32x4_t d = vld1q_f32(xd + o);
            int32x4_t is = vld1q_s32(isum + o);
            float32x4_t sd = vmulq_f32(halves4(scales + o), d), t;
            if (format == EL_INT4_ASYM) {
                float32x4_t sum = vcvtq_f32_s32(vld1q_s32(xsum + o));
                t = vaddq_f32(vmulq_f32(sd, vcvtq_f32_s32(is)), vmulq_f32(vmulq_f32(halves4(mins + o), d), sum));
            } else if (format == EL_INT4_SYM) {
                t = vmulq_f32(sd, vcvtq_f32_s32(vsubq_s32(is, vshlq_n_s32(vld1q_s32(xsum + o), 3))));
            } else {
                t = vmulq_f32(sd, vcvtq_f32_s32(is));
            }
            acc[h] = vaddq_f32(acc[h], t);
        }
    }
    vst1q_f32(lanes, acc[0]);
    vst1q_f32(lanes + 4, acc[1]);
    for (; j < n; j++)
        lanes[j % 8] += el_block_term(format, isum[j], xd[j], xsum[j], el_half_to_float(scales[j]),
                                      mins ? el_half_to_float(mins[j]) : 0.0f);
}

static void rms_norm_neon(float *out, const float *x, const float *weight, int32_t n, float eps) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t v = vld1q_f32(x + i);
        acc = vaddq_f32(acc, vmulq_f32(v, v));
    }
    float ss = vaddvq_f32(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (i = 0; i + 4 <= n; i += 4)
        vst1q_f32(out + i, vmulq_f32(vmulq_n_f32(vld1q_f32(x + i), scale), vld1q_f32(weight + i)));
    for (; i < n; i++) out[i] = x[i] * scale * weight[i];
}

static void rope_neon(float *out, const float *x, const float *cos_t, const float *sin_t, int32_t n_heads,
                      int32_t head_dim) {
    int32_t half = head_dim / 2;
    for (int32_t h = 0; h < n_heads; h++) {
        const float *xh = x + (size_t)h * head_dim;
        float *oh = out + (size_t)h * head_dim;
        int32_t i = 0;
        for (; i + 4 <= half; i += 4) {
            float32x4_t x1 = vld1q_f32(xh + i), x2 = vld1q_f32(xh + i + half);
            float32x4_t c = vld1q_f32(cos_t + i), s = vld1q_f32(sin_t + i);
            vst1q_f32(oh + i, vsubq_f32(vmulq_f32(x1, c), vmulq_f32(x2, s)));
            vst1q_f32(oh + i + half, vaddq_f32(vmulq_f32(x2, c), vmulq_f32(x1, s)));
        }
        for (; i < half; i++) {
            float x1 = xh[i], x2 = xh[i + half];
            oh[i] = x1 * cos_t[i] - x2 * sin_t[i];
            oh[i + half] = x2 * cos_t[i] + x1 * sin_t[i];
        }
    }
}

/* out[i] = exp(x[i] - max) (out may be x); returns their sum: softmax's and attention's middle step. */
static float exp_shifted_sum_neon(float *out, const float *x, float max, int32_t n) {
    float32x4_t vmax = vdupq_n_f32(max), acc = vdupq_n_f32(0.0f);
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t e = exp_f32x4(vsubq_f32(vld1q_f32(x + i), vmax));
        vst1q_f32(out + i, e);
        acc = vaddq_f32(acc, e);
    }
    float sum = vaddvq_f32(acc);
    for (; i < n; i++) {
        out[i] = expf(x[i] - max);
        sum += out[i];
    }
    return sum;
}

static void softmax_neon(float *out, const float *x, int32_t n) {
    float max = -INFINITY;
    for (int32_t i = 0; i < n; i++) max = x[i] > max ? x[i] : max;
    float sum = exp_shifted_sum_neon(out, x, max, n);
    float32x4_t vsum = vdupq_n_f32(sum);
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(out + i, vdivq_f32(vld1q_f32(out + i), vsum));
    for (; i < n; i++) out[i] = out[i] / sum;
}

static void silu_mul_neon(float *out, const float *gate, const float *up, int32_t n) {
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t g = vld1q_f32(gate + i);
        float32x4_t e = exp_f32x4(vnegq_f32(g));
        vst1q_f32(out + i, vmulq_f32(vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0f), e)), vld1q_f32(up + i)));
    }
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

#define ATTEND_MAX_D 256

/* One query head over a chunk of keys, head_dim a multiple of 4: query and output in registers. */
static void attend_part_neon(float *out, float *max, float *sum, float *scores, const float *q, const el_half *keys,
                             const el_half *values, int32_t n_keys, int32_t d, int32_t stride, float scale) {
    if (d % 4 || d > ATTEND_MAX_D) {
        el_attend_part_ref(out, max, sum, scores, q, keys, values, n_keys, d, stride, scale);
        return;
    }
    const int32_t nv = d / 4;
    float32x4_t qv[ATTEND_MAX_D / 4], o[ATTEND_MAX_D / 4];
    for (int32_t i = 0; i < nv; i++) qv[i] = vld1q_f32(q + 4 * i);
    float m = -INFINITY;
    for (int32_t j = 0; j < n_keys; j++) {
        const el_half *key = keys + (size_t)j * stride;
        float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
        int32_t i = 0;
        for (; i + 2 <= nv; i += 2) {
            acc0 = vaddq_f32(acc0, vmulq_f32(qv[i], halves4(key + 4 * i)));
            acc1 = vaddq_f32(acc1, vmulq_f32(qv[i + 1], halves4(key + 4 * i + 4)));
        }
        if (i < nv) acc0 = vaddq_f32(acc0, vmulq_f32(qv[i], halves4(key + 4 * i)));
        scores[j] = vaddvq_f32(vaddq_f32(acc0, acc1)) * scale;
        m = scores[j] > m ? scores[j] : m;
    }
    float l = exp_shifted_sum_neon(scores, scores, m, n_keys);
    for (int32_t i = 0; i < nv; i++) o[i] = vdupq_n_f32(0.0f);
    for (int32_t j = 0; j < n_keys; j++) {
        const el_half *value = values + (size_t)j * stride;
        for (int32_t i = 0; i < nv; i++) o[i] = vaddq_f32(o[i], vmulq_n_f32(halves4(value + 4 * i), scores[j]));
    }
    for (int32_t i = 0; i < nv; i++) vst1q_f32(out + 4 * i, o[i]);
    *max = m;
    *sum = l;
}

/* fcvtn rounds to nearest even (FPCR's default mode): the bits of el_float_to_half; a NaN is quieted */
static void to_half_neon(el_half *out, const float *x, int32_t n) {
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16(out + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
    for (; i < n; i++) out[i] = el_float_to_half(x[i]);
}

static void add_neon(float *out, const float *a, const float *b, int32_t n) {
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(out + i, vaddq_f32(vld1q_f32(a + i), vld1q_f32(b + i)));
    for (; i < n; i++) out[i] = a[i] + b[i];
}

const el_kernels el_kernels_neon = {
    .name = "neon",
    .quantize_q16a = quantize_q16a_neon,
    .quantize_q8a = el_quantize_q8a_neon,
    .combine = combine_neon,
    .isums_q4 = isums_q4_neon,
    .isums_q8 = isums_q8_neon,
    .rms_norm = rms_norm_neon,
    .rope = rope_neon,
    .softmax = softmax_neon,
    .silu_mul = silu_mul_neon,
    .add = add_neon,
    .attend_part = attend_part_neon,
    .combine_parts = el_combine_parts_ref,
    .to_half = to_half_neon,
};

/* ---- dot product: SDOT sums four int8 products into each int32 lane ------------------------ */

/* one plane of a block: sum over 32 values of codes (c0: values 0..15, c1: 16..31) times q */
static inline DOTPROD int32x4_t sdot32(int32x4_t acc, int8x16_t c0, int8x16_t c1, const int8_t *q) {
    return vdotq_s32(vdotq_s32(acc, c0, vld1q_s8(q)), c1, vld1q_s8(q + 16));
}

static inline DOTPROD int32_t planes_dotprod(int8x16_t c0, int8x16_t c1, const el_block_q16a *x) {
    int32x4_t hi = sdot32(vdupq_n_s32(0), c0, c1, x->qh);
    return vaddvq_s32(sdot32(vshlq_n_s32(hi, 8), c0, c1, x->ql));
}

static DOTPROD void isums_q4_dotprod(int32_t *isum, const uint8_t *codes, const el_block_q16a *x, int32_t nb) {
    for (int32_t j = 0; j < nb; j++) {
        int8x16_t c0, c1;
        unpack_q4(codes + 16 * j, &c0, &c1);
        isum[j] = planes_dotprod(c0, c1, x + j);
    }
}

static DOTPROD void isums_q8_dotprod(int32_t *isum, const uint8_t *codes, const el_block_q16a *x, int32_t nb) {
    for (int32_t j = 0; j < nb; j++)
        isum[j] = planes_dotprod(signed_q8(codes + 32 * j), signed_q8(codes + 32 * j + 16), x + j);
}

const el_kernels el_kernels_dotprod = {
    .name = "dotprod",
    .quantize_q16a = quantize_q16a_neon,
    .quantize_q8a = el_quantize_q8a_neon,
    .products_q8a = el_products_q8a_dotprod,
    .default_activation_bits = 8,
    .combine = combine_neon,
    .isums_q4 = isums_q4_dotprod,
    .isums_q8 = isums_q8_dotprod,
    .rms_norm = rms_norm_neon,
    .rope = rope_neon,
    .softmax = softmax_neon,
    .silu_mul = silu_mul_neon,
    .add = add_neon,
    .attend_part = attend_part_neon,
    .combine_parts = el_combine_parts_ref,
    .to_half = to_half_neon,
};

/* ---- i8mm: SMMLA multiplies a 2x8 by an 8x2 int8 matrix into 2x2 int32 -----------------------
 * Two weight rows (a) times two activation rows (b): 8 values of each per SMMLA, four per block.
 * The result lanes are [a0.b0, a0.b1, a1.b0, a1.b1]. Used by the matmul (prefill); a matvec has
 * one activation row and runs the dotprod code. */

static inline I8MM int32x4_t mmla16(int32x4_t acc, int8x16_t a0, int8x16_t a1, int8x16_t b0, int8x16_t b1) {
    /* rows' values 0..7 side by side, then 8..15 */
    int8x16_t a_lo = vreinterpretq_s8_s64(vzip1q_s64(vreinterpretq_s64_s8(a0), vreinterpretq_s64_s8(a1)));
    int8x16_t a_hi = vreinterpretq_s8_s64(vzip2q_s64(vreinterpretq_s64_s8(a0), vreinterpretq_s64_s8(a1)));
    int8x16_t b_lo = vreinterpretq_s8_s64(vzip1q_s64(vreinterpretq_s64_s8(b0), vreinterpretq_s64_s8(b1)));
    int8x16_t b_hi = vreinterpretq_s8_s64(vzip2q_s64(vreinterpretq_s64_s8(b0), vreinterpretq_s64_s8(b1)));
    return vmmlaq_s32(vmmlaq_s32(acc, a_lo, b_lo), a_hi, b_hi);
}

static inline I8MM void store_2x2(int32_t *isum, int32_t stride, int32_t j, int32x4_t acc) {
    isum[j] = vgetq_lane_s32(acc, 0);
    isum[stride + j] = vgetq_lane_s32(acc, 1);
    isum[2 * stride + j] = vgetq_lane_s32(acc, 2);
    isum[3 * stride + j] = vgetq_lane_s32(acc, 3);
}

/* both planes of a block for 2 rows x 2 tokens: 256 * high + low per lane */
static inline I8MM int32x4_t mmla_planes(int8x16_t r0a, int8x16_t r0b, int8x16_t r1a, int8x16_t r1b,
                                         const el_block_q16a *x0, const el_block_q16a *x1) {
    int32x4_t hi = mmla16(vdupq_n_s32(0), r0a, r1a, vld1q_s8(x0->qh), vld1q_s8(x1->qh));
    hi = mmla16(hi, r0b, r1b, vld1q_s8(x0->qh + 16), vld1q_s8(x1->qh + 16));
    int32x4_t lo = mmla16(vshlq_n_s32(hi, 8), r0a, r1a, vld1q_s8(x0->ql), vld1q_s8(x1->ql));
    return mmla16(lo, r0b, r1b, vld1q_s8(x0->ql + 16), vld1q_s8(x1->ql + 16));
}

static I8MM void isums_q4_i8mm_2x2(int32_t *isum, int32_t stride, const uint8_t *codes0, const uint8_t *codes1,
                                   const el_block_q16a *x0, const el_block_q16a *x1, int32_t nb) {
    for (int32_t j = 0; j < nb; j++) {
        int8x16_t r0a, r0b, r1a, r1b;
        unpack_q4(codes0 + 16 * j, &r0a, &r0b);
        unpack_q4(codes1 + 16 * j, &r1a, &r1b);
        store_2x2(isum, stride, j, mmla_planes(r0a, r0b, r1a, r1b, x0 + j, x1 + j));
    }
}

static I8MM void isums_q8_i8mm_2x2(int32_t *isum, int32_t stride, const uint8_t *codes0, const uint8_t *codes1,
                                   const el_block_q16a *x0, const el_block_q16a *x1, int32_t nb) {
    for (int32_t j = 0; j < nb; j++) {
        const uint8_t *c0 = codes0 + 32 * j, *c1 = codes1 + 32 * j;
        store_2x2(isum, stride, j, mmla_planes(signed_q8(c0), signed_q8(c0 + 16), signed_q8(c1), signed_q8(c1 + 16),
                                               x0 + j, x1 + j));
    }
}

const el_kernels el_kernels_i8mm = {
    .name = "i8mm",
    .quantize_q16a = quantize_q16a_neon,
    .quantize_q8a = el_quantize_q8a_neon,
    .products_q8a = el_products_q8a_i8mm,
    .default_activation_bits = 8,
    .combine = combine_neon,
    .isums_q4 = isums_q4_dotprod,
    .isums_q8 = isums_q8_dotprod,
    .isums_q4_2x2 = isums_q4_i8mm_2x2,
    .isums_q8_2x2 = isums_q8_i8mm_2x2,
    .rms_norm = rms_norm_neon,
    .rope = rope_neon,
    .softmax = softmax_neon,
    .silu_mul = silu_mul_neon,
    .add = add_neon,
    .attend_part = attend_part_neon,
    .combine_parts = el_combine_parts_ref,
    .to_half = to_half_neon,
};

#endif /* aarch64 */
