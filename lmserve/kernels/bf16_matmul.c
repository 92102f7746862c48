/* y[M, N] = x[M, K] @ W[N, K]^T (+ bias) with W in bf16 and x, y in float32.
 *
 * A decode step at a few dozen sequences, or a prefill, is bound by arithmetic, and a step at a few sequences by
 * reading the weights; bf16 weights halve the bytes of float32's. With AVX512-BF16, the dot product (vdpbf16ps: 16
 * lanes, each the sum of two bf16 products added to a float32) does twice the work of a float32 FMA: torch's bf16
 * GEMM reaches about 40% of that at 32 rows and rounds its output to bf16; this keeps ~3/4 of the peak from 8 rows
 * on, with float32 outputs (x is rounded to bf16 once per product, to nearest even). With AVX2 only, the weights
 * are widened to float32 in registers (a shift or a mask per 8 values) and multiplied by x in float32. With AMX,
 * products of 2 rows or more go to the tile unit (bf16_amx.c), on the same packed weights.
 *
 * W comes packed (native.pack_bf16): tiles of 16 output columns, each [K / 2][16][2] -- for every pair of inputs,
 * the two weights of each of the 16 columns side by side, so one 64-byte load feeds a dot product of 16 columns
 * against a broadcast pair of x. A micro-tile keeps its sums in registers over the whole of K: with AVX-512, up to
 * 8 rows x 3 column tiles (24 of the 32 vector registers; per pair of inputs, 3 weight loads and 8 broadcasts feed
 * 24 dot products); with AVX2, 4 rows x 1 tile (8 of 16 registers; more rows measured no faster). Threads take
 * (column group, block of rows) items; a thread's consecutive items share a column group, so its weights stay in
 * cache while rows stream past. AMX products of many rows split rows between threads instead (bf16_matmul).
 * The sums can also be added into y (a residual) or meet as silu(gate) * up (bf16_kernels.h's epilogues).
 *
 * x: float32 [M, K], rows contiguous.   w: bf16 [N / 16][K / 2][16][2].   bias: float32 [N] or NULL.
 * y: float32, row m at y + m * y_stride.   xb: scratch for x in bf16, bf16_scratch_values(M, K) (AVX-512, AMX).
 * The AVX-512 part is compiled for AVX512-BF16 whatever the library's flags: callers check the CPU (native.py).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "bf16_kernels.h"
#include "simd.h"

#define ROW_BLOCK 64 /* rows per work item */
#define ROW_CHUNK 256 /* rows of x kept in cache while every column group passes (a multiple of ROW_BLOCK) */
#define AMX_ROWS 32  /* rows per AMX micro-tile (bf16_amx.c) */
#define AMX_MIN_ROWS 2 /* one row: vdpbf16ps is as fast, and the tiles would be 15/16 padding */
#define AMX_ROW_SPLIT 128 /* rows from which each thread takes its own rows rather than its own columns */

void amx_begin(void);
void amx_end(void);
void amx_tile(const uint16_t *xb, int64_t K, const uint16_t *w, int64_t tile, int rows, int cols, const float *bias,
              float *y, int64_t y_stride, int epilogue);

/* ---- AVX2 + FMA ------------------------------------------------------------------------------------------------ */

#define MR_AVX2 4

/* Per pair of inputs: two loads (16 columns), widened by a shift (even input) and a mask (odd input), and two
 * broadcasts per row of x feed 4 FMAs per row. Loads, not FMAs, are the limit past 4 rows (two 32-byte loads a
 * cycle), so x's pair is broadcast once for both halves of the tile. */
static inline __attribute__((always_inline)) void micro_tile_avx2(const float *x, int64_t K, const uint16_t *w,
                                                                  const int rows, const float *bias, float *y,
                                                                  int64_t y_stride, int accumulate) {
    const __m256i high_half = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[MR_AVX2][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t p = 0; p < K / 2; p++) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + p * 32));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + p * 32 + 16));
        const __m256 even0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
        const __m256 odd0 = _mm256_castsi256_ps(_mm256_and_si256(w0, high_half));
        const __m256 even1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
        const __m256 odd1 = _mm256_castsi256_ps(_mm256_and_si256(w1, high_half));
        for (int r = 0; r < rows; r++) {
            const __m256 xe = _mm256_broadcast_ss(x + r * K + 2 * p), xo = _mm256_broadcast_ss(x + r * K + 2 * p + 1);
            acc[r][0] = _mm256_fmadd_ps(xe, even0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xe, even1, acc[r][1]);
            acc[r][0] = _mm256_fmadd_ps(xo, odd0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xo, odd1, acc[r][1]);
        }
    }
    for (int c = 0; c < 2; c++) {
        const __m256 b = bias ? _mm256_loadu_ps(bias + c * 8) : _mm256_setzero_ps();
        for (int r = 0; r < rows; r++) {
            float *out = y + r * y_stride + c * 8;
            const __m256 sums = _mm256_add_ps(acc[r][c], b);
            _mm256_storeu_ps(out, accumulate ? _mm256_add_ps(sums, _mm256_loadu_ps(out)) : sums);
        }
    }
}

static void tile_avx2(const float *x, int64_t K, const uint16_t *w, int rows, const float *bias, float *y,
                      int64_t y_stride, int accumulate) {
    switch (rows) {
    case 1: micro_tile_avx2(x, K, w, 1, bias, y, y_stride, accumulate); break;
    case 2: micro_tile_avx2(x, K, w, 2, bias, y, y_stride, accumulate); break;
    case 3: micro_tile_avx2(x, K, w, 3, bias, y, y_stride, accumulate); break;
    default: micro_tile_avx2(x, K, w, 4, bias, y, y_stride, accumulate); break;
    }
}

/* ---- AVX512-BF16 ----------------------------------------------------------------------------------------------- */

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

#define MR 8 /* rows of x per micro-tile */
#define NR 3 /* 16-column tiles per micro-tile */
/* float32 -> bf16, round to nearest even; NaN stays NaN (quiet). */
static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

static void convert_rows_avx512(const float *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
        _mm512_storeu_si512(out + i, (__m512i)pair);
    }
    for (; i < n; i++) out[i] = to_bf16(x[i]);
}

/* rows x (cols * 16) outputs over all of K; `rows` and `cols` are constants after inlining. Column tile c starts
 * c * tile values into w. SILU_MUL: cols is 2 (a gate tile and its up tile), y 16 wide. */
static inline __attribute__((always_inline)) void micro_tile(const int32_t *xpairs, int64_t pairs,
                                                             const uint16_t *w, int64_t tile, const int rows,
                                                             const int cols, const float *bias, float *y,
                                                             int64_t y_stride, int epilogue) {
    __m512 acc[MR][NR];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh wv[NR];
        for (int c = 0; c < cols; c++) wv[c] = (__m512bh)_mm512_loadu_si512(w + c * tile + p * 32);
        for (int r = 0; r < rows; r++) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(xpairs[r * pairs + p]);
            for (int c = 0; c < cols; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
        }
    }
    finish_tile16(acc[0], NR, rows, cols, bias, y, y_stride, epilogue);
}

#define TILE_CASE(r, c) micro_tile(xpairs, pairs, w, tile, r, c, bias, y, y_stride, epilogue)
#define TILE_ROWS(c)                                                                                                 \
    switch (rows) {                                                                                                  \
    case 1: TILE_CASE(1, c); break;                                                                                  \
    case 2: TILE_CASE(2, c); break;                                                                                  \
    case 3: TILE_CASE(3, c); break;                                                                                  \
    case 4: TILE_CASE(4, c); break;                                                                                  \
    case 5: TILE_CASE(5, c); break;                                                                                  \
    case 6: TILE_CASE(6, c); break;                                                                                  \
    case 7: TILE_CASE(7, c); break;                                                                                  \
    default: TILE_CASE(8, c); break;                                                                                 \
    }

static void tile_avx512(const int32_t *xpairs, int64_t pairs, const uint16_t *w, int64_t tile, int rows, int cols,
                        const float *bias, float *y, int64_t y_stride, int epilogue) {
    if (cols == 3) {
        TILE_ROWS(3)
    } else if (cols == 2) {
        TILE_ROWS(2)
    } else {
        TILE_ROWS(1)
    }
}

#pragma GCC pop_options

/* Values of bf16 scratch (xb) a product of M rows of K inputs needs: AMX reads x in tiles of 32 rows. */
int64_t bf16_scratch_values(int64_t M, int64_t K) { return (M + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS * K; }

/* One product's shapes and operands, and how it is cut into column groups. */
typedef struct {
    const float *x;
    int64_t K, pairs, tiles, per_group, tile_stride, micro_rows;
    const uint16_t *w, *xb;
    const float *bias;
    float *y;
    int64_t y_stride;
    int amx, dot_product, silu, epilogue;
} Product;

/* Rows [first, last) of column group `group` (with SILU_MUL, gate tile `group` and its up tile). */
static void group_rows(const Product *p, int64_t group, int64_t first, int64_t last) {
    const int cols = p->silu ? 2 : p->tiles - group * p->per_group < p->per_group
                                   ? (int)(p->tiles - group * p->per_group) : (int)p->per_group;
    const uint16_t *wg = p->w + group * p->per_group * p->pairs * 32;
    const float *bg = p->bias ? p->bias + group * p->per_group * 16 : NULL;
    float *yg = p->y + group * p->per_group * 16;
    for (int64_t m = first; m < last; m += p->micro_rows) {
        const int rows = last - m < p->micro_rows ? (int)(last - m) : (int)p->micro_rows;
        if (p->amx)
            amx_tile(p->xb + m * p->K, p->K, wg, p->tile_stride, rows, cols, bg, yg + m * p->y_stride, p->y_stride,
                     p->epilogue);
        else if (p->dot_product)
            tile_avx512((const int32_t *)p->xb + m * p->pairs, p->pairs, wg, p->tile_stride, rows, cols, bg,
                        yg + m * p->y_stride, p->y_stride, p->epilogue);
        else
            tile_avx2(p->x + m * p->K, p->K, wg, rows, bg, yg + m * p->y_stride, p->y_stride,
                      p->epilogue == ACCUMULATE);
    }
}

/* Returns 0, or -1 when N is not a multiple of 16 (32 for SILU_MUL) or K is odd, or SILU_MUL is asked of the AVX2
 * kernel or with a bias. kernel: BF16_AVX2, BF16_AVX512 or BF16_AMX (the caller has checked the CPU, and for AMX
 * called amx_enable). epilogue: STORE, ACCUMULATE or SILU_MUL (bf16_kernels.h). */
int bf16_matmul(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias, float *y,
                int64_t y_stride, uint16_t *xb, int kernel, int epilogue) {
    const int silu = epilogue == SILU_MUL;
    if (N % (silu ? 32 : 16) != 0 || K % 2 != 0 || (silu && (kernel == BF16_AVX2 || bias))) return -1;
    const int amx = kernel == BF16_AMX && M >= AMX_MIN_ROWS && K % 32 == 0, dot_product = kernel != BF16_AVX2;
    /* A group of column tiles; with SILU_MUL, a gate tile (its up tile `tile_stride` on), 16 outputs wide. */
    const int64_t pairs = K / 2, tiles = silu ? N / 32 : N / 16, per_group = silu ? 1 : amx ? 2 : dot_product ? NR : 1;
    const Product p = {x, K, pairs, tiles, per_group, silu ? tiles * pairs * 32 : pairs * 32,
                       amx ? AMX_ROWS : dot_product ? MR : MR_AVX2, w, xb, bias, y, y_stride, amx, dot_product, silu,
                       epilogue};
    const int64_t groups = (tiles + per_group - 1) / per_group, row_blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
    if (amx && M >= AMX_ROW_SPLIT) {
        /* Each thread its own rows through every column group: rows stay with the core that wrote them (the C
         * stack's row-wise ops share rows out the same way), where splitting columns had each core read the
         * other's half of x; each core reads all the weights, which a few hundred rows amortize. */
#pragma omp parallel
        {
            const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num(), blocks = (M + 31) / 32;
            const int64_t first = blocks * t / threads * 32, end = blocks * (t + 1) / threads * 32;
            const int64_t last = end < M ? end : M;
            for (int64_t m = first; m < last; m++) convert_rows_avx512(x + m * K, K, xb + m * K);
            amx_begin();
            for (int64_t group = 0; group < groups; group++) group_rows(&p, group, first, last);
            amx_end();
        }
        return 0;
    }
#pragma omp parallel
    {
        if (dot_product) {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) convert_rows_avx512(x + m * K, K, xb + m * K);
        }
        if (amx) amx_begin();
#pragma omp for schedule(guided)
        for (int64_t item = 0; item < groups * row_blocks; item++) {
            /* Items run chunk by chunk of rows (each chunk through every column group), so a chunk of x stays in
             * L2 while the weights stream past, rather than all of x streaming past each column group. */
            const int64_t chunk_blocks = ROW_CHUNK / ROW_BLOCK, chunk = item / (groups * chunk_blocks);
            const int64_t in_chunk = item % (groups * chunk_blocks);
            const int64_t blocks_here = row_blocks - chunk * chunk_blocks < chunk_blocks
                                        ? row_blocks - chunk * chunk_blocks : chunk_blocks;
            const int64_t first_row = (chunk * chunk_blocks + in_chunk % blocks_here) * ROW_BLOCK;
            group_rows(&p, in_chunk / blocks_here, first_row, first_row + ROW_BLOCK < M ? first_row + ROW_BLOCK : M);
        }
        if (amx) amx_end();
    }
    return 0;
}
