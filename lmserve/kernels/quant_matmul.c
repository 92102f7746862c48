/* y[M, N] = x[M, K] @ W[N, K]^T for a few rows of x, with W kept in GGUF's quantized blocks (Q4_0, Q4_1, Q8_0).
 *
 * Decoding a few sequences is bound by reading weights: a Q4_1 block holds 32 weights in 20 bytes instead of 128
 * in float32. Expanding every block to floats costs more than reading it, so x is quantized too, per block of 32,
 * to int16 with a float scale, and each block product is an integer dot product (madd). int16 keeps the rounding
 * of x near 1e-5 relative -- far below llama.cpp's int8 activations, so results stay within float noise of a
 * float32 product of the same weights. One expanded weight block serves up to ROWS rows of x. Threads split the
 * output columns; the OpenMP runtime is the one torch already loaded (same soname), so they never compete.
 *
 * x:  float32 [M, K], rows contiguous.     w: N rows of K / 32 blocks, GGUF block layout, rows contiguous.
 * xq: int16 scratch [M, K]; xscale, xsum: float32 scratch [M, K / 32].    y: float32 [M, N].
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK 32
#define ROWS 8 /* dot_tile's cases cover 1..ROWS */

enum { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 }; /* ggml's type numbers */

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline int block_bytes(int qtype) { return qtype == Q4_0 ? 18 : qtype == Q4_1 ? 20 : 34; }

static inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One block of x to int16: q = round(x / scale), scale = max|x| / 32767; also the plain float sum of the block. */
static void quantize_block(const float *x, int16_t *q, float *scale, float *sum) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256 v[4], amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
        total = _mm256_add_ps(total, v[i]);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float d = _mm_cvtss_f32(m) / 32767.0f;
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

/* Weight block as two vectors of 16 int16 (elements 0..15, 16..31), its scale d and offset m: w = d * q + m. */
static inline void load_block(int qtype, const uint8_t *block, __m256i w[2], float *d, float *m) {
    *d = half_to_float(block);
    if (qtype == Q8_0) {
        *m = 0.0f;
        w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(block + 2)));
        w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(block + 18)));
        return;
    }
    *m = qtype == Q4_1 ? half_to_float(block + 2) : -8.0f * *d;
    const __m128i raw = _mm_loadu_si128((const __m128i *)(block + (qtype == Q4_1 ? 4 : 2)));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    w[0] = _mm256_cvtepu8_epi16(_mm_and_si128(raw, low4));
    w[1] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low4));
}

/* One weight block against `rows` quantized rows of x, accumulated into acc and offset. */
static inline __attribute__((always_inline)) void block_dot(int qtype, const uint8_t *block, const int16_t *xq,
                                                            const float *xscale, const float *xsum, int64_t K,
                                                            int64_t blocks, int64_t b, const int rows, __m256 *acc,
                                                            float *offset) {
    float d, m;
    __m256i w[2];
    load_block(qtype, block, w, &d, &m);
    for (int r = 0; r < rows; r++) {
        const int16_t *x = xq + r * K + b * QK;
        const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(w[0], _mm256_loadu_si256((const __m256i *)x)),
                                             _mm256_madd_epi16(w[1], _mm256_loadu_si256((const __m256i *)(x + 16))));
        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xscale[r * blocks + b]), _mm256_cvtepi32_ps(dot), acc[r]);
        offset[r] += m * xsum[r * blocks + b];
    }
}

/* `rows` (1..ROWS) rows of x against one weight row; `rows` is a constant after inlining, so the accumulators
 * stay in registers. */
static inline __attribute__((always_inline)) void dot_rows(int qtype, const uint8_t *wrow, int64_t blocks,
                                                           const int16_t *xq, const float *xscale, const float *xsum,
                                                           int64_t K, const int rows, float *out, int64_t stride) {
    const int bytes = block_bytes(qtype);
    __m256 acc[ROWS];
    float offset[ROWS];
    for (int r = 0; r < rows; r++) {
        acc[r] = _mm256_setzero_ps();
        offset[r] = 0.0f;
    }
    for (int64_t b = 0; b < blocks; b++)
        block_dot(qtype, wrow + b * bytes, xq, xscale, xsum, K, blocks, b, rows, acc, offset);
    for (int r = 0; r < rows; r++) out[r * stride] = horizontal_sum(acc[r]) + offset[r];
}

static void dot_tile(int qtype, const uint8_t *wrow, int64_t blocks, const int16_t *xq, const float *xscale,
                     const float *xsum, int64_t K, int rows, float *out, int64_t stride) {
#define DOT_ROWS(n) dot_rows(qtype, wrow, blocks, xq, xscale, xsum, K, n, out, stride)
    switch (rows) {
    case 1: DOT_ROWS(1); break;
    case 2: DOT_ROWS(2); break;
    case 3: DOT_ROWS(3); break;
    case 4: DOT_ROWS(4); break;
    case 5: DOT_ROWS(5); break;
    case 6: DOT_ROWS(6); break;
    case 7: DOT_ROWS(7); break;
    default: DOT_ROWS(8); break;
    }
#undef DOT_ROWS
}

/* Returns 0 on success, -1 for an unsupported type or a K that is not a multiple of 32. */
int quant_matmul(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y,
                 int16_t *xq, float *xscale, float *xsum) {
    if ((qtype != Q4_0 && qtype != Q4_1 && qtype != Q8_0) || K % QK != 0) return -1;
    const int64_t blocks = K / QK;
    const int64_t row_bytes = blocks * block_bytes(qtype);
    for (int64_t i = 0; i < M * blocks; i++) quantize_block(x + i * QK, xq + i * QK, xscale + i, xsum + i);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m += ROWS) {
            const int rows = M - m < ROWS ? (int)(M - m) : ROWS;
            dot_tile(qtype, w + n * row_bytes, blocks, xq + m * K, xscale + m * blocks, xsum + m * blocks, K, rows,
                     y + m * N + n, N);
        }
    }
    return 0;
}
