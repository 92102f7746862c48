/* The bf16 products' kernels (bf16_matmul.c), in native.Bf16Kernel's numbering, and what a product does with its
 * sums. */
#ifndef LMSERVE_BF16_KERNELS_H
#define LMSERVE_BF16_KERNELS_H

enum { BF16_AVX2, BF16_AVX512, BF16_AMX };

/* STORE: y = x W^T + bias.  ACCUMULATE: y += x W^T + bias (a residual add, without a pass of its own).  SILU_MUL:
 * W is [gate | up] (N = 2n) and y = silu(x W_gate^T) * (x W_up^T), n wide (no bias): the two halves' products
 * meet in registers, not in a [M, 2n] buffer. The AVX512 and AMX kernels only. */
enum { STORE, ACCUMULATE, SILU_MUL };

#include <stdint.h>

#include "simd.h"

/* A micro-tile's sums (acc[r * stride + c]: rows x cols tiles of 16 columns) into y as `epilogue` says, plus bias
 * (STORE, ACCUMULATE); SILU_MUL takes column tile 0 as the gate and 1 as the up (bf16_matmul.c, int8_matmul.c).
 * Always inlined with constant rows and cols, so the sums stay in registers. */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void finish_tile16(
    const __m512 *acc, const int stride, const int rows, const int cols, const float *bias, float *y,
    int64_t y_stride, int epilogue) {
    if (epilogue == SILU_MUL && cols == 2) {
        for (int r = 0; r < rows; r++)
            _mm512_storeu_ps(y + r * y_stride, silu_mul16(acc[r * stride], acc[r * stride + 1]));
        return;
    }
    for (int c = 0; c < cols; c++) {
        const __m512 b = bias ? _mm512_loadu_ps(bias + c * 16) : _mm512_setzero_ps();
        for (int r = 0; r < rows; r++) {
            float *out = y + r * y_stride + c * 16;
            const __m512 sums = _mm512_add_ps(acc[r * stride + c], b);
            _mm512_storeu_ps(out, epilogue == ACCUMULATE ? _mm512_add_ps(sums, _mm512_loadu_ps(out)) : sums);
        }
    }
}

#endif
