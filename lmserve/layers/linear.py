"""A linear layer that may also keep its weight as GGUF quantized blocks for products with few rows.

Decoding reads every weight once per step for a handful of rows: there the 4/8-bit blocks (read 4-6x less memory,
integer dot products) win by 3-6x over a float32 product. Prefill and large batches have many rows and are bound by
arithmetic, where the float32 weight and torch's GEMM are faster, so both forms are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.kernels.native import quant_matmul

# SmolLM2's shapes on a 2-core AVX2 EPYC: the kernel wins 3-6x at 1-4 rows, ~1.2x at 32, and loses at 64 (end to
# end: `benchmarks/step_profile.py --batch 32 64`, with and without LMSERVE_NATIVE_KERNELS=0).
MAX_QUANTIZED_ROWS = 32


@dataclass
class QuantizedWeight:
    qtype: int            # ggml type number
    blocks: torch.Tensor  # uint8 [out_features, row bytes] in native.pack_blocks' layout, rows as the float weight's


class Linear(nn.Linear):
    quantized: QuantizedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is None or x.dtype != torch.float32 or x.numel() > MAX_QUANTIZED_ROWS * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        out = quant_matmul(self.quantized.qtype, x.reshape(-1, x.shape[-1]), self.quantized.blocks)
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias
