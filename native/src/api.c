/* api.c: the public entry points. Each checks its arguments, picks the current variant and
 * splits rows over the pool; the one reduction of the products' eight float lanes lives here. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "kernels.h"

#define CHUNK 64 /* activation blocks whose int32 sums are kept on the stack at a time */

int el_abi_version(void) { return EL_ABI_VERSION; }

int el_heap_trim(void) {
#if defined(__GLIBC__)
    return malloc_trim(0);
#else
    return 0;
#endif
}

const char *el_status_string(int status) {
    switch (status) {
    case EL_OK: return "ok";
    case EL_EINVAL: return "invalid argument (NULL pointer, length or format)";
    case EL_EUNSUPPORTED: return "not supported by this CPU or build";
    case EL_ENOMEM: return "out of memory";
    case EL_ETHREAD: return "could not start a thread";
    case EL_ERANGE: return "out of range (position past the context, chunk too long, token id past the vocabulary)";
    default: return "unknown status";
    }
}

/* ---- quantized matrix products ---------------------------------------------------------------- */

/* The lanes' one reduction order (edgellm.h), shared by every variant. */
static float reduce_lanes(const float *l) {
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

void el_prepare_blocks(float *d, int32_t *sum, int8_t *quads, const el_block_q16a *x, int32_t first, int32_t count) {
    for (int32_t j = first; j < first + count; j++) {
        d[j] = x[j].d;
        sum[j] = x[j].sum;
        if (!quads) continue;
        int8_t *slot = quads + (size_t)(j / 4) * EL_QUAD_BYTES + (j % 4) * 16;
        for (int i = 0; i < 16; i++) {
            slot[i] = x[j].qh[2 * i];
            slot[64 + i] = x[j].qh[2 * i + 1];
            slot[128 + i] = x[j].ql[2 * i];
            slot[192 + i] = x[j].ql[2 * i + 1];
        }
    }
}

typedef struct {
    float *y;                /* [n_tokens][rows] */
    const el_qmatrix *w;
    el_acts x;               /* from the first token on */
    int32_t n_tokens;
    const el_kernels *k;
    void *scratch;           /* this thread's el_panel_bytes(nb), for the panels */
} matmul_job;

/* Where row r of a matrix lives: its codes, block scales and mins (NULL: a format without), and the
 * shapes the product loops share. */
typedef struct {
    const el_qmatrix *w;
    int32_t n_wblocks;       /* weight blocks per row */
    size_t row_bytes;        /* code bytes per row */
    size_t span;             /* code bytes per 32 values: what one activation block meets */
    int32_t shift;           /* log2(block / 32): an activation block's weight block is j >> shift */
    int q4;
} matrix_rows;

static matrix_rows rows_of_matrix(const el_qmatrix *w) {
    const int q4 = w->format != EL_INT8_SYM;
    const int32_t n_wblocks = el_ceil_div(w->cols, w->block);
    return (matrix_rows){w, n_wblocks, (size_t)n_wblocks * (size_t)w->block / (q4 ? 2 : 1), q4 ? 16 : 32,
                         w->block == 32 ? 0 : w->block == 64 ? 1 : 2, q4};
}
static inline const uint8_t *row_codes(const matrix_rows *m, int32_t r) {
    return m->w->qweight + (size_t)r * m->row_bytes;
}
static inline const el_half *row_scales(const matrix_rows *m, int32_t r) {
    return m->w->scales + (size_t)r * m->n_wblocks;
}
static inline const el_half *row_mins(const matrix_rows *m, int32_t r) {
    return m->w->mins ? m->w->mins + (size_t)r * m->n_wblocks : NULL;
}

/* Fewer tokens than this go to the row kernels: packing a panel costs about what a few tokens' products do. */
#define PANEL_MIN_TOKENS 8

int el_uses_panels(const el_kernels *k, int32_t n_tokens) { return k->panels && n_tokens >= PANEL_MIN_TOKENS; }

#define TILE_BYTES (24 * 1024) /* half of a 48 KB L1 (Zen 4/5); Cortex-A76's 64 KB holds it too */

/* Rows [r0, r1) in panels: EL_PANEL_ROWS rows packed once for every token (blocks of 32 only). */
static void product_panels(const matmul_job *job, const matrix_rows *m, int32_t r0, int32_t r1) {
    const el_qmatrix *w = job->w;
    job->k->panels(job->y + r0, (size_t)w->rows, r1 - r0, job->n_tokens, w->format, row_codes(m, r0), m->row_bytes,
                   row_scales(m, r0), row_mins(m, r0), (size_t)m->n_wblocks, job->x.q, job->x.d, job->x.sum,
                   job->x.nb, job->scratch);
}

/* Rows [r0, r1) by the fused row kernels (blocks of 32 only), in tiles of tokens whose activations stay
 * in L1 (TILE_BYTES) while the rows stream past: a prefill chunk's activations read once per row would
 * come from L2, and that traffic, not the arithmetic, would set the pace. Every y is still one kernel
 * call's. One token: the rows in one call; four: one call a row. */
static void product_row_kernels(const matmul_job *job, const matrix_rows *m, int32_t r0, int32_t r1) {
    const el_kernels *k = job->k;
    const el_row_q4_fn row_q4 = k->row_q4;
    const el_row4_q4_fn row4_q4 = k->row4_q4;
    const el_row_q8_fn row_q8 = k->row_q8;
    const int q4 = m->q4;
    const int32_t nb = job->x.nb, n_tokens = job->n_tokens, rows = job->w->rows, format = job->w->format;
    const el_block_q16a *x = job->x.q;
    const int8_t *quads = job->x.quads;
    const float *xd = job->x.d;
    const int32_t *xsum = job->x.sum;
    float *y = job->y;
    const size_t quad_stride = el_quad_stride(nb);
    int32_t tile = (int32_t)(TILE_BYTES / (quad_stride + (size_t)nb * 8)) & ~3;
    if (tile < 4) tile = 4;
    for (int32_t t0 = 0; t0 < n_tokens; t0 += tile) {
        const int32_t t1 = t0 + tile < n_tokens ? t0 + tile : n_tokens;
        if (t1 - t0 == 1 && (q4 ? k->rows_q4 != NULL : k->rows_q8 != NULL)) {
            const size_t o = (size_t)t0 * nb;
            float *yt = y + (size_t)t0 * rows + r0;
            if (q4)
                k->rows_q4(yt, r1 - r0, format, row_codes(m, r0), m->row_bytes, row_scales(m, r0), row_mins(m, r0),
                           (size_t)m->n_wblocks, quads + t0 * quad_stride, xd + o, xsum + o, nb);
            else
                k->rows_q8(yt, r1 - r0, row_codes(m, r0), m->row_bytes, row_scales(m, r0), (size_t)m->n_wblocks, x + o,
                           xd + o, xsum + o, nb);
            continue;
        }
        for (int32_t r = r0; r < r1; r++) {
            const uint8_t *codes = row_codes(m, r);
            const el_half *sc = row_scales(m, r), *mn = row_mins(m, r);
            int32_t t = t0;
            if (q4 && row4_q4)
                for (; t + 4 <= t1; t += 4)
                    row4_q4(y + (size_t)t * rows + r, (size_t)rows, format, codes, sc, mn, quads + t * quad_stride,
                            quad_stride, xd + (size_t)t * nb, xsum + (size_t)t * nb, (size_t)nb, nb);
            for (; t < t1; t++) {
                const size_t o = (size_t)t * nb;
                y[(size_t)t * rows + r] = q4 ? row_q4(format, codes, sc, mn, quads + t * quad_stride, xd + o,
                                                      xsum + o, nb)
                                             : row_q8(codes, sc, x + o, xd + o, xsum + o, nb);
            }
        }
    }
}

/* The generic kernels of one product and the shapes they take, held in a local: the loops call the
 * kernels through pointers, and a field read through a pointer would be loaded again after every call. */
typedef struct {
    el_isums_fn isums;
    el_combine_fn combine;
    int32_t format, shift, nb;
    size_t span;
} generic_kernels;

/* One row (its codes, scales and mins) against one token's activation blocks by the generic kernels:
 * integer sums CHUNK blocks at a time, combined into the eight float lanes. */
static inline __attribute__((always_inline)) float row_token(generic_kernels g, const uint8_t *codes,
                                                            const el_half *sc, const el_half *mn,
                                                            const el_block_q16a *x, const float *xd,
                                                            const int32_t *xsum, int32_t *isum) {
    float lanes[8] = {0};
    for (int32_t j0 = 0; j0 < g.nb; j0 += CHUNK) {
        const int32_t n = g.nb - j0 < CHUNK ? g.nb - j0 : CHUNK, b0 = j0 >> g.shift;
        g.isums(isum, codes + j0 * g.span, x + j0, n);
        g.combine(lanes, g.format, isum, xd + j0, xsum + j0, sc + b0, mn ? mn + b0 : NULL, n, g.shift);
    }
    return reduce_lanes(lanes);
}

/* Rows [r0, r1) by the generic kernels; where the variant has them, two rows by two tokens at once
 * (i8mm's SMMLA), the odd last token and row one at a time. */
static void product_generic(const matmul_job *job, const matrix_rows *m, int32_t r0, int32_t r1) {
    const el_kernels *k = job->k;
    const generic_kernels g = {m->q4 ? k->isums_q4 : k->isums_q8, k->combine, job->w->format, m->shift, job->x.nb,
                               m->span};
    const el_isums_2x2_fn isums_2x2 = m->q4 ? k->isums_q4_2x2 : k->isums_q8_2x2;
    const int32_t nb = g.nb, n_tokens = job->n_tokens, rows = job->w->rows;
    const el_block_q16a *x = job->x.q;
    const float *xd = job->x.d;
    const int32_t *xsum = job->x.sum;
    float *y = job->y;
    int32_t isum[4 * CHUNK];
    int32_t r = r0;
    if (isums_2x2 && n_tokens >= 2) {
        for (; r + 2 <= r1; r += 2) {
            const uint8_t *c0 = row_codes(m, r), *c1 = row_codes(m, r + 1);
            const el_half *s0 = row_scales(m, r), *s1 = row_scales(m, r + 1), *m0 = row_mins(m, r),
                          *m1 = row_mins(m, r + 1);
            int32_t t = 0;
            for (; t + 2 <= n_tokens; t += 2) {
                const size_t o0 = (size_t)t * nb, o1 = o0 + nb;
                float lanes[4][8] = {{0}};
                for (int32_t j0 = 0; j0 < nb; j0 += CHUNK) {
                    const int32_t n = nb - j0 < CHUNK ? nb - j0 : CHUNK, b0 = j0 >> g.shift;
                    const el_half *n0 = m0 ? m0 + b0 : NULL, *n1 = m1 ? m1 + b0 : NULL;
                    const float *d0 = xd + o0 + j0, *d1 = xd + o1 + j0;
                    const int32_t *u0 = xsum + o0 + j0, *u1 = xsum + o1 + j0;
                    isums_2x2(isum, CHUNK, c0 + j0 * g.span, c1 + j0 * g.span, x + o0 + j0, x + o1 + j0, n);
                    g.combine(lanes[0], g.format, isum, d0, u0, s0 + b0, n0, n, g.shift);
                    g.combine(lanes[1], g.format, isum + CHUNK, d1, u1, s0 + b0, n0, n, g.shift);
                    g.combine(lanes[2], g.format, isum + 2 * CHUNK, d0, u0, s1 + b0, n1, n, g.shift);
                    g.combine(lanes[3], g.format, isum + 3 * CHUNK, d1, u1, s1 + b0, n1, n, g.shift);
                }
                y[(size_t)t * rows + r] = reduce_lanes(lanes[0]);
                y[(size_t)(t + 1) * rows + r] = reduce_lanes(lanes[1]);
                y[(size_t)t * rows + r + 1] = reduce_lanes(lanes[2]);
                y[(size_t)(t + 1) * rows + r + 1] = reduce_lanes(lanes[3]);
            }
            for (; t < n_tokens; t++) { /* an odd last token: the two rows one at a time */
                const size_t o = (size_t)t * nb;
                y[(size_t)t * rows + r] = row_token(g, c0, s0, m0, x + o, xd + o, xsum + o, isum);
                y[(size_t)t * rows + r + 1] = row_token(g, c1, s1, m1, x + o, xd + o, xsum + o, isum);
            }
        }
    }
    for (; r < r1; r++) {
        const uint8_t *codes = row_codes(m, r);
        const el_half *sc = row_scales(m, r), *mn = row_mins(m, r);
        for (int32_t t = 0; t < n_tokens; t++) {
            const size_t o = (size_t)t * nb;
            y[(size_t)t * rows + r] = row_token(g, codes, sc, mn, x + o, xd + o, xsum + o, isum);
        }
    }
}

/* Rows [r0, r1) with 8-bit activations: the variant's products for blocks of 32, else the reference's. */
static void product_q8a(const matmul_job *job, const matrix_rows *m, int32_t r0, int32_t r1) {
    const el_qmatrix *w = job->w;
    const int32_t nb = job->x.nb, rows = w->rows;
    if (w->block == 32 && job->k->products_q8a) {
        job->k->products_q8a(job->y + r0, (size_t)rows, r1 - r0, job->n_tokens, w->format, row_codes(m, r0),
                             m->row_bytes, row_scales(m, r0), row_mins(m, r0), (size_t)m->n_wblocks, job->x.q8, nb,
                             job->scratch);
        return;
    }
    for (int32_t r = r0; r < r1; r++)
        for (int32_t t = 0; t < job->n_tokens; t++)
            job->y[(size_t)t * rows + r] = el_row_q8a_ref(w->format, row_codes(m, r), row_scales(m, r),
                                                          row_mins(m, r), job->x.q8 + (size_t)t * nb, nb, m->shift);
}

/* Rows [r0, r1) of the job's product, by the best path the variant and the matrix allow. */
static void matmul_range(const matmul_job *job, int32_t r0, int32_t r1) {
    const matrix_rows m = rows_of_matrix(job->w);
    const el_kernels *k = job->k;
    if (job->x.q8)
        product_q8a(job, &m, r0, r1);
    else if (job->w->block == 32 && el_uses_panels(k, job->n_tokens))
        product_panels(job, &m, r0, r1);
    else if (job->w->block == 32 && (m.q4 ? k->row_q4 != NULL : k->row_q8 != NULL))
        product_row_kernels(job, &m, r0, r1);
    else
        product_generic(job, &m, r0, r1);
}

void el_matmul_rows(const el_kernels *k, float *y, const el_qmatrix *w, const el_acts *x, int32_t t0,
                    int32_t n_tokens, int32_t r0, int32_t r1, void *scratch) {
    if (r0 >= r1 || n_tokens <= 0) return;
    size_t o = (size_t)t0 * x->nb;
    matmul_job job = {y, w, {NULL, NULL, NULL, NULL, x->nb, x->q8 ? x->q8 + o : NULL}, n_tokens, k, scratch};
    if (!x->q8) job.x = (el_acts){x->q + o, x->d + o, x->sum + o, x->quads + t0 * el_quad_stride(x->nb), x->nb, NULL};
    matmul_range(&job, r0, r1);
}

/* Thread ith of nth takes one contiguous range of rows (with its own panel scratch). */
static void matmul_thread(void *ctx, int32_t ith, int32_t nth) {
    const matmul_job *job = ctx;
    int32_t rows = job->w->rows;
    int32_t per = el_ceil_div(rows, nth);
    int32_t r0 = ith * per, r1 = r0 + per < rows ? r0 + per : rows;
    if (r0 >= r1) return;
    matmul_job own = *job;
    own.scratch = (uint8_t *)job->scratch + (size_t)ith * el_product_scratch_bytes(job->x.nb);
    matmul_range(&own, r0, r1);
}

int el_check_matrix(const el_qmatrix *w) {
    if (!w || !w->qweight || !w->scales) return EL_EINVAL;
    if (w->format < EL_INT4_ASYM || w->format > EL_INT8_SYM) return EL_EINVAL;
    if ((w->format == EL_INT4_ASYM) != (w->mins != NULL)) return EL_EINVAL; /* a min per block, or none */
    if (w->rows < 0 || w->cols < 1) return EL_EINVAL;
    if (w->block != 32 && w->block != 64 && w->block != 128) return EL_EUNSUPPORTED;
    return EL_OK;
}

/* The arguments of a product (either activation format), and the variant that runs it into *k. */
static int check_product(const el_kernels **k, const float *y, int32_t n_tokens, int32_t n_y, const el_qmatrix *w,
                         const void *x, int32_t n_blocks) {
    int status = el_check_matrix(w);
    if (status != EL_OK) return status;
    if (!y || !x || n_tokens < 0 || n_y != w->rows || n_blocks != el_ceil_div(w->cols, EL_QBLOCK)) return EL_EINVAL;
    *k = el_kernels_current();
    return *k ? EL_OK : EL_EUNSUPPORTED;
}

int el_matmul(float *y, int32_t n_tokens, int32_t n_y, const el_qmatrix *w, const el_block_q16a *x,
              int32_t n_blocks, el_pool *pool) {
    const el_kernels *k;
    int status = check_product(&k, y, n_tokens, n_y, w, x, n_blocks);
    if (status != EL_OK || n_tokens == 0 || w->rows == 0) return status;
    size_t count = (size_t)n_tokens * (size_t)n_blocks, quad_stride = el_quad_stride(n_blocks);
    float *xd = malloc(sizeof(float) * count);
    int32_t *xsum = malloc(sizeof(int32_t) * count);
    int8_t *quads = el_alloc_quads((size_t)n_tokens, n_blocks);
    void *scratch = aligned_alloc(64, (size_t)el_pool_threads(pool) * el_product_scratch_bytes(n_blocks));
    int status_alloc = xd && xsum && quads && scratch ? EL_OK : EL_ENOMEM;
    if (status_alloc == EL_OK) {
        for (int32_t t = 0; t < n_tokens; t++)
            el_prepare_blocks(xd + (size_t)t * n_blocks, xsum + (size_t)t * n_blocks, quads + t * quad_stride,
                              x + (size_t)t * n_blocks, 0, n_blocks);
        matmul_job job = {y, w, {x, xd, xsum, quads, n_blocks, NULL}, n_tokens, k, scratch};
        el_pool_run(pool, matmul_thread, &job);
    }
    free(xd);
    free(xsum);
    free(quads);
    free(scratch);
    return status_alloc;
}

int el_matmul_q8a(float *y, int32_t n_tokens, int32_t n_y, const el_qmatrix *w, const el_block_q8a *x,
                  int32_t n_blocks, el_pool *pool) {
    const el_kernels *k;
    int status = check_product(&k, y, n_tokens, n_y, w, x, n_blocks);
    if (status != EL_OK || n_tokens == 0 || w->rows == 0) return status;
    void *scratch = aligned_alloc(64, (size_t)el_pool_threads(pool) * el_product_scratch_bytes(n_blocks));
    if (!scratch) return EL_ENOMEM;
    matmul_job job = {y, w, {NULL, NULL, NULL, NULL, n_blocks, x}, n_tokens, k, scratch};
    el_pool_run(pool, matmul_thread, &job);
    free(scratch);
    return EL_OK;
}

int el_quantize_q8a(el_block_q8a *out, int32_t n_blocks, const float *x, int32_t n_rows, int32_t n) {
    if (!out || !x || n < 1 || n_rows < 0 || n_blocks != el_ceil_div(n, EL_QBLOCK)) return EL_EINVAL;
    const el_kernels *k = el_kernels_current();
    if (!k) return EL_EUNSUPPORTED;
    for (int32_t r = 0; r < n_rows; r++) k->quantize_q8a(out + (size_t)r * n_blocks, x + (size_t)r * n, n);
    return EL_OK;
}

int el_matvec(float *y, int32_t n_y, const el_qmatrix *w, const el_block_q16a *x, int32_t n_blocks, el_pool *pool) {
    return el_matmul(y, 1, n_y, w, x, n_blocks, pool);
}

int el_quantize_q16a(el_block_q16a *out, int32_t n_blocks, const float *x, int32_t n_rows, int32_t n) {
    if (!out || !x || n < 1 || n_rows < 0 || n_blocks != el_ceil_div(n, EL_QBLOCK)) return EL_EINVAL;
    const el_kernels *k = el_kernels_current();
    if (!k) return EL_EUNSUPPORTED;
    for (int32_t r = 0; r < n_rows; r++) k->quantize_q16a(out + (size_t)r * n_blocks, x + (size_t)r * n, n);
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
