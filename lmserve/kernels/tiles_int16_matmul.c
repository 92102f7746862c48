/* y[M, N] = x[M, K] @ W[N, K]^T with AVX2 (and AVX512-VNNI where the CPU has it, below): W's GGUF Q4_0 / Q4_1 /
 * Q8_0 blocks regrouped eight output columns at a time, x rounded to int16 per block of 32 as quant_matmul.c
 * rounds it (the default path: a product within ~1e-4 of float32's, by norm, on SmolLM2's layers).
 *
 * quant_matmul.c keeps a weight row's blocks together, so each block of each (row, output) pair needs its own
 * unpacking, conversion and FMA. Here a vector's lanes are eight outputs (as in q4_int8_matmul.c): one 16-byte load,
 * widened to int16, holds two inputs x eight outputs of weights -- of 4-bit ones twice (low and high nibbles) --
 * each a madd against two int16 inputs broadcast (16 multiplies per instruction, int32 sums: at most 16 x 2 x 128
 * x 32767 within a block), and one conversion and one or two FMAs finish a block for eight outputs. The unpacking
 * serves ROWS rows of x. On SmolLM2's shapes (AVX2 EPYC, benchmarks/linear_crossover.py) 1.2-1.5x quant_matmul.c's
 * speed from 1 to 1024 rows for Q4_1 (against torch's float32 GEMM faster up to 64 rows and about even at
 * 256-1024), 1.2-1.7x for the LM head's Q8_0 (64 rows: 36 -> 23 ms, float32 42).
 *
 * With AVX512-VNNI, two neighbouring column groups share a 512-bit vector (the two 16-byte loads widened together)
 * and each madd + add is one vpdpwssd: the same int32 sums, so the same results to the bit; on a Xeon with
 * AVX512-VNNI (no BF16) a 64-sequence decode step's gate/up 35.0 -> 21.8 ms and LM head 18.8 -> 11.4 ms
 * (benchmarks/step_profile.py --batch 64, docs/benchmarks-vnni.md).
 * 512-bit madds and adds without VNNI gained only about a quarter of that (a probe), so AVX512BW alone keeps AVX2.
 *
 * Layout (block_tiles.pack_block_tiles, 16-bit inputs): Q4 quants uint8 [N / 8][K / 32][8][16], byte 2c + e of
 * load v holding column c's GGUF quant byte 2v + e (low nibble: input 2v + e of the block, high nibble: input 16 +
 * 2v + e); Q8_0 quants [N / 8][K / 32][16][16], byte 2c + e of load v holding column c's quant 2v + e (input 2v + e);
 * scales d and (Q4) mins m float32 [N / 8][K / 32][8], as for int8 inputs.
 *
 * scratch: int16_tiles_scratch_bytes(M, K) bytes.  y: float32 [M, N].
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16_kernels.h"
#include "simd.h"

#define QK 32
#define COLS 8
#define ROWS 5     /* rows of x per pass over a column group's blocks: 5 int32 and 5 float sums stay in registers */
#define CHUNK 60   /* rows of x (in ROWS) whose int16 copy stays in L2 while every column group passes over them */

void quantize_int16(const float *x, int64_t count, int16_t *xq, float *xscale, float *xsum);

static inline __m256i broadcast2(const int16_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Column group [8g, 8g + 8) against `rows` (1..ROWS) rows of x; `rows` and `q8` (Q8_0 weights, no mins) are
 * constants after inlining. */
static inline __attribute__((always_inline)) void tile(const uint8_t *quants, const float *d, const float *m,
                                                      int64_t blocks, const int16_t *xq, const float *xscale,
                                                      const float *xsum, int64_t K, const int rows, const float *bias,
                                                      float *y, int64_t N, int epilogue, const int q8) {
    const __m256i nibble = _mm256_set1_epi16(0x0F);
    __m256 acc[ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m256i sums[ROWS];
        for (int r = 0; r < rows; r++) sums[r] = _mm256_setzero_si256();
        if (q8) {
            for (int v = 0; v < 16; v++) {
                const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(quants + b * 256 + 16 * v)));
                for (int r = 0; r < rows; r++)
                    sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(w, broadcast2(xq + r * K + b * QK + 2 * v)));
            }
        } else {
            for (int v = 0; v < 8; v++) {
                const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(quants + b * 128 + 16 * v)));
                const __m256i low = _mm256_and_si256(w, nibble), high = _mm256_srli_epi16(w, 4);
                for (int r = 0; r < rows; r++) {
                    const int16_t *x = xq + r * K + b * QK + 2 * v;
                    sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(low, broadcast2(x)));
                    sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(high, broadcast2(x + 16)));
                }
            }
        }
        const __m256 db = _mm256_loadu_ps(d + b * COLS);
        for (int r = 0; r < rows; r++) {
            const __m256 scale = _mm256_mul_ps(db, _mm256_broadcast_ss(xscale + r * blocks + b));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), scale, acc[r]);
            if (!q8) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(m + b * COLS), _mm256_broadcast_ss(xsum + r * blocks + b), acc[r]);
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
/* A 16-byte load of column group g's quants and the same of group g + 1's (`next` bytes on), widened to int16. */
static inline __attribute__((always_inline)) __m512i widen_pair(const uint8_t *a, int64_t next, const int q8) {
    const __m256i bytes = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                                  _mm_loadu_si128((const __m128i *)(a + next)), 1);
    return q8 ? _mm512_cvtepi8_epi16(bytes) : _mm512_cvtepu8_epi16(bytes);
}

static inline __attribute__((always_inline)) __m512i broadcast2_wide(const int16_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* Column groups g and g + 1 (16 outputs, contiguous in y) in one 512-bit lane set: the same arithmetic as `tile`,
 * with vpdpwssd for madd + add and two sums per row (low and high nibbles, or even and odd loads) so that its
 * latency is hidden. `next` is the distance to group g + 1's quants, `next_scales` to its scales and mins. */
static inline __attribute__((always_inline)) void tile_pair(const uint8_t *quants, int64_t next, const float *d,
                                                           const float *m, int64_t next_scales, int64_t blocks,
                                                           const int16_t *xq, const float *xscale, const float *xsum,
                                                           int64_t K, const int rows, const float *bias, float *y,
                                                           int64_t N, int epilogue, const int q8) {
    const __m512i nibble = _mm512_set1_epi16(0x0F);
    __m512 acc[ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m512i sums[ROWS], sums2[ROWS];
        for (int r = 0; r < rows; r++) sums[r] = sums2[r] = _mm512_setzero_si512();
        if (q8) {
            for (int v = 0; v < 16; v += 2) {
                const __m512i w = widen_pair(quants + b * 256 + 16 * v, next, 1);
                const __m512i w2 = widen_pair(quants + b * 256 + 16 * v + 16, next, 1);
                for (int r = 0; r < rows; r++) {
                    const int16_t *x = xq + r * K + b * QK + 2 * v;
                    sums[r] = _mm512_dpwssd_epi32(sums[r], w, broadcast2_wide(x));
                    sums2[r] = _mm512_dpwssd_epi32(sums2[r], w2, broadcast2_wide(x + 2));
                }
            }
        } else {
            for (int v = 0; v < 8; v++) {
                const __m512i w = widen_pair(quants + b * 128 + 16 * v, next, 0);
                const __m512i low = _mm512_and_si512(w, nibble), high = _mm512_srli_epi16(w, 4);
                for (int r = 0; r < rows; r++) {
                    const int16_t *x = xq + r * K + b * QK + 2 * v;
                    sums[r] = _mm512_dpwssd_epi32(sums[r], low, broadcast2_wide(x));
                    sums2[r] = _mm512_dpwssd_epi32(sums2[r], high, broadcast2_wide(x + 16));
                }
            }
        }
        const __m512 db = load_pair8(d + b * COLS, next_scales);
        for (int r = 0; r < rows; r++) {
            const __m512 scale = _mm512_mul_ps(db, _mm512_set1_ps(xscale[r * blocks + b]));
            const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(sums[r], sums2[r]));
            acc[r] = _mm512_fmadd_ps(sum, scale, acc[r]);
            if (!q8) acc[r] = _mm512_fmadd_ps(load_pair8(m + b * COLS, next_scales),
                                              _mm512_set1_ps(xsum[r * blocks + b]), acc[r]);
        }
    }
    store_rows16(acc, rows, bias, y, N, epilogue == ACCUMULATE);
}

/* tile_pair for 1..ROWS rows, each count a constant of its own copy; a call, not inlined, so that no code of the
 * AVX2 path is compiled for AVX-512. */
static __attribute__((noinline)) void tile_pair_rows(const uint8_t *quants, int64_t next, const float *d,
                                                     const float *m, int64_t blocks, const int16_t *xq,
                                                     const float *xscale, const float *xsum, int64_t K, int rows,
                                                     const float *bias, float *y, int64_t N, int epilogue, int q8) {
#define PAIR(n, q) tile_pair(quants, next, d, m, blocks * COLS, blocks, xq, xscale, xsum, K, n, bias, y, N, epilogue, q)
#define PAIRS(q) switch (rows) { case 1: PAIR(1, q); break; case 2: PAIR(2, q); break; case 3: PAIR(3, q); break; \
                                 case 4: PAIR(4, q); break; default: PAIR(5, q); break; }
    if (q8) PAIRS(1) else PAIRS(0)
#undef PAIRS
#undef PAIR
}
#pragma GCC pop_options

int64_t int16_tiles_scratch_bytes(int64_t M, int64_t K) { return 2 * M * K + 2 * 4 * M * (K / QK); }

/* Whether this file's and q4_int8_matmul.c's products take their tile_pair: the CPU's answer at first use;
 * block_tiles_vnni(0 or 1) sets it (1 only where the CPU has AVX512-VNNI), for tests that compare both; -1 only
 * asks. Returns the setting. */
static int wide = -1;

int block_tiles_vnni(int request) {
    if (request >= 0 || wide < 0) {
        __builtin_cpu_init();
        wide = request != 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
               && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
               && __builtin_cpu_supports("avx512vnni");
    }
    return wide;
}

static inline __attribute__((always_inline)) int matmul(const float *x, int64_t M, int64_t K, const uint8_t *quants,
                                                       const float *d, const float *m, int64_t N, const float *bias,
                                                       float *y, uint8_t *scratch, int epilogue, const int q8) {
    if (K % QK || N % COLS || (epilogue != STORE && epilogue != ACCUMULATE)) return -1;
    const int64_t blocks = K / QK, group_bytes = blocks * (q8 ? 256 : 128), groups = N / COLS;
    const int64_t step = block_tiles_vnni(-1) ? 2 : 1;
    float *xscale = (float *)scratch, *xsum = xscale + M * blocks;
    int16_t *xq = (int16_t *)(xsum + M * blocks);
    quantize_int16(x, M * blocks, xq, xscale, xsum);
    /* Chunks of near-equal size: 64 rows go as 35 + 29, not 60 + a 4-row pass that re-reads every weight. */
    const int64_t chunks = (M + CHUNK - 1) / CHUNK, per_chunk = (M + chunks - 1) / chunks;
    const int64_t chunk_rows = (per_chunk + ROWS - 1) / ROWS * ROWS;
    for (int64_t first = 0; first < M; first += chunk_rows) {
        const int64_t end = M < first + chunk_rows ? M : first + chunk_rows;
#pragma omp parallel for schedule(guided)
        for (int64_t item = 0; item < (groups + step - 1) / step; item++) {
            const int64_t g = item * step;
            const int pair = step == 2 && g + 1 < groups;  /* an odd last group goes alone */
            const uint8_t *q = quants + g * group_bytes;
            const float *dg = d + g * blocks * COLS, *mg = q8 ? NULL : m + g * blocks * COLS;
            const float *bg = bias ? bias + g * COLS : NULL;
            for (int64_t r = first; r < end; r += ROWS) {
                const int rows = end - r < ROWS ? end - r : ROWS;
                if (pair) {
                    tile_pair_rows(q, group_bytes, dg, mg, blocks, xq + r * K, xscale + r * blocks,
                                   xsum + r * blocks, K, rows, bg, y + r * N + g * COLS, N, epilogue, q8);
                    continue;
                }
#define TILE(n) tile(q, dg, mg, blocks, xq + r * K, xscale + r * blocks, xsum + r * blocks, K, n, bg, \
                     y + r * N + g * COLS, N, epilogue, q8)
                switch (rows) {
                case 1: TILE(1); break;
                case 2: TILE(2); break;
                case 3: TILE(3); break;
                case 4: TILE(4); break;
                default: TILE(5); break;
                }
#undef TILE
            }
        }
    }
    return 0;
}

/* Returns 0, or -1 for shapes it does not take (K not a multiple of 32, N not of 8, epilogue SILU_MUL). */
int q4_int16_matmul(const float *x, int64_t M, int64_t K, const uint8_t *quants, const float *d, const float *m,
                    int64_t N, const float *bias, float *y, uint8_t *scratch, int epilogue) {
    return matmul(x, M, K, quants, d, m, N, bias, y, scratch, epilogue, 0);
}

/* The same for Q8_0 tiles (m unused). */
int q8_int16_matmul(const float *x, int64_t M, int64_t K, const uint8_t *quants, const float *d, const float *m,
                    int64_t N, const float *bias, float *y, uint8_t *scratch, int epilogue) {
    return matmul(x, M, K, quants, d, m, N, bias, y, scratch, epilogue, 1);
}
