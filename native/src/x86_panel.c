/* x86_panel.c: the prefill product with AVX-512 VNNI, as panels of 32 rows against tiles of up to
 * eight tokens.
 *
 * Why: the row kernels (row4_q4) give each (row, token) pair its own vpdpbusd lanes, so every
 * block's int32 sum has to be reduced across lanes before its float term: for 576-column rows that
 * reduction and the terms cost more instructions than the dot products, and prefill issued ~0.3
 * vpdpbusd per cycle. Here a panel's codes are unpacked to bytes and transposed once, so that one
 * 512-bit vector holds four consecutive codes of 16 rows and each vpdpbusd multiplies them by four
 * activation values of one token, broadcast from memory. The 16 lanes are 16 rows: a block's sum is
 * whole in its lane after eight vpdpbusd per plane, and its term is a handful of float operations
 * per 16 rows. A panel is packed once and read by every token tile; a tile's 2 x 8 int32
 * accumulators stay in registers (~0.66 vpdpbusd per cycle on 576- and 1536-column rows, one thread).
 *
 * The bits are those of row_q4 / row_q8 (edgellm.h): per (row, token) the term of block j is added
 * into lane j % 8, blocks in order (the lanes of a tile live in L1), and the eight lanes are reduced
 * as ((l0+l4)+(l2+l6))+((l1+l5)+(l3+l7)). */
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>
#include <stddef.h>

#include "kernels.h"

#define AVX512VNNI __attribute__((target("avx2,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define INLINE inline __attribute__((always_inline))
#define UNROLL _Pragma("GCC unroll 16")

#define TILE EL_PANEL_TILE
#define GROUP_BYTES (EL_PANEL_ROWS * 4)     /* four codes of each of the panel's rows */
#define BLOCK_BYTES (8 * GROUP_BYTES)       /* a block of 32 codes of the panel's rows */

/* The scratch (el_panel_bytes): the packed panel. */
typedef struct {
    uint8_t *codes;  /* [nb][8 groups][32 rows][4 codes], unsigned: 0..15 (4-bit) or raw 0..255 */
    float *scales;   /* [nb][32 rows] */
    float *mins;     /* [nb][32 rows], int4_asym */
} panel;

static panel panel_at(void *scratch, int32_t nb) {
    panel p;
    p.codes = scratch;
    p.scales = (float *)(p.codes + (size_t)nb * BLOCK_BYTES);
    p.mins = p.scales + (size_t)nb * EL_PANEL_ROWS;
    return p;
}

/* out[g] = dword g of each of the 16 rows (lane r: row r), g = 0..7: a 16 x 8 transpose of 32-bit groups.
 * Rows r and r + 8 share a vector, so an 8 x 8 transpose in each 256-bit half does it. */
static INLINE AVX512VNNI void transpose16x8(__m512i out[8], const __m256i rows[16]) {
    __m512i z[8], t[8], u[8];
    for (int r = 0; r < 8; r++) z[r] = _mm512_inserti64x4(_mm512_castsi256_si512(rows[r]), rows[r + 8], 1);
    for (int r = 0; r < 8; r += 2) {
        t[r] = _mm512_unpacklo_epi32(z[r], z[r + 1]);     /* per 128 bits: r.0 r+1.0 r.1 r+1.1 */
        t[r + 1] = _mm512_unpackhi_epi32(z[r], z[r + 1]); /* r.2 r+1.2 r.3 r+1.3 */
    }
    for (int r = 0; r < 8; r += 4)
        for (int k = 0; k < 2; k++) {
            u[r + 2 * k] = _mm512_unpacklo_epi64(t[r + k], t[r + 2 + k]);     /* rows r..r+3 of group 2k (+4) */
            u[r + 2 * k + 1] = _mm512_unpackhi_epi64(t[r + k], t[r + 2 + k]); /* of group 2k+1 (+4) */
        }
    /* u[i] (i < 4: rows 0-3, else rows 4-7) holds group i % 4 in its even 128-bit lanes, group i % 4 + 4
     * in its odd ones: interleave the two row quartets */
    const __m512i low = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    const __m512i high = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int g = 0; g < 4; g++) {
        out[g] = _mm512_permutex2var_epi32(u[g], low, u[g + 4]);
        out[g + 4] = _mm512_permutex2var_epi32(u[g], high, u[g + 4]);
    }
}

/* out [nb][32] = the float16 h [rows][n_wblocks] of rows r < n_rows (exactly: vcvtph2ps), 0 for the others:
 * eight blocks of 16 rows at a time, transposed as the codes are (masked loads: never past a row's end) */
static AVX512VNNI void pack_halves(float *out, int32_t n_rows, const el_half *h, size_t n_wblocks, int32_t nb) {
    for (int32_t j = 0; j < nb; j += 8) {
        const __mmask8 keep = nb - j >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (nb - j)) - 1);
        for (int half = 0; half < 2; half++) {
            __m256i rows[16];
            for (int r = 0; r < 16; r++) {
                int32_t row = 16 * half + r;
                rows[r] = row < n_rows ? _mm256_castps_si256(_mm256_cvtph_ps(
                                             _mm_maskz_loadu_epi16(keep, h + (size_t)row * n_wblocks + j)))
                                       : _mm256_setzero_si256();
            }
            __m512i blocks[8];
            transpose16x8(blocks, rows);
            for (int32_t b = 0; b < 8 && j + b < nb; b++)
                _mm512_store_si512(out + (size_t)(j + b) * EL_PANEL_ROWS + 16 * half, blocks[b]);
        }
    }
}

/* Rows [0, n_rows) (n_rows <= 32) of a matrix into the panel; the missing rows' codes, scales and
 * mins are zero (their outputs are never stored). */
static AVX512VNNI void pack_panel(panel *p, int32_t n_rows, int q4, const uint8_t *codes, size_t row_bytes,
                                  const el_half *scales, const el_half *mins, size_t n_wblocks, int32_t nb) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    /* the panel's rows come from memory (weights.bin does not fit in the caches): ask for all their lines
     * at once, not one row's line after another's as the loop below reaches them */
    for (int32_t r = 0; r < n_rows; r++) {
        for (size_t b = 0; b < row_bytes; b += 64) _mm_prefetch((const char *)codes + (size_t)r * row_bytes + b, _MM_HINT_T0);
        _mm_prefetch((const char *)(scales + (size_t)r * n_wblocks), _MM_HINT_T0);
        if (mins) _mm_prefetch((const char *)(mins + (size_t)r * n_wblocks), _MM_HINT_T0);
    }
    for (int32_t j = 0; j < nb; j++)
        for (int half = 0; half < 2; half++) {
            __m256i rows[16]; /* the 32 codes of 16 rows, one byte each */
            for (int r = 0; r < 16; r++) {
                int32_t row = 16 * half + r;
                const uint8_t *src = codes + (size_t)row * row_bytes + (size_t)j * (q4 ? 16 : 32);
                if (row >= n_rows) {
                    rows[r] = _mm256_setzero_si256();
                } else if (q4) { /* byte k = code 2k | code 2k+1 << 4 */
                    __m128i b = _mm_loadu_si128((const __m128i *)src);
                    __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
                    rows[r] = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
                } else {
                    rows[r] = _mm256_loadu_si256((const __m256i *)src);
                }
            }
            __m512i groups[8];
            transpose16x8(groups, rows);
            for (int g = 0; g < 8; g++)
                _mm512_store_si512(p->codes + (size_t)j * BLOCK_BYTES + g * GROUP_BYTES + 64 * half, groups[g]);
        }
    pack_halves(p->scales, n_rows, scales, n_wblocks, nb);
    if (mins) pack_halves(p->mins, n_rows, mins, n_wblocks, nb);
}

/* acc + w . (four int8 at q, broadcast): the broadcast folded into the vpdpbusd (GCC does not fold it) */
static INLINE AVX512VNNI __m512i dot_broadcast(__m512i acc, __m512i w, const int8_t *q) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t *)q));
    return acc;
}

/* acc[v][n] += the panel's block (codes) . one plane (at byte `plane` of each activation block) of
 * block j of token n, for the 16 rows of half v */
static INLINE AVX512VNNI void plane_dots(const int N, __m512i acc[2][TILE], const uint8_t *codes, const el_block_q16a *x,
                                         size_t plane, int32_t nb, int32_t j) {
    UNROLL for (int g = 0; g < 8; g++) {
        __m512i w0 = _mm512_load_si512(codes + g * GROUP_BYTES), w1 = _mm512_load_si512(codes + g * GROUP_BYTES + 64);
        UNROLL for (int n = 0; n < N; n++) {
            const int8_t *q = (const int8_t *)&x[(size_t)n * nb + j] + plane + 4 * g;
            acc[0][n] = dot_broadcast(acc[0][n], w0, q);
            acc[1][n] = dot_broadcast(acc[1][n], w1, q);
        }
    }
}

/* y[n * y_stride + r] for the panel's rows r < n_rows and tokens n < N of x [N][nb] (d, sum as x). The
 * blocks go in order; block j's terms are added into lane class j % 8, kept in L1 (lanes). */
static INLINE AVX512VNNI void panel_tile(const int N, float *y, size_t y_stride, int32_t n_rows, int32_t format,
                                         const panel *p, const el_block_q16a *x, const float *xd,
                                         const int32_t *xsum, int32_t nb) {
    _Alignas(64) float lanes[8][2][TILE][16];
    for (int32_t c = nb; c < 8; c++) /* classes no block reaches (rows of fewer than 8 blocks) */
        UNROLL for (int n = 0; n < N; n++) {
            _mm512_store_ps(lanes[c][0][n], _mm512_setzero_ps());
            _mm512_store_ps(lanes[c][1][n], _mm512_setzero_ps());
        }
    for (int32_t j = 0; j < nb; j++) {
        const uint8_t *codes = p->codes + (size_t)j * BLOCK_BYTES;
        __m512i acc[2][TILE];
        UNROLL for (int n = 0; n < N; n++) acc[0][n] = acc[1][n] = _mm512_setzero_si512();
        /* 256 * sum(code * qh) + sum(code * ql), exact in int32 */
        plane_dots(N, acc, codes, x, offsetof(el_block_q16a, qh), nb, j);
        UNROLL for (int n = 0; n < N; n++) {
            acc[0][n] = _mm512_slli_epi32(acc[0][n], 8);
            acc[1][n] = _mm512_slli_epi32(acc[1][n], 8);
        }
        plane_dots(N, acc, codes, x, offsetof(el_block_q16a, ql), nb, j);
        /* the terms of edgellm.h, in its order: (scale * d) * isum (+ (min * d) * sum), into lane j % 8 */
        float(*lane)[TILE][16] = lanes[j & 7];
        UNROLL for (int n = 0; n < N; n++) {
            const __m512 d = _mm512_set1_ps(xd[(size_t)n * nb + j]);
            const __m512i sum = _mm512_set1_epi32(xsum[(size_t)n * nb + j]);
            /* int4_asym: (float)sum; int4_sym, int8: what the raw codes' sums overcount, 8 or 128 sum */
            const __m512 sumf = _mm512_cvtepi32_ps(sum);
            const __m512i fix = _mm512_slli_epi32(sum, format == EL_INT4_SYM ? 3 : 7);
            UNROLL for (int v = 0; v < 2; v++) {
                const __m512 scale = _mm512_load_ps(p->scales + (size_t)j * EL_PANEL_ROWS + 16 * v);
                __m512 t;
                if (format == EL_INT4_ASYM) {
                    const __m512 min = _mm512_load_ps(p->mins + (size_t)j * EL_PANEL_ROWS + 16 * v);
                    t = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(scale, d), _mm512_cvtepi32_ps(acc[v][n])),
                                      _mm512_mul_ps(_mm512_mul_ps(min, d), sumf));
                } else {
                    t = _mm512_mul_ps(_mm512_mul_ps(scale, d), _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[v][n], fix)));
                }
                /* a lane starts at +0.0, as in the row kernels (+0.0 + t is not always t: t = -0.0) */
                __m512 before = j < 8 ? _mm512_setzero_ps() : _mm512_load_ps(lane[v][n]);
                _mm512_store_ps(lane[v][n], _mm512_add_ps(before, t));
            }
        }
    }
    for (int v = 0; v < 2; v++) {
        int32_t valid = n_rows - 16 * v;
        if (valid <= 0) break;
        __mmask16 keep = valid >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
        for (int n = 0; n < N; n++) {
#define L(c) _mm512_load_ps(lanes[c][v][n])
            __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(L(0), L(4)), _mm512_add_ps(L(2), L(6))),
                                     _mm512_add_ps(_mm512_add_ps(L(1), L(5)), _mm512_add_ps(L(3), L(7))));
#undef L
            _mm512_mask_storeu_ps(y + (size_t)n * y_stride + 16 * v, keep, s);
        }
    }
}

AVX512VNNI void el_panels_avx512vnni(float *y, size_t y_stride, int32_t n_rows, int32_t n_tokens, int32_t format,
                          const uint8_t *codes, size_t row_bytes, const el_half *scales, const el_half *mins,
                          size_t n_wblocks, const el_block_q16a *x, const float *xd, const int32_t *xsum, int32_t nb,
                          void *scratch) {
    panel p = panel_at(scratch, nb);
    const int q4 = format != EL_INT8_SYM;
    for (int32_t r0 = 0; r0 < n_rows; r0 += EL_PANEL_ROWS) {
        int32_t rows = n_rows - r0 < EL_PANEL_ROWS ? n_rows - r0 : EL_PANEL_ROWS;
        pack_panel(&p, rows, q4, codes + (size_t)r0 * row_bytes, row_bytes, scales + (size_t)r0 * n_wblocks,
                   mins ? mins + (size_t)r0 * n_wblocks : NULL, n_wblocks, nb);
        for (int32_t t0 = 0; t0 < n_tokens; t0 += TILE) {
            int32_t n = n_tokens - t0 < TILE ? n_tokens - t0 : TILE;
            size_t o = (size_t)t0 * nb;
            float *yt = y + (size_t)t0 * y_stride + r0;
            switch (n) { /* N a constant in each: the accumulators stay in registers */
            case 8: panel_tile(8, yt, y_stride, rows, format, &p, x + o, xd + o, xsum + o, nb); break;
            case 7: panel_tile(7, yt, y_stride, rows, format, &p, x + o, xd + o, xsum + o, nb); break;
            case 6: panel_tile(6, yt, y_stride, rows, format, &p, x + o, xd + o, xsum + o, nb); break;
            case 5: panel_tile(5, yt, y_stride, rows, format, &p, x + o, xd + o, xsum + o, nb); break;
            case 4: panel_tile(4, yt, y_stride, rows, format, &p, x + o, xd + o, xsum + o, nb); break;
            case 3: panel_tile(3, yt, y_stride, rows, format, &p, x + o, xd + o, xsum + o, nb); break;
            case 2: panel_tile(2, yt, y_stride, rows, format, &p, x + o, xd + o, xsum + o, nb); break;
            default: panel_tile(1, yt, y_stride, rows, format, &p, x + o, xd + o, xsum + o, nb); break;
            }
        }
    }
}

#endif /* x86-64 */
