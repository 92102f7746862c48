/* y[M, N] = x[M, K] @ W[N, K]^T for many rows of x with AVX2 only: W's GGUF Q4_0 / Q4_1 blocks regrouped eight
 * output columns at a time, x rounded to int8 per block of 32 (as llama.cpp rounds its activations to Q8).
 *
 * quant_matmul.c keeps a weight row's blocks together, so a vector's lanes are one output's partial sums: each
 * block of each (row, output) pair then needs its own conversion and FMA, and its int16 products do 16 multiplies
 * per instruction. Here a vector's lanes are eight outputs: one 32-byte load holds four inputs x eight outputs of
 * 4-bit weights twice (low and high nibbles), maddubs multiplies each half by four int8 inputs broadcast (32
 * multiplies per instruction), a block's eight products add up in int16 (at most 8 x 2 x 15 x 127 = 30480: none
 * saturates), and one madd, one conversion and two FMAs finish the block for eight outputs.
 *
 * Layout (block_tiles.pack_block_tiles): quants uint8 [N / 8][K / 32][4][32], byte 4c + i of load j holding column c's
 * GGUF quant byte 4j + i (low nibble: input 4j + i of the block, high nibble: input 16 + 4j + i); scales d and mins
 * m float32 [N / 8][K / 32][8] (Q4_0 is Q4_1 with m = -8 d). A block adds d * xscale * (q . xq) + m * xsum, xsum
 * being xscale * sum(xq): the product of the rounded x by the dequantized weight.
 *
 * With AVX512-VNNI (block_tiles_vnni, tiles_int16_matmul.c), two neighbouring column groups share a 512-bit vector
 * and vpdpbusd takes the place of maddubs + add + madd, summing in int32: the same sums, so the same results.
 *
 * xq: int8 scratch [M, K]; xscale, xsum: float32 scratch [M, K / 32].  y: float32 [M, N].
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16_kernels.h"
#include "simd.h"

#define QK 32
#define COLS 8
#define ROWS 6 /* rows of x per pass over a column group's blocks: 6 float and 6 int16 sums stay in registers */

/* One block of x to int8: q = round(x / scale), scale = max|x| / 127; also the sum of the rounded block, scale *
 * sum(q). That sum, not x's own, goes with the mins: a weight's m and its d * q then see the same rounded x, and
 * their rounding errors cancel as in the product of x rounded by the dequantized weight (with x's own sum, the
 * errors grow with q's mean, ~7.5 steps, instead of its spread: twice the error on SmolLM2's layers). */
static void quantize_block8(const float *x, int8_t *q, float *scale, float *sum) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256 v[4], amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
    }
    const float d = horizontal_max(amax) / 127.0f;
    const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    __m256i i32[4];
    for (int i = 0; i < 4; i++) {
        i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)); /* nearest, ties to even */
        total = _mm256_add_ps(total, _mm256_cvtepi32_ps(i32[i]));
    }
    /* packs interleaves 128-bit lanes: after both packs the dwords are in order 0 2 4 6 1 3 5 7 */
    const __m256i words = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    *scale = d;
    *sum = d * horizontal_sum(total);
}

static inline __m256i broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Column group [8g, 8g + 8) against `rows` (1..ROWS, a constant after inlining) rows of x. */
static inline __attribute__((always_inline)) void tile(const uint8_t *quants, const float *d, const float *m,
                                                      int64_t blocks, const int8_t *xq, const float *xscale,
                                                      const float *xsum, int64_t K, const int rows, const float *bias,
                                                      float *y, int64_t N, int epilogue) {
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m256i sums[ROWS];
        for (int r = 0; r < rows; r++) sums[r] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(quants + b * 128 + 32 * j));
            const __m256i low = _mm256_and_si256(w, nibble);
            for (int r = 0; r < rows; r++)
                sums[r] = _mm256_add_epi16(sums[r], _mm256_maddubs_epi16(low, broadcast4(xq + r * K + b * QK + 4 * j)));
            const __m256i high = _mm256_and_si256(_mm256_srli_epi16(w, 4), nibble);
            for (int r = 0; r < rows; r++)
                sums[r] = _mm256_add_epi16(sums[r],
                                           _mm256_maddubs_epi16(high, broadcast4(xq + r * K + b * QK + 16 + 4 * j)));
        }
        const __m256 db = _mm256_loadu_ps(d + b * COLS), mb = _mm256_loadu_ps(m + b * COLS);
        for (int r = 0; r < rows; r++) {
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums[r], ones));
            acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(db, _mm256_broadcast_ss(xscale + r * blocks + b)), acc[r]);
            acc[r] = _mm256_fmadd_ps(mb, _mm256_broadcast_ss(xsum + r * blocks + b), acc[r]);
        }
    }
    const __m256 add = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    for (int r = 0; r < rows; r++) {
        __m256 out = _mm256_add_ps(acc[r], add);
        if (epilogue == ACCUMULATE) out = _mm256_add_ps(out, _mm256_loadu_ps(y + r * N));
        _mm256_storeu_ps(y + r * N, out);
    }
}


#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
/* Column groups g and g + 1 (16 outputs, contiguous in y; group g + 1's quants `next` bytes on, its scales and mins
 * `next_scales` floats on) against `rows` rows of x: `tile`'s arithmetic, two int32 sums per row (low and high
 * nibbles) so that vpdpbusd's latency is hidden. */
static inline __attribute__((always_inline)) void tile_pair(const uint8_t *quants, int64_t next, const float *d,
                                                           const float *m, int64_t next_scales, int64_t blocks,
                                                           const int8_t *xq, const float *xscale, const float *xsum,
                                                           int64_t K, const int rows, const float *bias, float *y,
                                                           int64_t N, int epilogue) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512 acc[ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m512i sums[ROWS], sums2[ROWS];
        for (int r = 0; r < rows; r++) sums[r] = sums2[r] = _mm512_setzero_si512();
        for (int j = 0; j < 4; j++) {
            const uint8_t *at = quants + b * 128 + 32 * j;
            const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)at)),
                                                 _mm256_loadu_si256((const __m256i *)(at + next)), 1);
            const __m512i low = _mm512_and_si512(w, nibble);
            const __m512i high = _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble);
            for (int r = 0; r < rows; r++) {
                int32_t lo, hi;
                memcpy(&lo, xq + r * K + b * QK + 4 * j, 4);
                memcpy(&hi, xq + r * K + b * QK + 16 + 4 * j, 4);
                sums[r] = _mm512_dpbusd_epi32(sums[r], low, _mm512_set1_epi32(lo));
                sums2[r] = _mm512_dpbusd_epi32(sums2[r], high, _mm512_set1_epi32(hi));
            }
        }
        const __m512 db = load_pair8(d + b * COLS, next_scales), mb = load_pair8(m + b * COLS, next_scales);
        for (int r = 0; r < rows; r++) {
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(sums[r], sums2[r]));
            acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(db, _mm512_set1_ps(xscale[r * blocks + b])), acc[r]);
            acc[r] = _mm512_fmadd_ps(mb, _mm512_set1_ps(xsum[r * blocks + b]), acc[r]);
        }
    }
    store_rows16(acc, rows, bias, y, N, epilogue == ACCUMULATE);
}

/* tile_pair for 1..ROWS rows (each count a constant of its own copy); called, not inlined, so that no code of the
 * AVX2 path is compiled for AVX-512. */
static __attribute__((noinline)) void tile_pair_rows(const uint8_t *quants, int64_t next, const float *d,
                                                     const float *m, int64_t blocks, const int8_t *xq,
                                                     const float *xscale, const float *xsum, int64_t K, int rows,
                                                     const float *bias, float *y, int64_t N, int epilogue) {
#define PAIR(n) tile_pair(quants, next, d, m, blocks * COLS, blocks, xq, xscale, xsum, K, n, bias, y, N, epilogue)
    switch (rows) {
    case 1: PAIR(1); break;
    case 2: PAIR(2); break;
    case 3: PAIR(3); break;
    case 4: PAIR(4); break;
    case 5: PAIR(5); break;
    default: PAIR(6); break;
    }
#undef PAIR
}
#pragma GCC pop_options

int block_tiles_vnni(int request);

int64_t q4_int8_scratch_bytes(int64_t M, int64_t K) { return M * K + 2 * 4 * M * (K / QK); }

/* Returns 0, or -1 for shapes it does not take (K not a multiple of 32, N not of 8, epilogue SILU_MUL). */
int q4_int8_matmul(const float *x, int64_t M, int64_t K, const uint8_t *quants, const float *d, const float *m,
                   int64_t N, const float *bias, float *y, uint8_t *scratch, int epilogue) {
    if (K % QK || N % COLS || (epilogue != STORE && epilogue != ACCUMULATE)) return -1;
    const int64_t blocks = K / QK;
    int8_t *xq = (int8_t *)scratch;
    float *xscale = (float *)(scratch + M * K), *xsum = xscale + M * blocks;
#pragma omp parallel for if (M * blocks >= 64)
    for (int64_t i = 0; i < M * blocks; i++) quantize_block8(x + i * QK, xq + i * QK, xscale + i, xsum + i);
    const int64_t groups = N / COLS, step = block_tiles_vnni(-1) ? 2 : 1;
#pragma omp parallel for schedule(guided)
    for (int64_t item = 0; item < (groups + step - 1) / step; item++) {
        const int64_t g = item * step;
        const int pair = step == 2 && g + 1 < groups; /* an odd last group goes alone */
        const uint8_t *q = quants + g * blocks * 128;
        const float *dg = d + g * blocks * COLS, *mg = m + g * blocks * COLS, *bg = bias ? bias + g * COLS : NULL;
        for (int64_t r = 0; r < M; r += ROWS) {
            const int rows = M - r < ROWS ? M - r : ROWS;
            if (pair) {
                tile_pair_rows(q, blocks * 128, dg, mg, blocks, xq + r * K, xscale + r * blocks, xsum + r * blocks, K,
                               rows, bg, y + r * N + g * COLS, N, epilogue);
                continue;
            }
#define TILE(n) tile(q, dg, mg, blocks, xq + r * K, xscale + r * blocks, xsum + r * blocks, K, n, bg, \
                     y + r * N + g * COLS, N, epilogue)
            switch (rows) {
            case 1: TILE(1); break;
            case 2: TILE(2); break;
            case 3: TILE(3); break;
            case 4: TILE(4); break;
            case 5: TILE(5); break;
            default: TILE(6); break;
            }
#undef TILE
        }
    }
    return 0;
}
