/* ref.c: the portable C definition of every kernel. SIMD variants must equal it bit for bit
 * (quantization, integer block sums) or to a normalized MSE of 1e-10 (float kernels). */
#include <float.h>
#include <math.h>
#include <string.h>

#include "kernels.h"

/* round half away from zero, clamped to [-127, 127] (the clamp only matters for subnormal scales) */
static inline int8_t round_q(float s) {
    float r = roundf(s);
    if (r > 127.0f) r = 127.0f;
    if (r < -127.0f) r = -127.0f;
    return (int8_t)r;
}

/* One activation block from n_valid <= 32 values (the rest count as zeros). */
void el_quantize_block_ref(el_block_q16a *out, const float *x, int32_t n_valid) {
    float amax = 0.0f;
    int finite = 1;
    for (int32_t i = 0; i < n_valid; i++) {
        float a = fabsf(x[i]);
        if (!(a <= FLT_MAX)) finite = 0; /* NaN or infinity */
        else if (a > amax) amax = a;
    }
    memset(out->qh, 0, sizeof out->qh);
    memset(out->ql, 0, sizeof out->ql);
    out->sum = 0;
    if (!finite) {
        out->d = NAN; /* poisons every product that reads this block */
        return;
    }
    float c = amax / 127.0f;
    out->d = c / 256.0f;
    if (c == 0.0f) return; /* all zeros, or so small that the scale underflowed */
    int32_t sum = 0;
    for (int32_t i = 0; i < n_valid; i++) {
        float s = x[i] / c;
        int8_t qh = round_q(s);
        int8_t ql = round_q((s - (float)qh) * 256.0f); /* s - qh is exact: s is within 1/2 of qh */
        out->qh[i] = qh;
        out->ql[i] = ql;
        sum += 256 * qh + ql;
    }
    out->sum = sum;
}

void el_quantize_q16a_ref(el_block_q16a *out, const float *x, int32_t n) {
    for (int32_t i = 0; i < n; i += EL_QBLOCK) {
        int32_t left = n - i;
        el_quantize_block_ref(out++, x + i, left < EL_QBLOCK ? left : EL_QBLOCK);
    }
}

/* One 8-bit activation block from n_valid <= 32 values (the rest count as zeros). */
void el_quantize_block_q8a_ref(el_block_q8a *out, const float *x, int32_t n_valid) {
    float amax = 0.0f;
    int finite = 1;
    for (int32_t i = 0; i < n_valid; i++) {
        float a = fabsf(x[i]);
        if (!(a <= FLT_MAX)) finite = 0;
        else if (a > amax) amax = a;
    }
    memset(out->q, 0, sizeof out->q);
    out->sum = 0;
    if (!finite) {
        out->d = out->ds = NAN;
        return;
    }
    const float d = amax / 127.0f, id = 127.0f / amax;
    out->d = out->ds = 0.0f;
    if (d == 0.0f || !(id <= FLT_MAX)) return; /* zeros, or so small that 127 / amax overflows: as zeros */
    out->d = d;
    int32_t sum = 0;
    for (int32_t i = 0; i < n_valid; i++) {
        float v = rintf(x[i] * id); /* ties to even */
        out->q[i] = (int8_t)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
        sum += out->q[i];
    }
    out->sum = sum;
    out->ds = d * (float)sum;
}

void el_quantize_q8a_ref(el_block_q8a *out, const float *x, int32_t n) {
    for (int32_t i = 0; i < n; i += EL_QBLOCK) {
        int32_t left = n - i;
        el_quantize_block_q8a_ref(out++, x + i, left < EL_QBLOCK ? left : EL_QBLOCK);
    }
}

/* edgellm.h's 8-bit-activation product of one row and one token, any block size (b = j >> shift). */
float el_row_q8a_ref(int32_t format, const uint8_t *codes, const el_half *scales, const el_half *mins,
                     const el_block_q8a *x, int32_t nb, int32_t shift) {
    float lane[4] = {-0.0f, -0.0f, -0.0f, -0.0f}; /* so fma(a, b, lane) of a first term is a * b */
    for (int32_t j = 0; j < nb; j++) {
        int32_t isum = 0, b = j >> shift;
        if (format == EL_INT8_SYM) {
            const uint8_t *c = codes + (size_t)j * EL_QBLOCK;
            for (int i = 0; i < EL_QBLOCK; i++) isum += ((int32_t)c[i] - 128) * x[j].q[i];
        } else {
            const uint8_t *c = codes + (size_t)j * (EL_QBLOCK / 2);
            for (int k = 0; k < EL_QBLOCK / 2; k++) isum += (c[k] & 0x0F) * x[j].q[2 * k] + (c[k] >> 4) * x[j].q[2 * k + 1];
            if (format == EL_INT4_SYM) isum -= 8 * x[j].sum;
        }
        float *l = &lane[j & 3];
        *l = fmaf(el_half_to_float(scales[b]) * x[j].d, (float)isum, *l);
        if (format == EL_INT4_ASYM) *l = fmaf(el_half_to_float(mins[b]), x[j].ds, *l);
    }
    return (lane[0] + lane[1]) + (lane[2] + lane[3]);
}

int32_t el_isum_q4_block_ref(const uint8_t *codes16, const el_block_q16a *x) {
    int32_t hi = 0, lo = 0;
    for (int k = 0; k < EL_QBLOCK / 2; k++) {
        int32_t c0 = codes16[k] & 0x0F, c1 = codes16[k] >> 4;
        hi += c0 * x->qh[2 * k] + c1 * x->qh[2 * k + 1];
        lo += c0 * x->ql[2 * k] + c1 * x->ql[2 * k + 1];
    }
    return 256 * hi + lo;
}

int32_t el_isum_q8_block_ref(const uint8_t *codes32, const el_block_q16a *x) {
    int32_t hi = 0, lo = 0;
    for (int i = 0; i < EL_QBLOCK; i++) {
        hi += ((int32_t)codes32[i] - 128) * x->qh[i];
        lo += ((int32_t)codes32[i] - 128) * x->ql[i];
    }
    return 256 * hi + lo;
}

void el_isums_q4_ref(int32_t *isum, const uint8_t *codes, const el_block_q16a *x, int32_t nb) {
    for (int32_t j = 0; j < nb; j++) isum[j] = el_isum_q4_block_ref(codes + 16 * j, x + j);
}

void el_isums_q8_ref(int32_t *isum, const uint8_t *codes, const el_block_q16a *x, int32_t nb) {
    for (int32_t j = 0; j < nb; j++) isum[j] = el_isum_q8_block_ref(codes + 32 * j, x + j);
}

void el_combine_ref(float *lanes, int32_t format, const int32_t *isum, const float *xd, const int32_t *xsum,
                    const el_half *scales, const el_half *mins, int32_t n, int32_t shift) {
    for (int32_t j = 0; j < n; j++) {
        int32_t b = j >> shift;
        lanes[j % 8] += el_block_term(format, isum[j], xd[j], xsum[j], el_half_to_float(scales[b]),
                                      mins ? el_half_to_float(mins[b]) : 0.0f);
    }
}

void el_rms_norm_ref(float *out, const float *x, const float *weight, int32_t n, float eps) {
    float ss = 0.0f;
    for (int32_t i = 0; i < n; i++) ss += x[i] * x[i];
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int32_t i = 0; i < n; i++) out[i] = x[i] * scale * weight[i];
}

void el_rope_ref(float *out, const float *x, const float *cos_t, const float *sin_t, int32_t n_heads,
                 int32_t head_dim) {
    int32_t half = head_dim / 2;
    for (int32_t h = 0; h < n_heads; h++) {
        const float *xh = x + (size_t)h * head_dim;
        float *oh = out + (size_t)h * head_dim;
        for (int32_t i = 0; i < half; i++) {
            float x1 = xh[i], x2 = xh[i + half]; /* both read before either is written: in place is fine */
            oh[i] = x1 * cos_t[i] - x2 * sin_t[i];
            oh[i + half] = x2 * cos_t[i] + x1 * sin_t[i];
        }
    }
}

void el_softmax_ref(float *out, const float *x, int32_t n) {
    float max = -INFINITY;
    for (int32_t i = 0; i < n; i++) max = x[i] > max ? x[i] : max;
    float sum = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        out[i] = expf(x[i] - max);
        sum += out[i];
    }
    for (int32_t i = 0; i < n; i++) out[i] = out[i] / sum;
}

void el_silu_mul_ref(float *out, const float *gate, const float *up, int32_t n) {
    for (int32_t i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

void el_add_ref(float *out, const float *a, const float *b, int32_t n) {
    for (int32_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

/* The attention of one query over a chunk; keys and values are float16 (the cache) when `halves`,
 * else float32. Inlined with a constant `halves`: one function per type. */
static inline __attribute__((always_inline)) void attend_part(float *out, float *max, float *sum, float *scores,
                                                              const float *q, const void *keys, const void *values,
                                                              int32_t n_keys, int32_t d, int32_t stride, float scale,
                                                              const int halves) {
    float m = -INFINITY, l = 0.0f;
    for (int32_t j = 0; j < n_keys; j++) {
        const size_t row = (size_t)j * stride;
        float s = 0.0f;
        for (int32_t i = 0; i < d; i++)
            s += q[i] * (halves ? el_half_to_float(((const el_half *)keys)[row + i]) : ((const float *)keys)[row + i]);
        scores[j] = s * scale;
        m = scores[j] > m ? scores[j] : m;
    }
    for (int32_t j = 0; j < n_keys; j++) {
        scores[j] = expf(scores[j] - m);
        l += scores[j];
    }
    memset(out, 0, sizeof(float) * (size_t)d);
    for (int32_t j = 0; j < n_keys; j++) {
        const size_t row = (size_t)j * stride;
        for (int32_t i = 0; i < d; i++)
            out[i] += scores[j] *
                      (halves ? el_half_to_float(((const el_half *)values)[row + i]) : ((const float *)values)[row + i]);
    }
    *max = m;
    *sum = l;
}

void el_attend_part_ref(float *out, float *max, float *sum, float *scores, const float *q, const el_half *keys,
                        const el_half *values, int32_t n_keys, int32_t d, int32_t stride, float scale) {
    attend_part(out, max, sum, scores, q, keys, values, n_keys, d, stride, scale, 1);
}

void el_attend_part_f32_ref(float *out, float *max, float *sum, float *scores, const float *q, const float *keys,
                            const float *values, int32_t n_keys, int32_t d, int32_t stride, float scale) {
    attend_part(out, max, sum, scores, q, keys, values, n_keys, d, stride, scale, 0);
}

void el_combine_parts_ref(float *out, const float *parts, int32_t n_parts, int32_t d) {
    const int32_t stride = d + 2;
    float max = -INFINITY, sum = 0.0f;
    for (int32_t c = 0; c < n_parts; c++) max = parts[c * stride + d] > max ? parts[c * stride + d] : max;
    memset(out, 0, sizeof(float) * (size_t)d);
    for (int32_t c = 0; c < n_parts; c++) {
        const float *part = parts + (size_t)c * stride;
        float w = expf(part[d] - max);
        sum += part[d + 1] * w;
        for (int32_t i = 0; i < d; i++) out[i] += w * part[i];
    }
    for (int32_t i = 0; i < d; i++) out[i] = out[i] / sum;
}

void el_to_float_ref(float *out, const el_half *x, int32_t n) {
    for (int32_t i = 0; i < n; i++) out[i] = el_half_to_float(x[i]);
}

void el_to_half_ref(el_half *out, const float *x, int32_t n) {
    for (int32_t i = 0; i < n; i++) out[i] = el_float_to_half(x[i]);
}

const el_kernels el_kernels_ref = {
    .name = "ref",
    .quantize_q16a = el_quantize_q16a_ref,
    .quantize_q8a = el_quantize_q8a_ref,
    .isums_q4 = el_isums_q4_ref,
    .isums_q8 = el_isums_q8_ref,
    .isums_q4_2x2 = NULL,
    .isums_q8_2x2 = NULL,
    .combine = el_combine_ref,
    .rms_norm = el_rms_norm_ref,
    .rope = el_rope_ref,
    .softmax = el_softmax_ref,
    .silu_mul = el_silu_mul_ref,
    .add = el_add_ref,
    .attend_part = el_attend_part_ref,
    .attend_part_f32 = el_attend_part_f32_ref,
    .combine_parts = el_combine_parts_ref,
    .to_half = el_to_half_ref,
    .to_float = el_to_float_ref,
};
