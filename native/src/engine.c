/* engine.c: the whole decoder in C (the math of export/reference.py; see edgellm.h).
 *
 * One el_engine_forward is one job on the pool: every thread runs the same sequence of phases
 * and meets the others at a spinning barrier between them, so a token costs one wake-up of the
 * pool, not one per matrix. Work inside a phase is split so that each value is computed whole
 * by one thread with the same code whatever the thread count (rows of a product, heads of the
 * attention, tokens of a norm, 32-value blocks of an activation): the logits do not depend on
 * the number of threads, bit for bit. The phases of products and attention hand out their units
 * as the threads claim them (claim_next), so a thread done early takes over the rest of a slower
 * one's share.
 *
 * Phases of one layer (S tokens of the chunk; "|" is a barrier):
 *   norm     tokens:  x += proj (the previous layer's down_proj), h = rms_norm(x), quantize h  |
 *   qkv      heads:   q, k, v rows of one head (k, v straight into the cache), + bias, rope      |
 *   attn     (kv head, 16 tokens): softmax(q K^T / sqrt(D)) V, quantized when head_dim % 32 == 0 |
 *  [attn_q   tokens:  quantize the attention output, when a head is not whole 32-value blocks   |]
 *   o        rows:    proj = Wo a                                                                |
 *   mlp_norm tokens:  x += proj, h = rms_norm(x), quantize h                                     |
 *   gate_up  32-row units of ffn: gate and up rows, silu(gate) * up, its activation blocks       |
 *   down     rows:    proj = Wdown m                                                             |
 * then: x += proj, final norm (the last token only, unless every token's logits are wanted),
 * quantize | head rows -> logits.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"

enum {
    PH_EMBED, PH_NORM, PH_QKV, PH_ATTN, PH_ATTN_Q, PH_O, PH_MLP_NORM, PH_GATE_UP, PH_DOWN, PH_FINAL_NORM,
    PH_HEAD, N_PHASES
};
static const char *const PHASE_NAMES[N_PHASES] = {
    "embed", "attn_norm", "qkv_rope", "attention", "attn_quantize", "o_proj", "mlp_norm", "gate_up_silu",
    "down_proj", "final_norm", "head",
};

/* Attention runs over chunks of KEY_CHUNK cache positions: each chunk's softmax partial (max, sum,
 * unnormalized output) is computed on its own, then the chunks are combined in order. A decode
 * step splits (chunk, head) pairs over the threads, so each reads its own part of the cache; a
 * prefill splits (kv head, QUERY_BLOCK tokens) items, each going through its chunks in turn with
 * the query heads that share them (attend_block). Both compute the same partials and combine them
 * the same way (combine_parts): the same bits, whatever the split. */
#define KEY_CHUNK 64

/* A prefill attention item is a kv head and QUERY_BLOCK tokens: each chunk of that head's keys and
 * values is converted to float32 once (to_float) for the item's QUERY_BLOCK * (heads per kv head)
 * queries, instead of once per query as it is loaded (attend_part_f32: the same bits). */
#define QUERY_BLOCK 16

/* The units of a phase that thread ith has not started: [front, back) of its share, packed in one
 * word so that its owner (from the front) and a thread done with its own share (from the back) take
 * each unit exactly once. */
struct claims {
    _Alignas(64) _Atomic uint64_t range; /* front | back << 32 */
};

/* Activation blocks [tokens][nb] and what the products read of them (kernels.h: el_acts). */
typedef struct {
    el_block_q16a *q;
    float *d;
    int32_t *sum;
    int8_t *quads; /* [tokens][ceil(nb / 4)][EL_QUAD_BYTES] */
    el_block_q8a *q8; /* the 8-bit path's blocks instead of the four above (engine->act_bits 8) */
    el_acts view;
} act;

struct el_engine {
    el_model m;                 /* the descriptor; m.layers points at `layers` */
    el_layer *layers;           /* [n_layers] */
    el_pool *pool;
    int32_t n_threads, context, max_chunk;
    int32_t act_bits;           /* 8 or 16: the activation blocks of every product (edgellm.h) */
    int32_t q_size, kv_size, half;
    int32_t nb_hidden, nb_q, nb_ffn, nb_max; /* activation blocks per token of each matrix input */
    /* float16: a decode step reads the whole cache of its layer, and at long contexts those bytes
     * rival the weights' (attention's math stays float32: the variants convert as they load) */
    el_half *key_cache;         /* [n_layers][context][n_kv_heads][head_dim] */
    el_half *value_cache;       /* [n_layers][context][n_kv_heads][head_dim] */
    float *kv_rows;             /* [2][max_chunk][kv_size]  new keys and values before they become float16 */
    float *x;                   /* [max_chunk][hidden]  the residual stream */
    float *h;                   /* [max_chunk][max(hidden, ffn)]  normed x, or silu(gate) * up */
    act xq;                     /* [max_chunk][nb_max]  h (or the attention output) as activation blocks */
    act xq_ffn;                 /* [max_chunk][nb_ffn]  silu(gate) * up as activation blocks */
    act xq_head;                /* [max_chunk][nb_hidden]  16-bit blocks of the final norm when act_bits is 8 */
    float *q;                   /* [max_chunk][q_size] */
    float *attn;                /* [max_chunk][q_size] */
    float *proj;                /* [max_chunk][hidden]  o_proj, then down_proj output */
    float *gate, *up;           /* [max_chunk][ffn] */
    int32_t max_chunks;         /* ceil(context / KEY_CHUNK) */
    float *scores;              /* [n_threads][KEY_CHUNK] */
    float *parts;               /* [n_threads][QUERY_BLOCK][heads per kv head][max_chunks][head_dim + 2]  a prefill item's partials */
    float *chunk_f32;           /* [n_threads][2][KEY_CHUNK][head_dim]  a chunk's keys, then values, as float32 */
    float *decode_parts;        /* [n_heads][max_chunks][head_dim + 2]  a decode step's chunk partials */
    /* A decode step keeps one copy per thread of what every thread reads whole (forward_decode):
     * each computes the residual's norms and the attention's combine itself instead of waiting
     * for one thread to do it. */
    float *dx;                  /* [n_threads][hidden]  the residual stream */
    float *dh;                  /* [n_threads][max(hidden, q_size)]  its norm, or the attention output */
    float *drope;               /* [n_threads][2][head_dim / 2]  cos, sin of the position */
    act *dact;                  /* [n_threads]  activation blocks of one token, nb_max of them */
    act *dact_head;             /* [n_threads]  the same for the head (16-bit when act_bits is 8) */
    float *rope_cos, *rope_sin; /* [max_chunk][head_dim / 2] */
    /* [n_threads] each thread's units of the current phase (claim_next), one cache line each */
    struct claims *claims;
    uint8_t *panel_scratch;     /* [n_threads][panel_bytes]  a product's packed panel (kernels.h) */
    size_t panel_bytes;
    int64_t bytes;
    float *trace;               /* [n_layers][2][n_tokens][hidden] or NULL (el_engine_trace) */
    int64_t n_trace;
    int profile;
    double seconds[N_PHASES];
};

/* ---- the descriptor ------------------------------------------------------------------------ */

static int check_matrix(const el_qmatrix *w, int32_t rows, int32_t cols) {
    int status = el_check_matrix(w);
    return status != EL_OK ? status : w->rows != rows || w->cols != cols ? EL_EINVAL : EL_OK;
}

static int check_model(const el_model *m) {
    if (!m || !m->layers || !m->final_norm || !m->inv_freq) return EL_EINVAL;
    if (m->n_layers < 1 || m->hidden < 1 || m->ffn < 1 || m->n_heads < 1 || m->n_kv_heads < 1 || m->head_dim < 2 ||
        m->vocab < 1)
        return EL_EINVAL;
    if (m->head_dim % 2 || m->n_heads % m->n_kv_heads || !(m->rms_eps >= 0.0f)) return EL_EINVAL;
    if ((int64_t)m->n_heads * m->head_dim > INT32_MAX / 2) return EL_EINVAL;
    int32_t q_size = m->n_heads * m->head_dim, kv_size = m->n_kv_heads * m->head_dim;
    int status;
    if ((status = check_matrix(&m->embed, m->vocab, m->hidden)) != EL_OK) return status;
    if ((status = check_matrix(&m->head, m->vocab, m->hidden)) != EL_OK) return status;
    for (int32_t i = 0; i < m->n_layers; i++) {
        const el_layer *l = &m->layers[i];
        if (!l->attn_norm || !l->mlp_norm) return EL_EINVAL;
        if ((status = check_matrix(&l->q, q_size, m->hidden)) != EL_OK ||
            (status = check_matrix(&l->k, kv_size, m->hidden)) != EL_OK ||
            (status = check_matrix(&l->v, kv_size, m->hidden)) != EL_OK ||
            (status = check_matrix(&l->o, m->hidden, q_size)) != EL_OK ||
            (status = check_matrix(&l->gate, m->ffn, m->hidden)) != EL_OK ||
            (status = check_matrix(&l->up, m->ffn, m->hidden)) != EL_OK ||
            (status = check_matrix(&l->down, m->hidden, m->ffn)) != EL_OK)
            return status;
    }
    return EL_OK;
}

/* ---- create / destroy ------------------------------------------------------------------------ */

static void *alloc_floats(el_engine *e, size_t count, int zeroed) {
    size_t bytes = count * sizeof(float);
    void *p = zeroed ? calloc(count ? count : 1, sizeof(float)) : malloc(bytes ? bytes : 1);
    e->bytes += (int64_t)bytes;
    return p;
}

/* 8-bit activations where the variant has their products (where dot products bound a product, they
 * need half as many); EDGELLM_ACTIVATIONS=8 or 16 chooses (tests, benchmarks, fidelity checks). */
static int32_t activation_bits(void) {
    const char *env = getenv("EDGELLM_ACTIVATIONS");
    if (env && strcmp(env, "8") == 0) return 8;
    if (env && strcmp(env, "16") == 0) return 16;
    const el_kernels *k = el_kernels_current();
    return k && k->default_activation_bits == 8 ? 8 : 16;
}

int el_engine_activation_bits(const el_engine *engine) { return engine ? engine->act_bits : 0; }

static int alloc_act(el_engine *e, act *a, int32_t nb, int32_t bits) {
    size_t count = (size_t)e->max_chunk * (size_t)nb, quad_bytes = (size_t)e->max_chunk * el_quad_stride(nb);
    if (bits == 8) {
        a->q8 = malloc(sizeof(el_block_q8a) * (count ? count : 1));
        e->bytes += (int64_t)(sizeof(el_block_q8a) * count);
        a->view = (el_acts){NULL, NULL, NULL, NULL, nb, a->q8};
        return a->q8 != NULL;
    }
    a->q = malloc(sizeof(el_block_q16a) * count);
    a->d = malloc(sizeof(float) * count);
    a->sum = malloc(sizeof(int32_t) * count);
    a->quads = el_alloc_quads((size_t)e->max_chunk, nb);
    e->bytes += (int64_t)((sizeof(el_block_q16a) + sizeof(float) + sizeof(int32_t)) * count + quad_bytes);
    a->view = (el_acts){a->q, a->d, a->sum, a->quads, nb, NULL};
    return a->q && a->d && a->sum && a->quads;
}

static void free_act(act *a) {
    free(a->q);
    free(a->d);
    free(a->sum);
    free(a->quads);
    free(a->q8);
}

void el_engine_destroy(el_engine *e) {
    if (!e) return;
    free(e->layers);
    free(e->key_cache);
    free(e->value_cache);
    free(e->kv_rows);
    free(e->x);
    free(e->h);
    free_act(&e->xq);
    free_act(&e->xq_ffn);
    free_act(&e->xq_head);
    free(e->q);
    free(e->attn);
    free(e->proj);
    free(e->gate);
    free(e->up);
    free(e->scores);
    free(e->parts);
    free(e->chunk_f32);
    free(e->decode_parts);
    free(e->rope_cos);
    free(e->rope_sin);
    free(e->dx);
    free(e->dh);
    free(e->drope);
    for (int32_t i = 0; i < e->n_threads; i++) {
        if (e->dact) free_act(&e->dact[i]);
        if (e->dact_head) free_act(&e->dact_head[i]);
    }
    free(e->dact);
    free(e->dact_head);
    free(e->claims);
    free(e->panel_scratch);
    free(e);
}

int el_engine_create(el_engine **out, const el_model *model, int32_t context, int32_t max_chunk, el_pool *pool) {
    if (!out) return EL_EINVAL;
    *out = NULL;
    int status = check_model(model);
    if (status != EL_OK) return status;
    if (context < 1 || max_chunk < 1) return EL_EINVAL;
    if (max_chunk > context) max_chunk = context;
    el_engine *e = calloc(1, sizeof *e);
    if (!e) return EL_ENOMEM;
    e->m = *model;
    e->layers = malloc(sizeof(el_layer) * (size_t)model->n_layers);
    if (!e->layers) {
        free(e);
        return EL_ENOMEM;
    }
    memcpy(e->layers, model->layers, sizeof(el_layer) * (size_t)model->n_layers);
    e->m.layers = e->layers;
    e->pool = pool;
    e->n_threads = el_pool_threads(pool);
    e->act_bits = activation_bits();
    e->context = context;
    e->max_chunk = max_chunk;
    const el_model *m = &e->m;
    e->q_size = m->n_heads * m->head_dim;
    e->kv_size = m->n_kv_heads * m->head_dim;
    e->half = m->head_dim / 2;
    e->nb_hidden = el_ceil_div(m->hidden, EL_QBLOCK);
    e->nb_q = el_ceil_div(e->q_size, EL_QBLOCK);
    e->nb_ffn = el_ceil_div(m->ffn, EL_QBLOCK);
    e->nb_max = e->nb_hidden > e->nb_q ? e->nb_hidden : e->nb_q;
    e->nb_max = e->nb_max > e->nb_ffn ? e->nb_max : e->nb_ffn;
    size_t chunk = (size_t)max_chunk, widest = (size_t)(m->hidden > m->ffn ? m->hidden : m->ffn);
    size_t cache = (size_t)m->n_layers * (size_t)context * (size_t)e->kv_size;
    /* zeroed: a position never written reads as zeros, never as garbage (calloc maps large blocks
     * lazily, so a long context costs memory only as it fills) */
    e->key_cache = calloc(cache ? cache : 1, sizeof(el_half));
    e->value_cache = calloc(cache ? cache : 1, sizeof(el_half));
    e->bytes += (int64_t)(2 * cache * sizeof(el_half));
    e->kv_rows = alloc_floats(e, 2 * chunk * (size_t)e->kv_size, 0);
    e->x = alloc_floats(e, chunk * (size_t)m->hidden, 0);
    e->h = alloc_floats(e, chunk * widest, 0);
    int acts_ok = alloc_act(e, &e->xq, e->nb_max, e->act_bits);
    acts_ok &= alloc_act(e, &e->xq_ffn, e->nb_ffn, e->act_bits);
    if (e->act_bits == 8) acts_ok &= alloc_act(e, &e->xq_head, e->nb_hidden, 16);
    e->q = alloc_floats(e, chunk * (size_t)e->q_size, 0);
    e->attn = alloc_floats(e, chunk * (size_t)e->q_size, 0);
    e->proj = alloc_floats(e, chunk * (size_t)m->hidden, 0);
    e->gate = alloc_floats(e, chunk * (size_t)m->ffn, 0);
    e->up = alloc_floats(e, chunk * (size_t)m->ffn, 0);
    e->max_chunks = el_ceil_div(context, KEY_CHUNK);
    size_t part = (size_t)e->max_chunks * (size_t)(m->head_dim + 2);
    e->scores = alloc_floats(e, (size_t)e->n_threads * KEY_CHUNK, 0);
    e->parts = alloc_floats(e, (size_t)e->n_threads * QUERY_BLOCK * (size_t)(m->n_heads / m->n_kv_heads) * part, 0);
    e->chunk_f32 = alloc_floats(e, (size_t)e->n_threads * 2 * KEY_CHUNK * (size_t)m->head_dim, 0);
    e->decode_parts = alloc_floats(e, (size_t)m->n_heads * part, 0);
    e->rope_cos = alloc_floats(e, chunk * (size_t)e->half, 0);
    e->rope_sin = alloc_floats(e, chunk * (size_t)e->half, 0);
    if (!acts_ok || !e->key_cache || !e->value_cache || !e->kv_rows || !e->x || !e->h || !e->q || !e->attn ||
        !e->proj || !e->gate || !e->up || !e->scores || !e->parts || !e->chunk_f32 || !e->decode_parts || !e->rope_cos || !e->rope_sin) {
        el_engine_destroy(e);
        return EL_ENOMEM;
    }
    size_t widest_q = (size_t)(m->hidden > e->q_size ? m->hidden : e->q_size), threads = (size_t)e->n_threads;
    e->dx = alloc_floats(e, threads * (size_t)m->hidden, 0);
    e->dh = alloc_floats(e, threads * widest_q, 0);
    e->drope = alloc_floats(e, threads * 2 * (size_t)e->half, 0);
    e->dact = calloc(threads, sizeof(act));
    e->dact_head = calloc(threads, sizeof(act));
    int decode_ok = e->dx && e->dh && e->drope && e->dact && e->dact_head;
    if (e->dact && e->dact_head) {
        int32_t saved = e->max_chunk;
        e->max_chunk = 1; /* alloc_act sizes for max_chunk tokens */
        for (size_t i = 0; i < threads; i++) {
            decode_ok &= alloc_act(e, &e->dact[i], e->nb_max, e->act_bits);
            if (e->act_bits == 8) decode_ok &= alloc_act(e, &e->dact_head[i], e->nb_hidden, 16);
        }
        e->max_chunk = saved;
    }
    e->claims = aligned_alloc(64, threads * sizeof(struct claims));
    /* only the scratch its activations' products use: a larger allocation carved from freed (resident) heap
     * would stay resident */
    e->panel_bytes = e->act_bits == 8 ? (el_q8a_scratch_bytes(e->nb_max) + 63) & ~(size_t)63 : el_panel_bytes(e->nb_max);
    e->panel_scratch = aligned_alloc(64, threads * e->panel_bytes);
    e->bytes += (int64_t)(threads * e->panel_bytes);
    if (!decode_ok || !e->claims || !e->panel_scratch) {
        el_engine_destroy(e);
        return EL_ENOMEM;
    }
    for (size_t i = 0; i < threads; i++) atomic_init(&e->claims[i].range, 0); /* empty: front 0, back 0 */
    const char *profile = getenv("EDGELLM_PROFILE");
    e->profile = profile && *profile && strcmp(profile, "0") != 0;
    *out = e;
    return EL_OK;
}

int64_t el_engine_bytes(const el_engine *e) { return e ? e->bytes : 0; }

int el_engine_trace(el_engine *e, float *trace, int64_t n_trace) {
    if (!e || (trace && n_trace < 0)) return EL_EINVAL;
    e->trace = trace;
    e->n_trace = trace ? n_trace : 0;
    return EL_OK;
}

/* Token t's residual stream x into the trace, as layer li's `which` (0: after attention, 1: after the MLP). */
static void trace_row(const el_engine *e, int32_t li, int which, int32_t t, int32_t n_tokens, const float *x) {
    if (e->trace)
        memcpy(e->trace + (((size_t)li * 2 + (size_t)which) * (size_t)n_tokens + (size_t)t) * (size_t)e->m.hidden, x,
               sizeof(float) * (size_t)e->m.hidden);
}

int el_engine_profile(const el_engine *e, const char **names, double *seconds, int32_t capacity) {
    if (!e || !e->profile) return 0;
    for (int32_t i = 0; i < N_PHASES && i < capacity; i++) {
        if (names) names[i] = PHASE_NAMES[i];
        if (seconds) seconds[i] = e->seconds[i];
    }
    return N_PHASES;
}

/* ---- the pieces ------------------------------------------------------------------------------ */

/* out [cols] <- row `token` of a quantized matrix, dequantized exactly as export/quant_formats.py does. */
static void embed_row(float *out, const el_qmatrix *w, int32_t token) {
    const int32_t n_wb = el_ceil_div(w->cols, w->block);
    const int q4 = w->format != EL_INT8_SYM;
    const uint8_t *codes = w->qweight + (size_t)token * (size_t)n_wb * (size_t)w->block / (q4 ? 2 : 1);
    const el_half *scales = w->scales + (size_t)token * n_wb;
    const el_half *mins = w->mins ? w->mins + (size_t)token * n_wb : NULL;
    for (int32_t i = 0; i < w->cols; i++) {
        int32_t b = i / w->block;
        float code = q4 ? (float)((codes[i >> 1] >> ((i & 1) * 4)) & 0x0F) : (float)codes[i];
        float scale = el_half_to_float(scales[b]);
        switch (w->format) {
        case EL_INT4_ASYM: out[i] = code * scale + el_half_to_float(mins[b]); break;
        case EL_INT4_SYM: out[i] = (code - 8.0f) * scale; break;
        default: out[i] = (code - 128.0f) * scale; break;
        }
    }
}

/* Activation blocks of x [n] at block `first` of token t, for products with rows of nb blocks
 * (the buffer is laid out as [tokens][nb] for the product about to read it); their quads only for
 * the row kernels (the panels read the blocks themselves). */
static void quantize_to(const el_kernels *k, act *a, int32_t nb, int32_t t, int32_t first, const float *x, int32_t n,
                        int quads) {
    size_t o = (size_t)t * nb;
    if (a->q8) {
        k->quantize_q8a(a->q8 + o + first, x, n);
        return;
    }
    k->quantize_q16a(a->q + o + first, x, n);
    el_prepare_blocks(a->d + o, a->sum + o, quads ? a->quads + (size_t)t * el_quad_stride(nb) : NULL, a->q + o, first,
                      (n + EL_QBLOCK - 1) / EL_QBLOCK);
}

/* Rows [r0, r1) of y [n_tokens][w->rows] = X W^T for the tokens of a from token t0 on, by thread ith
 * (its panel scratch). */
static void rows_of(const el_engine *e, const el_kernels *k, int32_t ith, float *y, const el_qmatrix *w, act *a,
                    int32_t nb, int32_t t0, int32_t n_tokens, int32_t r0, int32_t r1) {
    a->view.nb = nb;
    el_matmul_rows(k, y, w, &a->view, t0, n_tokens, r0, r1, e->panel_scratch + (size_t)ith * e->panel_bytes);
}

/* The part [*lo, *hi) of n items that thread ith of nth takes (contiguous, sizes differ by at most one). */
static void split(int32_t n, int32_t ith, int32_t nth, int32_t *lo, int32_t *hi) {
    int32_t per = n / nth, extra = n % nth;
    *lo = ith * per + (ith < extra ? ith : extra);
    *hi = *lo + per + (ith < extra ? 1 : 0);
}

typedef struct {
    el_engine *e;
    const el_kernels *k;
    float *logits;
    const int32_t *tokens;
    int32_t n, pos, all;
    int quads; /* the chunk's products run the row kernels, which read the activations' quads */
} forward_job;

/* Thread 0 books the time since the previous mark to `phase` (EDGELLM_PROFILE). */
static void phase_mark(const forward_job *job, int32_t ith, int phase, struct timespec *mark) {
    if (ith == 0 && job->e->profile) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        job->e->seconds[phase] += (double)(now.tv_sec - mark->tv_sec) + 1e-9 * (double)(now.tv_nsec - mark->tv_nsec);
        *mark = now;
    }
}

/* ---- claiming units of work --------------------------------------------------------------------
 * A phase that claims splits its n units as split() does, but a thread done with its own share
 * takes what another has not started, from the back of that share. Units are whole rows, heads,
 * or attention items, computed by the same code whichever thread takes them, so the bits stay
 * the same; the phase ends when the slowest unit does, not the slowest share (on a shared or
 * noisy machine one thread's share often runs 20-30% longer than the other's). */

static uint64_t pack_range(int32_t front, int32_t back) { return (uint32_t)front | (uint64_t)(uint32_t)back << 32; }

typedef struct {
    el_engine *e;
    int32_t n_units;
} claims_plan;

/* Every thread's share of the next phase's units (run while no thread claims: before a job, or by
 * the last thread at the barrier before the phase). */
static void open_claims(void *ctx) {
    const claims_plan *plan = ctx;
    for (int32_t i = 0; i < plan->e->n_threads; i++) {
        int32_t lo, hi;
        split(plan->n_units, i, plan->e->n_threads, &lo, &hi);
        atomic_store_explicit(&plan->e->claims[i].range, pack_range(lo, hi), memory_order_relaxed);
    }
}

/* Thread ith's next unit: the front of its own share, else the back of another thread's; -1 when
 * every unit of the phase is taken. */
static int32_t claim_next(el_engine *e, int32_t ith) {
    for (int32_t i = 0; i < e->n_threads; i++) {
        int32_t owner = (ith + i) % e->n_threads;
        _Atomic uint64_t *range = &e->claims[owner].range;
        uint64_t r = atomic_load_explicit(range, memory_order_relaxed);
        while ((uint32_t)r < (uint32_t)(r >> 32)) {
            uint64_t taken = owner == ith ? r + 1 : r - ((uint64_t)1 << 32);
            if (atomic_compare_exchange_weak_explicit(range, &r, taken, memory_order_relaxed, memory_order_relaxed))
                return owner == ith ? (int32_t)(uint32_t)r : (int32_t)(r >> 32) - 1;
        }
    }
    return -1;
}

/* Rows per unit of a product: about 16 units per thread, at least 4 rows, at most 256; for many
 * tokens whole panels (x86_panel.c packs 32 rows at a time: an 18-row unit would fill 18 of 32 lanes). */
static int32_t row_grain(const el_engine *e, const el_qmatrix *w, int32_t n_tokens) {
    int32_t grain = w->rows / (16 * e->n_threads);
    grain = grain < 4 ? 4 : grain > 256 ? 256 : grain;
    return n_tokens > 1 ? el_ceil_div(grain, EL_PANEL_ROWS) * EL_PANEL_ROWS : grain;
}

static int32_t product_units(const el_engine *e, const el_qmatrix *w, int32_t n_tokens) {
    return el_ceil_div(w->rows, row_grain(e, w, n_tokens));
}

/* the q/k/v phase's units: the q heads, then the k heads, then the v heads (qkv_heads) */
static int32_t qkv_units(const el_engine *e) { return e->m.n_heads + 2 * e->m.n_kv_heads; }

/* 32-row blocks of ffn per gate/up unit: about 6 units per thread. The unit reads gate's rows, then
 * up's: switching between the two streams every 32 rows cost them ~15% of their speed. */
static int32_t gate_up_grain(const el_engine *e) {
    int32_t grain = e->nb_ffn / (6 * e->n_threads);
    return grain < 1 ? 1 : grain;
}

static int32_t gate_up_count(const el_engine *e) { return el_ceil_div(e->nb_ffn, gate_up_grain(e)); }

/* A phase ends: wait for the other threads, then book the time (barrier wait included). When the
 * next phase claims its work, next_units is its number of units (else -1). */
static void phase_end(const forward_job *job, int32_t ith, int phase, struct timespec *mark, int32_t next_units) {
    claims_plan plan = {job->e, next_units};
    el_pool_barrier_then(job->e->pool, next_units >= 0 ? open_claims : NULL, &plan);
    phase_mark(job, ith, phase, mark);
}

/* Tokens [t0, t1): x += proj (layer `added`'s MLP output, if added >= 0), h = rms_norm(x, weight), blocks of h. */
static void norm_tokens(const forward_job *job, int32_t t0, int32_t t1, const float *weight, int32_t added) {
    el_engine *e = job->e;
    const el_kernels *k = job->k;
    const int32_t n = e->m.hidden;
    for (int32_t t = t0; t < t1; t++) {
        float *x = e->x + (size_t)t * n, *h = e->h + (size_t)t * n;
        if (added >= 0) {
            k->add(x, x, e->proj + (size_t)t * n, n);
            trace_row(e, added, 1, t, job->n, x);
        }
        k->rms_norm(h, x, weight, n, e->m.rms_eps);
        quantize_to(k, &e->xq, e->nb_hidden, t, 0, h, n, job->quads);
    }
}

/* q, k, v for the heads [u0, u1) of the H + 2 KV heads, with bias and RoPE, k and v into the cache. */
static void qkv_heads(const forward_job *job, int32_t ith, const el_layer *l, act *x, const float *rope_cos,
                      const float *rope_sin, el_half *key, el_half *value, int32_t u0, int32_t u1) {
    el_engine *e = job->e;
    const el_kernels *k = job->k;
    const int32_t H = e->m.n_heads, KV = e->m.n_kv_heads, D = e->m.head_dim, S = job->n;
    float *keys_f32 = e->kv_rows, *values_f32 = e->kv_rows + (size_t)e->max_chunk * e->kv_size;
    struct {
        const el_qmatrix *w;
        const float *bias;
        float *y;
        int32_t first, count, stride, rope;
    } parts[3] = {{&l->q, l->q_bias, e->q, 0, H, e->q_size, 1},
                  {&l->k, l->k_bias, keys_f32, H, KV, e->kv_size, 1},
                  {&l->v, l->v_bias, values_f32, H + KV, KV, e->kv_size, 0}};
    el_half *cache[3] = {NULL, key, value};
    for (int p = 0; p < 3; p++) {
        int32_t lo = u0 > parts[p].first ? u0 : parts[p].first;
        int32_t hi = u1 < parts[p].first + parts[p].count ? u1 : parts[p].first + parts[p].count;
        if (lo >= hi) continue;
        int32_t h0 = lo - parts[p].first, h1 = hi - parts[p].first;
        rows_of(e, k, ith, parts[p].y, parts[p].w, x, e->nb_hidden, 0, S, h0 * D, h1 * D);
        for (int32_t t = 0; t < S; t++) {
            float *row = parts[p].y + (size_t)t * parts[p].stride;
            if (parts[p].bias) k->add(row + h0 * D, row + h0 * D, parts[p].bias + h0 * D, (h1 - h0) * D);
            if (parts[p].rope)
                k->rope(row + h0 * D, row + h0 * D, rope_cos + (size_t)t * e->half, rope_sin + (size_t)t * e->half,
                        h1 - h0, D);
            if (cache[p]) k->to_half(cache[p] + (size_t)t * e->kv_size + h0 * D, row + h0 * D, (h1 - h0) * D);
        }
    }
}

/* The partial of query head h of token t (position pos + t) over key chunk c of cache positions
 * 0 .. pos + t: part [head_dim] unnormalized output, then max, then sum. */
static void attend_chunk(const forward_job *job, const el_half *keys, const el_half *values, int32_t t, int32_t h,
                         int32_t c, float *part, float *scores) {
    el_engine *e = job->e;
    const int32_t D = e->m.head_dim, kvs = e->kv_size, T = job->pos + t + 1, j0 = c * KEY_CHUNK;
    const int32_t n = T - j0 < KEY_CHUNK ? T - j0 : KEY_CHUNK;
    const int32_t g = h / (e->m.n_heads / e->m.n_kv_heads);
    const float *q = e->q + (size_t)t * e->q_size + (size_t)h * D;
    const size_t at = (size_t)j0 * kvs + (size_t)g * D;
    job->k->attend_part(part, part + D, part + D + 1, scores, q, keys + at, values + at, n, D, kvs,
                        1.0f / sqrtf((float)D));
}

/* The attention output of (token t, head h) into attn [tokens][q_size], quantized into a when a head
 * is whole activation blocks. */
static void finish_head(const forward_job *job, float *attn, act *a, int32_t t, int32_t h, const float *parts,
                        int32_t n_chunks) {
    el_engine *e = job->e;
    const int32_t D = e->m.head_dim;
    float *out = attn + (size_t)t * e->q_size + (size_t)h * D;
    job->k->combine_parts(out, parts, n_chunks, D);
    if (D % EL_QBLOCK == 0) quantize_to(job->k, a, e->nb_q, t, h * (D / EL_QBLOCK), out, D, job->quads);
}

/* Prefill attention of kv head g for tokens [ta, ta + QUERY_BLOCK) of the chunk, with the query heads that
 * share it: chunk by chunk of the cache, each token's partial per head (its own number of positions:
 * causal), then each (token, head) combined and finished. */
static void attend_block(const forward_job *job, int32_t ith, const el_half *keys, const el_half *values, int32_t ta,
                         int32_t g) {
    el_engine *e = job->e;
    const el_kernels *k = job->k;
    const int32_t D = e->m.head_dim, G = e->m.n_heads / e->m.n_kv_heads, kvs = e->kv_size;
    const int32_t tz = ta + QUERY_BLOCK < job->n ? ta + QUERY_BLOCK : job->n, stride = D + 2;
    const size_t part = (size_t)e->max_chunks * (size_t)stride;
    const float scale = 1.0f / sqrtf((float)D);
    const int convert = k->attend_part_f32 && k->to_float;
    float *parts = e->parts + (size_t)ith * QUERY_BLOCK * G * part, *scores = e->scores + (size_t)ith * KEY_CHUNK;
    float *keys_f32 = e->chunk_f32 + (size_t)ith * 2 * KEY_CHUNK * D, *values_f32 = keys_f32 + (size_t)KEY_CHUNK * D;
    const int32_t n_chunks = el_ceil_div(job->pos + tz, KEY_CHUNK); /* the last token's */
    for (int32_t c = 0; c < n_chunks; c++) {
        const int32_t j0 = c * KEY_CHUNK, reach = job->pos + tz - j0; /* positions of the chunk any token reads */
        const int32_t n_rows = reach < KEY_CHUNK ? reach : KEY_CHUNK;
        const size_t at = (size_t)j0 * kvs + (size_t)g * D;
        if (convert)
            for (int32_t j = 0; j < n_rows; j++) {
                k->to_float(keys_f32 + (size_t)j * D, keys + at + (size_t)j * kvs, D);
                k->to_float(values_f32 + (size_t)j * D, values + at + (size_t)j * kvs, D);
            }
        for (int32_t t = ta; t < tz; t++) {
            const int32_t T = job->pos + t + 1, n = T - j0 < KEY_CHUNK ? T - j0 : KEY_CHUNK;
            if (n <= 0) continue; /* the token does not reach this chunk */
            for (int32_t i = 0; i < G; i++) {
                const float *q = e->q + (size_t)t * e->q_size + (size_t)(g * G + i) * D;
                float *p = parts + ((size_t)(t - ta) * G + i) * part + (size_t)c * stride;
                if (convert)
                    k->attend_part_f32(p, p + D, p + D + 1, scores, q, keys_f32, values_f32, n, D, D, scale);
                else
                    k->attend_part(p, p + D, p + D + 1, scores, q, keys + at, values + at, n, D, kvs, scale);
            }
        }
    }
    for (int32_t t = ta; t < tz; t++)
        for (int32_t i = 0; i < G; i++)
            finish_head(job, e->attn, &e->xq, t, g * G + i, parts + ((size_t)(t - ta) * G + i) * part,
                        el_ceil_div(job->pos + t + 1, KEY_CHUNK));
}

static void rope_table(const el_engine *e, float *cos_t, float *sin_t, int32_t position) {
    el_rope_tables(cos_t, sin_t, e->m.inv_freq, e->half, (float)position);
}

/* Thread ith computes the rows of y [n_tokens][w->rows] = x W^T that it claims (product_units of them). */
static void product(const forward_job *job, const el_qmatrix *w, float *y, act *a, int32_t nb, int32_t t0,
                    int32_t n_tokens, int32_t ith) {
    const int32_t grain = row_grain(job->e, w, n_tokens);
    for (int32_t u; (u = claim_next(job->e, ith)) >= 0;) {
        int32_t r0 = u * grain, r1 = r0 + grain < w->rows ? r0 + grain : w->rows;
        rows_of(job->e, job->k, ith, y, w, a, nb, t0, n_tokens, r0, r1);
    }
}

/* Unit `unit` of gate_up_grain 32-row blocks of ffn: gate and up rows, then silu(gate) * up and its
 * activation blocks (into xq_ffn: other threads may still read xq, the MLP input, for their rows). */
static void gate_up_unit(const forward_job *job, int32_t ith, const el_layer *l, act *x, int32_t grain, int32_t unit) {
    el_engine *e = job->e;
    const el_kernels *k = job->k;
    const int32_t F = e->m.ffn, S = job->n, u0 = unit * grain;
    int32_t r0 = u0 * EL_QBLOCK, r1 = (u0 + grain) * EL_QBLOCK < F ? (u0 + grain) * EL_QBLOCK : F;
    if (r0 >= r1) return;
    rows_of(e, k, ith, e->gate, &l->gate, x, e->nb_hidden, 0, S, r0, r1);
    rows_of(e, k, ith, e->up, &l->up, x, e->nb_hidden, 0, S, r0, r1);
    for (int32_t t = 0; t < S; t++) {
        float *m = e->h + (size_t)t * F + r0;
        k->silu_mul(m, e->gate + (size_t)t * F + r0, e->up + (size_t)t * F + r0, r1 - r0);
        quantize_to(k, &e->xq_ffn, e->nb_ffn, t, u0, m, r1 - r0, job->quads);
    }
}

static void forward_thread(void *ctx, int32_t ith, int32_t nth) {
    const forward_job *job = ctx;
    el_engine *e = job->e;
    const el_kernels *k = job->k;
    const el_model *m = &e->m;
    const int32_t S = job->n, KV = m->n_kv_heads, D = m->head_dim;
    const int heads_whole_blocks = D % EL_QBLOCK == 0;
    struct timespec mark = {0, 0};
    if (ith == 0 && e->profile) clock_gettime(CLOCK_MONOTONIC, &mark);
    int32_t t0, t1;
    split(S, ith, nth, &t0, &t1);

    for (int32_t t = t0; t < t1; t++) {
        embed_row(e->x + (size_t)t * m->hidden, &m->embed, job->tokens[t]);
        rope_table(e, e->rope_cos + (size_t)t * e->half, e->rope_sin + (size_t)t * e->half, job->pos + t);
    }
    phase_end(job, ith, PH_EMBED, &mark, -1);

    for (int32_t li = 0; li < m->n_layers; li++) {
        const el_layer *l = &m->layers[li];
        size_t layer_offset = (size_t)li * (size_t)e->context * (size_t)e->kv_size;
        el_half *keys = e->key_cache + layer_offset, *values = e->value_cache + layer_offset;

        norm_tokens(job, t0, t1, l->attn_norm, li - 1);
        phase_end(job, ith, PH_NORM, &mark, qkv_units(e));

        for (int32_t u; (u = claim_next(e, ith)) >= 0;)
            qkv_heads(job, ith, l, &e->xq, e->rope_cos, e->rope_sin, keys + (size_t)job->pos * e->kv_size,
                      values + (size_t)job->pos * e->kv_size, u, u + 1);
        phase_end(job, ith, PH_QKV, &mark, el_ceil_div(S, QUERY_BLOCK) * KV);

        for (int32_t item; (item = claim_next(e, ith)) >= 0;)
            attend_block(job, ith, keys, values, item / KV * QUERY_BLOCK, item % KV);
        phase_end(job, ith, PH_ATTN, &mark, heads_whole_blocks ? product_units(e, &l->o, S) : -1);
        if (!heads_whole_blocks) {
            for (int32_t t = t0; t < t1; t++)
                quantize_to(k, &e->xq, e->nb_q, t, 0, e->attn + (size_t)t * e->q_size, e->q_size, job->quads);
            phase_end(job, ith, PH_ATTN_Q, &mark, product_units(e, &l->o, S));
        }

        product(job, &l->o, e->proj, &e->xq, e->nb_q, 0, S, ith);
        phase_end(job, ith, PH_O, &mark, -1);

        for (int32_t t = t0; t < t1; t++) {
            float *x = e->x + (size_t)t * m->hidden, *h = e->h + (size_t)t * m->hidden;
            k->add(x, x, e->proj + (size_t)t * m->hidden, m->hidden);
            trace_row(e, li, 0, t, S, x);
            k->rms_norm(h, x, l->mlp_norm, m->hidden, m->rms_eps);
            quantize_to(k, &e->xq, e->nb_hidden, t, 0, h, m->hidden, job->quads);
        }
        phase_end(job, ith, PH_MLP_NORM, &mark, gate_up_count(e));

        for (int32_t u; (u = claim_next(e, ith)) >= 0;) gate_up_unit(job, ith, l, &e->xq, gate_up_grain(e), u);
        phase_end(job, ith, PH_GATE_UP, &mark, product_units(e, &l->down, S));

        product(job, &l->down, e->proj, &e->xq_ffn, e->nb_ffn, 0, S, ith);
        phase_end(job, ith, PH_DOWN, &mark, -1);
    }

    /* the head: every token's logits, or the last token's (the trace wants every token's residual) */
    int32_t first = job->all ? 0 : S - 1;
    act *head_act = e->act_bits == 8 ? &e->xq_head : &e->xq;
    if (e->trace) {
        split(first, ith, nth, &t0, &t1);
        for (int32_t t = t0; t < t1; t++) {
            float *x = e->x + (size_t)t * m->hidden;
            k->add(x, x, e->proj + (size_t)t * m->hidden, m->hidden);
            trace_row(e, m->n_layers - 1, 1, t, S, x);
        }
    }
    split(S - first, ith, nth, &t0, &t1);
    for (int32_t t = first + t0; t < first + t1; t++) {
        float *x = e->x + (size_t)t * m->hidden, *h = e->h + (size_t)t * m->hidden;
        k->add(x, x, e->proj + (size_t)t * m->hidden, m->hidden);
        trace_row(e, m->n_layers - 1, 1, t, S, x);
        k->rms_norm(h, x, m->final_norm, m->hidden, m->rms_eps);
        quantize_to(k, head_act, e->nb_hidden, t, 0, h, m->hidden, !el_uses_panels(k, S - first));
    }
    phase_end(job, ith, PH_FINAL_NORM, &mark, product_units(e, &m->head, S - first));
    product(job, &m->head, job->logits, head_act, e->nb_hidden, first, S - first, ith);
    phase_end(job, ith, PH_HEAD, &mark, -1);
}

/* One token (a decode step). Each thread keeps its own copy of the residual stream and computes
 * the norms, the RoPE table and the attention's combine itself (identical work, identical bits),
 * so only products and attention partials are split and a layer needs five barriers, not eight:
 *   qkv | attention partials | combine (each thread, all heads) + o | norm (each) + gate/up | down |
 * The math per value is that of forward_thread: a token decoded here gives the same bits as in a
 * chunk. In the profile the norms count in the phase that follows them (qkv_rope, gate_up_silu,
 * head) and the combine in o_proj. The first phase's claims are opened by el_engine_forward. */
static void forward_decode(void *ctx, int32_t ith, int32_t nth) {
    const forward_job *job = ctx;
    el_engine *e = job->e;
    const el_kernels *k = job->k;
    const el_model *m = &e->m;
    const int32_t H = m->n_heads, D = m->head_dim, E = m->hidden;
    struct timespec mark = {0, 0};
    if (ith == 0 && e->profile) clock_gettime(CLOCK_MONOTONIC, &mark);
    float *x = e->dx + (size_t)ith * E, *h = e->dh + (size_t)ith * (E > e->q_size ? E : e->q_size);
    float *cos_t = e->drope + (size_t)ith * 2 * e->half, *sin_t = cos_t + e->half;
    act *own = &e->dact[ith];
    float *scores = e->scores + (size_t)ith * KEY_CHUNK;
    const size_t part = (size_t)e->max_chunks * (size_t)(D + 2);
    const int32_t n_chunks = el_ceil_div(job->pos + 1, KEY_CHUNK);
    (void)nth;

    embed_row(x, &m->embed, job->tokens[0]);
    rope_table(e, cos_t, sin_t, job->pos);
    phase_mark(job, ith, PH_EMBED, &mark); /* no barrier: nothing shared yet */

    for (int32_t li = 0; li < m->n_layers; li++) {
        const el_layer *l = &m->layers[li];
        size_t layer_offset = (size_t)li * (size_t)e->context * (size_t)e->kv_size;
        el_half *keys = e->key_cache + layer_offset, *values = e->value_cache + layer_offset;

        if (li > 0) { /* the previous layer's down_proj */
            k->add(x, x, e->proj, E);
            if (ith == 0) trace_row(e, li - 1, 1, 0, 1, x);
        }
        k->rms_norm(h, x, l->attn_norm, E, m->rms_eps);
        quantize_to(k, own, e->nb_hidden, 0, 0, h, E, 1);
        for (int32_t u; (u = claim_next(e, ith)) >= 0;)
            qkv_heads(job, ith, l, own, cos_t, sin_t, keys + (size_t)job->pos * e->kv_size,
                      values + (size_t)job->pos * e->kv_size, u, u + 1);
        phase_end(job, ith, PH_QKV, &mark, n_chunks * H);

        /* (chunk, head) pairs, chunk-major: each thread streams its own stretch of the cache */
        for (int32_t i; (i = claim_next(e, ith)) >= 0;) {
            int32_t c = i / H, hd = i % H;
            attend_chunk(job, keys, values, 0, hd, c, e->decode_parts + hd * part + (size_t)c * (D + 2), scores);
        }
        phase_end(job, ith, PH_ATTN, &mark, product_units(e, &l->o, 1));

        for (int32_t hd = 0; hd < H; hd++) finish_head(job, h, own, 0, hd, e->decode_parts + hd * part, n_chunks);
        if (D % EL_QBLOCK) quantize_to(k, own, e->nb_q, 0, 0, h, e->q_size, 1);
        product(job, &l->o, e->proj, own, e->nb_q, 0, 1, ith);
        phase_end(job, ith, PH_O, &mark, gate_up_count(e));

        k->add(x, x, e->proj, E);
        if (ith == 0) trace_row(e, li, 0, 0, 1, x);
        k->rms_norm(h, x, l->mlp_norm, E, m->rms_eps);
        quantize_to(k, own, e->nb_hidden, 0, 0, h, E, 1);
        for (int32_t u; (u = claim_next(e, ith)) >= 0;) gate_up_unit(job, ith, l, own, gate_up_grain(e), u);
        phase_end(job, ith, PH_GATE_UP, &mark, product_units(e, &l->down, 1));

        product(job, &l->down, e->proj, &e->xq_ffn, e->nb_ffn, 0, 1, ith);
        phase_end(job, ith, PH_DOWN, &mark, li + 1 < m->n_layers ? qkv_units(e) : product_units(e, &m->head, 1));
    }

    k->add(x, x, e->proj, E);
    if (ith == 0) trace_row(e, m->n_layers - 1, 1, 0, 1, x);
    k->rms_norm(h, x, m->final_norm, E, m->rms_eps);
    act *head_act = e->act_bits == 8 ? &e->dact_head[ith] : own;
    quantize_to(k, head_act, e->nb_hidden, 0, 0, h, E, 1);
    product(job, &m->head, job->logits, head_act, e->nb_hidden, 0, 1, ith);
    phase_end(job, ith, PH_HEAD, &mark, -1);
}

int el_engine_forward(el_engine *e, float *logits, int64_t n_logits, const int32_t *tokens, int32_t n_tokens,
                      int32_t position, int32_t all_logits) {
    if (!e || !logits || !tokens || n_tokens < 1 || position < 0) return EL_EINVAL;
    if (n_tokens > e->max_chunk || (int64_t)position + n_tokens > e->context) return EL_ERANGE;
    if (n_logits < (int64_t)(all_logits ? n_tokens : 1) * e->m.vocab) return EL_ERANGE;
    if (e->trace && e->n_trace < (int64_t)e->m.n_layers * 2 * n_tokens * e->m.hidden) return EL_ERANGE;
    for (int32_t t = 0; t < n_tokens; t++)
        if (tokens[t] < 0 || tokens[t] >= e->m.vocab) return EL_ERANGE;
    const el_kernels *k = el_kernels_current();
    if (!k) return EL_EUNSUPPORTED;
    forward_job job = {e, k, logits, tokens, n_tokens, position, all_logits != 0, !el_uses_panels(k, n_tokens)};
    if (n_tokens == 1) { /* a decode step claims from its first phase on: q, k, v heads */
        claims_plan plan = {e, qkv_units(e)};
        open_claims(&plan);
    }
    el_pool_run(e->pool, n_tokens == 1 ? forward_decode : forward_thread, &job);
    return EL_OK;
}
