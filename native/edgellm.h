/* edgellm.h: the native kernels' one public header (plain C ABI).
 *
 * Conventions: the output pointer comes first, every length is an explicit element count, all
 * memory belongs to the caller, functions return EL_OK (0) or a negative EL_E* status and never
 * exit. The only global state is the kernel dispatch table (which variant runs), chosen once by
 * el_init() from the CPU and EDGELLM_KERNELS.
 *
 * Weight block formats (mirror of export/quant_formats.py, bit-exact). A quantized matrix is
 * [rows, cols] in blocks of `block` consecutive values along cols (the input dimension), stored
 * PLANAR, one array per field, each row padded to n_blocks = ceil(cols / block) whole blocks:
 *
 *   qweight  uint8   [rows][n_blocks][block * bits / 8]
 *            4-bit: byte k holds code 2k in its low nibble and code 2k+1 in its high nibble
 *            (ONNX Runtime's MatMulNBits order; GGUF's Q4_0/Q4_1 order is re-packed at export)
 *   scales   float16 [rows][n_blocks]  (IEEE binary16 bits, el_half; read as the float32 they equal)
 *   mins     float16 [rows][n_blocks]   int4_asym only
 *
 *   format      weight                    codes     bits per weight (block 32)
 *   int4_asym   w = code * scale + min    0..15     4 + 32/32 = 5.0   (= GGUF Q4_1)
 *   int4_sym    w = (code - 8) * scale    0..15     4 + 16/32 = 4.5   (= GGUF Q4_0)
 *   int8_sym    w = (code - 128) * scale  0..255    8 + 16/32 = 8.5   (= GGUF Q8_0, code = q + 128)
 *
 * float16 like GGUF's blocks, so a GGUF's scales are carried bit for bit, and a decode step, which
 * streams every weight once, reads 5 bits per weight instead of 6 (float32 scales and mins were a
 * sixth of the bytes). Every use converts a scale to float32 exactly first, so the math below is
 * float32 throughout.
 *
 * Block sizes 32, 64 and 128 are supported (a multiple of the activation block, 32).
 *
 * Activation blocks (el_block_q16a): x float32 [n] is cut into ceil(n / 32) blocks of 32, the
 * last one zero-padded, and each value kept to 16 bits as two int8 planes, so that the products
 * still run on int8 hardware (VNNI, SDOT, SMMLA) at about the accuracy of float activations
 * (int8 alone, as llama.cpp's Q8_1, costs a normalized MSE of ~4e-4 on the logits: enough to
 * change greedy tokens). Per block, in float32, round() rounding half away from zero:
 *   amax = max |x_i|;  c = amax / 127;  s_i = x_i / c
 *   qh_i = round(s_i) clamped to [-127, 127];  ql_i = round((s_i - qh_i) * 256) clamped to [-127, 127]
 *   d = c / 256;  q16_i = 256 * qh_i + ql_i;  sum = sum_i q16_i;   so x_i ~ d * q16_i (error <= c/512)
 * c == 0 gives q = 0. A block holding a NaN or an infinity gets d = NaN, q = 0, sum = 0, so every
 * product that reads it is NaN.
 *
 * Matrix-vector product, per row r and activation block j (weight block b = j / (block / 32)):
 *   isum_j = sum_i (code_i - zp) * q16_i  exactly, in int32   (zp = 0 int4_asym, 8 int4_sym,
 *            128 int8_sym; |isum| < 2^31)
 *   int4_asym: t_j = (scale[b] * d[j]) * (float)isum_j + (min[b] * d[j]) * (float)sum[j]
 *   sym:       t_j = (scale[b] * d[j]) * (float)isum_j
 *   eight lanes, lane[j % 8] += t_j in block order, each starting at 0.0f, then
 *   y[r] = ((lane0 + lane4) + (lane2 + lane6)) + ((lane1 + lane5) + (lane3 + lane7))
 * in float32 without FMA. The lanes are what a 256-bit vector of floats holds (AVX2; two
 * 128-bit vectors on NEON), so every variant vectorizes the float work too and still gives the
 * same bits as the scalar reference, and as numpy running the formula (edgellm.backends.native.ffi).
 *
 * 8-bit activations (el_block_q8a): llama.cpp's Q8_1 activations (its x86 rounding), with float32
 * d and ds where Q8_1 stores float16 (an fp16 ds overflows past |x| ~ 2047). One int8 plane: half the
 * dot products of the 16-bit path, where a product is bound by them (prefill everywhere, decode on
 * Arm cores). Per block, in float32:
 *   amax = max |x_i|;  d = amax / 127;  id = 127 / amax;  q_i = rint(x_i * id) (ties to even)
 *   clamped to [-127, 127];  sum = sum_i q_i;  ds = d * (float)sum
 * (d == 0, or id past FLT_MAX: d = ds = 0, q = 0; a NaN or infinity: d = ds = NaN, q = 0, sum = 0).
 * Products, per row r, four lanes, each starting at -0.0 (so a lane's first fma is a product):
 *   isum_j = sum_i (code_i - zp) * q_i  exactly, in int32
 *   lane[j % 4] = fma(scale[b] * d[j], (float)isum_j, lane[j % 4])         in block order
 *   int4_asym:  lane[j % 4] = fma(min[b], ds[j], lane[j % 4])               right after it
 *   y[r] = (lane0 + lane1) + (lane2 + lane3)
 * with fma rounding once (C's fmaf, NEON's FMLA, x86's VFMADD). Four lanes are what a decode
 * step on NEON holds per row (four blocks' sums after one pairwise reduction), and what a prefill
 * tile holds per (four rows, token) in four registers, so neither reorders a float operation.
 */
#ifndef EDGELLM_H
#define EDGELLM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EL_ABI_VERSION 6
#define EL_QBLOCK 32 /* values per activation block */

/* The declarations from here to EL_CDEF_END are read verbatim by native/build_ffi.py as the
 * cffi cdef: plain C only (no macros, no expressions in array sizes). */
/* EL_CDEF_BEGIN */
enum el_status {
    EL_OK = 0,
    EL_EINVAL = -1,      /* a bad argument: NULL pointer, wrong length, unknown format */
    EL_EUNSUPPORTED = -2, /* a variant this CPU or build lacks, a block size not supported */
    EL_ENOMEM = -3,
    EL_ETHREAD = -4,      /* a thread could not be started */
    EL_ERANGE = -5        /* a position past the context, a chunk past max_chunk, a token id past the vocabulary */
};

enum el_format { EL_INT4_ASYM = 0, EL_INT4_SYM = 1, EL_INT8_SYM = 2 };

typedef uint16_t el_half; /* an IEEE binary16 value's bits (the block scales and mins) */

/* One activation block: 72 bytes; x_i ~ d * (256 * qh_i + ql_i). */
typedef struct {
    float d;        /* the fine scale amax / 127 / 256; NaN if the block held a NaN or an infinity */
    int32_t sum;    /* sum of 256 * qh_i + ql_i, for the min term of int4_asym and the zero points */
    int8_t qh[32];  /* the high plane: round(x_i / (256 d)), in [-127, 127] */
    int8_t ql[32];  /* the low plane: the remainder in 1/256ths, in [-127, 127] */
} el_block_q16a;

/* One 8-bit activation block: 44 bytes; x_i ~ d * q_i. */
typedef struct {
    float d;        /* amax / 127; NaN if the block held a NaN or an infinity */
    float ds;       /* d * (float)sum: the min term's factor */
    int32_t sum;    /* sum of q_i, for the zero points */
    int8_t q[32];   /* round(x_i / d), in [-127, 127] */
} el_block_q8a;

/* A view of a quantized matrix (the caller keeps the arrays alive). */
typedef struct {
    int32_t format;          /* enum el_format */
    int32_t rows, cols;      /* logical shape [rows, cols] */
    int32_t block;           /* 32, 64 or 128 */
    const uint8_t *qweight;  /* [rows][ceil(cols/block)][block*bits/8] */
    const el_half *scales;   /* [rows][ceil(cols/block)] */
    const el_half *mins;     /* [rows][ceil(cols/block)] for int4_asym, else NULL */
} el_qmatrix;

typedef struct el_pool el_pool;

int el_abi_version(void);
const char *el_status_string(int status);

/* Kernel variants: "ref", "avx2", "avx512vnni" (x86-64), "neon", "dotprod", "i8mm" (aarch64).
 * el_init picks the best one the CPU runs, or the one EDGELLM_KERNELS names (EL_EUNSUPPORTED if
 * the CPU lacks it or the name is unknown). Safe to call more than once; it decides once. */
int el_init(void);
const char *el_variant(void);  /* the variant in use */
/* Names of the variants this CPU runs, best last; returns how many (at most capacity stored). */
int el_available_variants(const char **names, int32_t capacity);
/* Switch variant (for tests and benchmarks; not while kernels run on other threads). */
int el_set_variant(const char *name);

/* A pool of n_threads - 1 workers plus the calling thread. Rows are split into contiguous
 * ranges, one per thread, and each row is computed whole by one thread, so results do not
 * depend on the thread count. A pool runs one job at a time (concurrent callers wait). */
int el_pool_create(el_pool **out, int32_t n_threads);
void el_pool_destroy(el_pool *pool);
int el_pool_threads(const el_pool *pool);

/* out [n_blocks] <- x [n], n_blocks == ceil(n / 32); rows of a batch are separate calls or
 * n_rows > 1: x [n_rows][n] -> out [n_rows][n_blocks]. */
int el_quantize_q16a(el_block_q16a *out, int32_t n_blocks, const float *x, int32_t n_rows, int32_t n);

/* y [w->rows] = W x; x [n_blocks] with n_blocks == ceil(w->cols / 32). pool may be NULL. */
int el_matvec(float *y, int32_t n_y, const el_qmatrix *w, const el_block_q16a *x, int32_t n_blocks,
              el_pool *pool);

/* Y [n_tokens][w->rows] = X W^T; x [n_tokens][n_blocks]. Equal, bit for bit, to n_tokens calls
 * of el_matvec. */
int el_matmul(float *y, int32_t n_tokens, int32_t n_y, const el_qmatrix *w, const el_block_q16a *x,
              int32_t n_blocks, el_pool *pool);

/* The same two with 8-bit activations (el_block_q8a): el_matmul_q8a of one token is the
 * matrix-vector product, and every token of a matmul gives the bits it would alone. */
int el_quantize_q8a(el_block_q8a *out, int32_t n_blocks, const float *x, int32_t n_rows, int32_t n);
int el_matmul_q8a(float *y, int32_t n_tokens, int32_t n_y, const el_qmatrix *w, const el_block_q8a *x,
                  int32_t n_blocks, el_pool *pool);

/* Float kernels over x [n_rows][n]; out may equal x. Variants agree with ref to a normalized
 * MSE of 1e-10, not bit for bit. */
/* out = x / sqrt(mean(x^2) + eps) * weight[n] */
int el_rms_norm(float *out, const float *x, const float *weight, int32_t n_rows, int32_t n, float eps);
/* Rotate-half RoPE (HF order: pairs (i, i + head_dim/2)) on x [n_heads][head_dim] with
 * cos, sin [head_dim / 2] of one position. */
int el_rope(float *out, const float *x, const float *cos_t, const float *sin_t, int32_t n_heads,
            int32_t head_dim);
/* cos_t, sin_t [half] <- cos/sin(position * inv_freq[i]), the angle rounded to float32. */
int el_rope_tables(float *cos_t, float *sin_t, const float *inv_freq, int32_t half, float position);
/* out = exp(x - max) / sum, per row. */
int el_softmax(float *out, const float *x, int32_t n_rows, int32_t n);
/* out = silu(gate) * up = gate / (1 + exp(-gate)) * up. */
int el_silu_mul(float *out, const float *gate, const float *up, int32_t n);
/* out = a + b (the residual add). */
int el_add(float *out, const float *a, const float *b, int32_t n);
/* ---- the decoder engine (engine.c) -------------------------------------------------------------
 *
 * A Llama-family decoder (Llama, Mistral, Qwen2) run whole inside C: Python calls
 * el_engine_forward once per token or prefill chunk. The model is a descriptor of pointers INTO
 * the memory-mapped weights.bin (nothing is copied or repacked: the matrices are read in their
 * exported layout); the caller validates the mapping (offsets, sizes) and keeps it mapped, and
 * keeps the pool alive, for as long as the engine lives. The engine owns the KV cache and all
 * scratch, allocated once by el_engine_create.
 *
 * Per token x at position p (the math of export/reference.py, with int8 activations for every
 * matrix product as above (8-bit ones, el_block_q8a, when el_engine_activation_bits says 8; the head
 * keeps 16-bit ones: a prefill runs it for one token, and its logits come nearer the float ones);
 * norms, RoPE, attention and softmax in float32):
 *   x = dequantize(embed row x)                                          [hidden]
 *   per layer:  h = rms_norm(x, attn_norm)
 *               q, k, v = Wq h (+ bq), Wk h (+ bk), Wv h (+ bv)         [heads|kv_heads][head_dim]
 *               q, k = rope(q, p), rope(k, p)    rotate-half, pairs (i, i + head_dim/2)
 *               K[p], V[p] = half(k), half(v)        (the cache: float16, rounded to nearest even)
 *               a_h = softmax(q_h . K[0..p]_g / sqrt(head_dim)) V[0..p]_g, g = h / (heads / kv_heads)
 *               x = x + Wo a;  h = rms_norm(x, mlp_norm);  x = x + Wdown (silu(Wgate h) * Wup h)
 *   logits = Whead rms_norm(x, final_norm)                               [vocab]
 * A chunk of n tokens is positions p .. p+n-1, causal within the chunk. */

/* One decoder layer (HF names in the comments). */
typedef struct {
    const float *attn_norm;        /* [hidden]  input_layernorm.weight */
    el_qmatrix q, k, v;            /* [heads*head_dim | kv_heads*head_dim, hidden]  self_attn.{q,k,v}_proj */
    const float *q_bias;           /* [heads*head_dim] or NULL; k_bias, v_bias [kv_heads*head_dim] or NULL */
    const float *k_bias;
    const float *v_bias;
    el_qmatrix o;                  /* [hidden, heads*head_dim]  self_attn.o_proj */
    const float *mlp_norm;         /* [hidden]  post_attention_layernorm.weight */
    el_qmatrix gate, up;           /* [ffn, hidden]  mlp.{gate,up}_proj */
    el_qmatrix down;               /* [hidden, ffn]  mlp.down_proj */
} el_layer;

typedef struct {
    int32_t n_layers, hidden, ffn, n_heads, n_kv_heads, head_dim, vocab;
    float rms_eps;
    el_qmatrix embed;              /* [vocab, hidden]  embed_tokens: one row dequantized per token */
    el_qmatrix head;               /* [vocab, hidden]  lm_head, or the same arrays as embed when tied */
    const float *final_norm;       /* [hidden]  model.norm.weight */
    const float *inv_freq;         /* [head_dim / 2]  model.rotary_emb.inv_freq (RoPE scaling included) */
    const el_layer *layers;        /* [n_layers]; copied by el_engine_create */
} el_model;

typedef struct el_engine el_engine;

/* Checks the descriptor (shapes against the hyper-parameters, NULL pointers, formats: EL_EINVAL),
 * allocates the KV cache [n_layers][context][n_kv_heads][head_dim] float16 for keys and for values
 * and the scratch for chunks of up to max_chunk tokens. pool may be NULL (one thread). */
int el_engine_create(el_engine **out, const el_model *model, int32_t context, int32_t max_chunk, el_pool *pool);
void el_engine_destroy(el_engine *engine);

/* Runs tokens [n_tokens] at positions position .. position+n_tokens-1, reading the cache of
 * positions 0 .. position-1 (whatever earlier calls wrote there) and writing the new ones.
 * logits [n_logits]: the last token's [vocab], or every token's [n_tokens][vocab] when all_logits.
 * EL_ERANGE if position + n_tokens > context, n_tokens > max_chunk, a token id is outside
 * [0, vocab) or n_logits is too small. One call at a time per engine. */
int el_engine_forward(el_engine *engine, float *logits, int64_t n_logits, const int32_t *tokens, int32_t n_tokens,
                      int32_t position, int32_t all_logits);

/* From the next el_engine_forward on (trace NULL: no longer), the residual stream of every token of a
 * call after each layer's attention and after its MLP: trace [n_layers][2][n_tokens][hidden], what
 * export/reference.py's trace names "{layer}.attn_residual" and "{layer}.out". For a failing parity
 * test to name the layer where the engine left the reference; it costs a copy per layer. A forward
 * whose tokens need more than n_trace floats returns EL_ERANGE. */
int el_engine_trace(el_engine *engine, float *trace, int64_t n_trace);

/* 8 or 16: the activations the engine's products use (edgellm.h): 8 where the kernel variant has
 * 8-bit products (dotprod, i8mm), else 16; EDGELLM_ACTIVATIONS=8|16 at el_engine_create chooses. */
int el_engine_activation_bits(const el_engine *engine);
/* Bytes the engine allocated (KV cache + scratch), and the context and chunk it was made for. */
int64_t el_engine_bytes(const el_engine *engine);

/* Gives memory the C heap holds but no longer uses back to the system (glibc's malloc_trim; a no-op
 * elsewhere). Returns 1 if some was released. The runtime calls it once a model is loaded, before
 * the weights are paged in: parsing a tokenizer's JSON leaves tens of MB of freed heap resident. */
int el_heap_trim(void);

/* Profile (EDGELLM_PROFILE=1 in the environment at el_engine_create): seconds spent per phase,
 * summed over calls on thread 0 (barrier waits included in the phase that waited). names[i]
 * are static strings. Returns the number of phases (at most capacity stored), 0 when off. */
int el_engine_profile(const el_engine *engine, const char **names, double *seconds, int32_t capacity);
/* EL_CDEF_END */

#ifdef __cplusplus
}
#endif

/* The code bytes of 32 consecutive weights of a row (the span one activation block meets):
 * a weight row is a plain byte array of ceil(cols/block) * block * bits / 8 bytes, whatever the
 * block size, and its 32-value span j starts at byte j * sizeof(el_codes_qN). */
typedef struct { uint8_t qs[EL_QBLOCK / 2]; } el_codes_q4; /* codes 2k | 2k+1 << 4 */
typedef struct { uint8_t qs[EL_QBLOCK]; } el_codes_q8;     /* code = q + 128 */

#if !defined(__cplusplus)
_Static_assert(sizeof(el_block_q16a) == 8 + 2 * EL_QBLOCK, "el_block_q16a: float d, int32 sum, 2 x 32 x int8");
_Static_assert(sizeof(el_block_q8a) == 12 + EL_QBLOCK, "el_block_q8a: float d, float ds, int32 sum, 32 x int8");
_Static_assert(sizeof(el_codes_q4) == 16, "4 bits per code");
_Static_assert(sizeof(el_codes_q8) == 32, "8 bits per code");
_Static_assert(sizeof(float) == 4 && sizeof(el_half) == 2, "float32 math, float16 scales and mins");
#endif

#endif /* EDGELLM_H */
