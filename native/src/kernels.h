/* kernels.h: what every kernel variant provides (internal to native/src).
 *
 * The matrix products are split in two: the exact int32 block sums (isums, integer SIMD) and
 * their float accumulation into eight lanes (combine). A variant's combine does per lane exactly
 * the float operations of the reference, in the same order (edgellm.h), and the lanes are
 * reduced once, in api.c; so every variant's products are bit-identical to the reference.
 */
#ifndef EDGELLM_KERNELS_H
#define EDGELLM_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../edgellm.h"

/* isum[j] for blocks j = 0..nb-1 of one weight row span against activation blocks x[0..nb-1],
 * with q16_i = 256 * qh_i + ql_i:
 *   q4: codes = nb x 16 bytes (el_codes_q4), isum[j] = sum_i code_i * q16_i      (raw codes 0..15)
 *   q8: codes = nb x 32 bytes (el_codes_q8), isum[j] = sum_i (code_i - 128) * q16_i */
typedef void (*el_isums_fn)(int32_t *isum, const uint8_t *codes, const el_block_q16a *x, int32_t nb);

/* The same for two weight rows times two activation rows at once (i8mm):
 * isum[0][j] = row0.x0, isum[1][j] = row0.x1, isum[2][j] = row1.x0, isum[3][j] = row1.x1,
 * each array of stride `stride`. */
typedef void (*el_isums_2x2_fn)(int32_t *isum, int32_t stride, const uint8_t *codes0, const uint8_t *codes1,
                                const el_block_q16a *x0, const el_block_q16a *x1, int32_t nb);

/* lanes[j % 8] += t_j (edgellm.h) for blocks j = 0..n-1 of a span that starts at a multiple of 8
 * blocks: isum [n] from isums (raw codes for int4), xd [n] and xsum [n] the activation blocks'
 * d and sum, scales and mins at the span's first weight block, weight block of j = j >> shift. */
typedef void (*el_combine_fn)(float *lanes, int32_t format, const int32_t *isum, const float *xd,
                              const int32_t *xsum, const el_half *scales, const el_half *mins, int32_t n,
                              int32_t shift);

/* The activations of n tokens as the products read them (prepared once, read by every row):
 *   q      [n][nb]  the blocks
 *   d, sum [n][nb]  their d and sum, contiguous, for eight blocks per vector load
 *   quads  [n][ceil(nb / 4)][EL_QUAD_BYTES]  the planes re-ordered for 4-bit codes: per quad of
 *          blocks 4q .. 4q+3, the qh of the even values (0, 2, .., 30) of each of the four blocks
 *          (16 bytes each: 64), the qh of their odd values, then the same two for ql. A 64-byte load
 *          of four blocks' codes masked to its low nibbles meets the even values without a shuffle,
 *          its high nibbles the odd ones. A pair of blocks (2p, 2p+1) is half a quad: its four
 *          planes are 32 bytes each, 64 bytes apart, from el_pair_at(quads, 2p). The slots of
 *          blocks past nb are zero and never matter: their codes are loaded as zeros. */
#define EL_QUAD_BYTES 256
static inline int32_t el_ceil_div(int32_t a, int32_t b) { return (a + b - 1) / b; }

static inline size_t el_quad_stride(int32_t nb) { return (size_t)((nb + 3) / 4) * EL_QUAD_BYTES; }
/* A zeroed buffer of n quad strides, 64-byte aligned: a 512-bit load of a quad then never splits
 * across two cache lines (which costs the 4-bit products about a third of their speed). free() it. */
static inline int8_t *el_alloc_quads(size_t n, int32_t nb) {
    size_t bytes = n * el_quad_stride(nb);
    int8_t *p = aligned_alloc(64, bytes ? bytes : 64); /* bytes: a multiple of 256 */
    if (p) memset(p, 0, bytes);
    return p;
}
static inline const int8_t *el_pair_at(const int8_t *quads, int32_t j) { /* j even */
    return quads + (size_t)(j >> 2) * EL_QUAD_BYTES + 16 * (j & 2);
}
typedef struct {
    const el_block_q16a *q;
    const float *d;
    const int32_t *sum;
    const int8_t *quads;
    int32_t nb;
    const el_block_q8a *q8; /* not NULL: the 8-bit path, which reads only these [n][nb] */
} el_acts;

/* A whole row against one token for blocks of 32 weights (optional, x86): the same bits as isums
 * + combine + the lane reduction, fused so the block sums never leave the registers. */
typedef float (*el_row_q4_fn)(int32_t format, const uint8_t *codes, const el_half *scales, const el_half *mins,
                              const int8_t *quads, const float *xd, const int32_t *xsum, int32_t nb);
/* The same row against four tokens at once (prefill): y[t * y_stride], tokens' quads quad_stride bytes
 * apart and their d and sum x_stride values apart; bit-identical to four el_row_q4_fn calls. */
typedef void (*el_row4_q4_fn)(float *y, size_t y_stride, int32_t format, const uint8_t *codes, const el_half *scales,
                              const el_half *mins, const int8_t *quads, size_t quad_stride, const float *xd,
                              const int32_t *xsum, size_t x_stride, int32_t nb);
/* Rows [0, n_rows) against one token (decode): y[i] for the row whose codes are i * row_bytes and
 * whose scales and mins are i * n_wblocks after the first's; bit-identical to el_row_q4_fn per row,
 * without a call per row. */
typedef void (*el_rows_q4_fn)(float *y, int32_t n_rows, int32_t format, const uint8_t *codes, size_t row_bytes,
                              const el_half *scales, const el_half *mins, size_t n_wblocks, const int8_t *quads,
                              const float *xd, const int32_t *xsum, int32_t nb);
typedef float (*el_row_q8_fn)(const uint8_t *codes, const el_half *scales, const el_block_q16a *x, const float *xd,
                              const int32_t *xsum, int32_t nb);
/* The same for 8-bit rows (codes row_bytes apart, scales n_wblocks apart). */
typedef void (*el_rows_q8_fn)(float *y, int32_t n_rows, const uint8_t *codes, size_t row_bytes, const el_half *scales,
                              size_t n_wblocks, const el_block_q16a *x, const float *xd, const int32_t *xsum, int32_t nb);

/* Prefill in panels (optional, x86 AVX-512 VNNI; x86_panel.c): y[t * y_stride + i] for rows i < n_rows of
 * a matrix of blocks of 32 (codes row_bytes apart, scales and mins n_wblocks apart) and tokens t < n_tokens
 * of x [n_tokens][nb] (xd, xsum alike); bit-identical to el_row_q4_fn / el_row_q8_fn per (row, token).
 * Rows go EL_PANEL_ROWS at a time, each panel unpacked and transposed once into scratch (64-byte aligned,
 * el_panel_bytes(nb)) for all the tokens, EL_PANEL_TILE tokens at a time. */
#define EL_PANEL_ROWS 32
#define EL_PANEL_TILE 8
typedef void (*el_panels_fn)(float *y, size_t y_stride, int32_t n_rows, int32_t n_tokens, int32_t format,
                             const uint8_t *codes, size_t row_bytes, const el_half *scales, const el_half *mins,
                             size_t n_wblocks, const el_block_q16a *x, const float *xd, const int32_t *xsum, int32_t nb,
                             void *scratch);
/* one thread's scratch: the panel's codes [nb][8][32][4], its scales and mins as float [nb][32] each
 * (whole cache lines: each thread's is one of an array of them) */
static inline size_t el_panel_bytes(int32_t nb) {
    return (size_t)nb * (EL_PANEL_ROWS * 32 + 2 * EL_PANEL_ROWS * sizeof(float)); /* 1280 nb bytes */
}

/* 8-bit activations (edgellm.h, el_block_q8a), blocks of 32: y[t * y_stride + i] for rows i < n_rows
 * (codes row_bytes apart, scales and mins n_wblocks apart) and tokens t < n_tokens of x [n_tokens][nb];
 * bit-identical to el_row_q8a_ref per (row, token). A variant prepares what it reads (unpacked
 * panels, the activations re-ordered) in scratch: el_q8a_scratch_bytes(nb), 64-byte aligned. */
typedef void (*el_products_q8a_fn)(float *y, size_t y_stride, int32_t n_rows, int32_t n_tokens, int32_t format,
                                   const uint8_t *codes, size_t row_bytes, const el_half *scales,
                                   const el_half *mins, size_t n_wblocks, const el_block_q8a *x, int32_t nb,
                                   void *scratch);
/* tokens a variant prepares at a time (its scratch holds them) */
#define EL_Q8A_TOKENS 64
static inline size_t el_q8a_scratch_bytes(int32_t nb) {
    /* (arm_q8a.c) per block: a panel's 4 rows' codes (128 bytes), scales and mins (2 x 32) and
     * EL_Q8A_TOKENS / 4 tiles' 4 tokens' values, d, ds and sums (224 bytes each); 4 blocks more for
     * the decode's padding */
    return (size_t)(nb + 4) * (192 + (size_t)EL_Q8A_TOKENS / 4 * 224) + 64;
}

/* one thread's scratch for any product (the panels' or the 8-bit path's) */
static inline size_t el_product_scratch_bytes(int32_t nb) {
    size_t panel = el_panel_bytes(nb), q8a = el_q8a_scratch_bytes(nb);
    return ((panel > q8a ? panel : q8a) + 63) & ~(size_t)63;
}

typedef struct {
    const char *name;
    /* one row: out [ceil(n/32)] <- x [n] */
    void (*quantize_q16a)(el_block_q16a *out, const float *x, int32_t n);
    void (*quantize_q8a)(el_block_q8a *out, const float *x, int32_t n);
    el_products_q8a_fn products_q8a; /* NULL: el_row_q8a_ref per (row, token) */
    /* the engine's activation width unless EDGELLM_ACTIVATIONS says: 8 where the 8-bit products are what
     * pays (docs/performance.md), else 0 for 16 */
    int32_t default_activation_bits;
    el_isums_fn isums_q4, isums_q8;
    el_isums_2x2_fn isums_q4_2x2, isums_q8_2x2; /* NULL: the matmul loops over single rows */
    el_combine_fn combine;
    el_row_q4_fn row_q4; /* NULL: isums + combine */
    el_row4_q4_fn row4_q4; /* NULL: row_q4 per token */
    el_rows_q4_fn rows_q4; /* NULL: row_q4 per row */
    el_row_q8_fn row_q8;
    el_rows_q8_fn rows_q8; /* NULL: row_q8 per row */
    el_panels_fn panels;   /* NULL: the row kernels for many tokens too */
    /* float kernels, one row each */
    void (*rms_norm)(float *out, const float *x, const float *weight, int32_t n, float eps);
    void (*rope)(float *out, const float *x, const float *cos_t, const float *sin_t, int32_t n_heads,
                 int32_t head_dim);
    void (*softmax)(float *out, const float *x, int32_t n);
    void (*silu_mul)(float *out, const float *gate, const float *up, int32_t n);
    void (*add)(float *out, const float *a, const float *b, int32_t n);
    /* one query head over one chunk of keys j < n_keys of the float16 cache (rows `stride` values
     * apart), unnormalized, in float32: s_j = q . keys[j] * scale;  *max = max_j s_j;
     * *sum = sum_j exp(s_j - max);  out [d] = sum_j exp(s_j - max) values[j];  scores [n_keys] is scratch */
    void (*attend_part)(float *out, float *max, float *sum, float *scores, const float *q, const el_half *keys,
                        const el_half *values, int32_t n_keys, int32_t d, int32_t stride, float scale);
    /* out [d] = the partials [n_parts][d + 2] (attend_part's out, max, sum) combined in order: the
     * softmax over all of them, times the values */
    void (*combine_parts)(float *out, const float *parts, int32_t n_parts, int32_t d);
    /* the same over keys and values already converted to float32 (to_float), bit for bit: a prefill
     * converts a chunk once for all the queries that attend it (optional: NULL, attend_part per query) */
    void (*attend_part_f32)(float *out, float *max, float *sum, float *scores, const float *q, const float *keys,
                            const float *values, int32_t n_keys, int32_t d, int32_t stride, float scale);
    /* out [n] = x [n] as float16, rounded to nearest even (el_float_to_half): the same bits in every variant */
    void (*to_half)(el_half *out, const float *x, int32_t n);
    /* out [n] = x [n] as float32 (exact; el_half_to_float), with attend_part_f32 */
    void (*to_float)(float *out, const el_half *x, int32_t n);
} el_kernels;

/* Each variant's table; the ones this build does not compile for are absent (dispatch.c). */
extern const el_kernels el_kernels_ref;
#if defined(__x86_64__) || defined(_M_X64)
extern const el_kernels el_kernels_avx2;
extern const el_kernels el_kernels_avx512vnni;
void el_panels_avx512vnni(float *y, size_t y_stride, int32_t n_rows, int32_t n_tokens, int32_t format,
                          const uint8_t *codes, size_t row_bytes, const el_half *scales, const el_half *mins,
                          size_t n_wblocks, const el_block_q16a *x, const float *xd, const int32_t *xsum, int32_t nb,
                          void *scratch);
void el_products_q8a_avx2(float *y, size_t y_stride, int32_t n_rows, int32_t n_tokens, int32_t format,
                          const uint8_t *codes, size_t row_bytes, const el_half *scales, const el_half *mins,
                          size_t n_wblocks, const el_block_q8a *x, int32_t nb, void *scratch);
#endif
#if defined(__aarch64__)
extern const el_kernels el_kernels_neon;
extern const el_kernels el_kernels_dotprod;
extern const el_kernels el_kernels_i8mm;
void el_quantize_q8a_neon(el_block_q8a *out, const float *x, int32_t n);
void el_products_q8a_dotprod(float *y, size_t y_stride, int32_t n_rows, int32_t n_tokens, int32_t format,
                             const uint8_t *codes, size_t row_bytes, const el_half *scales, const el_half *mins,
                             size_t n_wblocks, const el_block_q8a *x, int32_t nb, void *scratch);
void el_products_q8a_i8mm(float *y, size_t y_stride, int32_t n_rows, int32_t n_tokens, int32_t format,
                          const uint8_t *codes, size_t row_bytes, const el_half *scales, const el_half *mins,
                          size_t n_wblocks, const el_block_q8a *x, int32_t nb, void *scratch);
#endif

/* The generic scalar pieces SIMD loops end in (ref.c). */
void el_quantize_block_ref(el_block_q16a *out, const float *x, int32_t n_valid); /* n_valid <= 32 */
int32_t el_isum_q4_block_ref(const uint8_t *codes16, const el_block_q16a *x);    /* sum code * q16 */
int32_t el_isum_q8_block_ref(const uint8_t *codes32, const el_block_q16a *x);    /* sum (code-128) * q16 */
void el_quantize_q16a_ref(el_block_q16a *out, const float *x, int32_t n);
void el_quantize_block_q8a_ref(el_block_q8a *out, const float *x, int32_t n_valid); /* n_valid <= 32 */
void el_quantize_q8a_ref(el_block_q8a *out, const float *x, int32_t n);
float el_row_q8a_ref(int32_t format, const uint8_t *codes, const el_half *scales, const el_half *mins,
                     const el_block_q8a *x, int32_t nb, int32_t shift);
void el_isums_q4_ref(int32_t *isum, const uint8_t *codes, const el_block_q16a *x, int32_t nb);
void el_isums_q8_ref(int32_t *isum, const uint8_t *codes, const el_block_q16a *x, int32_t nb);
void el_combine_ref(float *lanes, int32_t format, const int32_t *isum, const float *xd, const int32_t *xsum,
                    const el_half *scales, const el_half *mins, int32_t n, int32_t shift);
/* The float32 a binary16 value equals (exactly: every binary16 is a float32), subnormals, infinities
 * and NaN included; the portable twin of F16C's vcvtph2ps and AArch64's fcvtl. */
static inline float el_half_to_float(el_half h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu, bits;
    if (exponent == 0x1F) bits = sign | 0x7F800000u | (mantissa << 13); /* inf, NaN */
    else if (exponent != 0) bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    else if (mantissa == 0) bits = sign; /* +-0 */
    else { /* subnormal: mantissa * 2^-24, normalized */
        int32_t e = -1;
        do { mantissa <<= 1; e++; } while (!(mantissa & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((mantissa & 0x3FFu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
/* The binary16 nearest to f (ties to even; past 65504 an infinity; NaN a quiet NaN keeping the sign
 * and the payload's top bits): the portable twin of F16C's vcvtps2ph and AArch64's fcvtn. */
static inline el_half el_float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (el_half)(sign | 0x7E00u | ((a >> 13) & 0x3FFu)); /* NaN */
    if (a >= 0x477FF000u) return (el_half)(sign | 0x7C00u);                      /* rounds to 65536 or more */
    if (a < 0x38800000u) { /* under 2^-14: a multiple of 2^-24, the float add rounds it to even */
        float m;
        memcpy(&m, &a, sizeof m);                  /* |f| */
        m = m * 16777216.0f + 8388608.0f;          /* exact product; the sum's last place is 1 */
        uint32_t bits;
        memcpy(&bits, &m, sizeof bits);
        return (el_half)(sign | (bits - 0x4B000000u)); /* 1024 = the smallest normal's bits, 0x400 */
    }
    return (el_half)(sign | ((a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13)); /* rebias 127 -> 15 */
}
/* one block's term t_j (edgellm.h): what every combine computes per lane */
static inline float el_block_term(int32_t format, int32_t isum, float d, int32_t sum, float scale, float min) {
    switch (format) {
    case EL_INT4_ASYM: return (scale * d) * (float)isum + (min * d) * (float)sum;
    case EL_INT4_SYM: return (scale * d) * (float)(isum - 8 * sum);
    default: return (scale * d) * (float)isum;
    }
}
void el_rms_norm_ref(float *out, const float *x, const float *weight, int32_t n, float eps);
void el_rope_ref(float *out, const float *x, const float *cos_t, const float *sin_t, int32_t n_heads,
                 int32_t head_dim);
void el_softmax_ref(float *out, const float *x, int32_t n);
void el_silu_mul_ref(float *out, const float *gate, const float *up, int32_t n);
void el_add_ref(float *out, const float *a, const float *b, int32_t n);
void el_attend_part_ref(float *out, float *max, float *sum, float *scores, const float *q, const el_half *keys,
                        const el_half *values, int32_t n_keys, int32_t d, int32_t stride, float scale);
void el_attend_part_f32_ref(float *out, float *max, float *sum, float *scores, const float *q, const float *keys,
                            const float *values, int32_t n_keys, int32_t d, int32_t stride, float scale);
void el_to_half_ref(el_half *out, const float *x, int32_t n);
void el_to_float_ref(float *out, const el_half *x, int32_t n);
void el_combine_parts_ref(float *out, const float *parts, int32_t n_parts, int32_t d);

/* The current variant, initializing on first use; NULL if EDGELLM_KERNELS named one this CPU lacks. */
const el_kernels *el_kernels_current(void);

/* pool.c: run fn(ctx, ith, nth) on every thread of the pool (or inline when pool is NULL). */
typedef void (*el_job_fn)(void *ctx, int32_t ith, int32_t nth);
void el_pool_run(el_pool *pool, el_job_fn fn, void *ctx);
/* Inside a job: waits until every thread of the pool has reached it (spinning, then sleeping), and
 * the last thread to arrive runs last(ctx) (if not NULL) before the barrier opens (with no pool, or one
 * thread, the caller runs it): every thread leaves the barrier seeing what it wrote. Every thread must
 * call it the same number of times. */
void el_pool_barrier_then(el_pool *pool, void (*last)(void *ctx), void *ctx);

/* api.c: rows r0 .. r1-1 of Y [n_tokens][w->rows] = X W^T for tokens t0 .. t0+n_tokens-1 of x
 * (el_matmul's body, for callers that split the rows over threads themselves). Not checked.
 * scratch: el_panel_bytes(x->nb), 64-byte aligned, the calling thread's own. */
void el_matmul_rows(const el_kernels *k, float *y, const el_qmatrix *w, const el_acts *x, int32_t t0,
                    int32_t n_tokens, int32_t r0, int32_t r1, void *scratch);
/* EL_OK if w is a matrix the products take (pointers, format and mins, block size: EL_EINVAL or
 * EL_EUNSUPPORTED otherwise). */
int el_check_matrix(const el_qmatrix *w);
/* Whether a product of n_tokens tokens runs in panels (else the row kernels, which read x->quads). */
int el_uses_panels(const el_kernels *k, int32_t n_tokens);
/* The d, sum and quads of blocks first .. first+count-1 of one token's row (d, sum and quads point at
 * the token's start; quads NULL: not those), from its blocks x (pointing at the token's start too). */
void el_prepare_blocks(float *d, int32_t *sum, int8_t *quads, const el_block_q16a *x, int32_t first, int32_t count);

#endif /* EDGELLM_KERNELS_H */
