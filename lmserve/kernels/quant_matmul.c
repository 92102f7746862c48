/* y[M, N] = x[M, K] @ W[N, K]^T for a few rows of x, with W kept in GGUF's quantized blocks (Q4_0, Q4_1, Q8_0).
 *
 * Decoding a few sequences is bound by reading weights: a Q4_1 block holds 32 weights in 20 bytes instead of 128
 * in float32. Expanding every block to floats costs more than reading it, so x is quantized too, per block of 32,
 * to int16 with a float scale, and each block product is an integer dot product (madd). int16 keeps the rounding
 * of x near 1e-5 relative -- far below llama.cpp's int8 activations, so results stay within float noise of a
 * float32 product of the same weights. One expanded weight block serves up to ROWS rows of x. Threads take the
 * output columns in shrinking chunks (guided), so a thread that loses its core for a while (to the server's event
 * loop, a client, the hypervisor) does not hold the product up; the OpenMP runtime is the one torch already
 * loaded (same soname), so the two never compete.
 *
 * Weight rows come in the kernels' layout (native.pack_blocks): GGUF's bytes regrouped per row as all f16 scales
 * d, then (Q4_1) all f16 offsets m, then all quants, so eight blocks' scales convert in one vector op.
 *
 * x:  float32 [M, K], rows contiguous.     w: N rows of K / 32 blocks, kernels' layout, rows contiguous.
 * xq: int16 scratch [M, K]; xscale, xsum: float32 scratch [M, K / 32].    y: float32 [M, N].
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define QK 32
#define ROWS 8 /* rows of x one pass over a weight row serves; dot_rows' cases cover 1..ROWS */

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 }; /* ggml's type numbers */
static inline int quant_bytes(int qtype) { return qtype == Q8_0 ? 32 : 16; }
static inline int block_bytes(int qtype) { return quant_bytes(qtype) + (qtype == Q4_1 ? 4 : 2); }
static inline int64_t header_bytes(int qtype, int64_t blocks) { return blocks * (qtype == Q4_1 ? 4 : 2); }

/* One block of x to int16: q = round(x / scale), scale = max|x| / 32767; also the plain float sum of the block. */
static void quantize_block(const float *x, int16_t *q, float *scale, float *sum) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256 v[4], amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
        total = _mm256_add_ps(total, v[i]);
    }
    const float d = horizontal_max(amax) / 32767.0f;
    const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    __m256i i32[4];
    for (int i = 0; i < 4; i++)
        i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT));
    for (int i = 0; i < 2; i++) { /* packs interleaves 128-bit lanes; the permute restores element order */
        __m256i packed = _mm256_packs_epi32(i32[2 * i], i32[2 * i + 1]);
        _mm256_storeu_si256((__m256i *)(q + 16 * i), _mm256_permute4x64_epi64(packed, 0xD8));
    }
    *scale = d;
    *sum = horizontal_sum(total);
}

/* `count` consecutive blocks of x (rows of x back to back) to int16 with their scales and sums; also for
 * tiles_int16_matmul.c, whose products keep this rounding. */
void quantize_int16(const float *x, int64_t count, int16_t *xq, float *xscale, float *xsum) {
#pragma omp parallel for if (count >= 256)
    for (int64_t i = 0; i < count; i++) quantize_block(x + i * QK, xq + i * QK, xscale + i, xsum + i);
}

#define MAX_BLOCKS 256 /* blocks of a row whose scales are prepared at once (K <= 8192 in one pass) */

/* A block's 32 quants as two vectors of 16 int16 (elements 0..15, 16..31). A Q4 byte i holds quants i (low
 * nibble) and i + 16 (high nibble); widened to 16 bits, the high one is a plain shift. */
static inline void load_quants(int qtype, const uint8_t *q, __m256i w[2]) {
    if (qtype == Q8_0) {
        w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
        w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
        return;
    }
    const __m256i wide = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)q));
    w[0] = _mm256_and_si256(wide, _mm256_set1_epi16(0x0F));
    w[1] = _mm256_srli_epi16(wide, 4);
}

static inline __m256i first_lanes(int count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* `count` (1..8) consecutive f16 values as floats, lanes past count 0. Reads 8 values: a row's scales and offsets
 * are followed by at least 16 bytes of its quants. */
static inline __m256 load_halves(const uint8_t *p, int count) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    return count == 8 ? v : _mm256_and_ps(v, _mm256_castsi256_ps(first_lanes(count)));
}

static inline __m256 load_floats(const float *p, int count) {
    return count == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_lanes(count));
}

/* Blocks [first, first + count) of `cols` weight rows against `rows` rows of x (cols * rows <= ROWS), added to
 * out[r * stride + c]. Each block adds d * xscale * (q . xq) + m * xsum. The scale products d * xscale go to a
 * table first and the offsets m * xsum are summed eight blocks per vector, so the block loop is integer products
 * and one FMA. A single row of x takes several weight rows at once: their sums are independent chains of FMAs
 * (one would wait on each FMA's latency) and share the loads of x. `qtype`, `cols` and `rows` are constants after
 * inlining, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dot_tile(const int qtype, const uint8_t *w, int64_t row_bytes,
                                                           int64_t blocks, int64_t first, int count,
                                                           const int16_t *xq, const float *xscale, const float *xsum,
                                                           int64_t K, const int cols, const int rows, float *out,
                                                           int64_t stride) {
    float dx[ROWS][MAX_BLOCKS];
    __m256 offset[ROWS], acc[ROWS];
    for (int c = 0; c < cols; c++) {
        const uint8_t *scales = w + c * row_bytes + 2 * first, *offsets = scales + 2 * blocks;
        for (int r = 0; r < rows; r++) offset[c * rows + r] = acc[c * rows + r] = _mm256_setzero_ps();
        for (int g = 0; g < count; g += 8) {
            const int n = count - g < 8 ? count - g : 8;
            const __m256 d = load_halves(scales + 2 * g, n);
            const __m256 m = qtype == Q4_1 ? load_halves(offsets + 2 * g, n) : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
            for (int r = 0; r < rows; r++) {
                const __m256 xs = load_floats(xscale + r * blocks + first + g, n);
                _mm256_storeu_ps(dx[c * rows + r] + g, _mm256_mul_ps(d, xs));
                if (qtype != Q8_0)
                    offset[c * rows + r] =
                        _mm256_fmadd_ps(m, load_floats(xsum + r * blocks + first + g, n), offset[c * rows + r]);
            }
        }
    }
    for (int b = 0; b < count; b++) {
        __m256i x[ROWS][2];
        for (int r = 0; r < rows; r++) {
            x[r][0] = _mm256_loadu_si256((const __m256i *)(xq + r * K + (first + b) * QK));
            x[r][1] = _mm256_loadu_si256((const __m256i *)(xq + r * K + (first + b) * QK + 16));
        }
        for (int c = 0; c < cols; c++) {
            __m256i q[2];
            load_quants(qtype, w + c * row_bytes + header_bytes(qtype, blocks) + (first + b) * quant_bytes(qtype), q);
            for (int r = 0; r < rows; r++) {
                const int i = c * rows + r;
                const __m256i dot =
                    _mm256_add_epi32(_mm256_madd_epi16(q[0], x[r][0]), _mm256_madd_epi16(q[1], x[r][1]));
                acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(&dx[i][b]), _mm256_cvtepi32_ps(dot), acc[i]);
            }
        }
    }
    for (int c = 0; c < cols; c++)
        for (int r = 0; r < rows; r++)
            out[r * stride + c] += horizontal_sum(_mm256_add_ps(acc[c * rows + r], offset[c * rows + r]));
}

/* Weight rows [n, n + 4) (fewer at the end) against rows [0, rows) of x: 4 x 1, 2 x 2 or 1 x rows tiles. */
#define COLS 4
static inline __attribute__((always_inline)) void dot_rows(const int qtype, const uint8_t *w, int64_t row_bytes,
                                                           int64_t N, int64_t blocks, const int16_t *xq,
                                                           const float *xscale, const float *xsum, int64_t K,
                                                           int rows, float *out, int64_t stride) {
    /* Weight rows four tiles ahead, from memory into L2 while these are computed (prefetches past the end are
     * harmless): a row's first loads are its scales, which all the rest waits on, and the hardware prefetcher
     * alone falls behind (a SmolLM2 decode step: 2x slower LM head without this). */
    for (int64_t offset = 0; N > COLS && offset < COLS * row_bytes; offset += 64)
        _mm_prefetch((const char *)w + 4 * COLS * row_bytes + offset, _MM_HINT_T1);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < COLS && c < N; c++) out[r * stride + c] = 0.0f;
    for (int64_t first = 0; first < blocks; first += MAX_BLOCKS) {
        const int count = blocks - first < MAX_BLOCKS ? (int)(blocks - first) : MAX_BLOCKS;
#define TILE(c, cols, rows) dot_tile(qtype, w + (c) * row_bytes, row_bytes, blocks, first, count, xq, xscale, xsum, \
                                     K, cols, rows, out + (c), stride)
        if (N >= COLS && rows == 1 && qtype != Q8_0) { /* Q8_0 rows are twice as long: one at a time streams better */
            TILE(0, 4, 1);
        } else if (N >= COLS && rows == 2) {
            TILE(0, 2, 2);
            TILE(2, 2, 2);
        } else {
            for (int c = 0; c < COLS && c < N; c++) switch (rows) {
                case 1: TILE(c, 1, 1); break;
                case 2: TILE(c, 1, 2); break;
                case 3: TILE(c, 1, 3); break;
                case 4: TILE(c, 1, 4); break;
                case 5: TILE(c, 1, 5); break;
                case 6: TILE(c, 1, 6); break;
                case 7: TILE(c, 1, 7); break;
                default: TILE(c, 1, 8); break;
                }
        }
#undef TILE
    }
}

#define DOT_ROWS(QTYPE)                                                                                              \
    static void dot_rows_##QTYPE(const uint8_t *w, int64_t row_bytes, int64_t N, int64_t blocks, const int16_t *xq, \
                                 const float *xscale, const float *xsum, int64_t K, int rows, float *out,           \
                                 int64_t stride) {                                                                   \
        dot_rows(QTYPE, w, row_bytes, N, blocks, xq, xscale, xsum, K, rows, out, stride);                            \
    }
DOT_ROWS(Q4_0)
DOT_ROWS(Q4_1)
DOT_ROWS(Q8_0)

typedef void (*DotRows)(const uint8_t *, int64_t, int64_t, int64_t, const int16_t *, const float *, const float *,
                        int64_t, int, float *, int64_t);

/* Returns 0 on success, -1 for an unsupported type or a K that is not a multiple of 32. */
int quant_matmul(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y,
                 int16_t *xq, float *xscale, float *xsum) {
    const DotRows tile = qtype == Q4_0 ? dot_rows_Q4_0 : qtype == Q4_1 ? dot_rows_Q4_1 : qtype == Q8_0 ? dot_rows_Q8_0
                                                                                                       : NULL;
    if (tile == NULL || K % QK != 0) return -1;
    const int64_t blocks = K / QK;
    const int64_t row_bytes = blocks * block_bytes(qtype);
    quantize_int16(x, M * blocks, xq, xscale, xsum);
#pragma omp parallel for schedule(guided)
    for (int64_t n = 0; n < N; n += COLS)
        for (int64_t m = 0; m < M; m += ROWS)
            tile(w + n * row_bytes, row_bytes, N - n, blocks, xq + m * K, xscale + m * blocks, xsum + m * blocks, K,
                 M - m < ROWS ? (int)(M - m) : ROWS, y + m * N + n, N);
    return 0;
}
