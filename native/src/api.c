/* api.c: the public entry points. Each checks its arguments, picks the current variant and
 * splits rows over the pool; the float accumulation of the matrix products lives here, once. */
#include <math.h>
#include <stddef.h>

#include "kernels.h"

#define CHUNK 64 /* activation blocks whose int32 sums are kept on the stack at a time */

int el_abi_version(void) { return EL_ABI_VERSION; }

const char *el_status_string(int status) {
    switch (status) {
    case EL_OK: return "ok";
    case EL_EINVAL: return "invalid argument (NULL pointer, length or format)";
    case EL_EUNSUPPORTED: return "not supported by this CPU or build";
    case EL_ENOMEM: return "out of memory";
    case EL_ETHREAD: return "could not start a thread";
    default: return "unknown status";
    }
}

static int32_t ceil_div(int32_t a, int32_t b) { return (a + b - 1) / b; }

/* ---- quantized matrix products ---------------------------------------------------------------- */

/* Adds blocks j0 .. j0+n-1 of one row to acc, in block order, exactly as edgellm.h states.
 * Every variant's products go through this one loop (compiled once, -ffp-contract=off), which is
 * what makes them bit-identical. */
static float combine_row(int32_t format, float acc, const int32_t *isum, const el_block_q8a *x,
                         const float *scales, const float *mins, int32_t j0, int32_t n, int32_t shift) {
    switch (format) {
    case EL_INT4_ASYM:
        for (int32_t j = j0; j < j0 + n; j++) {
            float d = x[j].d;
            acc += scales[j >> shift] * d * (float)isum[j - j0] + mins[j >> shift] * d * (float)x[j].sum;
        }
        break;
    case EL_INT4_SYM:
        for (int32_t j = j0; j < j0 + n; j++)
            acc += scales[j >> shift] * x[j].d * (float)(isum[j - j0] - 8 * x[j].sum);
        break;
    default: /* EL_INT8_SYM: isum already holds sum (code - 128) * q */
        for (int32_t j = j0; j < j0 + n; j++) acc += scales[j >> shift] * x[j].d * (float)isum[j - j0];
        break;
    }
    return acc;
}

typedef struct {
    float *y;                /* [n_tokens][rows] */
    const el_qmatrix *w;
    const el_block_q8a *x;   /* [n_tokens][nb] */
    int32_t nb, n_tokens;
    const el_kernels *k;
} matmul_job;

static void matmul_range(const matmul_job *job, int32_t r0, int32_t r1) {
    const el_qmatrix *w = job->w;
    const int32_t nb = job->nb, n_tokens = job->n_tokens, rows = w->rows;
    const int q4 = w->format != EL_INT8_SYM;
    const size_t span = q4 ? 16 : 32;                           /* code bytes per 32 values */
    const int32_t n_wblocks = ceil_div(w->cols, w->block);
    const size_t row_bytes = (size_t)n_wblocks * (size_t)w->block / (q4 ? 2 : 1);
    const int32_t shift = w->block == 32 ? 0 : w->block == 64 ? 1 : 2;
    el_isums_fn isums = q4 ? job->k->isums_q4 : job->k->isums_q8;
    el_isums_2x2_fn isums_2x2 = q4 ? job->k->isums_q4_2x2 : job->k->isums_q8_2x2;
    int32_t isum[4 * CHUNK];

    int32_t r = r0;
    if (isums_2x2 && n_tokens >= 2) {
        for (; r + 2 <= r1; r += 2) {
            const uint8_t *c0 = w->qweight + (size_t)r * row_bytes, *c1 = c0 + row_bytes;
            const float *s0 = w->scales + (size_t)r * n_wblocks, *s1 = s0 + n_wblocks;
            const float *m0 = w->mins ? w->mins + (size_t)r * n_wblocks : NULL, *m1 = m0 ? m0 + n_wblocks : NULL;
            int32_t t = 0;
            for (; t + 2 <= n_tokens; t += 2) {
                const el_block_q8a *x0 = job->x + (size_t)t * nb, *x1 = x0 + nb;
                float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                for (int32_t j0 = 0; j0 < nb; j0 += CHUNK) {
                    int32_t n = nb - j0 < CHUNK ? nb - j0 : CHUNK;
                    isums_2x2(isum, CHUNK, c0 + j0 * span, c1 + j0 * span, x0 + j0, x1 + j0, n);
                    acc[0] = combine_row(w->format, acc[0], isum, x0, s0, m0, j0, n, shift);
                    acc[1] = combine_row(w->format, acc[1], isum + CHUNK, x1, s0, m0, j0, n, shift);
                    acc[2] = combine_row(w->format, acc[2], isum + 2 * CHUNK, x0, s1, m1, j0, n, shift);
                    acc[3] = combine_row(w->format, acc[3], isum + 3 * CHUNK, x1, s1, m1, j0, n, shift);
                }
                job->y[(size_t)t * rows + r] = acc[0];
                job->y[(size_t)(t + 1) * rows + r] = acc[1];
                job->y[(size_t)t * rows + r + 1] = acc[2];
                job->y[(size_t)(t + 1) * rows + r + 1] = acc[3];
            }
            for (; t < n_tokens; t++) { /* an odd last token: one row at a time */
                const el_block_q8a *x = job->x + (size_t)t * nb;
                for (int32_t rr = 0; rr < 2; rr++) {
                    float acc = 0.0f;
                    for (int32_t j0 = 0; j0 < nb; j0 += CHUNK) {
                        int32_t n = nb - j0 < CHUNK ? nb - j0 : CHUNK;
                        isums(isum, (rr ? c1 : c0) + j0 * span, x + j0, n);
                        acc = combine_row(w->format, acc, isum, x, rr ? s1 : s0, rr ? m1 : m0, j0, n, shift);
                    }
                    job->y[(size_t)t * rows + r + rr] = acc;
                }
            }
        }
    }
    for (; r < r1; r++) {
        const uint8_t *codes = w->qweight + (size_t)r * row_bytes;
        const float *s = w->scales + (size_t)r * n_wblocks;
        const float *m = w->mins ? w->mins + (size_t)r * n_wblocks : NULL;
        for (int32_t t = 0; t < n_tokens; t++) {
            const el_block_q8a *x = job->x + (size_t)t * nb;
            float acc = 0.0f;
            for (int32_t j0 = 0; j0 < nb; j0 += CHUNK) {
                int32_t n = nb - j0 < CHUNK ? nb - j0 : CHUNK;
                isums(isum, codes + j0 * span, x + j0, n);
                acc = combine_row(w->format, acc, isum, x, s, m, j0, n, shift);
            }
            job->y[(size_t)t * rows + r] = acc;
        }
    }
}

/* Thread ith of nth takes one contiguous range of rows. */
static void matmul_thread(void *ctx, int32_t ith, int32_t nth) {
    const matmul_job *job = ctx;
    int32_t rows = job->w->rows;
    int32_t per = ceil_div(rows, nth);
    int32_t r0 = ith * per, r1 = r0 + per < rows ? r0 + per : rows;
    if (r0 < r1) matmul_range(job, r0, r1);
}

static int check_matrix(const el_qmatrix *w) {
    if (!w || !w->qweight || !w->scales) return EL_EINVAL;
    if (w->format < EL_INT4_ASYM || w->format > EL_INT8_SYM) return EL_EINVAL;
    if (w->format == EL_INT4_ASYM && !w->mins) return EL_EINVAL;
    if (w->rows < 0 || w->cols < 1) return EL_EINVAL;
    if (w->block != 32 && w->block != 64 && w->block != 128) return EL_EUNSUPPORTED;
    return EL_OK;
}

int el_matmul(float *y, int32_t n_tokens, int32_t n_y, const el_qmatrix *w, const el_block_q8a *x,
              int32_t n_blocks, el_pool *pool) {
    int status = check_matrix(w);
    if (status != EL_OK) return status;
    if (!y || !x || n_tokens < 0 || n_y != w->rows || n_blocks != ceil_div(w->cols, EL_QBLOCK)) return EL_EINVAL;
    const el_kernels *k = el_kernels_current();
    if (!k) return EL_EUNSUPPORTED;
    if (n_tokens == 0 || w->rows == 0) return EL_OK;
    matmul_job job = {y, w, x, n_blocks, n_tokens, k};
    el_pool_run(pool, matmul_thread, &job);
    return EL_OK;
}

int el_matvec(float *y, int32_t n_y, const el_qmatrix *w, const el_block_q8a *x, int32_t n_blocks, el_pool *pool) {
    return el_matmul(y, 1, n_y, w, x, n_blocks, pool);
}

int el_quantize_q8a(el_block_q8a *out, int32_t n_blocks, const float *x, int32_t n_rows, int32_t n) {
    if (!out || !x || n < 1 || n_rows < 0 || n_blocks != ceil_div(n, EL_QBLOCK)) return EL_EINVAL;
    const el_kernels *k = el_kernels_current();
    if (!k) return EL_EUNSUPPORTED;
    for (int32_t r = 0; r < n_rows; r++) k->quantize_q8a(out + (size_t)r * n_blocks, x + (size_t)r * n, n);
    return EL_OK;
}

/* ---- float kernels ---------------------------------------------------------------------------- */

int el_rms_norm(float *out, const float *x, const float *weight, int32_t n_rows, int32_t n, float eps) {
    if (!out || !x || !weight || n < 1 || n_rows < 0) return EL_EINVAL;
    const el_kernels *k = el_kernels_current();
    if (!k) return EL_EUNSUPPORTED;
    for (int32_t r = 0; r < n_rows; r++) k->rms_norm(out + (size_t)r * n, x + (size_t)r * n, weight, n, eps);
    return EL_OK;
}

int el_rope(float *out, const float *x, const float *cos_t, const float *sin_t, int32_t n_heads, int32_t head_dim) {
    if (!out || !x || !cos_t || !sin_t || n_heads < 0 || head_dim < 2 || head_dim % 2) return EL_EINVAL;
    const el_kernels *k = el_kernels_current();
    if (!k) return EL_EUNSUPPORTED;
    k->rope(out, x, cos_t, sin_t, n_heads, head_dim);
    return EL_OK;
}

int el_rope_tables(float *cos_t, float *sin_t, const float *inv_freq, int32_t half, float position) {
    if (!cos_t || !sin_t || !inv_freq || half < 1) return EL_EINVAL;
    for (int32_t i = 0; i < half; i++) {
        float angle = position * inv_freq[i]; /* float32 like the reference's positions * inv_freq */
        cos_t[i] = cosf(angle);
        sin_t[i] = sinf(angle);
    }
    return EL_OK;
}

int el_softmax(float *out, const float *x, int32_t n_rows, int32_t n) {
    if (!out || !x || n < 1 || n_rows < 0) return EL_EINVAL;
    const el_kernels *k = el_kernels_current();
    if (!k) return EL_EUNSUPPORTED;
    for (int32_t r = 0; r < n_rows; r++) k->softmax(out + (size_t)r * n, x + (size_t)r * n, n);
    return EL_OK;
}

int el_silu_mul(float *out, const float *gate, const float *up, int32_t n) {
    if (!out || !gate || !up || n < 0) return EL_EINVAL;
    const el_kernels *k = el_kernels_current();
    if (!k) return EL_EUNSUPPORTED;
    k->silu_mul(out, gate, up, n);
    return EL_OK;
}

int el_add(float *out, const float *a, const float *b, int32_t n) {
    if (!out || !a || !b || n < 0) return EL_EINVAL;
    const el_kernels *k = el_kernels_current();
    if (!k) return EL_EUNSUPPORTED;
    k->add(out, a, b, n);
    return EL_OK;
}
