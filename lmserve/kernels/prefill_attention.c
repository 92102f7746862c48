/* Prefill attention in bf16: a run of query rows of one sequence (a prompt, or a chunk of one) against its paged
 * float16 K/V, sixteen rows at a time, on AMX tiles or with AVX512-BF16 dot products.
 *
 * Row by row (paged_attention.c), a 128-token prompt's attention took a fifth of a prefill step for 2% of its
 * arithmetic: each row re-reads its keys and multiplies in 8-lane vectors (a step of 8 such prompts: 64 ms of its
 * attention row by row, 20 ms on tiles; Xeon with AMX, 2 cores). Here the keys and values of one kv head are
 * converted to bf16 once per run, into the tile layouts (bf16_amx.c: B as [pairs][16 columns][2]), and a block of
 * 16 query rows meets them as two products: S = Q K^T, then O = P V after a float32 softmax of S in which each row
 * keeps only keys up to its own position. Without AMX, the same layouts feed vdpbf16ps (one 64-byte load: a pair
 * of dims of 16 keys, or a pair of keys of 16 dims) in micro-tiles of 4 rows x 4 column tiles. As with vLLM's bf16
 * attention, Q, K, P and V are rounded to bf16 and the sums kept in float32; the caller only sends runs from a
 * float16 cache (an exact float32 run stays exact).
 *
 * q, out: the run's rows, [n, H, D] at stride H * D.  table: the sequence's block table.  first_context: the first
 * row's context length (itself included); row i attends to first_context + i keys.  D: a multiple of 16.
 * scratch: bf16_run_scratch_floats(D, max_context) floats for the calling thread.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"


#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,f16c")

#define QB 16 /* query rows per block: a tile's rows */

static inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

int64_t bf16_run_scratch_floats(int64_t D, int64_t max_context) {
    const int64_t keys = round_up(max_context, 32), d32 = round_up(D, 32);
    /* bf16 K and V tiles, float32 scores, bf16 probabilities, bf16 queries, one float32 output tile */
    return keys * d32 / 2 + keys * D / 2 + QB * keys + QB * keys / 2 + QB * d32 / 2 + QB * 16;
}

static inline const uint16_t *cache_row(const void *cache, const int64_t *table, int64_t token, int64_t block_size,
                                        int64_t row_values, int64_t offset) {
    const int64_t slot = table[token / block_size] * block_size + token % block_size;
    return (const uint16_t *)cache + slot * row_values + offset;
}

/* Keys [from, to) (from a multiple of 32) into kt: per 16-key tile and 32-dim chunk, [16 dim pairs][16 keys][2]
 * (S = Q K^T's B); values into vt: per 32-key chunk and 16-dim tile, [16 key pairs][16 dims][2] (O = P V's B).
 * Keys past `to` up to the next 32 are zeros (their probabilities are zero, and zero times a stale value could be
 * NaN). */
static void pack_kv(const void *k_cache, const void *v_cache, const int64_t *table, int64_t from, int64_t to,
                    int64_t block_size, int64_t row_values, int64_t offset, int64_t D, uint16_t *kt, uint16_t *vt) {
    const int64_t d32 = round_up(D, 32);
    /* vt's pair interleave: lane 2i takes value i of the first key's 16, lane 2i + 1 value i of the second's */
    static const uint16_t interleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                            8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i pairs = _mm512_loadu_si512(interleave);
    for (int64_t chunk = from / 32; chunk * 32 < to; chunk++) {
        uint16_t key[32][128] __attribute__((aligned(64))), value[32][128] __attribute__((aligned(64)));
        for (int64_t n = 0; n < 32; n++) {
            const int64_t t = chunk * 32 + n;
            memset(key[n], 0, sizeof(key[n]));
            memset(value[n], 0, sizeof(value[n]));
            if (t >= to) continue;
            const uint16_t *k = cache_row(k_cache, table, t, block_size, row_values, offset);
            const uint16_t *v = cache_row(v_cache, table, t, block_size, row_values, offset);
            for (int64_t d = 0; d < D; d += 16) {
                const __m256bh kb = _mm512_cvtneps_pbh(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k + d))));
                const __m256bh vb = _mm512_cvtneps_pbh(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + d))));
                _mm256_store_si256((__m256i *)(key[n] + d), (__m256i)kb);
                _mm256_store_si256((__m256i *)(value[n] + d), (__m256i)vb);
            }
        }
        for (int64_t half = 0; half < 2; half++) /* K: each 16-key tile's words (dim pairs) transposed */
            for (int64_t c = 0; c < d32 / 32; c++) {
                uint32_t *tile = (uint32_t *)(kt + ((chunk * 2 + half) * (d32 / 32) + c) * 512);
                for (int64_t pair = 0; pair < 16; pair++)
                    for (int64_t n = 0; n < 16; n++)
                        tile[pair * 16 + n] = ((const uint32_t *)key[half * 16 + n])[c * 16 + pair];
            }
        for (int64_t j = 0; j < D / 16; j++) /* V: the two keys of a pair interleaved, 16 dims at a time */
            for (int64_t pair = 0; pair < 16; pair++) {
                const __m512i two = _mm512_inserti64x4(_mm512_castsi256_si512(
                    _mm256_load_si256((const __m256i *)(value[2 * pair] + j * 16))),
                    _mm256_load_si256((const __m256i *)(value[2 * pair + 1] + j * 16)), 1);
                _mm512_storeu_si512(vt + ((chunk * (D / 16) + j) * 16 + pair) * 32,
                                    _mm512_permutexvar_epi16(pairs, two));
            }
    }
}

/* Scaled scores s[0, keys) -> bf16 probabilities p[0, width) (zero past keys), unnormalized; returns their sum. */
static float softmax_row(const float *s, int64_t keys, int64_t width, float scale, uint16_t *p) {
    __m512 running = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < keys; t += 16) {
        const __mmask16 valid = keys - t >= 16 ? 0xFFFF : (1u << (keys - t)) - 1;
        running = _mm512_max_ps(running, _mm512_maskz_loadu_ps(valid, s + t));
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(running) * scale), sc = _mm512_set1_ps(scale);
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < width; t += 16) {
        const __mmask16 valid = keys - t >= 16 ? 0xFFFF : keys <= t ? 0 : (1u << (keys - t)) - 1;
        const __m512 e = _mm512_maskz_mov_ps(valid, exp_nonpositive16(_mm512_fmsub_ps(_mm512_loadu_ps(s + t), sc, m)));
        total = _mm512_add_ps(total, e);
        _mm256_storeu_si256((__m256i *)(p + t), (__m256i)_mm512_cvtneps_pbh(e));
    }
    return _mm512_reduce_add_ps(total);
}

/* S [16 rows][keys] (row stride `stride`) = Q K^T over `chunks` 32-dim chunks. Up to two chunks (head size 64),
 * Q stays in two tile registers and two 16-key tiles go at once, each operand in its own register, so a load never
 * waits for the product before it to let go of its register. */
static void scores_tiles(const uint16_t *qt, const uint16_t *kt, int64_t keys, int64_t chunks, float *s,
                         int64_t stride) {
    if (chunks > 2) {
        for (int64_t t = 0; t < keys; t += 16) {
            _tile_zero(0);
            for (int64_t c = 0; c < chunks; c++) {
                _tile_loadd(6, qt + c * QB * 32, 64);
                _tile_loadd(7, kt + ((t / 16) * chunks + c) * 512, 64);
                _tile_dpbf16ps(0, 6, 7);
            }
            _tile_stored(0, s + t, stride * 4);
        }
        return;
    }
    _tile_loadd(6, qt, 64);
    if (chunks == 2) _tile_loadd(7, qt + QB * 32, 64);
    for (int64_t t = 0; t < keys; t += 32) {
        const uint16_t *k = kt + (t / 16) * chunks * 512;
        const int second = t + 16 < keys;
        _tile_zero(0);
        _tile_zero(1);
        _tile_loadd(2, k, 64);
        if (chunks == 2) _tile_loadd(3, k + 512, 64);
        if (second) _tile_loadd(4, k + chunks * 512, 64);
        if (second && chunks == 2) _tile_loadd(5, k + chunks * 512 + 512, 64);
        _tile_dpbf16ps(0, 6, 2);
        if (chunks == 2) _tile_dpbf16ps(0, 7, 3);
        if (second) _tile_dpbf16ps(1, 6, 4);
        if (second && chunks == 2) _tile_dpbf16ps(1, 7, 5);
        _tile_stored(0, s + t, stride * 4);
        if (second) _tile_stored(1, s + t + 16, stride * 4);
    }
}

/* O = P V on tiles for one block of rows: out row r = inv_sum[r] * (p row r) V, up to 64 dims (4 tiles) at a time. */
static void values_tiles(const uint16_t *p, const uint16_t *vt, int64_t width, int64_t keys_max, int64_t D,
                         int64_t rows, const float *inv_sum, float *o, float *out, int64_t out_stride) {
    for (int64_t j0 = 0; j0 < D / 16; j0 += 4) {
        const int64_t tiles = D / 16 - j0 < 4 ? D / 16 - j0 : 4;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t c = 0; c < width / 32; c++) { /* each V tile in its own register: no load waits */
            _tile_loadd(4, p + c * 32, keys_max * 2);
            const uint16_t *v = vt + (c * (D / 16) + j0) * 512;
            _tile_loadd(5, v, 64);
            if (tiles > 1) _tile_loadd(6, v + 512, 64);
            if (tiles > 2) _tile_loadd(7, v + 1024, 64);
            _tile_dpbf16ps(0, 4, 5);
            if (tiles > 1) _tile_dpbf16ps(1, 4, 6);
            if (tiles > 2) _tile_dpbf16ps(2, 4, 7);
            if (tiles > 3) {
                _tile_loadd(5, v + 1536, 64);
                _tile_dpbf16ps(3, 4, 5);
            }
        }
        for (int64_t j = 0; j < tiles; j++) {
            switch (j) {
            case 0: _tile_stored(0, o, 64); break;
            case 1: _tile_stored(1, o, 64); break;
            case 2: _tile_stored(2, o, 64); break;
            default: _tile_stored(3, o, 64); break;
            }
            for (int64_t r = 0; r < rows; r++)
                _mm512_storeu_ps(out + r * out_stride + (j0 + j) * 16,
                                 _mm512_mul_ps(_mm512_loadu_ps(o + r * 16), _mm512_set1_ps(inv_sum[r])));
        }
    }
}

/* R x (C * 16) sums by vdpbf16ps (R, C <= 4, constants after inlining): out[r * out_stride + 16 * c + lane] =
 * scale[r] * sum over pairs p of a[r * a_stride + p] . B_c[p], where a holds pairs of bf16 as 32-bit words and B_c,
 * the c-th 16-column tile in the tile layout, keeps pair p at b + c * tile_stride + (p / 16) * chunk_stride +
 * (p % 16) * 32. pairs: a multiple of 16. scale: NULL for none. */
static inline __attribute__((always_inline)) void dot_tile(const uint32_t *a, int64_t a_stride, int64_t pairs,
                                                           const uint16_t *b, int64_t tile_stride,
                                                           int64_t chunk_stride, const int R, const int C,
                                                           const float *scale, float *out, int64_t out_stride) {
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t chunk = 0; chunk < pairs / 16; chunk++)
        for (int64_t p = 0; p < 16; p++) {
            const uint16_t *bp = b + chunk * chunk_stride + p * 32;
            __m512bh bv[4];
            for (int c = 0; c < C; c++) bv[c] = (__m512bh)_mm512_loadu_si512(bp + c * tile_stride);
            for (int r = 0; r < R; r++) {
                const __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[r * a_stride + chunk * 16 + p]);
                for (int c = 0; c < C; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av, bv[c]);
            }
        }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            _mm512_storeu_ps(out + r * out_stride + c * 16,
                             scale ? _mm512_mul_ps(acc[r][c], _mm512_set1_ps(scale[r])) : acc[r][c]);
}

#define DOT_TILE(r, c) dot_tile(a, a_stride, pairs, b, tile_stride, chunk_stride, r, c, scale, out, out_stride)
#define DOT_TILES(r)                                                                                                 \
    switch (C) {                                                                                                     \
    case 1: DOT_TILE(r, 1); break;                                                                                   \
    case 2: DOT_TILE(r, 2); break;                                                                                   \
    case 3: DOT_TILE(r, 3); break;                                                                                   \
    default: DOT_TILE(r, 4); break;                                                                                  \
    }

/* dot_tile over `rows` rows and `tiles` column tiles, in micro-tiles of up to 4 x 4. */
static void dot_product(const uint32_t *a, int64_t a_stride, int64_t pairs, const uint16_t *b, int64_t tile_stride,
                        int64_t chunk_stride, int64_t rows, int64_t tiles, const float *scales, float *out_rows,
                        int64_t out_stride) {
    for (int64_t r0 = 0; r0 < rows; r0 += 4)
        for (int64_t c0 = 0; c0 < tiles; c0 += 4) {
            const int R = rows - r0 < 4 ? (int)(rows - r0) : 4, C = tiles - c0 < 4 ? (int)(tiles - c0) : 4;
            const uint32_t *a_here = a + r0 * a_stride;
            const uint16_t *b_here = b + c0 * tile_stride;
            const float *scale = scales ? scales + r0 : NULL;
            float *out = out_rows + r0 * out_stride + c0 * 16;
            {
                const uint32_t *a = a_here;
                const uint16_t *b = b_here;
                switch (R) {
                case 1: DOT_TILES(1) break;
                case 2: DOT_TILES(2) break;
                case 3: DOT_TILES(3) break;
                default: DOT_TILES(4) break;
                }
            }
        }
}

/* The query heads [kvh * group, (kvh + 1) * group) of n rows; see the top of the file. amx: on tiles (the caller
 * has loaded the tile configuration), else by dot products. */
void bf16_attend_run(const float *q, const void *k_cache, const void *v_cache, const int64_t *table,
                     int64_t first_context, int64_t n, int64_t kvh, int64_t KVH, int64_t group, int64_t H, int64_t D,
                     int64_t block_size, float scale, float *scratch, float *out, int amx) {
    const int64_t d32 = round_up(D, 32), keys_max = round_up(first_context + n - 1, 32);
    uint16_t *kt = (uint16_t *)scratch, *vt = kt + keys_max * d32, *p = vt + keys_max * D;
    float *s = (float *)(p + QB * keys_max);
    uint16_t *qt = (uint16_t *)(s + QB * keys_max);
    float *o = (float *)(qt + QB * d32);
    int64_t packed = 0;
    for (int64_t b = 0; b < n; b += QB) {
        const int64_t rows = n - b < QB ? n - b : QB, keys = first_context + b + rows - 1, width = round_up(keys, 32);
        pack_kv(k_cache, v_cache, table, packed, keys, block_size, KVH * D, kvh * D, D, kt, vt);
        packed = keys / 32 * 32; /* the last, partial chunk is packed again with the next block's keys */
        for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
            memset(qt, 0, sizeof(uint16_t) * QB * d32);
            for (int64_t r = 0; r < rows; r++) /* Q: tiles [32-dim chunk][row][32]; dot products [row][d32] */
                for (int64_t d = 0; d < D; d += 16)
                    _mm256_storeu_si256((__m256i *)(qt + (amx ? (d / 32 * QB + r) * 32 + d % 32 : r * d32 + d)),
                                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(q + ((b + r) * H + h) * D + d)));
            if (amx)
                scores_tiles(qt, kt, keys, d32 / 32, s, keys_max);
            else /* K's 16-key tiles are d32 / 32 chunks of 512 values each */
                dot_product((const uint32_t *)qt, d32 / 2, d32 / 2, kt, d32 * 16, 512, rows, width / 16, NULL, s,
                            keys_max);
            float inv_sum[QB];
            for (int64_t r = 0; r < QB; r++) {
                if (r < rows)
                    inv_sum[r] = 1.0f / softmax_row(s + r * keys_max, first_context + b + r, width, scale,
                                                    p + r * keys_max);
                else if (amx)
                    memset(p + r * keys_max, 0, sizeof(uint16_t) * width);
            }
            float *out_rows = out + (b * H + h) * D;
            if (amx)
                values_tiles(p, vt, width, keys_max, D, rows, inv_sum, o, out_rows, H * D);
            else /* V's 16-dim tiles are 512 values apart within a 32-key chunk; chunks D / 16 tiles apart */
                dot_product((const uint32_t *)p, keys_max / 2, width / 2, vt, 512, D / 16 * 512, rows, D / 16,
                            inv_sum, out_rows, H * D);
        }
    }
}

#pragma GCC pop_options
