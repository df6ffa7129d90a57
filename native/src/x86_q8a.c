/* x86_q8a.c: the 8-bit-activation products (edgellm.h: el_block_q8a) with AVX2, for the avx2 and
 * avx512vnni variants. Not their default (the engine's default there is 16-bit activations, which
 * agree with the float reference more closely): what EDGELLM_ACTIVATIONS=8 runs on x86.
 *
 * One row against up to four tokens at a time (each block's codes unpacked once for them). A token's
 * values are stored once per pass in the order that 4-bit codes unpack to (a block's even values, which
 * meet the low nibbles, then its odd ones), with d, ds and 8 * sum contiguous. A block's 32 products are one VPMADDUBSW (codes as unsigned bytes; 8-bit
 * codes as |code - 128| against the values with code - 128's sign, so no pair overflows int16) and one
 * VPMADDWD; four blocks' sums are reduced to one vector (block 4g+k in lane k: edgellm.h's lane j % 4),
 * so their float terms take one FMA each. A row's last one to three blocks add their terms to their
 * lanes one by one, as the reference does. */
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "kernels.h"
#include "x86_sums.h"

#define AVX2_FMA __attribute__((target("avx2,fma,f16c")))
#define INLINE inline __attribute__((always_inline))

/* one token's values as the row loop reads them: q [nb][32] (4-bit formats: even values, then odd),
 * d, ds [nb] and isum_offset [nb] (int4_sym: 8 * sum, subtracted from each block's sum) */
typedef struct {
    const int8_t *q;
    const float *d, *ds;
    const int32_t *offset;
} token_acts;

/* one token's share of scratch: TOKEN_BYTES(nb), four of them within el_q8a_scratch_bytes(nb) */
#define TOKEN_BYTES(nb) ((size_t)(nb) * (32 + 2 * sizeof(float) + sizeof(int32_t)))
static token_acts prepare_token(void *scratch, int32_t format, const el_block_q8a *x, int32_t nb) {
    int8_t *q = scratch;
    float *d = (float *)(q + (size_t)nb * 32), *ds = d + nb;
    int32_t *offset = (int32_t *)(ds + nb);
    for (int32_t j = 0; j < nb; j++) {
        d[j] = x[j].d;
        ds[j] = x[j].ds;
        offset[j] = format == EL_INT4_SYM ? 8 * x[j].sum : 0;
        if (format == EL_INT8_SYM) {
            memcpy(q + 32 * (size_t)j, x[j].q, 32);
        } else {
            for (int k = 0; k < 16; k++) {
                q[32 * (size_t)j + k] = x[j].q[2 * k];
                q[32 * (size_t)j + 16 + k] = x[j].q[2 * k + 1];
            }
        }
    }
    return (token_acts){q, d, ds, offset};
}

/* A row's block j unpacked to 32 signed-product operands: 4-bit codes as unsigned bytes (low nibbles,
 * then high: the values' order in token_acts); 8-bit ones as |code - 128|, with code - 128 kept in *sign
 * for the values. */
static INLINE AVX2_FMA __m256i block_codes(int32_t format, const uint8_t *codes, int32_t j, __m256i *sign) {
    if (format == EL_INT8_SYM) {
        *sign = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(codes + 32 * (size_t)j)),
                                 _mm256_set1_epi8((char)0x80)); /* code - 128 */
        return _mm256_sign_epi8(*sign, *sign);
    }
    const __m128i c = _mm_loadu_si128((const __m128i *)(codes + 16 * (size_t)j));
    const __m128i low = _mm_and_si128(c, _mm_set1_epi8(0x0F));
    const __m128i high = _mm_and_si128(_mm_srli_epi16(c, 4), _mm_set1_epi8(0x0F));
    return _mm256_set_m128i(high, low);
}

/* eight int32 partial sums of a block's unpacked codes against a token's values (no pair overflows int16) */
static INLINE AVX2_FMA __m256i block_partials(int32_t format, __m256i codes, __m256i sign, const int8_t *q) {
    __m256i values = _mm256_loadu_si256((const __m256i *)q);
    if (format == EL_INT8_SYM) values = _mm256_sign_epi8(values, sign);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, values), _mm256_set1_epi16(1));
}

/* four blocks' partial sums -> their sums, block k in lane k */
static INLINE AVX2_FMA __m128i reduce4(__m256i p0, __m256i p1, __m256i p2, __m256i p3) {
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

static INLINE AVX2_FMA __m128 halves4(const el_half *h) { return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)h)); }

/* One row against n (1..4) tokens, each block's codes unpacked once for all of them: edgellm.h's four lanes
 * per token, reduced (l0 + l1) + (l2 + l3) into y[t * y_stride]. */
static INLINE AVX2_FMA void row_tokens(float *y, size_t y_stride, int32_t n, int32_t format, const uint8_t *codes,
                                      const el_half *sc, const el_half *mn, const token_acts *a, int32_t nb) {
    __m128 lanes[4];
    for (int32_t t = 0; t < n; t++) lanes[t] = _mm_set1_ps(-0.0f); /* edgellm.h: the lanes start at -0.0 */
    int32_t j = 0;
    for (; j + 4 <= nb; j += 4) {
        __m256i c[4], sign[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                                 _mm256_setzero_si256()};
        for (int k = 0; k < 4; k++) c[k] = block_codes(format, codes, j + k, &sign[k]);
        const __m128 scale = halves4(sc + j);
        const __m128 min = format == EL_INT4_ASYM ? halves4(mn + j) : _mm_setzero_ps();
        for (int32_t t = 0; t < n; t++) {
            const int8_t *q = a[t].q + 32 * (size_t)j;
            __m128i sums = reduce4(block_partials(format, c[0], sign[0], q), block_partials(format, c[1], sign[1], q + 32),
                                   block_partials(format, c[2], sign[2], q + 64), block_partials(format, c[3], sign[3], q + 96));
            sums = _mm_sub_epi32(sums, _mm_loadu_si128((const __m128i *)(a[t].offset + j)));
            const __m128 isum = _mm_cvtepi32_ps(sums); /* exact: |sum| < 2^24 */
            lanes[t] = _mm_fmadd_ps(_mm_mul_ps(scale, _mm_loadu_ps(a[t].d + j)), isum, lanes[t]);
            if (format == EL_INT4_ASYM) lanes[t] = _mm_fmadd_ps(min, _mm_loadu_ps(a[t].ds + j), lanes[t]);
        }
    }
    for (int32_t t = 0; t < n; t++) {
        float l[4];
        _mm_storeu_ps(l, lanes[t]);
        for (int32_t i = j; i < nb; i++) { /* the last one to three blocks, each into its own lane */
            __m256i sign = _mm256_setzero_si256();
            const __m256i c = block_codes(format, codes, i, &sign);
            const int32_t isum = hsum_i32x8(block_partials(format, c, sign, a[t].q + 32 * (size_t)i)) - a[t].offset[i];
            float *lane = &l[i & 3];
            *lane = fmaf(_cvtsh_ss(sc[i]) * a[t].d[i], (float)isum, *lane);
            if (format == EL_INT4_ASYM) *lane = fmaf(_cvtsh_ss(mn[i]), a[t].ds[i], *lane);
        }
        y[(size_t)t * y_stride] = (l[0] + l[1]) + (l[2] + l[3]);
    }
}

static INLINE AVX2_FMA void rows_tokens(float *y, size_t y_stride, int32_t n_rows, int32_t n, int32_t format,
                                       const uint8_t *codes, size_t row_bytes, const el_half *scales,
                                       const el_half *mins, size_t n_wblocks, const token_acts *a, int32_t nb) {
    for (int32_t r = 0; r < n_rows; r++)
        row_tokens(y + r, y_stride, n, format, codes + (size_t)r * row_bytes, scales + (size_t)r * n_wblocks,
                   mins ? mins + (size_t)r * n_wblocks : NULL, a, nb);
}

/* tokens per pass over the rows: their values stay in L1 while the rows stream past once */
#define TOKENS_PER_PASS 4

AVX2_FMA void el_products_q8a_avx2(float *y, size_t y_stride, int32_t n_rows, int32_t n_tokens, int32_t format,
                                   const uint8_t *codes, size_t row_bytes, const el_half *scales, const el_half *mins,
                                   size_t n_wblocks, const el_block_q8a *x, int32_t nb, void *scratch) {
    for (int32_t t0 = 0; t0 < n_tokens; t0 += TOKENS_PER_PASS) {
        const int32_t n = n_tokens - t0 < TOKENS_PER_PASS ? n_tokens - t0 : TOKENS_PER_PASS;
        token_acts a[TOKENS_PER_PASS];
        for (int32_t t = 0; t < n; t++)
            a[t] = prepare_token((char *)scratch + (size_t)t * TOKEN_BYTES(nb), format, x + (size_t)(t0 + t) * nb, nb);
        float *yt = y + (size_t)t0 * y_stride;
#define ROWS(fmt) rows_tokens(yt, y_stride, n_rows, n, fmt, codes, row_bytes, scales, mins, n_wblocks, a, nb)
        switch (format) { /* one loop per format, its branches folded */
        case EL_INT4_ASYM: ROWS(EL_INT4_ASYM); break;
        case EL_INT4_SYM: ROWS(EL_INT4_SYM); break;
        default: ROWS(EL_INT8_SYM); break;
        }
#undef ROWS
    }
}

#endif
