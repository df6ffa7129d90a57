/* kernels.h: what every kernel variant provides (internal to native/src).
 *
 * A variant vectorizes only integer work and elementwise float work. The float accumulation of
 * the matrix products lives once, in el_combine_row (api.c), so every variant's matvec is
 * bit-identical to the reference by construction: variants differ only in how they compute the
 * exact int32 block sums.
 */
#ifndef EDGELLM_KERNELS_H
#define EDGELLM_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "../edgellm.h"

/* isum[j] for blocks j = 0..nb-1 of one weight row span against activation blocks x[0..nb-1].
 *   q4: codes = nb x 16 bytes (el_codes_q4), isum[j] = sum_i code_i * q_i       (raw codes 0..15)
 *   q8: codes = nb x 32 bytes (el_codes_q8), isum[j] = sum_i (code_i - 128) * q_i */
typedef void (*el_isums_fn)(int32_t *isum, const uint8_t *codes, const el_block_q8a *x, int32_t nb);

/* The same for two weight rows times two activation rows at once (i8mm):
 * isum[0][j] = row0.x0, isum[1][j] = row0.x1, isum[2][j] = row1.x0, isum[3][j] = row1.x1,
 * each array of stride `stride`. */
typedef void (*el_isums_2x2_fn)(int32_t *isum, int32_t stride, const uint8_t *codes0, const uint8_t *codes1,
                                const el_block_q8a *x0, const el_block_q8a *x1, int32_t nb);

typedef struct {
    const char *name;
    /* one row: out [ceil(n/32)] <- x [n] */
    void (*quantize_q8a)(el_block_q8a *out, const float *x, int32_t n);
    el_isums_fn isums_q4, isums_q8;
    el_isums_2x2_fn isums_q4_2x2, isums_q8_2x2; /* NULL: the matmul loops over single rows */
    /* float kernels, one row each */
    void (*rms_norm)(float *out, const float *x, const float *weight, int32_t n, float eps);
    void (*rope)(float *out, const float *x, const float *cos_t, const float *sin_t, int32_t n_heads,
                 int32_t head_dim);
    void (*softmax)(float *out, const float *x, int32_t n);
    void (*silu_mul)(float *out, const float *gate, const float *up, int32_t n);
    void (*add)(float *out, const float *a, const float *b, int32_t n);
} el_kernels;

/* Each variant's table; the ones this build does not compile for are absent (dispatch.c). */
extern const el_kernels el_kernels_ref;
#if defined(__x86_64__) || defined(_M_X64)
extern const el_kernels el_kernels_avx2;
extern const el_kernels el_kernels_avx512vnni;
#endif
#if defined(__aarch64__)
extern const el_kernels el_kernels_neon;
extern const el_kernels el_kernels_dotprod;
extern const el_kernels el_kernels_i8mm;
#endif

/* The generic scalar pieces SIMD loops end in (ref.c). */
void el_quantize_block_ref(el_block_q8a *out, const float *x, int32_t n_valid); /* n_valid <= 32 */
int32_t el_isum_q4_block_ref(const uint8_t *codes16, const int8_t *q32);       /* sum code * q */
int32_t el_isum_q8_block_ref(const uint8_t *codes32, const int8_t *q32);       /* sum (code-128) * q */
void el_quantize_q8a_ref(el_block_q8a *out, const float *x, int32_t n);
void el_isums_q4_ref(int32_t *isum, const uint8_t *codes, const el_block_q8a *x, int32_t nb);
void el_isums_q8_ref(int32_t *isum, const uint8_t *codes, const el_block_q8a *x, int32_t nb);
void el_rms_norm_ref(float *out, const float *x, const float *weight, int32_t n, float eps);
void el_rope_ref(float *out, const float *x, const float *cos_t, const float *sin_t, int32_t n_heads,
                 int32_t head_dim);
void el_softmax_ref(float *out, const float *x, int32_t n);
void el_silu_mul_ref(float *out, const float *gate, const float *up, int32_t n);
void el_add_ref(float *out, const float *a, const float *b, int32_t n);

/* The current variant, initializing on first use; NULL if EDGELLM_KERNELS named one this CPU lacks. */
const el_kernels *el_kernels_current(void);

/* pool.c: run fn(ctx, ith, nth) on every thread of the pool (or inline when pool is NULL). */
typedef void (*el_job_fn)(void *ctx, int32_t ith, int32_t nth);
void el_pool_run(el_pool *pool, el_job_fn fn, void *ctx);

#endif /* EDGELLM_KERNELS_H */
