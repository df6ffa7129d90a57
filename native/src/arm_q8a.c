/* arm_q8a.c: the 8-bit-activation products on aarch64 (edgellm.h: el_block_q8a), for dotprod and i8mm.
 *
 * Decode (fewer than 4 tokens): one row at a time straight from its planar codes. Four blocks' codes
 * come in by one LD4 of 32-bit words, which leaves block 4g+k in lane k (edgellm.h's lane j % 4); the
 * token's values were stored once per call in the order that load gives, so eight SDOTs sum each block
 * in its own lane with no reduction, and the scales, mins and float terms of four blocks take one vector
 * operation each. A block's integer sum starts at MAGIC_BITS, so one subtraction converts four. The
 * last blocks of a row (576 columns: two) come in by LD2 or plain loads and are reduced pairwise.
 *
 * Prefill: panels of four rows, unpacked once per 64 tokens into scratch with the rows side by side
 * (ST4 / ST2 store them so: a vector holds four values of each of the four rows), so that an SDOT by
 * element accumulates one row's block in each lane and the float terms of four rows are one vector
 * operation per token; the integer sums start at MAGIC_BITS, so one subtraction converts them.
 * Tiles of four tokens; the four lanes of edgellm.h are four passes over the blocks (j % 4 == k), so
 * a tile keeps four accumulators per token, not sixteen. i8mm: SMMLA on two rows by two tokens.
 */
#if defined(__aarch64__)

#include <arm_neon.h>
#include <string.h>

#include "kernels.h"

#define DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#define I8MM __attribute__((target("arch=armv8.6-a+i8mm")))

/* Integer sums that start at 1.5 * 2^23 as float bits: while |sum| < 2^22 the bits are those of the float
 * 12582912 + sum, exactly, so a subtraction gives (float)sum (what SCVTF gives, at half its cost in the A76's
 * V0 pipe), and the start value replaces a zeroing. One block's |isum| <= 32 * 128 * 127 < 2^22. */
#define MAGIC_BITS 0x4B400000
#define MAGIC_FLOAT 12582912.0f

static inline float32x4_t magic_to_float(int32x4_t acc) {
    return vsubq_f32(vreinterpretq_f32_s32(acc), vdupq_n_f32(MAGIC_FLOAT));
}

/* tokens below this run the decode path once per token */
#define PANEL_MIN_TOKENS 4

static inline float32x4_t halves4(const el_half *h) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h))); }

/* ---- decode ---------------------------------------------------------------------------------- */

/* A row's codes are read in pieces: groups of four blocks, then at the row's end a pair and a single block.
 * A de-interleaving load (LD4 / LD2 of 32-bit words) puts each piece's code words in lanes by block, so the
 * SDOTs sum each block in its own lanes and no reduction is needed for a group of 4-bit codes:
 *   4-bit group: LD4 of 64 bytes, lane k = block k;      8-bit group: two pairs, one pairwise add;
 *   4-bit pair:  LD2 of 32 bytes, lanes 2k, 2k+1 = block k; 8-bit pair: LD4 of 64 bytes, the same lanes;
 *   single:      plain loads, four lanes of the one block.
 * The token's values are stored once per call in the same order, so that a plain load of them meets the codes'
 * lanes: each piece's values go through the de-interleaving load its codes get (4-bit: the even values, which
 * meet the low nibbles, and the odd ones apart). */

/* one token's values in piece order ([nb][32] bytes), and d, ds and 8 * sum contiguous up to a multiple of 4
 * (padded with -0.0, -0.0 and 0: see tail_sums; 8 * sum is exact in float32) */
typedef struct {
    int8_t *q;
    float *d, *ds, *sum8;
} decode_acts;

/* The 4-bit planes of blocks x[0..n) contiguous: the even values of each block, then the odd ones. */
static void planes_q4(int8_t *even, int8_t *odd, const el_block_q8a *x, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        int8x16x2_t v = vld2q_s8(x[i].q); /* val[0] the even values, val[1] the odd */
        vst1q_s8(even + 16 * i, v.val[0]);
        vst1q_s8(odd + 16 * i, v.val[1]);
    }
}

/* 16 * n bytes of one plane as the piece's load de-interleaves n blocks (4, 2 or 1) of 16-byte code rows. */
static void store_piece16(int8_t *out, const int8_t *plane, int32_t n) {
    const int32_t *w = (const int32_t *)plane;
    if (n == 4) {
        int32x4x4_t v = vld4q_s32(w);
        for (int k = 0; k < 4; k++) vst1q_s8(out + 16 * k, vreinterpretq_s8_s32(v.val[k]));
    } else if (n == 2) {
        int32x4x2_t v = vld2q_s32(w);
        for (int k = 0; k < 2; k++) vst1q_s8(out + 16 * k, vreinterpretq_s8_s32(v.val[k]));
    } else {
        vst1q_s8(out, vld1q_s8(plane));
    }
}

/* One piece of n blocks' values into out (32 * n bytes): 4-bit, the even values' vectors then the odd ones';
 * 8-bit, groups as two pairs, each pair (64 bytes) as LD4 de-interleaves it. */
static void store_piece(int8_t *out, int32_t format, const el_block_q8a *x, int32_t n) {
    int8_t even[64], odd[64];
    if (format != EL_INT8_SYM) {
        planes_q4(even, odd, x, n);
        store_piece16(out, even, n);
        store_piece16(out + 16 * n, odd, n);
        return;
    }
    for (int32_t i = 0; i + 2 <= n; i += 2) {
        memcpy(even, x[i].q, 32);
        memcpy(even + 32, x[i + 1].q, 32);
        int32x4x4_t v = vld4q_s32((const int32_t *)even);
        for (int k = 0; k < 4; k++) vst1q_s8(out + 32 * i + 16 * k, vreinterpretq_s8_s32(v.val[k]));
    }
    if (n & 1) memcpy(out + 32 * (n - 1), x[n - 1].q, 32);
}

/* The pieces of a row of nb blocks: groups of four, then a pair if two or three remain, then a single one. */
static inline int32_t piece_blocks(int32_t j, int32_t nb) { return nb - j >= 4 ? 4 : nb - j >= 2 ? 2 : 1; }

static decode_acts prepare_decode(int32_t format, const el_block_q8a *x, int32_t nb, void *scratch) {
    const int32_t nb4 = (nb + 3) & ~3;
    decode_acts a;
    a.q = scratch;
    a.d = (float *)(a.q + (size_t)nb * 32);
    a.ds = a.d + nb4;
    a.sum8 = a.ds + nb4;
    for (int32_t j = 0; j < nb4; j++) {
        const int live = j < nb;
        a.d[j] = live ? x[j].d : -0.0f; /* a padded lane's terms are -0.0, which leave it as it is */
        a.ds[j] = live ? x[j].ds : -0.0f;
        a.sum8[j] = live ? (float)(8 * x[j].sum) : 0.0f;
    }
    for (int32_t j = 0; j < nb; j += piece_blocks(j, nb)) store_piece(a.q + 32 * (size_t)j, format, x + j, piece_blocks(j, nb));
    return a;
}

/* The start values of a piece's integer sums (MAGIC_BITS once per block: in each lane of a group, in the
 * first of each block's two lanes of a pair, in lane 0 of a single block) and of a row's float lanes (-0.0),
 * loaded from memory on purpose: a load issues on the A76's load pipes, where a register copy or a MOVI
 * would take a slot of the vector pipes that bound this loop (volatile, so that the compiler does not hoist
 * it and copy a register instead). */
enum { START_GROUP, START_PAIR, START_SINGLE, START_LANES };
static const int32_t DECODE_STARTS[4][4] __attribute__((aligned(16))) = {
    {MAGIC_BITS, MAGIC_BITS, MAGIC_BITS, MAGIC_BITS},
    {MAGIC_BITS, 0, MAGIC_BITS, 0},
    {MAGIC_BITS, 0, 0, 0},
    {INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN}, /* -0.0f */
};

static inline int32x4_t load_start(int which) {
    int32x4_t v;
    __asm__ volatile("ldr %q0, %1" : "=w"(v) : "Q"(*(const int32_t(*)[4])DECODE_STARTS[which]));
    return v;
}

static inline int8x16_t lo4(uint32x4_t c) { return vreinterpretq_s8_u8(vandq_u8(vreinterpretq_u8_u32(c), vdupq_n_u8(0x0F))); }
static inline int8x16_t hi4(uint32x4_t c) { return vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_u32(c), 4)); }
static inline int8x16_t signed8(uint32x4_t c) { /* code - 128 */
    return vreinterpretq_s8_u8(veorq_u8(vreinterpretq_u8_u32(c), vdupq_n_u8(0x80)));
}

/* Sums of a piece's n code vectors c with the values q (in piece order) into t. */
static inline __attribute__((always_inline)) DOTPROD int32x4_t piece_dot(int32_t format, int32x4_t t, const uint32x4_t *c,
                                                                         int32_t n, const int8_t *q) {
#pragma GCC unroll 4
    for (int32_t k = 0; k < n; k++) {
        if (format == EL_INT8_SYM) {
            t = vdotq_s32(t, signed8(c[k]), vld1q_s8(q + 16 * k));
        } else {
            t = vdotq_s32(t, lo4(c[k]), vld1q_s8(q + 16 * k));
            t = vdotq_s32(t, hi4(c[k]), vld1q_s8(q + 16 * (n + k)));
        }
    }
    return t;
}

/* 8-bit codes of a pair (64 bytes): lanes 0, 1 block 0, lanes 2, 3 block 1. */
static inline __attribute__((always_inline)) DOTPROD int32x4_t pair_q8(const uint8_t *c, const int8_t *q) {
    const uint32x4x4_t v = vld4q_u32((const uint32_t *)c);
    return piece_dot(EL_INT8_SYM, load_start(START_PAIR), v.val, 4, q);
}

/* Sums of blocks j .. j+3 in lanes 0..3, as MAGIC_BITS-based floats' bits. */
static inline __attribute__((always_inline)) DOTPROD int32x4_t group_sums(int32_t format, const uint8_t *codes,
                                                                          const int8_t *q, int32_t j) {
    if (format == EL_INT8_SYM)
        return vpaddq_s32(pair_q8(codes + 32 * (size_t)j, q + 32 * (size_t)j),
                          pair_q8(codes + 32 * (size_t)(j + 2), q + 32 * (size_t)(j + 2)));
    const uint32x4x4_t v = vld4q_u32((const uint32_t *)(codes + 16 * (size_t)j));
    return piece_dot(format, load_start(START_GROUP), v.val, 4, q + 32 * (size_t)j);
}

/* Sums of the last 1 to 3 blocks (from j) in lanes 0..n-1, MAGIC_BITS (+0.0 once converted) in the others, so
 * that their terms, +0.0 (a zero scale) times -0.0 (the padded d and ds) times +0.0, are -0.0 and leave the
 * lanes as the reference does, signed zeros included. */
static inline __attribute__((always_inline)) DOTPROD int32x4_t tail_sums(int32_t format, const uint8_t *codes,
                                                                         const int8_t *q, int32_t j, int32_t n) {
    const size_t code_bytes = format == EL_INT8_SYM ? 32 : 16;
    int32x4_t pair = vdupq_n_s32(0), single = vdupq_n_s32(0);
    if (n >= 2) {
        if (format == EL_INT8_SYM) {
            pair = pair_q8(codes + 32 * (size_t)j, q + 32 * (size_t)j);
        } else {
            const uint32x4x2_t v = vld2q_u32((const uint32_t *)(codes + 16 * (size_t)j));
            pair = piece_dot(format, load_start(START_PAIR), v.val, 2, q + 32 * (size_t)j);
        }
    }
    if (n != 2) {
        const int32_t js = j + n - 1;
        const uint8_t *c = codes + code_bytes * (size_t)js;
        uint32x4_t v[2] = {vld1q_u32((const uint32_t *)c), vdupq_n_u32(0)};
        if (format == EL_INT8_SYM) v[1] = vld1q_u32((const uint32_t *)(c + 16));
        single = piece_dot(format, load_start(START_SINGLE), v, format == EL_INT8_SYM ? 2 : 1,
                           q + 32 * (size_t)js);
        single = vpaddq_s32(single, load_start(START_SINGLE)); /* [block, block, MAGIC, 0] */
    }
    if (n == 1) return vpaddq_s32(single, load_start(START_PAIR));
    return vpaddq_s32(pair, n == 3 ? single : load_start(START_PAIR));
}

/* The first n (<= 4) of a row's halves from h as float32, zeros after; never read past the row's end. */
static inline float32x4_t halves(const el_half *h, int32_t n) {
    if (n == 4) return halves4(h);
    uint16x4_t v = vdup_n_u16(0);
    if (n >= 2) {
        uint32_t pair;
        memcpy(&pair, h, sizeof pair);
        v = vreinterpret_u16_u32(vcreate_u32(pair));
    }
    if (n == 1) v = vld1_lane_u16(h, v, 0);
    if (n == 3) v = vld1_lane_u16(h + 2, v, 2);
    return vcvt_f32_f16(vreinterpret_f16_u16(v));
}

/* lanes + the float terms of blocks j0 .. j0+n-1 (edgellm.h), their integer sums s in MAGIC_BITS-based bits. */
static inline __attribute__((always_inline)) DOTPROD float32x4_t block_terms(int32_t format, float32x4_t lanes,
                                                                             int32x4_t s, const el_half *sc,
                                                                             const el_half *mn, const decode_acts *a,
                                                                             int32_t j0, int32_t n) {
    const float32x4_t isum = magic_to_float(s);
    const float32x4_t x = format == EL_INT4_SYM ? vsubq_f32(isum, vld1q_f32(a->sum8 + j0)) : isum; /* exact */
    lanes = vfmaq_f32(lanes, vmulq_f32(halves(sc + j0, n), vld1q_f32(a->d + j0)), x);
    if (format == EL_INT4_ASYM) lanes = vfmaq_f32(lanes, halves(mn + j0, n), vld1q_f32(a->ds + j0));
    return lanes;
}

/* One row's four lanes (edgellm.h) against one token. */
static inline __attribute__((always_inline)) DOTPROD float32x4_t row_lanes(int32_t format, const uint8_t *codes,
                                                                           const el_half *sc, const el_half *mn,
                                                                           const decode_acts *a, int32_t nb) {
    float32x4_t lanes = vreinterpretq_f32_s32(load_start(START_LANES)); /* edgellm.h: the lanes start at -0.0 */
    int32_t j = 0;
    for (; j + 4 <= nb; j += 4) lanes = block_terms(format, lanes, group_sums(format, codes, a->q, j), sc, mn, a, j, 4);
    if (j < nb) lanes = block_terms(format, lanes, tail_sums(format, codes, a->q, j, nb - j), sc, mn, a, j, nb - j);
    return lanes;
}

/* Rows [0, n_rows) against one token, four rows per store, each row's lanes reduced in the order of edgellm.h. */
static inline __attribute__((always_inline)) DOTPROD void decode_rows(int32_t format, float *y, int32_t n_rows,
                                                                      const uint8_t *codes, size_t row_bytes,
                                                                      const el_half *scales, const el_half *mins,
                                                                      size_t n_wblocks, const decode_acts *a,
                                                                      int32_t nb) {
    for (int32_t r0 = 0; r0 < n_rows; r0 += 4) {
        float32x4_t l[4];
        const int32_t n = n_rows - r0 < 4 ? n_rows - r0 : 4;
        for (int32_t i = 0; i < 4; i++) {
            const int32_t r = r0 + (i < n ? i : 0);
            l[i] = row_lanes(format, codes + (size_t)r * row_bytes, scales + (size_t)r * n_wblocks,
                             mins ? mins + (size_t)r * n_wblocks : NULL, a, nb);
        }
        /* (lane0 + lane1) + (lane2 + lane3) of four rows at once */
        float32x4_t out = vpaddq_f32(vpaddq_f32(l[0], l[1]), vpaddq_f32(l[2], l[3]));
        if (n == 4) vst1q_f32(y + r0, out);
        else {
            float v[4];
            vst1q_f32(v, out);
            memcpy(y + r0, v, (size_t)n * sizeof(float));
        }
    }
}

static DOTPROD void decode_token(float *y, int32_t n_rows, int32_t format, const uint8_t *codes, size_t row_bytes,
                                 const el_half *scales, const el_half *mins, size_t n_wblocks,
                                 const el_block_q8a *x, int32_t nb, void *scratch) {
    const decode_acts a = prepare_decode(format, x, nb, scratch);
#define DECODE(fmt) decode_rows(fmt, y, n_rows, codes, row_bytes, scales, mins, n_wblocks, &a, nb)
    switch (format) { /* one loop per format, its branches folded */
    case EL_INT4_ASYM: DECODE(EL_INT4_ASYM); break;
    case EL_INT4_SYM: DECODE(EL_INT4_SYM); break;
    default: DECODE(EL_INT8_SYM); break;
    }
#undef DECODE
}

/* ---- prefill panels -------------------------------------------------------------------------- */

/* Four rows unpacked once for every tile of tokens:
 *   w [nb][8]  the codes as signed int8 (code - 128 for 8-bit), four rows side by side:
 *              dotprod: w[g] = [row 0, 1, 2, 3] x the block's values 4g .. 4g+3 in the tile's value
 *              order (4-bit: the even values, then the odd ones: low nibbles, then high);
 *              i8mm: w[4p + s] = [row 2p, row 2p+1] x eight values (step s) in the same order.
 *   scale, min [2][nb][4]  float32: dotprod [0][j] = rows 0..3; i8mm [p][j] = the 2x2 tiles' lanes,
 *              rows (2p, 2p, 2p+1, 2p+1). */
typedef struct {
    int8x16_t *w;
    float *scale, *min;
    int32_t nb;
} panel;

/* One block of a tile of four tokens: their values (dotprod: [token][32] in the panel's value order;
 * i8mm: [pair][step][2 tokens x 8]), and d, ds and 8 * sum (dotprod: tokens 0..3; i8mm [2][4]: the 2x2
 * tiles' lanes, tokens (2p, 2p+1, 2p, 2p+1)). */
typedef struct {
    int8_t q[128];
    float d[8], ds[8];
    int32_t sum8[8];
} tile_block;

static inline uint8x16_t low_nibbles(uint8x16_t v) { return vandq_u8(v, vdupq_n_u8(0x0F)); }
static inline uint8x16_t high_nibbles(uint8x16_t v) { return vshrq_n_u8(v, 4); }
static inline uint8x16_t flip_sign(uint8x16_t v) { return veorq_u8(v, vdupq_n_u8(0x80)); } /* code - 128 */

/* The codes of block j of rows c0..c3 into w (8 vectors). The rows' side-by-side layouts are what ST4
 * (dotprod: 4-byte groups of four registers interleaved) and ST2 (i8mm: 8-byte halves of two) store.
 * (Written out row by row: GCC keeps a loop's uint8x16x4_t on the stack.) */
static inline __attribute__((always_inline)) void unpack_codes(int8x16_t *w, int i8mm, int32_t format,
                                                               const uint8_t *c0, const uint8_t *c1,
                                                               const uint8_t *c2, const uint8_t *c3) {
    uint8x16_t l0, l1, l2, l3, h0, h1, h2, h3; /* 4-bit: the even values, the odd ones; 8-bit: 0..15, 16..31 */
    if (format == EL_INT8_SYM) {
        l0 = flip_sign(vld1q_u8(c0)), l1 = flip_sign(vld1q_u8(c1));
        l2 = flip_sign(vld1q_u8(c2)), l3 = flip_sign(vld1q_u8(c3));
        h0 = flip_sign(vld1q_u8(c0 + 16)), h1 = flip_sign(vld1q_u8(c1 + 16));
        h2 = flip_sign(vld1q_u8(c2 + 16)), h3 = flip_sign(vld1q_u8(c3 + 16));
    } else {
        const uint8x16_t v0 = vld1q_u8(c0), v1 = vld1q_u8(c1), v2 = vld1q_u8(c2), v3 = vld1q_u8(c3);
        l0 = low_nibbles(v0), l1 = low_nibbles(v1), l2 = low_nibbles(v2), l3 = low_nibbles(v3);
        h0 = high_nibbles(v0), h1 = high_nibbles(v1), h2 = high_nibbles(v2), h3 = high_nibbles(v3);
    }
    if (!i8mm) {
        uint32_t *o = (uint32_t *)(void *)w;
        vst4q_u32(o, (uint32x4x4_t){{vreinterpretq_u32_u8(l0), vreinterpretq_u32_u8(l1), vreinterpretq_u32_u8(l2),
                                     vreinterpretq_u32_u8(l3)}});
        vst4q_u32(o + 16, (uint32x4x4_t){{vreinterpretq_u32_u8(h0), vreinterpretq_u32_u8(h1),
                                          vreinterpretq_u32_u8(h2), vreinterpretq_u32_u8(h3)}});
        return;
    }
    uint64_t *o = (uint64_t *)(void *)w; /* per row pair, steps: l's halves, then h's */
    vst2q_u64(o, (uint64x2x2_t){{vreinterpretq_u64_u8(l0), vreinterpretq_u64_u8(l1)}});
    vst2q_u64(o + 4, (uint64x2x2_t){{vreinterpretq_u64_u8(h0), vreinterpretq_u64_u8(h1)}});
    vst2q_u64(o + 8, (uint64x2x2_t){{vreinterpretq_u64_u8(l2), vreinterpretq_u64_u8(l3)}});
    vst2q_u64(o + 12, (uint64x2x2_t){{vreinterpretq_u64_u8(h2), vreinterpretq_u64_u8(h3)}});
}

/* Four rows' scales (or mins) h0..h3 of blocks j .. j+3 into out [nb][4] (dotprod) or out and out2 (i8mm):
 * one FCVTL a row, and ST4 interleaves the rows per block. */
static inline void unpack_halves4(float *out, float *out2, int i8mm, const el_half *h0, const el_half *h1,
                                  const el_half *h2, const el_half *h3) {
    const float32x4_t f0 = halves4(h0), f1 = halves4(h1), f2 = halves4(h2), f3 = halves4(h3);
    if (!i8mm) {
        vst4q_f32(out, (float32x4x4_t){{f0, f1, f2, f3}});
        return;
    }
    vst4q_f32(out, (float32x4x4_t){{f0, f0, f1, f1}});
    vst4q_f32(out2, (float32x4x4_t){{f2, f2, f3, f3}});
}

/* the same for one block (the last one to three of a row: a four-block load would read past it) */
static inline void unpack_halves1(float *out, float *out2, int i8mm, const el_half *const *h, int32_t j) {
    uint16x4_t lanes = vdup_n_u16(0);
    lanes = vld1_lane_u16(h[0] + j, lanes, 0);
    lanes = vld1_lane_u16(h[1] + j, lanes, 1);
    lanes = vld1_lane_u16(h[2] + j, lanes, 2);
    lanes = vld1_lane_u16(h[3] + j, lanes, 3);
    const float32x4_t f = vcvt_f32_f16(vreinterpret_f16_u16(lanes));
    if (!i8mm) {
        vst1q_f32(out + 4 * (size_t)j, f);
        return;
    }
    vst1q_f32(out + 4 * (size_t)j, vzip1q_f32(f, f));
    vst1q_f32(out2 + 4 * (size_t)j, vzip2q_f32(f, f));
}

static inline void unpack_halves(float *out, float *out2, int i8mm, const el_half *const *h, int32_t nb) {
    int32_t j = 0;
    for (; j + 4 <= nb; j += 4)
        unpack_halves4(out + 4 * (size_t)j, out2 + 4 * (size_t)j, i8mm, h[0] + j, h[1] + j, h[2] + j, h[3] + j);
    for (; j < nb; j++) unpack_halves1(out, out2, i8mm, h, j);
}

/* Rows (codes[r], scales[r], mins[r]), r < 4, into the panel, for one layout and format. */
static inline __attribute__((always_inline)) void unpack_rows(const panel *p, int i8mm, int32_t format,
                                                              const uint8_t *const *c, const el_half *const *sc,
                                                              const el_half *const *mn) {
    const size_t span = format == EL_INT8_SYM ? 32 : 16, nb = (size_t)p->nb;
    const uint8_t *c0 = c[0], *c1 = c[1], *c2 = c[2], *c3 = c[3];
    for (size_t j = 0; j < nb; j++, c0 += span, c1 += span, c2 += span, c3 += span)
        unpack_codes(p->w + 8 * j, i8mm, format, c0, c1, c2, c3);
    unpack_halves(p->scale, p->scale + 4 * nb, i8mm, sc, p->nb);
    if (format == EL_INT4_ASYM) unpack_halves(p->min, p->min + 4 * nb, i8mm, mn, p->nb);
}

static void unpack_panel(const panel *p, int i8mm, int32_t format, const uint8_t *const *c,
                         const el_half *const *sc, const el_half *const *mn) {
    switch (format) { /* each layout and format its own loop */
    case EL_INT4_ASYM: i8mm ? unpack_rows(p, 1, EL_INT4_ASYM, c, sc, mn) : unpack_rows(p, 0, EL_INT4_ASYM, c, sc, mn); break;
    case EL_INT4_SYM: i8mm ? unpack_rows(p, 1, EL_INT4_SYM, c, sc, mn) : unpack_rows(p, 0, EL_INT4_SYM, c, sc, mn); break;
    default: i8mm ? unpack_rows(p, 1, EL_INT8_SYM, c, sc, mn) : unpack_rows(p, 0, EL_INT8_SYM, c, sc, mn); break;
    }
}

/* Tokens x[t], t < n_tokens (<= 4; a short tile repeats its last token), into tile blocks [nb]. */
static void prepare_tile(tile_block *tb, int i8mm, int32_t format, const el_block_q8a *x, int32_t nb,
                         int32_t n_tokens) {
    for (int32_t j = 0; j < nb; j++, tb++) {
        int8x16_t v0[4], v1[4];
        for (int t = 0; t < 4; t++) {
            const el_block_q8a *b = x + (size_t)(t < n_tokens ? t : n_tokens - 1) * nb + j;
            if (format == EL_INT8_SYM) {
                v0[t] = vld1q_s8(b->q), v1[t] = vld1q_s8(b->q + 16);
            } else {
                int8x16x2_t eo = vld2q_s8(b->q); /* the even values, the odd ones: the nibbles' order */
                v0[t] = eo.val[0], v1[t] = eo.val[1];
            }
            const int at = i8mm ? 4 * (t / 2) + (t % 2) : t; /* i8mm: lanes (2p, 2p+1, 2p, 2p+1) */
            tb->d[at] = b->d, tb->ds[at] = b->ds, tb->sum8[at] = 8 * b->sum;
            if (i8mm) tb->d[at + 2] = b->d, tb->ds[at + 2] = b->ds, tb->sum8[at + 2] = 8 * b->sum;
        }
        if (!i8mm) {
            for (int t = 0; t < 4; t++) {
                vst1q_s8(tb->q + 32 * t, v0[t]);
                vst1q_s8(tb->q + 32 * t + 16, v1[t]);
            }
            continue;
        }
        for (int pair = 0; pair < 2; pair++) { /* steps: v0's halves, then v1's, as the panel's */
            uint64_t *q = (uint64_t *)(void *)(tb->q + 64 * pair);
            vst2q_u64(q, (uint64x2x2_t){{vreinterpretq_u64_s8(v0[2 * pair]), vreinterpretq_u64_s8(v0[2 * pair + 1])}});
            vst2q_u64(q + 4, (uint64x2x2_t){{vreinterpretq_u64_s8(v1[2 * pair]), vreinterpretq_u64_s8(v1[2 * pair + 1])}});
        }
    }
}

/* from MAGIC_BITS, the isums of four rows' block (w: 8 vectors) against one token's 32 values q */
static inline __attribute__((always_inline)) DOTPROD int32x4_t rows4_dot(const int8x16_t *w, const int8_t *q) {
    const int8x16_t q0 = vld1q_s8(q), q1 = vld1q_s8(q + 16);
    int32x4_t acc = vdotq_laneq_s32(vdupq_n_s32(MAGIC_BITS), w[0], q0, 0);
    acc = vdotq_laneq_s32(acc, w[1], q0, 1);
    acc = vdotq_laneq_s32(acc, w[2], q0, 2);
    acc = vdotq_laneq_s32(acc, w[3], q0, 3);
    acc = vdotq_laneq_s32(acc, w[4], q1, 0);
    acc = vdotq_laneq_s32(acc, w[5], q1, 1);
    acc = vdotq_laneq_s32(acc, w[6], q1, 2);
    return vdotq_laneq_s32(acc, w[7], q1, 3);
}

/* fma(a, b, f), or a * b for a lane's first term: its start value -0.0 (edgellm.h) makes them equal */
static inline float32x4_t fma_first(float32x4_t f, float32x4_t a, float32x4_t b, int first) {
    return first ? vmulq_f32(a, b) : vfmaq_f32(f, a, b);
}

/* f[t] + the terms of block j for four rows x four tokens (token t's, rows in lanes) */
static inline __attribute__((always_inline)) DOTPROD void step_dotprod(float32x4_t f[4], int32_t format,
                                                                       const panel *p, const tile_block *tb,
                                                                       int32_t j, int first) {
    const int8x16_t *w = p->w + 8 * (size_t)j;
    const tile_block *tj = tb + j;
    int32x4_t s0 = rows4_dot(w, tj->q), s1 = rows4_dot(w, tj->q + 32);
    int32x4_t s2 = rows4_dot(w, tj->q + 64), s3 = rows4_dot(w, tj->q + 96);
    if (format == EL_INT4_SYM) {
        const int32x4_t sum8 = vld1q_s32(tj->sum8);
        s0 = vsubq_s32(s0, vdupq_laneq_s32(sum8, 0)), s1 = vsubq_s32(s1, vdupq_laneq_s32(sum8, 1));
        s2 = vsubq_s32(s2, vdupq_laneq_s32(sum8, 2)), s3 = vsubq_s32(s3, vdupq_laneq_s32(sum8, 3));
    }
    const float32x4_t scale = vld1q_f32(p->scale + 4 * (size_t)j), d = vld1q_f32(tj->d);
    f[0] = fma_first(f[0], vmulq_laneq_f32(scale, d, 0), magic_to_float(s0), first);
    f[1] = fma_first(f[1], vmulq_laneq_f32(scale, d, 1), magic_to_float(s1), first);
    f[2] = fma_first(f[2], vmulq_laneq_f32(scale, d, 2), magic_to_float(s2), first);
    f[3] = fma_first(f[3], vmulq_laneq_f32(scale, d, 3), magic_to_float(s3), first);
    if (format == EL_INT4_ASYM) {
        const float32x4_t min = vld1q_f32(p->min + 4 * (size_t)j), ds = vld1q_f32(tj->ds);
        f[0] = vfmaq_laneq_f32(f[0], min, ds, 0);
        f[1] = vfmaq_laneq_f32(f[1], min, ds, 1);
        f[2] = vfmaq_laneq_f32(f[2], min, ds, 2);
        f[3] = vfmaq_laneq_f32(f[3], min, ds, 3);
    }
}

/* One lane of four rows x four tokens (blocks j = k, k+4, ..): f[t] = token t's, rows in lanes. */
static inline __attribute__((always_inline)) DOTPROD void pass_dotprod(float32x4_t f[4], int32_t format,
                                                                       const panel *p, const tile_block *tb,
                                                                       int32_t k) {
    float32x4_t g[4] = {vdupq_n_f32(-0.0f), vdupq_n_f32(-0.0f), vdupq_n_f32(-0.0f), vdupq_n_f32(-0.0f)};
    if (k < p->nb) step_dotprod(g, format, p, tb, k, 1);
    for (int32_t j = k + 4; j < p->nb; j += 4) step_dotprod(g, format, p, tb, j, 0);
    f[0] = g[0], f[1] = g[1], f[2] = g[2], f[3] = g[3];
}

/* from MAGIC_BITS, rows (2a, 2a+1) x tokens (2b, 2b+1) of a block, lanes [r0 t0, r0 t1, r1 t0, r1 t1] */
static inline __attribute__((always_inline)) I8MM int32x4_t pairs_mmla(const int8x16_t *w, const tile_block *t, int a,
                                                                       int b) {
    const int8_t *q = t->q + 64 * b;
    w += 4 * a;
    int32x4_t acc = vmmlaq_s32(vdupq_n_s32(MAGIC_BITS), w[0], vld1q_s8(q));
    acc = vmmlaq_s32(acc, w[1], vld1q_s8(q + 16));
    acc = vmmlaq_s32(acc, w[2], vld1q_s8(q + 32));
    return vmmlaq_s32(acc, w[3], vld1q_s8(q + 48));
}

/* f + the 2x2 tile's terms of block j: row pair a, token pair b */
static inline __attribute__((always_inline)) I8MM float32x4_t pair_term(float32x4_t f, int32_t format, int32x4_t s,
                                                                        const panel *p, const tile_block *t,
                                                                        int32_t j, int a, int b, int first) {
    const size_t at = 4 * ((size_t)a * (size_t)p->nb + (size_t)j);
    if (format == EL_INT4_SYM) s = vsubq_s32(s, vld1q_s32(t->sum8 + 4 * b));
    f = fma_first(f, vmulq_f32(vld1q_f32(p->scale + at), vld1q_f32(t->d + 4 * b)), magic_to_float(s), first);
    if (format == EL_INT4_ASYM) f = vfmaq_f32(f, vld1q_f32(p->min + at), vld1q_f32(t->ds + 4 * b));
    return f;
}

static inline __attribute__((always_inline)) I8MM void step_i8mm(float32x4_t f[4], int32_t format, const panel *p,
                                                                 const tile_block *tb, int32_t j, int first) {
    const int8x16_t *w = p->w + 8 * (size_t)j;
    const tile_block *tj = tb + j;
    const int32x4_t s0 = pairs_mmla(w, tj, 0, 0), s1 = pairs_mmla(w, tj, 0, 1);
    const int32x4_t s2 = pairs_mmla(w, tj, 1, 0), s3 = pairs_mmla(w, tj, 1, 1);
    f[0] = pair_term(f[0], format, s0, p, tj, j, 0, 0, first);
    f[1] = pair_term(f[1], format, s1, p, tj, j, 0, 1, first);
    f[2] = pair_term(f[2], format, s2, p, tj, j, 1, 0, first);
    f[3] = pair_term(f[3], format, s3, p, tj, j, 1, 1, first);
}

/* The same for i8mm: f[2a + b] = rows (2a, 2a+1) x tokens (2b, 2b+1). */
static inline __attribute__((always_inline)) I8MM void pass_i8mm(float32x4_t f[4], int32_t format, const panel *p,
                                                                 const tile_block *tb, int32_t k) {
    float32x4_t g[4] = {vdupq_n_f32(-0.0f), vdupq_n_f32(-0.0f), vdupq_n_f32(-0.0f), vdupq_n_f32(-0.0f)};
    if (k < p->nb) step_i8mm(g, format, p, tb, k, 1);
    for (int32_t j = k + 4; j < p->nb; j += 4) step_i8mm(g, format, p, tb, j, 0);
    f[0] = g[0], f[1] = g[1], f[2] = g[2], f[3] = g[3];
}

/* A tile: the four lane passes combined (lane0 + lane1) + (lane2 + lane3) as edgellm.h orders them;
 * y[t] = token t's four rows. */
static inline __attribute__((always_inline)) DOTPROD void tile_dotprod(float32x4_t y[4], int32_t format,
                                                                       const panel *p, const tile_block *tb) {
    float32x4_t a[4], b[4];
    pass_dotprod(a, format, p, tb, 0);
    pass_dotprod(b, format, p, tb, 1);
    for (int i = 0; i < 4; i++) y[i] = vaddq_f32(a[i], b[i]);
    pass_dotprod(a, format, p, tb, 2);
    pass_dotprod(b, format, p, tb, 3);
    for (int i = 0; i < 4; i++) y[i] = vaddq_f32(y[i], vaddq_f32(a[i], b[i]));
}

static inline __attribute__((always_inline)) I8MM void tile_i8mm(float32x4_t y[4], int32_t format, const panel *p,
                                                                 const tile_block *tb) {
    float32x4_t a[4], b[4];
    pass_i8mm(a, format, p, tb, 0);
    pass_i8mm(b, format, p, tb, 1);
    for (int i = 0; i < 4; i++) y[i] = vaddq_f32(a[i], b[i]);
    pass_i8mm(a, format, p, tb, 2);
    pass_i8mm(b, format, p, tb, 3);
    for (int i = 0; i < 4; i++) y[i] = vaddq_f32(y[i], vaddq_f32(a[i], b[i]));
    /* y[2a + b] = [r2a t2b, r2a t2b+1, r2a+1 t2b, r2a+1 t2b+1] -> per token, rows 0..3 */
    const float32x4_t t0 = vuzp1q_f32(y[0], y[2]), t1 = vuzp2q_f32(y[0], y[2]);
    const float32x4_t t2 = vuzp1q_f32(y[1], y[3]), t3 = vuzp2q_f32(y[1], y[3]);
    y[0] = t0, y[1] = t1, y[2] = t2, y[3] = t3;
}

/* The tiles [n_tiles] of one panel: y[t * y_stride + r] for its n_rows rows and n_tokens tokens (the last
 * tile may be short). */
typedef struct {
    float *y;
    size_t y_stride;
    int32_t n_rows, n_tokens, n_tiles;
} panel_out;

static inline void store_tile(const panel_out *o, int32_t i, const float32x4_t out[4]) {
    const int32_t n_t = o->n_tokens - 4 * i < 4 ? o->n_tokens - 4 * i : 4;
    float *y = o->y + (size_t)(4 * i) * o->y_stride;
    for (int32_t t = 0; t < n_t; t++, y += o->y_stride) {
        if (o->n_rows == 4) {
            vst1q_f32(y, out[t]);
            continue;
        }
        float v[4];
        vst1q_f32(v, out[t]);
        for (int32_t r = 0; r < o->n_rows; r++) y[r] = v[r];
    }
}

/* every tile of a panel, its format's branches folded */
static DOTPROD void tiles_dotprod(const panel_out *o, int32_t format, const panel *p, const tile_block *tiles) {
    for (int32_t i = 0; i < o->n_tiles; i++) {
        float32x4_t out[4];
        const tile_block *t = tiles + (size_t)i * (size_t)p->nb;
        switch (format) {
        case EL_INT4_ASYM: tile_dotprod(out, EL_INT4_ASYM, p, t); break;
        case EL_INT4_SYM: tile_dotprod(out, EL_INT4_SYM, p, t); break;
        default: tile_dotprod(out, EL_INT8_SYM, p, t); break;
        }
        store_tile(o, i, out);
    }
}
static I8MM void tiles_i8mm(const panel_out *o, int32_t format, const panel *p, const tile_block *tiles) {
    for (int32_t i = 0; i < o->n_tiles; i++) {
        float32x4_t out[4];
        const tile_block *t = tiles + (size_t)i * (size_t)p->nb;
        switch (format) {
        case EL_INT4_ASYM: tile_i8mm(out, EL_INT4_ASYM, p, t); break;
        case EL_INT4_SYM: tile_i8mm(out, EL_INT4_SYM, p, t); break;
        default: tile_i8mm(out, EL_INT8_SYM, p, t); break;
        }
        store_tile(o, i, out);
    }
}

/* Prefill: rows in panels of four, tokens in tiles of four, EL_Q8A_TOKENS tokens prepared at a time. */
static void panels(float *y, size_t y_stride, int32_t n_rows, int32_t n_tokens, int32_t format, const uint8_t *codes,
                   size_t row_bytes, const el_half *scales, const el_half *mins, size_t n_wblocks,
                   const el_block_q8a *x, int32_t nb, void *scratch, int i8mm) {
    panel p = {scratch, NULL, NULL, nb};
    p.scale = (float *)(p.w + 8 * (size_t)nb);
    p.min = p.scale + 8 * (size_t)nb;
    tile_block *tiles = (tile_block *)(p.min + 8 * (size_t)nb);
    for (int32_t t0 = 0; t0 < n_tokens; t0 += EL_Q8A_TOKENS) {
        const int32_t n_t = n_tokens - t0 < EL_Q8A_TOKENS ? n_tokens - t0 : EL_Q8A_TOKENS;
        const int32_t n_tiles = (n_t + 3) / 4;
        for (int32_t i = 0; i < n_tiles; i++)
            prepare_tile(tiles + (size_t)i * nb, i8mm, format, x + (size_t)(t0 + 4 * i) * nb, nb,
                         n_t - 4 * i < 4 ? n_t - 4 * i : 4);
        for (int32_t r0 = 0; r0 < n_rows; r0 += 4) {
            const int32_t n_r = n_rows - r0 < 4 ? n_rows - r0 : 4;
            const uint8_t *rc[4];
            const el_half *rs[4], *rm[4];
            for (int r = 0; r < 4; r++) {
                const size_t row = (size_t)r0 + (size_t)(r < n_r ? r : 0); /* a short panel repeats a row */
                rc[r] = codes + row * row_bytes;
                rs[r] = scales + row * n_wblocks;
                rm[r] = mins ? mins + row * n_wblocks : NULL;
            }
            unpack_panel(&p, i8mm, format, rc, rs, rm);
            const panel_out o = {y + (size_t)t0 * y_stride + r0, y_stride, n_r, n_t, n_tiles};
            if (i8mm) tiles_i8mm(&o, format, &p, tiles);
            else tiles_dotprod(&o, format, &p, tiles);
        }
    }
}

/* ---- entry points (kernels.h) ------------------------------------------------------------------ */

DOTPROD void el_products_q8a_dotprod(float *y, size_t y_stride, int32_t n_rows, int32_t n_tokens, int32_t format,
                                     const uint8_t *codes, size_t row_bytes, const el_half *scales,
                                     const el_half *mins, size_t n_wblocks, const el_block_q8a *x, int32_t nb,
                                     void *scratch) {
    if (n_tokens >= PANEL_MIN_TOKENS) {
        panels(y, y_stride, n_rows, n_tokens, format, codes, row_bytes, scales, mins, n_wblocks, x, nb, scratch, 0);
        return;
    }
    for (int32_t t = 0; t < n_tokens; t++)
        decode_token(y + (size_t)t * y_stride, n_rows, format, codes, row_bytes, scales, mins, n_wblocks,
                     x + (size_t)t * nb, nb, scratch);
}

I8MM void el_products_q8a_i8mm(float *y, size_t y_stride, int32_t n_rows, int32_t n_tokens, int32_t format,
                               const uint8_t *codes, size_t row_bytes, const el_half *scales, const el_half *mins,
                               size_t n_wblocks, const el_block_q8a *x, int32_t nb, void *scratch) {
    if (n_tokens >= PANEL_MIN_TOKENS) {
        panels(y, y_stride, n_rows, n_tokens, format, codes, row_bytes, scales, mins, n_wblocks, x, nb, scratch, 1);
        return;
    }
    el_products_q8a_dotprod(y, y_stride, n_rows, n_tokens, format, codes, row_bytes, scales, mins, n_wblocks, x, nb,
                            scratch);
}

/* el_quantize_q8a_ref's arithmetic: the same divisions, product and rounding (FCVTNS: to nearest, ties to
 * even); its clamp never acts here (|x * id| <= 127 (1 + 2^-23)^2 < 127.5); the rare blocks it treats
 * specially (a NaN or an infinity, which FMAX carries into amax; zeros; tiny amax) go to it. */
void el_quantize_q8a_neon(el_block_q8a *out, const float *x, int32_t n) {
    int32_t i = 0;
    for (; i + EL_QBLOCK <= n; i += EL_QBLOCK, out++) {
        float32x4_t v[8], vmax = vdupq_n_f32(0.0f);
        for (int k = 0; k < 8; k++) {
            v[k] = vld1q_f32(x + i + 4 * k);
            vmax = vmaxq_f32(vmax, vabsq_f32(v[k]));
        }
        const float amax = vmaxvq_f32(vmax), d = amax / 127.0f, id = 127.0f / amax;
        if (!(amax <= 3.40282347e+38f) || d == 0.0f || !(id <= 3.40282347e+38f)) {
            el_quantize_block_q8a_ref(out, x + i, EL_QBLOCK);
            continue;
        }
        int32x4_t q[8];
        for (int k = 0; k < 8; k++) q[k] = vcvtnq_s32_f32(vmulq_n_f32(v[k], id));
        const int16x8_t h0 = vcombine_s16(vmovn_s32(q[0]), vmovn_s32(q[1])), h1 = vcombine_s16(vmovn_s32(q[2]), vmovn_s32(q[3]));
        const int16x8_t h2 = vcombine_s16(vmovn_s32(q[4]), vmovn_s32(q[5])), h3 = vcombine_s16(vmovn_s32(q[6]), vmovn_s32(q[7]));
        const int8x16_t b0 = vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)), b1 = vcombine_s8(vmovn_s16(h2), vmovn_s16(h3));
        vst1q_s8(out->q, b0);
        vst1q_s8(out->q + 16, b1);
        out->d = d;
        out->sum = vaddlvq_s8(b0) + vaddlvq_s8(b1);
        out->ds = d * (float)out->sum;
    }
    if (i < n) el_quantize_q8a_ref(out, x + i, n - i);
}

#endif /* aarch64 */
