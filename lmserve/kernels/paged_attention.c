/* Attention straight from the paged KV cache, float32 queries and outputs, x86 AVX2 + FMA + F16C.
 *
 * Each query row attends to its own context: a decode token to its sequence's cache, a prefill token to the cache
 * up to its own position (this step's K/V are stored before any row attends, so causality is the row's context
 * length). torch would first gather every sequence's blocks into a padded [seqs, context, kv_heads, head_dim] copy
 * and mask padded queries; here each work item (a row, or one kv head of it when there are few rows) walks its
 * block table and reads K and V rows in place, once for all the query heads that share them (GQA).
 * Work items are handed out one at a time: contexts differ in length, and a thread may lose its core for a while
 * (to the server's event loop: handing them out round-robin, to prefetch each thread's next item, lost 5% of W2).
 * A prefill's runs of rows go to bf16 products where the CPU has AVX512-BF16 or AMX (prefill_attention.c).
 *
 * At a few dozen sequences a decode step reads more K/V than weights, at memory speed: a float16 cache (kv_half)
 * halves those bytes; its values are widened to float32 as they are loaded, once per GQA group of 2 or 3 heads
 * (attend_group), else once per head.
 *
 * q, out: [S, H, D] (S query rows).  k_cache, v_cache: [slots, KVH, D] float32, or float16 when kv_half, slot =
 * block * block_size + offset.
 * block_tables: [S, max_blocks] each row's sequence's table.  context_lens: [S] tokens each row attends to (itself
 * included).  scores: scratch, attention_scratch_floats(H, D, max_context).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16_kernels.h"
#include "simd.h"


/* Eight cache values from element i of row, float32 or float16 (`half` is a constant after inlining). */
static inline __m256 load_kv(const void *row, int64_t i, const int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)))
                : _mm256_loadu_ps((const float *)row + i);
}

static inline float dot(const float *a, const void *b, int64_t n, const int half) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load_kv(b, i, half), acc);
    return horizontal_sum(acc);
}

/* Exponentiates scores[0..n) minus their max, in place, and returns their sum (the caller normalizes once). */
static float softmax_unnormalized(float *scores, int64_t n) {
    __m256 running = _mm256_set1_ps(scores[0]);
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) running = _mm256_max_ps(running, _mm256_loadu_ps(scores + t));
    float lanes[8], max = scores[0];
    _mm256_storeu_ps(lanes, running);
    for (int i = 0; i < 8; i++) max = lanes[i] > max ? lanes[i] : max;
    for (; t < n; t++) max = scores[t] > max ? scores[t] : max;
    const __m256 m = _mm256_set1_ps(max);
    __m256 total = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + t), m));
        _mm256_storeu_ps(scores + t, e);
        total = _mm256_add_ps(total, e);
    }
    float sum = horizontal_sum(total);
    if (t < n) { /* the tail through a padded vector */
        float tail[8] = {0};
        for (int64_t i = t; i < n; i++) tail[i - t] = scores[i] - max;
        float e[8];
        _mm256_storeu_ps(e, exp_nonpositive(_mm256_loadu_ps(tail)));
        for (int64_t i = t; i < n; i++) {
            scores[i] = e[i - t];
            sum += e[i - t];
        }
    }
    return sum;
}

/* The sums of eight vectors, lane j holding the sum of v[j]'s lanes. */
static inline __m256 horizontal_sums8(const __m256 v[8]) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* Scores of query qh against tokens [0, n): within each block, eight tokens at a time with one accumulator each,
 * so the FMAs never wait on each other. Rows are found block by block (no division per token). */
static inline __attribute__((always_inline)) void scores(const float *qh, const char *cache, const int64_t *table,
                                                         int64_t n, int64_t block_bytes, int64_t row_bytes,
                                                         int64_t block_size, int64_t D, float scale, float *sh,
                                                         const int half) {
    for (int64_t b = 0, t = 0; t < n; b++) {
        const char *block = cache + table[b] * block_bytes;
        const int64_t rows = block_size < n - t ? block_size : n - t;
        int64_t j = 0;
        for (; j + 8 <= rows; j += 8) {
            __m256 acc[8];
            for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
            for (int64_t i = 0; i < D; i += 8) {
                const __m256 qv = _mm256_loadu_ps(qh + i);
                for (int r = 0; r < 8; r++)
                    acc[r] = _mm256_fmadd_ps(qv, load_kv(block + (j + r) * row_bytes, i, half), acc[r]);
            }
            _mm256_storeu_ps(sh + t + j, _mm256_mul_ps(horizontal_sums8(acc), _mm256_set1_ps(scale)));
        }
        for (; j < rows; j++) sh[t + j] = dot(qh, block + j * row_bytes, D, half) * scale;
        t += rows;
    }
}

/* out[0, 8 * chunks) = inv_sum * sum over tokens of p[t] * V row t (dims from the row's element d on); `chunks`
 * (1..8) is a constant after inlining, so the sums stay in registers rather than on the stack. */
static inline __attribute__((always_inline)) void value_chunks(const float *p, const char *cache, const int64_t *table,
                                                               int64_t n, int64_t block_bytes, int64_t row_bytes,
                                                               int64_t block_size, int64_t d, float inv_sum,
                                                               float *out, const int chunks, const int half) {
    __m256 o[8];
    for (int i = 0; i < chunks; i++) o[i] = _mm256_setzero_ps();
    for (int64_t b = 0, t = 0; t < n; b++) {
        const char *block = cache + table[b] * block_bytes;
        const int64_t rows = block_size < n - t ? block_size : n - t;
        for (int64_t j = 0; j < rows; j++) {
            const __m256 pj = _mm256_set1_ps(p[t + j]);
            for (int i = 0; i < chunks; i++)
                o[i] = _mm256_fmadd_ps(pj, load_kv(block + j * row_bytes, d + 8 * i, half), o[i]);
        }
        t += rows;
    }
    for (int i = 0; i < chunks; i++) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(o[i], _mm256_set1_ps(inv_sum)));
}

/* out[0, D) = inv_sum * sum over tokens of p[t] * V row t, 64 dims at a time. */
static inline __attribute__((always_inline)) void weighted_values(const float *p, const char *cache,
                                                                  const int64_t *table, int64_t n, int64_t block_bytes,
                                                                  int64_t row_bytes, int64_t block_size, int64_t D,
                                                                  float inv_sum, float *out, const int half) {
    for (int64_t d = 0; d < D; d += 64) {
#define CHUNKS(c) value_chunks(p, cache, table, n, block_bytes, row_bytes, block_size, d, inv_sum, out + d, c, half)
        switch ((D - d < 64 ? D - d : 64) / 8) {
        case 1: CHUNKS(1); break;
        case 2: CHUNKS(2); break;
        case 3: CHUNKS(3); break;
        case 4: CHUNKS(4); break;
        case 5: CHUNKS(5); break;
        case 6: CHUNKS(6); break;
        case 7: CHUNKS(7); break;
        default: CHUNKS(8); break;
        }
#undef CHUNKS
    }
}

/* The query heads of kv heads [kvh, kvh + count) of one sequence (q, out: its [H, D] rows; sc: its [H, max_context]
 * scores). A head's K and V rows are read once per query head of its group: the second and third reads come from
 * cache. */
static inline __attribute__((always_inline)) void attend(const float *q, const void *k_cache, const void *v_cache,
                                                         const int64_t *table, int64_t n, int64_t kvh, int64_t count,
                                                         int64_t KVH, int64_t group, int64_t D, int64_t block_size,
                                                         float scale, float *sc, int64_t max_context, float *out,
                                                         const int half) {
    const int64_t value_bytes = half ? 2 : 4, row_bytes = KVH * D * value_bytes, block_bytes = block_size * row_bytes;
    for (int64_t c = 0; c < count; c++) {
        const char *k = (const char *)k_cache + (kvh + c) * D * value_bytes;
        const char *v = (const char *)v_cache + (kvh + c) * D * value_bytes;
        for (int64_t h = (kvh + c) * group; h < (kvh + c + 1) * group; h++) {
            float *sh = sc + h * max_context;
            scores(q + h * D, k, table, n, block_bytes, row_bytes, block_size, D, scale, sh, half);
            const float inv_sum = 1.0f / softmax_unnormalized(sh, n);
            weighted_values(sh, v, table, n, block_bytes, row_bytes, block_size, D, inv_sum, out + h * D, half);
        }
    }
}

/* [sum a, sum b, sum c, sum d] of four vectors' lanes. */
static inline __m128 horizontal_sums4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* `bytes` of each of `rows` rows (`stride` apart) into L2, not L1: on the AVX512-BF16 EPYC a prefetch into L1 holds
 * one of L1's few miss buffers until the line arrives, and a block's worth stalled the loop (attention at 64
 * sequences 24.4 -> 16.4 ms a step with T1, `benchmarks/step_profile.py`; 34 -> 20 ms in an ad-hoc probe with every
 * block from DRAM). Always inlined: as a function, gcc deems it free of effects (only prefetches) and drops its
 * calls. */
static inline __attribute__((always_inline)) void prefetch_rows(const char *first, int64_t rows, int64_t stride,
                                                                int64_t bytes) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t line = 0; line < bytes; line += 64)
            _mm_prefetch(first + r * stride + line, _MM_HINT_T1);
}

/* A GQA group of G (2 or 3, a constant after inlining) query heads over one kv head, float16 cache: each K and V
 * value is widened once for the whole group (attend widens it once per head) -- 4 keys x G heads of scores, then
 * 32 dims x G heads of value sums, in registers. With less arithmetic between them, the reads from memory waited
 * more (alone, this was slower than attend in ad-hoc probes); so the next block's K (and V) rows of this kv head
 * are prefetched while a block is computed, a few rows with each step of the loop rather than all at its start: a
 * burst of 32 prefetches left the AVX2 EPYC's memory idle in between (64 sequences x 160 tokens, 30 layers from
 * DRAM: 30.3 -> 23.3 ms, ad-hoc A/B of the two builds alternated). `benchmarks/step_profile.py --batch 32 64`,
 * attention per step with the burst: 10.4 -> 8.0 ms at 32 sequences, 20.7 -> 16.7 at 64 (Xeon, 2 cores).
 * qg, og: the group's [G, D] rows; sg: its [G, max_context] scores. */
static inline __attribute__((always_inline)) void attend_group(const float *qg, const char *k, const char *v,
                                                               const int64_t *table, int64_t n, int64_t block_bytes,
                                                               int64_t row_bytes, int64_t block_size, int64_t D,
                                                               float scale, float *sg, int64_t max_context, float *og,
                                                               const int G) {
    for (int64_t b = 0, t = 0; t < n; b++) {
        const char *block = k + table[b] * block_bytes;
        const int64_t rows = block_size < n - t ? block_size : n - t;
        const char *next = t + rows < n ? k + table[b + 1] * block_bytes : NULL;
        int64_t j = 0;
        for (; j + 4 <= rows; j += 4) {
            if (next) prefetch_rows(next + j * row_bytes, 4, row_bytes, D * 2);
            __m256 acc[4][3];
            for (int r = 0; r < 4; r++)
                for (int h = 0; h < G; h++) acc[r][h] = _mm256_setzero_ps();
            for (int64_t i = 0; i < D; i += 8) {
                __m256 qv[3];
                for (int h = 0; h < G; h++) qv[h] = _mm256_loadu_ps(qg + h * D + i);
                for (int r = 0; r < 4; r++) {
                    const __m256 kv = load_kv(block + (j + r) * row_bytes, i, 1);
                    for (int h = 0; h < G; h++) acc[r][h] = _mm256_fmadd_ps(qv[h], kv, acc[r][h]);
                }
            }
            for (int h = 0; h < G; h++)
                _mm_storeu_ps(sg + h * max_context + t + j,
                              _mm_mul_ps(horizontal_sums4(acc[0][h], acc[1][h], acc[2][h], acc[3][h]),
                                         _mm_set1_ps(scale)));
        }
        for (; j < rows; j++)
            for (int h = 0; h < G; h++)
                sg[h * max_context + t + j] = dot(qg + h * D, block + j * row_bytes, D, 1) * scale;
        t += rows;
    }
    float inv_sum[3];
    for (int h = 0; h < G; h++) inv_sum[h] = 1.0f / softmax_unnormalized(sg + h * max_context, n);
    for (int64_t d = 0; d < D; d += 32) {
        const int chunks = D - d < 32 ? (int)(D - d) / 8 : 4;
        __m256 o[3][4];
        for (int h = 0; h < G; h++)
            for (int c = 0; c < 4; c++) o[h][c] = _mm256_setzero_ps();
        for (int64_t b = 0, t = 0; t < n; b++) {
            const char *block = v + table[b] * block_bytes;
            const int64_t rows = block_size < n - t ? block_size : n - t;
            const char *next = d == 0 && t + rows < n ? v + table[b + 1] * block_bytes : NULL;
            for (int64_t j = 0; j < rows; j++) {
                if (next) prefetch_rows(next + j * row_bytes, 1, row_bytes, D * 2);
                __m256 p[3];
                for (int h = 0; h < G; h++) p[h] = _mm256_set1_ps(sg[h * max_context + t + j]);
                for (int c = 0; c < chunks; c++) {
                    const __m256 vv = load_kv(block + j * row_bytes, d + 8 * c, 1);
                    for (int h = 0; h < G; h++) o[h][c] = _mm256_fmadd_ps(p[h], vv, o[h][c]);
                }
            }
            t += rows;
        }
        for (int h = 0; h < G; h++)
            for (int c = 0; c < chunks; c++)
                _mm256_storeu_ps(og + h * D + d + 8 * c, _mm256_mul_ps(o[h][c], _mm256_set1_ps(inv_sum[h])));
    }
}

static void attend_half_grouped(const float *q, const void *k_cache, const void *v_cache, const int64_t *table,
                                int64_t n, int64_t kvh, int64_t count, int64_t KVH, int64_t group, int64_t D,
                                int64_t block_size, float scale, float *sc, int64_t max_context, float *out) {
    const int64_t row_bytes = KVH * D * 2, block_bytes = block_size * row_bytes;
    for (int64_t c = kvh; c < kvh + count; c++) {
        const char *k = (const char *)k_cache + c * D * 2, *v = (const char *)v_cache + c * D * 2;
        const int64_t h = c * group;
        if (group == 3)
            attend_group(q + h * D, k, v, table, n, block_bytes, row_bytes, block_size, D, scale, sc + h * max_context,
                         max_context, out + h * D, 3);
        else
            attend_group(q + h * D, k, v, table, n, block_bytes, row_bytes, block_size, D, scale, sc + h * max_context,
                         max_context, out + h * D, 2);
    }
}

static void attend_float(const float *q, const void *k_cache, const void *v_cache, const int64_t *table, int64_t n,
                         int64_t kvh, int64_t count, int64_t KVH, int64_t group, int64_t D, int64_t block_size,
                         float scale, float *sc, int64_t max_context, float *out) {
    attend(q, k_cache, v_cache, table, n, kvh, count, KVH, group, D, block_size, scale, sc, max_context, out, 0);
}

static void attend_half(const float *q, const void *k_cache, const void *v_cache, const int64_t *table, int64_t n,
                        int64_t kvh, int64_t count, int64_t KVH, int64_t group, int64_t D, int64_t block_size,
                        float scale, float *sc, int64_t max_context, float *out) {
    attend(q, k_cache, v_cache, table, n, kvh, count, KVH, group, D, block_size, scale, sc, max_context, out, 1);
}

void amx_begin(void);
void amx_end(void);
int64_t bf16_run_scratch_floats(int64_t D, int64_t max_context);
void bf16_attend_run(const float *q, const void *k_cache, const void *v_cache, const int64_t *table,
                     int64_t first_context, int64_t n, int64_t kvh, int64_t KVH, int64_t group, int64_t H, int64_t D,
                     int64_t block_size, float scale, float *scratch, float *out, int amx);

#define MIN_RUN 8 /* query rows of one sequence from which its attention goes to prefill_attention.c */

/* Scratch per thread: a row's [H, max_context] scores, or a run's bf16 K/V (prefill_attention.c). */
static int64_t thread_scratch_floats(int64_t H, int64_t D, int64_t max_context) {
    const int64_t rows = H * max_context, runs = bf16_run_scratch_floats(D, max_context);
    return rows > runs ? rows : runs;
}

int64_t attention_scratch_floats(int64_t H, int64_t D, int64_t max_context) {
    return omp_get_max_threads() * thread_scratch_floats(H, D, max_context);
}

/* Whether row r + 1 continues row r's run: the next position of the same sequence. */
static int continues(const int64_t *block_tables, int64_t max_blocks, const int64_t *context_lens, int64_t r,
                     int64_t block_size) {
    if (context_lens[r + 1] != context_lens[r] + 1) return 0;
    const int64_t blocks = (context_lens[r + 1] + block_size - 1) / block_size;
    const int64_t *a = block_tables + r * max_blocks, *b = a + max_blocks;
    for (int64_t i = 0; i < blocks; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}

/* Returns 0, or -1 when head_dim is not a multiple of 8, the heads do not group evenly or memory ran out.
 * kernel: the bf16 kernel the CPU runs (bf16_kernels.h; for AMX the caller called amx_enable): with AVX512-BF16 or
 * AMX, runs of MIN_RUN rows or more of one sequence from a float16 cache go to prefill_attention.c. */
int paged_attention_by_row(const float *q, const void *k_cache, const void *v_cache, const int64_t *block_tables,
                           int64_t max_blocks, const int64_t *context_lens, int64_t S, int64_t H, int64_t KVH,
                           int64_t D, int64_t block_size, float scale, float *scores, int64_t max_context,
                           float *out, int kv_half, int kernel) {
    if (D % 8 != 0 || KVH <= 0 || H % KVH != 0) return -1;
    const int64_t per_thread = thread_scratch_floats(H, D, max_context), group = H / KVH;
    /* Runs of rows (a prefill chunk's) in bf16; every other row goes through attend_* on its own. */
    int64_t *rows = malloc(sizeof(int64_t) * 3 * S), *run_first = rows, *run_rows = rows + S, *single = rows + 2 * S;
    if (!rows) return -1;
    int64_t run_count = 0, single_count = 0;
    const int in_runs = kernel != BF16_AVX2 && kv_half && D % 16 == 0 && D <= 128, amx = kernel == BF16_AMX;
    for (int64_t r = 0, end; r < S; r = end) {
        for (end = r + 1; in_runs && end < S && continues(block_tables, max_blocks, context_lens, end - 1, block_size);)
            end++;
        if (end - r >= MIN_RUN) {
            run_first[run_count] = r;
            run_rows[run_count++] = end - r;
        } else {
            for (int64_t i = r; i < end; i++) single[single_count++] = i;
        }
    }
    /* Enough rows to keep every thread busy: one work item each, reading whole K/V rows. Fewer: one item per
     * (row, kv head), so that a single stream still uses every core. */
    const int64_t per_item = single_count >= 2 * omp_get_max_threads() ? KVH : 1;
    const int64_t items = single_count * (KVH / per_item);
#pragma omp parallel
    {
        float *mine = scores + omp_get_thread_num() * per_thread;
        if (run_count) {
            if (amx) amx_begin();
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t i = 0; i < run_count * KVH; i++) {
                const int64_t first = run_first[i / KVH], n = run_rows[i / KVH];
                bf16_attend_run(q + first * H * D, k_cache, v_cache, block_tables + first * max_blocks,
                                context_lens[first], n, i % KVH, KVH, group, H, D, block_size, scale, mine,
                                out + first * H * D, amx);
            }
            if (amx) amx_end();
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < items; i++) {
            const int64_t s = single[i / (KVH / per_item)], kvh = i % (KVH / per_item) * per_item;
            (kv_half && (group == 2 || group == 3) ? attend_half_grouped : kv_half ? attend_half : attend_float)(
                q + s * H * D, k_cache, v_cache, block_tables + s * max_blocks, context_lens[s], kvh, per_item, KVH,
                group, D, block_size, scale, mine, max_context, out + s * H * D);
        }
    }
    free(rows);
    return 0;
}
