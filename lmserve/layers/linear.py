"""A linear layer that may also keep its weight as GGUF quantized blocks for products with few rows.

Decoding reads every weight once per step for a handful of rows: there the 4/8-bit blocks (read 4-6x less memory,
integer dot products) win by 3-6x over a float32 product. Prefill and large batches have many rows and are bound by
arithmetic, where the float weight and torch's GEMM are faster, so both forms are kept. The float weight may be
bf16 under float32 activations (where the CPU has native bf16: its GEMMs are twice float32's); the product then
runs in bf16 and its result comes back as float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.kernels.native import quant_matmul

# Rows up to which the block kernels beat torch's GEMM on the float weight, by the float weight's dtype (SmolLM2's
# shapes, 2-core EPYC; `benchmarks/linear_crossover.py`): against float32 (AVX2 EPYC) they won 3-6x at 1-4 rows,
# ~1.2x at 32 and lost at 64; against bf16 (AVX512-BF16 EPYC) they are about even at 8 rows and 2-3x slower at 32.
MAX_QUANTIZED_ROWS = {torch.float32: 32, torch.bfloat16: 8}


@dataclass
class QuantizedWeight:
    qtype: int            # ggml type number
    blocks: torch.Tensor  # uint8 [out_features, row bytes] in native.pack_blocks' layout, rows as the float weight's


class Linear(nn.Linear):
    quantized: QuantizedWeight | None = None

    @property
    def max_quantized_rows(self) -> int:
        """Products with up to this many rows run on the blocks (0 without blocks)."""
        return 0 if self.quantized is None else MAX_QUANTIZED_ROWS.get(self.weight.dtype, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.numel() <= self.max_quantized_rows * x.shape[-1]:
            out = quant_matmul(self.quantized.qtype, x.reshape(-1, x.shape[-1]), self.quantized.blocks)
            out = out.view(*x.shape[:-1], out.shape[-1])
            return out if self.bias is None else out + self.bias
        if x.dtype != self.weight.dtype:  # bf16 weight, float32 activations (the bias stays with the activations)
            out = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)
