/* y[M, N] = x[M, K] @ W[N, K]^T (+ bias) in int8: weights and activations rounded to int8 per group of 64 inputs,
 * AVX512-VNNI dot products, float32 sums across groups and float32 outputs (--quantization int8).
 *
 * Without AMX, a decode step at dozens of sequences and a prefill are bound by arithmetic, and vdpbf16ps is the
 * arithmetic: bf16_matmul.c runs at ~90% of its peak on the AVX512-BF16 EPYC. vpdpbusd does twice vdpbf16ps's
 * multiply-adds an instruction (16 lanes x 4 int8 products), so this kernel, with one int32 -> float32 scaling per
 * group of 64 inputs, runs products 1.6-1.7x faster there. The price is rounding: W to 255 levels per (output,
 * group) and x per (row, group) -- symmetric, max-abs scales -- which moved SmolLM2's perplexity by +0.25% in a
 * simulation (`lmserve bench quality --quantization int8` measures the kernel itself).
 *
 * vpdpbusd multiplies unsigned by signed bytes: x goes in as x_q + 128 (unsigned) and W as signed, so each group's
 * sum carries 128 * sum(W_q) of the group, which `offsets` (precomputed per output and group) takes back out.
 *
 * W comes packed (native.pack_int8): tiles of 16 output columns, each [K / 4][16][4] bytes (one 64-byte load: 4
 * inputs of 16 columns); scales and offsets [N / 16][K / 64][16] (float32, int32). A micro-tile keeps up to 4 rows
 * x 3 column tiles of sums in registers (int32 within a group, float32 across groups). Threads take (column group,
 * block of rows) items, a thread's consecutive items sharing a column group, as in bf16_matmul.c.
 * xq: scratch of int8_scratch_bytes(M, K) bytes: x's rows in bytes, then their group scales.
 * The kernel is compiled for AVX512-VNNI whatever the library's flags: callers check the CPU (native.py).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "bf16_kernels.h"
#include "simd.h"

#define GROUP 64     /* inputs per scale */
#define ROW_BLOCK 64 /* rows per work item */
#define MR 4         /* rows per micro-tile */
#define NR 3         /* 16-column tiles per micro-tile */

int64_t int8_scratch_bytes(int64_t M, int64_t K) { return M * K + 4 * M * (K / GROUP) + 64; }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

/* One row of x to bytes (x_q + 128) and its groups' scales (max |x| / 127; 0 for a zero group). */
static void quantize_row(const float *x, int64_t K, uint8_t *q, float *scales) {
    for (int64_t g = 0; g < K / GROUP; g++) {
        const float *xg = x + g * GROUP;
        __m512 amax = _mm512_setzero_ps();
        for (int i = 0; i < GROUP; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xg + i)));
        const float max = _mm512_reduce_max_ps(amax), scale = max / 127.0f;
        const __m512 inverse = _mm512_set1_ps(max > 0 ? 127.0f / max : 0.0f);
        for (int i = 0; i < GROUP; i += 16) {
            const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + i), inverse)),
                                               _mm512_set1_epi32(128));
            _mm_storeu_si128((__m128i *)(q + g * GROUP + i), _mm512_cvtepi32_epi8(v));
        }
        scales[g] = scale;
    }
}

/* rows x (cols * 16) outputs over all of K; `rows`, `cols` and `epilogue` are constants after inlining. Column tile
 * c's weights start c * tile_stride bytes into w, its scales and offsets c * meta_stride values on. */
static inline __attribute__((always_inline)) void micro_tile(const uint8_t *xq, const float *xs, int64_t K,
                                                             const int8_t *w, int64_t tile_stride, const float *ws,
                                                             const int32_t *wo, int64_t meta_stride, const int rows,
                                                             const int cols, const float *bias, float *y,
                                                             int64_t y_stride, const int epilogue) {
    const int64_t groups = K / GROUP;
    __m512 acc[MR][NR];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i sums[MR][NR];
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++) sums[r][c] = _mm512_setzero_si512();
        for (int64_t i = g * GROUP; i < (g + 1) * GROUP; i += 4) {
            __m512i wv[NR];
            for (int c = 0; c < cols; c++) wv[c] = _mm512_loadu_si512(w + c * tile_stride + i * 16);
            for (int r = 0; r < rows; r++) {
                int32_t four; /* x's 4 bytes at i, broadcast */
                memcpy(&four, xq + r * K + i, 4);
                const __m512i xv = _mm512_set1_epi32(four);
                for (int c = 0; c < cols; c++) sums[r][c] = _mm512_dpbusd_epi32(sums[r][c], xv, wv[c]);
            }
        }
        for (int c = 0; c < cols; c++) {
            const __m512 scale = _mm512_loadu_ps(ws + c * meta_stride + g * 16);
            const __m512i offset = _mm512_loadu_si512(wo + c * meta_stride + g * 16);
            for (int r = 0; r < rows; r++)
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sums[r][c], offset)),
                                            _mm512_mul_ps(scale, _mm512_set1_ps(xs[r * groups + g])), acc[r][c]);
        }
    }
    finish_tile16(acc[0], NR, rows, cols, bias, y, y_stride, epilogue);
}

#define TILE_CASE(r, c, e) micro_tile(xq, xs, K, w, tile_stride, ws, wo, meta_stride, r, c, bias, y, y_stride, e)
#define TILE_ROWS(c, e)                                                                                              \
    switch (rows) {                                                                                                  \
    case 1: TILE_CASE(1, c, e); break;                                                                               \
    case 2: TILE_CASE(2, c, e); break;                                                                               \
    case 3: TILE_CASE(3, c, e); break;                                                                               \
    default: TILE_CASE(4, c, e); break;                                                                              \
    }

static void tile(const uint8_t *xq, const float *xs, int64_t K, const int8_t *w, int64_t tile_stride, const float *ws,
                 const int32_t *wo, int64_t meta_stride, int rows, int cols, const float *bias, float *y,
                 int64_t y_stride, int epilogue) {
    if (epilogue == SILU_MUL) {
        TILE_ROWS(2, SILU_MUL)
    } else if (cols == 3) {
        TILE_ROWS(3, epilogue)
    } else if (cols == 2) {
        TILE_ROWS(2, epilogue)
    } else {
        TILE_ROWS(1, epilogue)
    }
}

#pragma GCC pop_options

/* Returns 0, or -1 when N is not a multiple of 16 (32 for SILU_MUL), K not of 64, or SILU_MUL comes with a bias.
 * epilogue: STORE, ACCUMULATE or SILU_MUL (bf16_kernels.h; SILU_MUL: W is [gate | up], y is N / 2 wide). */
int int8_matmul(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scales, const int32_t *offsets,
                int64_t N, const float *bias, float *y, int64_t y_stride, uint8_t *xq, int epilogue) {
    const int silu = epilogue == SILU_MUL;
    if (N % (silu ? 32 : 16) != 0 || K % GROUP != 0 || (silu && bias)) return -1;
    const int64_t groups = K / GROUP, tiles = silu ? N / 32 : N / 16, per_group = silu ? 1 : NR;
    const int64_t tile_stride = silu ? tiles * K * 16 : K * 16, meta_stride = silu ? tiles * groups * 16 : groups * 16;
    const int64_t column_groups = (tiles + per_group - 1) / per_group, row_blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
    float *xs = (float *)(xq + (M * K + 63) / 64 * 64);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, xq + m * K, xs + m * groups);
#pragma omp for schedule(guided)
        for (int64_t item = 0; item < column_groups * row_blocks; item++) {
            const int64_t group = item / row_blocks, first = item % row_blocks * ROW_BLOCK;
            const int64_t last = first + ROW_BLOCK < M ? first + ROW_BLOCK : M, tile0 = group * per_group;
            const int cols = silu ? 2 : tiles - tile0 < per_group ? (int)(tiles - tile0) : (int)per_group;
            for (int64_t m = first; m < last; m += MR)
                tile(xq + m * K, xs + m * groups, K, w + tile0 * K * 16, tile_stride, scales + tile0 * groups * 16,
                     offsets + tile0 * groups * 16, meta_stride, last - m < MR ? (int)(last - m) : MR, cols,
                     bias ? bias + tile0 * 16 : NULL, y + m * y_stride + tile0 * 16, y_stride, epilogue);
        }
    }
    return 0;
}
