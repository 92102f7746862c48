/* The bf16 products' kernels (bf16_matmul.c), in native.Bf16Kernel's numbering, and what a product does with its
 * sums. */
#ifndef LMSERVE_BF16_KERNELS_H
#define LMSERVE_BF16_KERNELS_H

enum { BF16_AVX2, BF16_AVX512, BF16_AMX };

/* STORE: y = x W^T + bias.  ACCUMULATE: y += x W^T + bias (a residual add, without a pass of its own).  SILU_MUL:
 * W is [gate | up] (N = 2n) and y = silu(x W_gate^T) * (x W_up^T), n wide (no bias): the two halves' products
 * meet in registers, not in a [M, 2n] buffer. The AVX512 and AMX kernels only. */
enum { STORE, ACCUMULATE, SILU_MUL };

#endif
