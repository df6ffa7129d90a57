/* test_kernels.c: every variant this CPU runs against the reference, on deterministic data.
 * Integer paths (activation quantization, matvec, matmul) must be bit-identical; float kernels
 * must agree to a normalized MSE of 1e-10. The reference itself is checked against the formula
 * of edgellm.h written out naively here. Prints one line per check, then "N passed, N failed";
 * exits non-zero on any failure. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../edgellm.h"
#include "../src/kernels.h" /* the variants' tables, which the engine uses internally (attend_part, to_half) */

static int n_passed, n_failed;

static void report(int ok, const char *variant, const char *what, const char *detail) {
    printf("%s %-10s %s%s%s\n", ok ? "ok  " : "FAIL", variant, what, detail[0] ? ": " : "", detail);
    if (ok) n_passed++;
    else n_failed++;
}

/* ---- deterministic data ------------------------------------------------------------------------ */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(rnd() >> 8) / 16777216.0f; }
static float normalish(void) { return uniform(-1, 1) + uniform(-1, 1) + uniform(-1, 1); }

static const char *FORMAT_NAMES[] = {"int4_asym", "int4_sym", "int8_sym"};

typedef struct { /* a random quantized matrix and its arrays */
    el_qmatrix m;
    uint8_t *qweight;
    el_half *scales, *mins;  /* what the library reads */
    float *fscales, *fmins;  /* the same values as the compiler's _Float16 converts them, for the formula */
} test_matrix;

/* a float16 scale near v (the compiler's conversion), its bits and the float32 it equals */
static el_half half_of(float v, float *exact) {
    _Float16 h = (_Float16)v;
    el_half bits;
    memcpy(&bits, &h, sizeof bits);
    *exact = (float)h;
    return bits;
}

static test_matrix make_matrix(int32_t format, int32_t rows, int32_t cols, int32_t block) {
    test_matrix t;
    int32_t nwb = (cols + block - 1) / block;
    size_t bytes = (size_t)rows * nwb * block / (format == EL_INT8_SYM ? 1 : 2);
    t.qweight = malloc(bytes ? bytes : 1);
    size_t n = (size_t)rows * nwb > 0 ? (size_t)rows * nwb : 1;
    t.scales = malloc(sizeof(el_half) * n);
    t.fscales = malloc(sizeof(float) * n);
    t.mins = format == EL_INT4_ASYM ? malloc(sizeof(el_half) * n) : NULL;
    t.fmins = format == EL_INT4_ASYM ? malloc(sizeof(float) * n) : NULL;
    for (size_t i = 0; i < bytes; i++) t.qweight[i] = (uint8_t)rnd();
    for (size_t i = 0; i < (size_t)rows * nwb; i++) {
        /* one scale in 16 a float16 subnormal (below 2^-14), as tiny weights' blocks get */
        t.scales[i] = half_of(rnd() % 16 ? uniform(0.001f, 0.05f) : uniform(1e-7f, 6e-5f), &t.fscales[i]);
        if (t.mins) t.mins[i] = half_of(uniform(-0.4f, 0.0f), &t.fmins[i]);
    }
    t.m = (el_qmatrix){format, rows, cols, block, t.qweight, t.scales, t.mins};
    return t;
}

static void free_matrix(test_matrix *t) {
    free(t->qweight);
    free(t->scales);
    free(t->mins);
    free(t->fscales);
    free(t->fmins);
}

static float *random_floats(int32_t n) {
    float *x = malloc(sizeof(float) * (size_t)(n ? n : 1));
    for (int32_t i = 0; i < n; i++) x[i] = normalish();
    return x;
}

static int same_bits(const void *a, const void *b, size_t bytes) { return memcmp(a, b, bytes) == 0; }

static double nmse(const float *a, const float *ref, int32_t n) {
    double num = 0, den = 0;
    for (int32_t i = 0; i < n; i++) {
        if (isnan(a[i]) != isnan(ref[i])) return INFINITY;
        if (isnan(ref[i])) continue;
        num += ((double)a[i] - ref[i]) * ((double)a[i] - ref[i]);
        den += (double)ref[i] * ref[i];
    }
    return den ? num / den : num;
}

/* ---- the formula of edgellm.h, written out without any of the library's code ------------------- */

static int32_t code_at(const test_matrix *t, int32_t r, int32_t c) {
    const el_qmatrix *m = &t->m;
    int32_t nwb = (m->cols + m->block - 1) / m->block;
    if (m->format == EL_INT8_SYM) return t->qweight[(size_t)r * nwb * m->block + c];
    uint8_t byte = t->qweight[(size_t)r * nwb * m->block / 2 + c / 2];
    return c % 2 ? byte >> 4 : byte & 0x0F;
}

static float formula_row(const test_matrix *t, int32_t r, const el_block_q16a *x) {
    const el_qmatrix *m = &t->m;
    int32_t nwb = (m->cols + m->block - 1) / m->block, nb = (m->cols + 31) / 32;
    int32_t zp = m->format == EL_INT4_ASYM ? 0 : m->format == EL_INT4_SYM ? 8 : 128;
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int32_t j = 0; j < nb; j++) {
        int64_t isum = 0;
        int32_t b = j * 32 / m->block;
        for (int32_t i = 0; i < 32; i++)
            isum += (int64_t)(code_at(t, r, 32 * j + i) - zp) * (256 * x[j].qh[i] + x[j].ql[i]);
        float s = t->fscales[(size_t)r * nwb + b], d = x[j].d, term;
        if (m->format == EL_INT4_ASYM) term = (s * d) * (float)isum + (t->fmins[(size_t)r * nwb + b] * d) * (float)x[j].sum;
        else term = (s * d) * (float)isum;
        lane[j % 8] += term;
    }
    return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

/* ---- checks ----------------------------------------------------------------------------------- */

static const int32_t COLS[] = {32, 64, 224, 100, 288, 512, 576, 1000, 1568};
static const int32_t ROWS[] = {1, 3, 17, 64, 577};
#define N_COLS ((int)(sizeof COLS / sizeof COLS[0]))
#define N_ROWS ((int)(sizeof ROWS / sizeof ROWS[0]))

/* Values whose x/d lands exactly on .5 (amax 127 makes d = 1), zeros, a subnormal, NaN, inf. */
static float *quantize_corner_cases(int32_t *n_out) {
    int32_t n = 32 * 6 + 7;
    float *x = random_floats(n);
    x[0] = 127.0f; x[1] = 2.5f; x[2] = -2.5f; x[3] = 0.5f; x[4] = -0.5f; x[5] = 126.5f; x[6] = -1.5f;
    for (int i = 32; i < 64; i++) x[i] = 0.0f;
    x[70] = 1e-40f; for (int i = 64; i < 96; i++) if (i != 70) x[i] = 0.0f;
    x[100] = NAN;
    x[140] = INFINITY;
    *n_out = n;
    return x;
}


static el_block_q16a *quantize_with(const char *variant, const float *x, int32_t n_rows, int32_t n) {
    int32_t nb = (n + 31) / 32;
    el_block_q16a *q = malloc(sizeof(el_block_q16a) * (size_t)nb * (n_rows ? n_rows : 1));
    el_set_variant(variant);
    if (el_quantize_q16a(q, nb, x, n_rows, n) != EL_OK) memset(q, 0x55, sizeof(el_block_q16a) * nb * n_rows);
    return q;
}

/* floats for the float16 conversion: every power of two's neighbourhood from 2^-26 to 2^17 (ties,
 * subnormals, the largest half, the overflow edge), infinities, NaNs, and random values; n is odd
 * so a variant's vector loop leaves a tail */
static float *half_cases(int32_t *n) {
    const int32_t count = 20001;
    float *x = malloc(sizeof(float) * count);
    int32_t i = 0;
    for (int e = -26; e <= 17 && i + 40 < count; e++)
        for (int k = -4; k <= 4; k++) {
            float p = ldexpf(1.0f, e);
            uint32_t bits;
            memcpy(&bits, &p, sizeof bits);
            bits += (uint32_t)(k * 0x1000); /* steps of half a float16 last place: ties and their neighbours */
            memcpy(&x[i++], &bits, sizeof bits);
            x[i] = -x[i - 1], i++;
        }
    const float edges[] = {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, 1e9f, INFINITY, -INFINITY, NAN, -NAN,
                           5.9604645e-8f, 2.9802322e-8f, 8.940697e-8f, 6.1035156e-5f, 6.097555e-5f};
    for (size_t k = 0; k < sizeof edges / sizeof edges[0]; k++) x[i++] = edges[k];
    uint64_t saved = rng_state; /* the other checks' data stays what it was */
    while (i < count) x[i++] = normalish() * ldexpf(1.0f, (int)(rnd() % 40) - 26);
    rng_state = saved;
    *n = count;
    return x;
}

static void check_reference_semantics(void) {
    { /* ref's float -> float16 against the compiler's _Float16 (round to nearest even) */
        int32_t n, bad = -1;
        float *x = half_cases(&n);
        for (int32_t i = 0; i < n && bad < 0; i++) {
            _Float16 h = (_Float16)x[i];
            el_half want, got = el_float_to_half(x[i]);
            memcpy(&want, &h, sizeof want);
            if (isnan(x[i]) ? (got & 0x7FFFu) <= 0x7C00u : got != want) bad = i;
        }
        char detail[96] = "";
        if (bad >= 0) snprintf(detail, sizeof detail, "%a", (double)x[bad]);
        report(bad < 0, "ref", "float -> float16 equals the compiler's _Float16 conversion", detail);
        free(x);
    }
    /* the ref quantizer on the corner cases, against the header's words */
    int32_t n;
    float *x = quantize_corner_cases(&n);
    el_block_q16a *q = quantize_with("ref", x, 1, n);
    /* amax 127: the coarse scale is 1, d = 1/256; 2.5 -> 3 - 127/256 (the remainder -128/256 clamps) */
    int ok = q[0].d == 1.0f / 256 && q[0].qh[1] == 3 && q[0].qh[2] == -3 && q[0].qh[3] == 1 && q[0].qh[4] == -1 &&
             q[0].qh[5] == 127 && q[0].qh[6] == -2 && q[0].ql[0] == 0 && q[0].ql[1] == -127 && q[0].ql[6] == 127 &&
             q[1].d == 0.0f && q[1].sum == 0 && isnan(q[3].d) && q[3].sum == 0 && isnan(q[4].d) &&
             q[6].qh[7] == 0 && q[6].ql[7] == 0;
    int32_t sum0 = 0;
    for (int i = 0; i < 32; i++) sum0 += 256 * q[0].qh[i] + q[0].ql[i];
    /* and the two planes hold x to within c / 512 */
    for (int i = 7; i < 32; i++) ok &= fabsf(q[0].d * (float)(256 * q[0].qh[i] + q[0].ql[i]) - x[i]) <= 1.0f / 512 + 1e-6f;
    report(ok && sum0 == q[0].sum, "ref", "quantize: two planes, ties away from zero, zero/NaN/inf blocks, tail", "");
    free(q);
    free(x);

    /* the ref matvec against the formula written out above */
    char detail[160] = "";
    ok = 1;
    for (int32_t f = 0; f < 3 && ok; f++)
        for (int32_t block = 32; block <= 128 && ok; block *= 2)
            for (int c = 0; c < N_COLS && ok; c++) {
                int32_t rows = 17, cols = COLS[c], nb = (cols + 31) / 32;
                test_matrix t = make_matrix(f, rows, cols, block);
                float *xf = random_floats(cols), *y = malloc(sizeof(float) * rows);
                el_block_q16a *xq = quantize_with("ref", xf, 1, cols);
                el_matvec(y, rows, &t.m, xq, nb, NULL);
                for (int32_t r = 0; r < rows && ok; r++) {
                    float want = formula_row(&t, r, xq);
                    if (!same_bits(&y[r], &want, sizeof want)) {
                        ok = 0;
                        snprintf(detail, sizeof detail, "%s block %d cols %d row %d: %.9g != %.9g",
                                 FORMAT_NAMES[f], block, cols, r, y[r], want);
                    }
                }
                free(xf), free(y), free(xq), free_matrix(&t);
            }
    report(ok, "ref", "matvec equals the formula of edgellm.h (3 formats, blocks 32/64/128)", detail);
}

static void check_variant_quantize(const char *variant) {
    int32_t n;
    float *x = quantize_corner_cases(&n);
    el_block_q16a *want = quantize_with("ref", x, 1, n), *got = quantize_with(variant, x, 1, n);
    int32_t nb = (n + 31) / 32;
    /* NaN blocks: compare the fields (NaN != NaN), all others bit for bit */
    int ok = 1;
    for (int32_t j = 0; j < nb; j++) {
        if (isnan(want[j].d))
            ok &= isnan(got[j].d) && got[j].sum == 0 && same_bits(got[j].qh, want[j].qh, 32) &&
                  same_bits(got[j].ql, want[j].ql, 32);
        else ok &= same_bits(&got[j], &want[j], sizeof got[j]);
    }
    free(want), free(got), free(x);
    char detail[64] = "";
    for (int c = 0; c < N_COLS && ok; c++) {
        int32_t cols = COLS[c] + 7, rows = 3; /* a partial last block on every size */
        float *xs = random_floats(rows * cols);
        for (int32_t i = 0; i < rows * cols; i += 5) xs[i] = (float)(int)(xs[i] * 8) / 2; /* many ties */
        want = quantize_with("ref", xs, rows, cols);
        got = quantize_with(variant, xs, rows, cols);
        if (!same_bits(got, want, sizeof(el_block_q16a) * rows * ((cols + 31) / 32))) {
            ok = 0;
            snprintf(detail, sizeof detail, "cols %d", cols);
        }
        free(want), free(got), free(xs);
    }
    report(ok, variant, "quantize_q16a equals ref bit for bit (corner cases, tails)", detail);
}

/* matvec and matmul of `variant` against ref's matvec, all sizes, for one format and block */
static void check_variant_products(const char *variant, int32_t format, int32_t block, el_pool *pools[3]) {
    char what[128], detail[160] = "";
    int ok = 1, checked = 0;
    for (int c = 0; c < N_COLS && ok; c++)
        for (int r = 0; r < N_ROWS && ok; r++) {
            int32_t rows = ROWS[r], cols = COLS[c], nb = (cols + 31) / 32, n_tok = 14;
            test_matrix t = make_matrix(format, rows, cols, block);
            float *xf = random_floats(n_tok * cols);
            el_block_q16a *xq = quantize_with("ref", xf, n_tok, cols);
            float *want = malloc(sizeof(float) * n_tok * rows), *got = malloc(sizeof(float) * n_tok * rows);
            el_set_variant("ref");
            for (int32_t k = 0; k < n_tok; k++) el_matvec(want + k * rows, rows, &t.m, xq + k * nb, nb, NULL);
            el_set_variant(variant);
            for (int p = 0; p < 3 && ok; p++) { /* 1, 2 and 3 threads */
                memset(got, 0, sizeof(float) * n_tok * rows);
                el_matvec(got, rows, &t.m, xq, nb, pools[p]);
                if (!same_bits(got, want, sizeof(float) * rows)) {
                    ok = 0;
                    snprintf(detail, sizeof detail, "matvec rows %d cols %d threads %d", rows, cols, p + 1);
                }
                for (int32_t tokens = 1; tokens <= n_tok && ok; tokens += tokens < 5 ? 1 : 4) { /* 9, 13: panels */
                    memset(got, 0, sizeof(float) * n_tok * rows);
                    el_matmul(got, tokens, rows, &t.m, xq, nb, pools[p]);
                    if (!same_bits(got, want, sizeof(float) * tokens * rows)) {
                        ok = 0;
                        snprintf(detail, sizeof detail, "matmul tokens %d rows %d cols %d threads %d", tokens,
                                 rows, cols, p + 1);
                    }
                }
                checked++;
            }
            free(xf), free(xq), free(want), free(got), free_matrix(&t);
        }
    snprintf(what, sizeof what, "matvec+matmul %s block %d equal ref bit for bit (%d shapes x threads 1,2,3)",
             FORMAT_NAMES[format], block, checked / 3);
    report(ok, variant, what, detail);
}

static void check_variant_nan(const char *variant) {
    int ok = 1;
    for (int32_t f = 0; f < 3; f++) {
        int32_t rows = 17, cols = 288, nb = 9;
        test_matrix t = make_matrix(f, rows, cols, 32);
        float *xf = random_floats(cols), y[17];
        xf[200] = NAN;
        el_block_q16a *xq = quantize_with(variant, xf, 1, cols);
        el_matvec(y, rows, &t.m, xq, nb, NULL);
        for (int32_t r = 0; r < rows; r++) ok &= isnan(y[r]) != 0;
        free(xf), free(xq), free_matrix(&t);
    }
    report(ok, variant, "a NaN in x makes every output NaN", "");
}

static void check_variant_floats(const char *variant) {
    char detail[128] = "";
    int ok = 1;
    const int32_t sizes[] = {1, 7, 64, 576, 1000};
    for (int s = 0; s < 5; s++) {
        int32_t n = sizes[s];
        float *x = random_floats(n), *g = random_floats(n), *u = random_floats(n), *w = random_floats(n);
        for (int32_t i = 0; i < n; i++) x[i] *= 4; /* a softmax with some spread */
        float *a = malloc(sizeof(float) * n), *b = malloc(sizeof(float) * n);
        struct { const char *name; double err; } results[4];
        el_set_variant("ref"); el_rms_norm(a, x, w, 1, n, 1e-5f);
        el_set_variant(variant); el_rms_norm(b, x, w, 1, n, 1e-5f);
        results[0].name = "rms_norm", results[0].err = nmse(b, a, n);
        el_set_variant("ref"); el_softmax(a, x, 1, n);
        el_set_variant(variant); el_softmax(b, x, 1, n);
        results[1].name = "softmax", results[1].err = nmse(b, a, n);
        el_set_variant("ref"); el_silu_mul(a, g, u, n);
        el_set_variant(variant); el_silu_mul(b, g, u, n);
        results[2].name = "silu_mul", results[2].err = nmse(b, a, n);
        el_set_variant("ref"); el_add(a, g, u, n);
        el_set_variant(variant); el_add(b, g, u, n);
        results[3].name = "add", results[3].err = nmse(b, a, n);
        for (int k = 0; k < 4; k++)
            if (!(results[k].err <= 1e-10)) {
                ok = 0;
                snprintf(detail, sizeof detail, "%s n %d nmse %.3g", results[k].name, n, results[k].err);
            }
        free(x), free(g), free(u), free(w), free(a), free(b);
    }
    /* RoPE: 9 heads of 64 (SmolLM2) and 3 heads of 6 (a tail) */
    const int32_t shapes[2][2] = {{9, 64}, {3, 6}};
    for (int s = 0; s < 2; s++) {
        int32_t heads = shapes[s][0], dim = shapes[s][1], n = heads * dim;
        float *x = random_floats(n), *a = malloc(sizeof(float) * n), *b = malloc(sizeof(float) * n);
        float inv[32], c[32], sn[32];
        for (int32_t i = 0; i < dim / 2; i++) inv[i] = powf(10000.0f, -2.0f * i / dim);
        el_rope_tables(c, sn, inv, dim / 2, 37.0f);
        el_set_variant("ref"); el_rope(a, x, c, sn, heads, dim);
        el_set_variant(variant); el_rope(b, x, c, sn, heads, dim);
        if (!(nmse(b, a, n) <= 1e-10)) {
            ok = 0;
            snprintf(detail, sizeof detail, "rope %dx%d", heads, dim);
        }
        free(x), free(a), free(b);
    }
    /* attention of one head: head_dims that are whole vectors, and one that is not; strided rows */
    const int32_t heads[5][2] = {{64, 1}, {64, 37}, {128, 70}, {16, 200}, {6, 9}}; /* head_dim, keys */
    int f32_checked = 0;
    char what[192];
    for (int s = 0; s < 5; s++) {
        int32_t d = heads[s][0], n_keys = heads[s][1], stride = 3 * d;
        float *q = random_floats(d), *kf = random_floats(n_keys * stride), *vf = random_floats(n_keys * stride);
        el_half *kv = malloc(sizeof(el_half) * n_keys * stride), *vv = malloc(sizeof(el_half) * n_keys * stride);
        el_to_half_ref(kv, kf, n_keys * stride);
        el_to_half_ref(vv, vf, n_keys * stride);
        float *a = malloc(sizeof(float) * (d + 2)), *b = malloc(sizeof(float) * (d + 2));
        float *scores = malloc(sizeof(float) * n_keys);
        el_set_variant("ref");
        el_kernels_current()->attend_part(a, a + d, a + d + 1, scores, q, kv, vv, n_keys, d, stride, 0.125f);
        el_set_variant(variant);
        el_kernels_current()->attend_part(b, b + d, b + d + 1, scores, q, kv, vv, n_keys, d, stride, 0.125f);
        if (!(nmse(b, a, d + 2) <= 1e-10)) {
            ok = 0;
            snprintf(detail, sizeof detail, "attend d %d keys %d nmse %.3g", d, n_keys, nmse(b, a, d + 2));
        }
        const el_kernels *k = el_kernels_current();
        if (k->attend_part_f32 && k->to_float) { /* keys and values converted first: the same bits */
            k->to_float(kf, kv, n_keys * stride);
            k->to_float(vf, vv, n_keys * stride);
            k->attend_part_f32(a, a + d, a + d + 1, scores, q, kf, vf, n_keys, d, stride, 0.125f);
            f32_checked++;
            if (!same_bits(a, b, sizeof(float) * (size_t)(d + 2))) {
                ok = 0;
                snprintf(detail, sizeof detail, "attend_part_f32 d %d keys %d differs from attend_part", d, n_keys);
            }
        }
        free(q), free(kf), free(vf), free(kv), free(vv), free(a), free(b), free(scores);
    }
    /* partials of 1, 5 and 17 chunks combined (head_dims that are whole vectors, and one that is not) */
    for (int32_t d = 6; d <= 64; d += 58)
        for (int32_t n_parts = 1; n_parts <= 17; n_parts += 4 * (n_parts < 5 ? 1 : 3)) {
            float *parts = random_floats(n_parts * (d + 2)), *a = malloc(sizeof(float) * d), *b = malloc(sizeof(float) * d);
            for (int32_t c = 0; c < n_parts; c++) parts[c * (d + 2) + d + 1] = uniform(1.0f, 30.0f); /* sums */
            el_set_variant("ref");
            el_kernels_current()->combine_parts(a, parts, n_parts, d);
            el_set_variant(variant);
            el_kernels_current()->combine_parts(b, parts, n_parts, d);
            if (!(nmse(b, a, d) <= 1e-10)) {
                ok = 0;
                snprintf(detail, sizeof detail, "combine_parts d %d parts %d nmse %.3g", d, n_parts, nmse(b, a, d));
            }
            free(parts), free(a), free(b);
        }
    snprintf(what, sizeof what, "rms_norm, rope, softmax, silu_mul, add, attend_part, combine_parts within NMSE 1e-10 of ref%s",
             f32_checked ? "; attend_part_f32 equals attend_part bit for bit" : "");
    report(ok, variant, what, detail);

    /* the cache's float16: the same bits as ref's conversion (NaN: a NaN), a tail past the vectors */
    int32_t n;
    float *x = half_cases(&n);
    el_half *want = malloc(sizeof(el_half) * n), *got = malloc(sizeof(el_half) * n);
    el_set_variant("ref");
    el_kernels_current()->to_half(want, x, n);
    el_set_variant(variant);
    el_kernels_current()->to_half(got, x, n);
    ok = 1;
    for (int32_t i = 0; i < n && ok; i++)
        if (isnan(x[i]) ? (want[i] & 0x7FFFu) <= 0x7C00u || (got[i] & 0x7FFFu) <= 0x7C00u : got[i] != want[i]) {
            ok = 0;
            snprintf(detail, sizeof detail, "%a: 0x%04x != 0x%04x", (double)x[i], got[i], want[i]);
        }
    report(ok, variant, "to_half (the KV cache's float16) equals ref bit for bit", ok ? "" : detail);
    free(x), free(want), free(got);
    if (el_kernels_current()->to_float) { /* every binary16, back: exact (NaN: a NaN) */
        el_half *all = malloc(sizeof(el_half) * 65536);
        float *f = malloc(sizeof(float) * 65536);
        for (int32_t i = 0; i < 65536; i++) all[i] = (el_half)i;
        el_kernels_current()->to_float(f, all, 65535); /* odd: a scalar tail */
        ok = 1;
        for (int32_t i = 0; i < 65535 && ok; i++) {
            float r = el_half_to_float(all[i]);
            if (isnan(r) ? !isnan(f[i]) : !same_bits(&f[i], &r, sizeof r)) {
                ok = 0;
                snprintf(detail, sizeof detail, "0x%04x: %a != %a", (unsigned)i, (double)f[i], (double)r);
            }
        }
        report(ok, variant, "to_float equals ref bit for bit (every float16)", ok ? "" : detail);
        free(all), free(f);
    }
}

/* ---- the engine: a tiny random decoder ------------------------------------------------------------ */

typedef struct {
    el_model m;
    el_layer layers[2];
    test_matrix mats[2][7], embed, head;
    float *vectors[16];
    int n_vectors;
} tiny_model;

static float *tiny_vector(tiny_model *t, int32_t n, float base, float spread) {
    float *v = malloc(sizeof(float) * (size_t)n);
    for (int32_t i = 0; i < n; i++) v[i] = base + spread * normalish();
    t->vectors[t->n_vectors++] = v;
    return v;
}

/* 2 layers, hidden 96, ffn 400, 6 query heads over 2 KV heads of head_dim (16: heads are not whole
 * activation blocks; 32: they are), vocab 50, int4 layers, int8 embedding, an untied head, q/k/v biases.
 * ffn 400 is 12.5 blocks: one thread's gate/up units are two blocks, the last one half a block, and
 * two or three threads' are one block, so the thread counts compared split it differently. */
static void make_tiny(tiny_model *t, int32_t head_dim) {
    memset(t, 0, sizeof *t);
    const int32_t hidden = 96, ffn = 400, heads = 6, kv = 2, vocab = 50, q = heads * head_dim, kvs = kv * head_dim;
    t->m = (el_model){.n_layers = 2, .hidden = hidden, .ffn = ffn, .n_heads = heads, .n_kv_heads = kv,
                      .head_dim = head_dim, .vocab = vocab, .rms_eps = 1e-6f};
    t->embed = make_matrix(EL_INT8_SYM, vocab, hidden, 32);
    t->head = make_matrix(EL_INT4_SYM, vocab, hidden, 32);
    t->m.embed = t->embed.m;
    t->m.head = t->head.m;
    t->m.final_norm = tiny_vector(t, hidden, 1.0f, 0.1f);
    float *inv = tiny_vector(t, head_dim / 2, 0.0f, 0.0f);
    for (int32_t i = 0; i < head_dim / 2; i++) inv[i] = powf(10000.0f, -2.0f * i / head_dim);
    t->m.inv_freq = inv;
    const int32_t shapes[7][2] = {{q, hidden}, {kvs, hidden}, {kvs, hidden}, {hidden, q}, {ffn, hidden}, {ffn, hidden}, {hidden, ffn}};
    for (int l = 0; l < 2; l++) {
        for (int i = 0; i < 7; i++) t->mats[l][i] = make_matrix(i == 6 ? EL_INT8_SYM : EL_INT4_ASYM, shapes[i][0], shapes[i][1], 32);
        el_layer *L = &t->layers[l];
        L->attn_norm = tiny_vector(t, hidden, 1.0f, 0.1f);
        L->mlp_norm = tiny_vector(t, hidden, 1.0f, 0.1f);
        L->q = t->mats[l][0].m, L->k = t->mats[l][1].m, L->v = t->mats[l][2].m, L->o = t->mats[l][3].m;
        L->gate = t->mats[l][4].m, L->up = t->mats[l][5].m, L->down = t->mats[l][6].m;
        if (l == 1) {
            L->q_bias = tiny_vector(t, q, 0.0f, 0.1f);
            L->k_bias = tiny_vector(t, kvs, 0.0f, 0.1f);
            L->v_bias = tiny_vector(t, kvs, 0.0f, 0.1f);
        }
    }
    t->m.layers = t->layers;
}

static void free_tiny(tiny_model *t) {
    for (int l = 0; l < 2; l++)
        for (int i = 0; i < 7; i++) free_matrix(&t->mats[l][i]);
    free_matrix(&t->embed);
    free_matrix(&t->head);
    for (int i = 0; i < t->n_vectors; i++) free(t->vectors[i]);
}

/* 140 tokens: past two chunks of 64 cache positions, so attention combines partials */
#define TINY_TOKENS 140
#define TINY_CONTEXT 160
#define TINY_CHUNK 8
static int32_t TINY_IDS[TINY_TOKENS];

/* logits [TINY_TOKENS][vocab]: prefill chunks of TINY_CHUNK (every token's logits) up to the last 4
 * tokens, then those one at a time */
static int run_tiny(const tiny_model *t, el_pool *pool, float *logits) {
    el_engine *e;
    int status = el_engine_create(&e, &t->m, TINY_CONTEXT, TINY_CHUNK, pool);
    if (status != EL_OK) return status;
    int32_t vocab = t->m.vocab, i = 0;
    for (; i + TINY_CHUNK <= TINY_TOKENS - 4 && status == EL_OK; i += TINY_CHUNK)
        status = el_engine_forward(e, logits + (size_t)i * vocab, (int64_t)TINY_CHUNK * vocab, TINY_IDS + i, TINY_CHUNK, i, 1);
    for (; i < TINY_TOKENS && status == EL_OK; i++)
        status = el_engine_forward(e, logits + (size_t)i * vocab, vocab, TINY_IDS + i, 1, i, 0);
    el_engine_destroy(e);
    return status;
}

static void check_engine(const char *const *variants, int32_t count, el_pool *pools[3]) {
    for (int32_t i = 0; i < TINY_TOKENS; i++) TINY_IDS[i] = (int32_t)(rnd() % 50);
    for (int32_t head_dim = 16; head_dim <= 32; head_dim += 16) {
        tiny_model t;
        make_tiny(&t, head_dim);
        size_t n = (size_t)TINY_TOKENS * t.m.vocab;
        float *want = malloc(sizeof(float) * n), *got = malloc(sizeof(float) * n), *single = malloc(sizeof(float) * n);
        el_set_variant("ref");
        int ok = run_tiny(&t, NULL, want) == EL_OK;
        /* token by token from position 0 gives the chunk's logits bit for bit */
        el_engine *e;
        ok &= el_engine_create(&e, &t.m, TINY_CONTEXT, TINY_CHUNK, NULL) == EL_OK;
        for (int32_t i = 0; i < TINY_TOKENS && ok; i++)
            ok &= el_engine_forward(e, single + (size_t)i * t.m.vocab, t.m.vocab, TINY_IDS + i, 1, i, 0) == EL_OK;
        ok &= same_bits(single, want, sizeof(float) * n);
        for (int32_t i = 0; i < (int32_t)n; i++) ok &= isfinite(want[i]) != 0;
        char what[160];
        snprintf(what, sizeof what, "engine (head_dim %d, %s-bit activations): a chunk equals token by token, finite",
                 head_dim, getenv("EDGELLM_ACTIVATIONS"));
        report(ok, "ref", what, "");
        /* bad arguments */
        int32_t bad_token = t.m.vocab;
        ok = el_engine_forward(e, single, (int64_t)n, TINY_IDS, 2, TINY_CONTEXT - 1, 0) == EL_ERANGE && /* past the context */
             el_engine_forward(e, single, (int64_t)n, TINY_IDS, 9, 0, 0) == EL_ERANGE &&   /* past max_chunk */
             el_engine_forward(e, single, (int64_t)n, &bad_token, 1, 0, 0) == EL_ERANGE &&
             el_engine_forward(e, single, t.m.vocab - 1, TINY_IDS, 1, 0, 0) == EL_ERANGE && /* logits too short */
             el_engine_forward(e, single, (int64_t)n, TINY_IDS, 0, 0, 0) == EL_EINVAL;
        el_engine_destroy(e);
        el_model broken = t.m;
        el_layer layers[2] = {t.layers[0], t.layers[1]};
        layers[1].o.cols += 32;
        broken.layers = layers;
        ok &= el_engine_create(&e, &broken, TINY_CONTEXT, TINY_CHUNK, NULL) == EL_EINVAL && e == NULL;
        snprintf(what, sizeof what, "engine (head_dim %d): bad arguments and shapes are refused", head_dim);
        report(ok, "-", what, "");
        for (int32_t v = 0; v < count; v++) {
            el_set_variant(variants[v]);
            char detail[96] = "";
            float *first = malloc(sizeof(float) * n);
            /* 1e-7, not the float kernels' 1e-10: the cache is float16, and a variant's last-bit differences
             * in the norms or RoPE move some keys and values across a float16 rounding (2^-11 relative)
             * (8-bit activations: 1e-4, as such a last-bit difference moves a value across an int8 rounding
             * step, 1/254 of its block's largest, where the 16-bit blocks' step is 256 times finer) */
            const double tolerance = strcmp(getenv("EDGELLM_ACTIVATIONS"), "8") == 0 ? 1e-4 : 1e-7;
            ok = run_tiny(&t, NULL, first) == EL_OK && nmse(first, want, (int32_t)n) <= tolerance;
            if (!ok) snprintf(detail, sizeof detail, "nmse %.3g against ref", nmse(first, want, (int32_t)n));
            for (int p = 0; p < 3 && ok; p++) {
                ok &= run_tiny(&t, pools[p], got) == EL_OK && same_bits(got, first, sizeof(float) * n);
                if (!ok) snprintf(detail, sizeof detail, "threads %d differ from one thread", p + 1);
            }
            /* the chunks' products (x86: panels) give the bits of single tokens' (row kernels) */
            int made = ok && el_engine_create(&e, &t.m, TINY_CONTEXT, TINY_CHUNK, pools[1]) == EL_OK;
            ok &= made;
            for (int32_t i = 0; i < TINY_TOKENS && ok; i++)
                ok &= el_engine_forward(e, single + (size_t)i * t.m.vocab, t.m.vocab, TINY_IDS + i, 1, i, 0) == EL_OK;
            if (made) el_engine_destroy(e);
            if (ok && !same_bits(single, first, sizeof(float) * n)) {
                ok = 0;
                snprintf(detail, sizeof detail, "token by token differs from the chunks");
            }
            snprintf(what, sizeof what,
                     "engine (head_dim %d, %s-bit) within NMSE 1e-7 (8-bit: 1e-4) of ref, same bits for threads 1,2,3 and token by token",
                     head_dim, getenv("EDGELLM_ACTIVATIONS"));
            report(ok, variants[v], what, detail);
            free(first);
        }
        free(want), free(got), free(single);
        free_tiny(&t);
    }
}

/* 8-bit activations: quantize_q8a and every product path (decode, panels, short tiles, more than
 * EL_Q8A_TOKENS tokens, short panels) of `variant` equal ref bit for bit, at 1, 2 and 3 threads */
static void check_variant_q8a(const char *variant, el_pool *pools[3]) {
    static const int32_t TOKENS[] = {1, 2, 3, 4, 5, 7, 8, 13, 64, 70};
    static const struct { int32_t format, block; } KINDS[] = {
        {EL_INT4_ASYM, 32}, {EL_INT4_SYM, 32}, {EL_INT8_SYM, 32}, {EL_INT4_ASYM, 64}, {EL_INT8_SYM, 128}};
    char detail[160] = "";
    int ok = 1, checked = 0;
    int32_t n;
    float *corner = quantize_corner_cases(&n);
    int32_t nb = (n + 31) / 32;
    el_block_q8a *want_q = malloc(sizeof(el_block_q8a) * nb), *got_q = malloc(sizeof(el_block_q8a) * nb);
    el_set_variant("ref");
    el_quantize_q8a(want_q, nb, corner, 1, n);
    el_set_variant(variant);
    el_quantize_q8a(got_q, nb, corner, 1, n);
    for (int32_t j = 0; j < nb; j++)
        ok &= isnan(want_q[j].d) ? isnan(got_q[j].d) && isnan(got_q[j].ds) && got_q[j].sum == 0 &&
                                       same_bits(got_q[j].q, want_q[j].q, 32)
                                 : same_bits(&got_q[j], &want_q[j], sizeof got_q[j]);
    if (!ok) snprintf(detail, sizeof detail, "quantize_q8a corner cases");
    free(want_q), free(got_q), free(corner);
    for (size_t kind = 0; kind < sizeof KINDS / sizeof KINDS[0] && ok; kind++)
        for (int c = 0; c < N_COLS && ok; c++)
            for (int r = 0; r < N_ROWS && ok; r++) {
                const int32_t rows = ROWS[r], cols = COLS[c], n_tok = 70;
                nb = (cols + 31) / 32;
                if (rows == 577 && cols > 600) continue; /* the largest shapes cost qemu minutes, add nothing */
                test_matrix t = make_matrix(KINDS[kind].format, rows, cols, KINDS[kind].block);
                float *xf = random_floats(n_tok * cols);
                el_block_q8a *xq = malloc(sizeof(el_block_q8a) * n_tok * nb);
                el_set_variant("ref");
                el_quantize_q8a(xq, nb, xf, n_tok, cols);
                float *want = malloc(sizeof(float) * n_tok * rows), *got = malloc(sizeof(float) * n_tok * rows);
                for (int32_t k = 0; k < n_tok; k++) el_matmul_q8a(want + k * rows, 1, rows, &t.m, xq + k * nb, nb, NULL);
                el_set_variant(variant);
                for (int p = 0; p < 3 && ok; p++)
                    for (size_t i = 0; i < sizeof TOKENS / sizeof TOKENS[0] && ok; i++) {
                        memset(got, 0, sizeof(float) * n_tok * rows);
                        el_matmul_q8a(got, TOKENS[i], rows, &t.m, xq, nb, pools[p]);
                        if (!same_bits(got, want, sizeof(float) * TOKENS[i] * rows)) {
                            ok = 0;
                            snprintf(detail, sizeof detail, "%s block %d tokens %d rows %d cols %d threads %d",
                                     FORMAT_NAMES[KINDS[kind].format], KINDS[kind].block, TOKENS[i], rows, cols, p + 1);
                        }
                        checked++;
                    }
                free(xf), free(xq), free(want), free(got), free_matrix(&t);
            }
    char what[128];
    snprintf(what, sizeof what, "quantize_q8a and matmul_q8a equal ref bit for bit (%d products)", checked);
    report(ok, variant, what, detail);
}

/* Signed zeros: negative scales against zero activations make every term -0.0, so a row's four lanes
 * stay -0.0 and the product is -0.0; a lane that no block fills (rows of 1 to 3 blocks, or a row's last 1
 * to 3) must stay as the reference leaves it, not turn +0.0 under a padded term. */
static void check_variant_q8a_signed_zeros(const char *variant) {
    static const int32_t COLS_Z[] = {32, 64, 96, 160, 192, 224};
    static const int32_t FORMATS_Z[] = {EL_INT4_ASYM, EL_INT4_SYM, EL_INT8_SYM};
    const int32_t rows = 5, n_tok = 3;
    int ok = 1;
    char detail[160] = "";
    for (size_t f = 0; f < 3 && ok; f++)
        for (size_t c = 0; c < sizeof COLS_Z / sizeof COLS_Z[0] && ok; c++) {
            const int32_t cols = COLS_Z[c], nb = cols / 32;
            test_matrix t = make_matrix(FORMATS_Z[f], rows, cols, 32);
            for (int32_t i = 0; i < rows * nb; i++) {
                t.scales[i] |= 0x8000; /* negative */
                if (t.mins) t.mins[i] |= 0x8000;
            }
            float *xf = calloc((size_t)n_tok * cols, sizeof(float));
            el_block_q8a *xq = malloc(sizeof(el_block_q8a) * n_tok * nb);
            float want[15], got[15];
            el_set_variant("ref");
            el_quantize_q8a(xq, nb, xf, n_tok, cols);
            for (int32_t k = 0; k < n_tok; k++) el_matmul_q8a(want + k * rows, 1, rows, &t.m, xq + k * nb, nb, NULL);
            el_set_variant(variant);
            for (int32_t tokens = 1; tokens <= n_tok && ok; tokens++) {
                el_matmul_q8a(got, tokens, rows, &t.m, xq, nb, NULL);
                ok = same_bits(got, want, sizeof(float) * tokens * rows) && signbit(want[0]);
                if (!ok)
                    snprintf(detail, sizeof detail, "%s cols %d tokens %d: %g (ref %g)", FORMAT_NAMES[FORMATS_Z[f]],
                             cols, tokens, got[0], want[0]);
            }
            free(xf), free(xq), free_matrix(&t);
        }
    report(ok, variant, "matmul_q8a keeps the reference's signed zeros (negative scales, zero activations)", detail);
}

int main(void) {
    int status = el_init();
    const char *forced = getenv("EDGELLM_KERNELS");
    if (status != EL_OK) {
        printf("dispatch: EDGELLM_KERNELS=%s refused: %s\n", forced ? forced : "", el_status_string(status));
        return 2;
    }
    const char *names[8];
    int32_t count = el_available_variants(names, 8);
    printf("dispatch: variant=%s available:", el_variant());
    for (int32_t i = 0; i < count; i++) printf(" %s", names[i]);
    printf("\n");
    if (strcmp(el_variant(), "i8mm") == 0) printf("dispatch: i8mm runs matmul with SMMLA, matvec with SDOT\n");
    const char *chosen = el_variant();

    el_pool *pools[3] = {NULL, NULL, NULL};
    for (int p = 0; p < 3; p++)
        if (el_pool_create(&pools[p], p + 1) != EL_OK) {
            printf("FAIL could not create a pool of %d threads\n", p + 1);
            return 1;
        }

    check_reference_semantics();
    for (int32_t i = 0; i < count; i++) {
        const char *variant = names[i];
        check_variant_quantize(variant);
        for (int32_t f = 0; f < 3; f++) check_variant_products(variant, f, 32, pools);
        if (strcmp(variant, "ref") != 0) {
            check_variant_products(variant, EL_INT4_ASYM, 64, pools);
            check_variant_products(variant, EL_INT8_SYM, 128, pools);
        }
        check_variant_nan(variant);
        if (strcmp(variant, "ref") != 0) check_variant_floats(variant);
        if (strcmp(variant, "ref") != 0) check_variant_q8a(variant, pools);
        if (strcmp(variant, "ref") != 0) check_variant_q8a_signed_zeros(variant);
    }
    setenv("EDGELLM_ACTIVATIONS", "16", 1);
    check_engine(names, count, pools);
    setenv("EDGELLM_ACTIVATIONS", "8", 1);
    check_engine(names, count, pools);
    unsetenv("EDGELLM_ACTIVATIONS");
    el_set_variant(chosen);
    report(el_set_variant("no-such-variant") == EL_EUNSUPPORTED, "-", "an unknown variant is refused", "");
    report(el_matvec(NULL, 0, NULL, NULL, 0, NULL) == EL_EINVAL, "-", "NULL arguments return EL_EINVAL", "");

    for (int p = 0; p < 3; p++) el_pool_destroy(pools[p]);
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
