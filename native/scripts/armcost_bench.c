/* armcost_bench: one matrix product through edgellm's public C API, repeated between two markers, for
 * native/scripts/armcost.py to count under qemu with the shared armcost tool (count.sh counts the guest
 * instructions between the first calls of mark_begin and mark_end).
 *
 *   armcost_bench q16a|q8a int4_asym|int4_sym|int8_sym ROWS COLS TOKENS REPS
 *
 * What is measured is what a caller pays per product: quantizing the float activations, then the product
 * (el_matvec for one 16-bit token, el_matmul otherwise; el_matmul_q8a for 8-bit ones), one thread. The data
 * are deterministic; the counts do not depend on the values, but they are kept sane anyway. Silent unless
 * something fails, so that a run is only its counts.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgellm.h"

/* Empty, but kept as real calls (noinline, and an asm the compiler may not drop or move work across). */
__attribute__((noinline)) void mark_begin(void) { __asm__ volatile("" ::: "memory"); }
__attribute__((noinline)) void mark_end(void) { __asm__ volatile("" ::: "memory"); }

static uint64_t rng_state = 0x243f6a8885a308d3u;
static uint64_t next_random(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

enum kind { Q16A, Q8A };

/* Quantize the activations, then the product: one call of what is counted. */
static int product(enum kind kind, float *y, int32_t tokens, const el_qmatrix *w, const float *x, void *xq,
                   int32_t nb) {
    int st;
    if (kind == Q8A) {
        st = el_quantize_q8a(xq, nb, x, tokens, w->cols);
        return st != EL_OK ? st : el_matmul_q8a(y, tokens, w->rows, w, xq, nb, NULL);
    }
    st = el_quantize_q16a(xq, nb, x, tokens, w->cols);
    if (st != EL_OK) return st;
    return tokens == 1 ? el_matvec(y, w->rows, w, xq, nb, NULL) : el_matmul(y, tokens, w->rows, w, xq, nb, NULL);
}

static int usage(void) {
    fprintf(stderr, "usage: armcost_bench q16a|q8a int4_asym|int4_sym|int8_sym ROWS COLS TOKENS REPS\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc != 7) return usage();
    enum kind kind;
    if (!strcmp(argv[1], "q16a")) kind = Q16A;
    else if (!strcmp(argv[1], "q8a")) kind = Q8A;
    else return usage();
    int32_t format;
    if (!strcmp(argv[2], "int4_asym")) format = EL_INT4_ASYM;
    else if (!strcmp(argv[2], "int4_sym")) format = EL_INT4_SYM;
    else if (!strcmp(argv[2], "int8_sym")) format = EL_INT8_SYM;
    else return usage();
    int32_t rows = atoi(argv[3]), cols = atoi(argv[4]), tokens = atoi(argv[5]), reps = atoi(argv[6]);
    if (rows < 1 || cols < 1 || tokens < 1 || reps < 1) return usage();

    /* EDGELLM_KERNELS (set by armcost.py) picks the variant; el_init refuses one the CPU model lacks. */
    int st = el_init();
    if (st != EL_OK) {
        fprintf(stderr, "el_init: %s\n", el_status_string(st));
        return 1;
    }

    int32_t nb = (cols + EL_QBLOCK - 1) / EL_QBLOCK;
    size_t n_wblocks = (size_t)rows * nb, row_bytes = (size_t)nb * (format == EL_INT8_SYM ? 32 : 16);
    uint8_t *qweight = malloc(rows * row_bytes);
    el_half *scales = malloc(sizeof(el_half) * n_wblocks), *mins = malloc(sizeof(el_half) * n_wblocks);
    float *x = malloc(sizeof(float) * (size_t)tokens * cols), *y = malloc(sizeof(float) * (size_t)tokens * rows);
    size_t block_bytes = kind == Q8A ? sizeof(el_block_q8a) : sizeof(el_block_q16a);
    void *xq = malloc(block_bytes * (size_t)tokens * nb);
    if (!qweight || !scales || !mins || !x || !y || !xq) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < rows * row_bytes; i += 8) {
        uint64_t r = next_random();
        memcpy(qweight + i, &r, 8); /* row_bytes is a multiple of 16 */
    }
    /* scale in [2^-7, 2^-5) and min = -8 scale (three more in the exponent, sign set): codes centred on 0. */
    for (size_t i = 0; i < n_wblocks; i++) {
        scales[i] = (el_half)(0x2000 + (next_random() & 0x7ff));
        mins[i] = (el_half)(0x8000 | (scales[i] + 0x0c00));
    }
    for (size_t i = 0; i < (size_t)tokens * cols; i++) x[i] = (float)(next_random() >> 40) / (1 << 21) - 4.0f;
    el_qmatrix w = {format, rows, cols, 32, qweight, scales, format == EL_INT4_ASYM ? mins : NULL};

    st = product(kind, y, tokens, &w, x, xq, nb); /* warm-up: first-call work stays out of the count */
    if (st == EL_OK) {
        mark_begin();
        for (int32_t r = 0; r < reps && st == EL_OK; r++) st = product(kind, y, tokens, &w, x, xq, nb);
        mark_end();
    }
    if (st != EL_OK) {
        fprintf(stderr, "product failed: %s\n", el_status_string(st));
        return 1;
    }
    return 0;
}
