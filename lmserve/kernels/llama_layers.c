/* The Llama-family decoder layers of a step, float32, in a single call: M token rows, each a decode token or a
 * prefill token (attention takes each row's own block table and context length).
 *
 * At one to a few dozen tokens a step, a layer's arithmetic takes less time than dispatching its ~25 torch ops
 * one by one. This runs the whole layer -- RMSNorm, q/k/v product, rotary, KV store, paged attention, output
 * product, residual, RMSNorm, gate/up product, SiLU * up, down product, residual -- from C, on the GGUF blocks
 * or the bf16 tiles, with the same arithmetic as lmserve's torch path (up to the order of float sums). At a
 * prefill's thousands of rows, the elementwise ops run vectorized in one pass each instead of torch's several.
 *
 * The whole stack goes in one call too: between layers, Python glue (module calls, views of the cache, argument
 * marshalling) costs more than a layer's arithmetic at batch 1.
 *
 * x: [M, hidden], the residual stream, updated in place. cos, sin: [M, rotary_dim] (rotate-half convention).
 * block_tables: [M, max_blocks], context_lens: [M], by row (paged_attention.c).
 * k_cache, v_cache: [layers, slots, kv_heads, head_dim], float32 or (kv_half) float16.
 * scratch: llama_stack_scratch_bytes() bytes.
 * op_seconds: NULL, or LAYER_OPS doubles to which each op's wall time is added (benchmarks/step_profile.py).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "bf16_kernels.h"
#include "simd.h"

int quant_matmul(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y,
                 int16_t *xq, float *xscale, float *xsum);
int bf16_matmul(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias, float *y,
                int64_t y_stride, uint16_t *xb, int kernel, int epilogue);
int64_t bf16_scratch_values(int64_t M, int64_t K);
int paged_attention_by_row(const float *q, const void *k_cache, const void *v_cache, const int64_t *block_tables,
                           int64_t max_blocks, const int64_t *context_lens, int64_t S, int64_t H, int64_t KVH,
                           int64_t D, int64_t block_size, float scale, float *scores, int64_t max_context,
                           float *out, int kv_half, int kernel);
int64_t attention_scratch_floats(int64_t H, int64_t D, int64_t max_context);
int int8_matmul(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scales, const int32_t *offsets,
                int64_t N, const float *bias, float *y, int64_t y_stride, uint8_t *xq, int epilogue);
int q4_int8_matmul(const float *x, int64_t M, int64_t K, const uint8_t *quants, const float *d, const float *m,
                   int64_t N, const float *bias, float *y, uint8_t *scratch, int epilogue);
int q4_int16_matmul(const float *x, int64_t M, int64_t K, const uint8_t *quants, const float *d, const float *m,
                    int64_t N, const float *bias, float *y, uint8_t *scratch, int epilogue);
enum { Q8_0 = 8 }; /* ggml's type number */
int q8_int16_matmul(const float *x, int64_t M, int64_t K, const uint8_t *quants, const float *d, const float *m,
                    int64_t N, const float *bias, float *y, uint8_t *scratch, int epilogue);

/* A linear layer's native weights: GGUF blocks, tiles -- bf16 (bf16_matmul.c), int8 (int8_matmul.c) or the blocks
 * regrouped for int16 or (Q4) int8 inputs (tiles_int16_matmul.c, q4_int8_matmul.c) -- or blocks and tiles; the blocks take products of up to
 * max_block_rows rows, the tiles the rest. */
typedef struct {
    int qtype;                 /* ggml type of the blocks */
    const uint8_t *blocks;     /* NULL when the layer has none */
    const uint16_t *bf16_tiles;/* NULL when the layer has none */
    int64_t max_block_rows;
    const float *bias;         /* NULL when the layer has none */
    const int8_t *int8_tiles;  /* NULL when the layer has none; with their scales and offsets */
    const float *int8_scales;
    const int32_t *int8_offsets;
    const uint8_t *tile_quants;/* regrouped blocks of type qtype, NULL when the layer has none; scales, (Q4) mins */
    const float *tile_scales, *tile_mins;
    int tile_input_bits;       /* 16 or 8 */
} NativeLinear;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, rotary_dim, intermediate;
    float eps, scale;
    int bf16_kernel;           /* bf16_matmul's kernel for the tiles: AVX2, AVX512-BF16 or AMX */
    const float *input_norm, *post_attention_norm;
    NativeLinear qkv, o, gate_up, down;
} LlamaLayer;

static int64_t max3(int64_t a, int64_t b, int64_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

static int64_t layer_scratch_bytes(const LlamaLayer *L, int64_t M, int64_t max_context) {
    const int64_t qkv = (L->heads + 2 * L->kv_heads) * L->head_dim, q = L->heads * L->head_dim;
    const int64_t widest_input = max3(L->hidden, q, L->intermediate);
    const int64_t floats = M * (L->hidden + qkv + 2 * q + 2 * L->intermediate + L->intermediate + L->hidden)
                           + attention_scratch_floats(L->heads, L->head_dim, max_context) + 2 * M * (widest_input / 32);
    return 4 * floats + 2 * bf16_scratch_values(M, widest_input);
}

/* Scratch for llama_layer_stack: what the widest of the layers needs. */
int64_t llama_stack_scratch_bytes(const LlamaLayer *layers, int64_t num_layers, int64_t M, int64_t max_context) {
    int64_t bytes = 0;
    for (int64_t l = 0; l < num_layers; l++) {
        const int64_t layer = layer_scratch_bytes(&layers[l], M, max_context);
        bytes = layer > bytes ? layer : bytes;
    }
    return bytes;
}

/* Token rows per pass through a layer: activations stay in cache between ops, and each pass reads all the layer's
 * weights again. 256 where products split columns between threads (2048-token prefill steps 590 -> 515 ms against
 * whole-step passes); 1024, a CPU step's whole budget, where AMX products split rows and so each thread reads all the
 * weights (1024-token prefill steps ~167 -> ~147 ms against 256). Xeon with AMX, 2 cores. */
#define LAYER_ROWS 256
#define LAYER_ROWS_AMX 1024

/* Rows are shared out between threads from this many on: below, a parallel region costs more than it saves. */
#define PARALLEL_ROWS 4

static void rms_norm(const float *x, const float *weight, int64_t M, int64_t n, float eps, float *out) {
#pragma omp parallel for if (M >= PARALLEL_ROWS)
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * n;
        __m256 squares = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            squares = _mm256_fmadd_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(row + i), squares);
        float sum = horizontal_sum(squares);
        for (; i < n; i++) sum += row[i] * row[i];
        const float inv = 1.0f / sqrtf(sum / (float)n + eps);
        for (i = 0; i < n; i++) out[m * n + i] = weight[i] * (row[i] * inv);
    }
}

/* silu(gate) * up for each row of [gate | up] (2 * n wide); silu(g) = g * sigmoid(g), with e^-|g| so that the
 * exponential never overflows. */
static void silu_mul(const float *gate_up, int64_t M, int64_t n, float *out) {
#pragma omp parallel for if (M >= PARALLEL_ROWS)
    for (int64_t m = 0; m < M; m++) {
        const float *gate = gate_up + m * 2 * n, *up = gate + n;
        const __m256 one = _mm256_set1_ps(1.0f), sign_bit = _mm256_set1_ps(-0.0f);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 g = _mm256_loadu_ps(gate + i);
            const __m256 e = exp_nonpositive(_mm256_or_ps(g, sign_bit)); /* e^-|g| */
            const __m256 sigmoid = _mm256_div_ps(_mm256_blendv_ps(one, e, g), _mm256_add_ps(one, e));
            _mm256_storeu_ps(out + m * n + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_loadu_ps(up + i)));
        }
        for (; i < n; i++) out[m * n + i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

typedef struct {
    int16_t *xq;
    float *xscale, *xsum;
} QuantScratch;

static void add_into(float *x, const float *delta, int64_t M, int64_t n) {
#pragma omp parallel for if (M >= PARALLEL_ROWS)
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < n; i++) x[m * n + i] += delta[m * n + i];
}

static int on_blocks(const NativeLinear *W, int64_t M) {
    return W->blocks && (M <= W->max_block_rows || !(W->bf16_tiles || W->int8_tiles || W->tile_quants));
}

/* y = x W^T + bias, or (accumulate) y += x W^T + bias: the tiles add into y as they store, the blocks' product goes
 * through `delta` first. */
static int linear(const NativeLinear *W, const float *x, int64_t M, int64_t K, int64_t N, float *y, int accumulate,
                  float *delta, const QuantScratch *s, int bf16_kernel) {
    if (on_blocks(W, M)) {
        float *out = accumulate ? delta : y;
        if (quant_matmul(W->qtype, x, M, K, W->blocks, N, out, s->xq, s->xscale, s->xsum) != 0) return -1;
        if (W->bias)
            for (int64_t m = 0; m < M; m++)
                for (int64_t n = 0; n < N; n++) out[m * N + n] += W->bias[n];
        if (accumulate) add_into(y, delta, M, N);
        return 0;
    }
    if (W->tile_quants && W->tile_input_bits == 16) /* its scratch: xscale, xsum and xq, which follow each other */
        return (W->qtype == Q8_0 ? q8_int16_matmul : q4_int16_matmul)(x, M, K, W->tile_quants, W->tile_scales,
                                                                      W->tile_mins, N, W->bias, y,
                                                                      (uint8_t *)s->xscale,
                                                                      accumulate ? ACCUMULATE : STORE);
    if (W->tile_quants)
        return q4_int8_matmul(x, M, K, W->tile_quants, W->tile_scales, W->tile_mins, N, W->bias, y, (uint8_t *)s->xq,
                              accumulate ? ACCUMULATE : STORE);
    if (W->int8_tiles)
        return int8_matmul(x, M, K, W->int8_tiles, W->int8_scales, W->int8_offsets, N, W->bias, y, N,
                           (uint8_t *)s->xq, accumulate ? ACCUMULATE : STORE);
    if (!W->bf16_tiles) return -1;
    return bf16_matmul(x, M, K, W->bf16_tiles, N, W->bias, y, N, (uint16_t *)s->xq, bf16_kernel,
                       accumulate ? ACCUMULATE : STORE);
}

/* act = silu(h W_gate^T) * (h W_up^T): in the tiles' registers where their kernel can (bf16_kernels.h), else
 * through the [M, 2n] gate_up buffer. */
static int gate_up_silu(const NativeLinear *W, const float *h, int64_t M, int64_t K, int64_t n, float *gate_up,
                        float *act, const QuantScratch *s, int bf16_kernel) {
    if (!on_blocks(W, M) && W->int8_tiles && !W->bias && n % 16 == 0)
        return int8_matmul(h, M, K, W->int8_tiles, W->int8_scales, W->int8_offsets, 2 * n, NULL, act, n,
                           (uint8_t *)s->xq, SILU_MUL);
    if (!on_blocks(W, M) && W->bf16_tiles && bf16_kernel != BF16_AVX2 && !W->bias && n % 16 == 0)
        return bf16_matmul(h, M, K, W->bf16_tiles, 2 * n, NULL, act, n, (uint16_t *)s->xq, bf16_kernel, SILU_MUL);
    if (linear(W, h, M, K, 2 * n, gate_up, 0, NULL, s, bf16_kernel)) return -1;
    silu_mul(gate_up, M, n, act);
    return 0;
}

/* n (a multiple of 8) floats into the cache, as float32 or, rounded to nearest even like torch, float16. */
static void store_kv(void *cache, int64_t index, const float *values, int64_t n, int kv_half) {
    if (!kv_half) {
        memcpy((float *)cache + index, values, sizeof(float) * n);
        return;
    }
    uint16_t *out = (uint16_t *)cache + index;
    for (int64_t i = 0; i < n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(values + i), _MM_FROUND_TO_NEAREST_INT));
}

/* Rotate the first rotary_dim dims of each head: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin (halves x1, x2). */
static void rotate(float *head, const float *cos, const float *sin, int64_t rotary_dim) {
    const int64_t half = rotary_dim / 2;
    for (int64_t i = 0; i < half; i++) {
        const float x1 = head[i], x2 = head[i + half];
        head[i] = x1 * cos[i] - x2 * sin[i];
        head[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
    }
}

/* Returns 0, or -1 when a product or the attention refuses its shapes (nothing sensible was computed then). */
/* The ops op_seconds times, in this order. */
enum { OP_NORMS, OP_QKV, OP_ROTARY_STORE, OP_ATTENTION, OP_O, OP_MLP_IN, OP_DOWN, LAYER_OPS };

int llama_layer_ops(void) { return LAYER_OPS; }

/* Adds the time since *since to op_seconds[op] (when timing) and restarts the clock. */
static void lap(double *op_seconds, int op, double *since) {
    if (!op_seconds) return;
    const double now = omp_get_wtime();
    op_seconds[op] += now - *since;
    *since = now;
}

static int llama_layer(const LlamaLayer *L, float *x, int64_t M, const float *cos, const float *sin, void *k_cache,
                       void *v_cache, int kv_half, const int64_t *slot_mapping, const int64_t *block_tables,
                       int64_t max_blocks, const int64_t *context_lens, int64_t block_size, uint8_t *scratch,
                       double *op_seconds) {
    const int64_t H = L->heads, KVH = L->kv_heads, D = L->head_dim, hidden = L->hidden, inter = L->intermediate;
    const int64_t qkv_width = (H + 2 * KVH) * D, q_width = H * D, max_context = max_blocks * block_size;
    const int64_t widest_input = max3(hidden, q_width, inter);
    float *h = (float *)scratch, *qkv = h + M * hidden, *q = qkv + M * qkv_width, *attn = q + M * q_width;
    float *gate_up = attn + M * q_width, *act = gate_up + 2 * M * inter, *delta = act + M * inter;
    float *scores = delta + M * hidden;
    QuantScratch qs = {.xscale = scores + attention_scratch_floats(H, D, max_context)};
    qs.xsum = qs.xscale + M * (widest_input / 32);
    qs.xq = (int16_t *)(qs.xsum + M * (widest_input / 32));

    double since = op_seconds ? omp_get_wtime() : 0;
    rms_norm(x, L->input_norm, M, hidden, L->eps, h);
    lap(op_seconds, OP_NORMS, &since);
    if (linear(&L->qkv, h, M, hidden, qkv_width, qkv, 0, NULL, &qs, L->bf16_kernel)) return -1;
    lap(op_seconds, OP_QKV, &since);
#pragma omp parallel for if (M >= PARALLEL_ROWS)
    for (int64_t m = 0; m < M; m++) {
        float *row = qkv + m * qkv_width;
        const float *c = cos + m * L->rotary_dim, *s = sin + m * L->rotary_dim;
        for (int64_t head = 0; head < H + KVH; head++) rotate(row + head * D, c, s, L->rotary_dim);
        memcpy(q + m * q_width, row, sizeof(float) * q_width);
        const int64_t slot = slot_mapping[m];
        store_kv(k_cache, slot * KVH * D, row + q_width, KVH * D, kv_half);
        store_kv(v_cache, slot * KVH * D, row + q_width + KVH * D, KVH * D, kv_half);
    }
    lap(op_seconds, OP_ROTARY_STORE, &since);
    if (paged_attention_by_row(q, k_cache, v_cache, block_tables, max_blocks, context_lens, M, H, KVH, D, block_size,
                               L->scale, scores, max_context, attn, kv_half, L->bf16_kernel))
        return -1;
    lap(op_seconds, OP_ATTENTION, &since);
    if (linear(&L->o, attn, M, q_width, hidden, x, 1, delta, &qs, L->bf16_kernel)) return -1; /* x += o(attn) */
    lap(op_seconds, OP_O, &since);

    rms_norm(x, L->post_attention_norm, M, hidden, L->eps, h);
    lap(op_seconds, OP_NORMS, &since);
    if (gate_up_silu(&L->gate_up, h, M, hidden, inter, gate_up, act, &qs, L->bf16_kernel)) return -1;
    lap(op_seconds, OP_MLP_IN, &since);
    if (linear(&L->down, act, M, inter, hidden, x, 1, delta, &qs, L->bf16_kernel)) return -1; /* x += down(act) */
    lap(op_seconds, OP_DOWN, &since);
    return 0;
}

/* Layers [0, num_layers) in turn; layer l's cache starts layer_stride values after layer l - 1's. */
int llama_layer_stack(const LlamaLayer *layers, int64_t num_layers, float *x, int64_t M, const float *cos,
                       const float *sin, char *k_cache, char *v_cache, int kv_half, int64_t layer_stride,
                       const int64_t *slot_mapping, const int64_t *block_tables, int64_t max_blocks,
                       const int64_t *context_lens, int64_t block_size, uint8_t *scratch, double *op_seconds) {
    const int64_t value_bytes = kv_half ? 2 : 4;
    for (int64_t l = 0; l < num_layers; l++) {
        const LlamaLayer *L = &layers[l];
        /* Rows go in order, so a row's earlier tokens are in the cache when it attends. */
        const int64_t pass = L->bf16_kernel == BF16_AMX ? LAYER_ROWS_AMX : LAYER_ROWS;
        for (int64_t m = 0; m < M; m += pass) {
            const int64_t rows = M - m < pass ? M - m : pass;
            if (llama_layer(L, x + m * L->hidden, rows, cos + m * L->rotary_dim, sin + m * L->rotary_dim,
                            k_cache + l * layer_stride * value_bytes, v_cache + l * layer_stride * value_bytes,
                            kv_half, slot_mapping + m, block_tables + m * max_blocks, max_blocks, context_lens + m,
                            block_size, scratch, op_seconds))
                return -1;
        }
    }
    return 0;
}
