"""A linear layer that may also keep its weight as GGUF quantized blocks for products with few rows.

Decoding reads every weight once per step for a handful of rows: there the 4/8-bit blocks (read 4-6x less memory,
integer dot products) win by 3-6x over a float32 product. Prefill and large batches have many rows and are bound by
arithmetic, where the float weight and torch's GEMM are faster, so both forms are kept. The float weight may be
bf16 under float32 activations (where the CPU has native bf16: its GEMMs are twice float32's); the product then
runs in bf16 and its result comes back as float32. A bf16 weight is kept in lmserve's own tiles instead
(kernels/bf16_matmul.c: with AMX 1.5-4x torch's bf16 GEMM at 2-128 rows, with AVX512-BF16 about twice it at 8-64
rows, with float32 sums and outputs; with AVX2 only, far ahead of torch's emulated bf16), which beat the blocks
from 2 rows on (with AVX2 only, they
are about even with the blocks from 4 rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch
import torch.nn.functional as F
from torch import nn

from lmserve.kernels.block_tiles import BlockTiles, block_tiles_matmul, pack_block_tiles, tiles_packable
from lmserve.kernels.int8_linear import Int8Tiles, has_int8_dot_product, int8_matmul, int8_packable, pack_int8
from lmserve.kernels.native import bf16_matmul, kernels_available, pack_bf16, quant_matmul

# Rows up to which the block kernels beat torch's GEMM on the float weight, by the float weight's dtype (SmolLM2's
# shapes, 2-core EPYC; `benchmarks/linear_crossover.py`): against float32 (AVX2 EPYC) they won 3-6x at 1-4 rows,
# ~1.2x at 32 and lost at 64; against bf16 (AVX512-BF16 EPYC) they are about even at 8 rows and 2-3x slower at 32;
# against lmserve's bf16 tiles they win at one row only (the model's weights are read from memory once per step:
# 4.5 bits a weight against 16), both with AVX512-BF16 (EPYC) and with AMX (Xeon: gate/up at one row 0.041 ms on
# the blocks, 0.047-0.055 on the tiles; at 2 rows the AMX tiles lead, 0.055 against 0.063).
MAX_QUANTIZED_ROWS = {torch.float32: 32, torch.bfloat16: 8}
MAX_QUANTIZED_ROWS_OVER_TILES = 1
# A wide product (an LM head's ~50k outputs) keeps the blocks up to more rows against float32: torch's GEMM runs at
# about half its speed there (AVX2 EPYC, `benchmarks/linear_crossover.py --only lm_head`, Q8_0 blocks vs float32:
# 50 vs 74 ms at 64 rows, 90 vs 102 at 128, and at 256 173 vs 194 in one run, 236 vs 201 in another).
WIDE_OUTPUTS = 16384
MAX_QUANTIZED_ROWS_WIDE = 128
# Sequences up to which a decode step runs in the C stack on the blocks, whatever the row limit above: the whole
# step, without torch's per-op work, beat torch's float32 GEMMs by 20% at 64 sequences and 16% at 128 (AVX2 EPYC,
# `benchmarks/step_profile.py`).
MAX_FUSED_DECODE_ROWS = 128


@dataclass
class QuantizedWeight:
    qtype: int            # ggml type number
    blocks: torch.Tensor  # uint8 [out_features, row bytes] in native.pack_blocks' layout, rows as the float weight's


class Linear(nn.Linear):
    quantized: QuantizedWeight | None = None
    bf16_tiles: torch.Tensor | None = None  # the weight in native.pack_bf16's layout; `weight` is None then
    int8_tiles: Int8Tiles | None = None     # the weight rounded to int8 (--quantization int8); `weight` is None then
    block_tiles: BlockTiles | None = None   # the GGUF blocks regrouped for int16 or int8 inputs; `weight` is None then

    @property
    def max_quantized_rows(self) -> int:
        """Products with up to this many rows run on the blocks (0 without blocks)."""
        if self.quantized is None or self.block_tiles is not None:
            return 0
        if self.bf16_tiles is not None or self.int8_tiles is not None:
            return MAX_QUANTIZED_ROWS_OVER_TILES
        if self.weight.dtype == torch.float32 and self.out_features >= WIDE_OUTPUTS:
            return MAX_QUANTIZED_ROWS_WIDE
        return MAX_QUANTIZED_ROWS.get(self.weight.dtype, 0)

    @property
    def weight_form(self) -> str:
        """What the products multiply by, for reports: "float32", "bfloat16 tiles", "Q4_1 x int16 inputs", ..."""
        if self.block_tiles is not None:
            return f"{gguf.GGMLQuantizationType(self.block_tiles.qtype).name} x int{self.block_tiles.input_bits} inputs"
        if self.int8_tiles is not None:
            return "int8 tiles"
        return "bfloat16 tiles" if self.bf16_tiles is not None else str(self.weight.dtype).removeprefix("torch.")

    def runs_natively(self, rows: int, decode: bool = True) -> bool:
        """Whether a step of `rows` token rows should run this layer in the C stack: on tiles at any size; on the
        blocks for decode steps up to MAX_FUSED_DECODE_ROWS sequences, and for other steps only where the torch
        path multiplies by the blocks too (a prefill keeps the float weights' exact products)."""
        if self.bf16_tiles is not None or self.int8_tiles is not None or self.block_tiles is not None:
            return True
        return self.quantized is not None and rows <= (MAX_FUSED_DECODE_ROWS if decode else self.max_quantized_rows)

    def store_weight_in(self, dtype: torch.dtype) -> None:
        """Keep the float weight in `dtype`; bf16 goes into lmserve's tiles where the CPU and the shape allow."""
        weight = self.weight.detach()
        float32_bias = self.bias is None or self.bias.dtype == torch.float32  # the kernel adds it in float32
        if dtype == torch.bfloat16 and kernels_available() and weight.shape[0] % 16 == 0 \
                and weight.shape[1] % 2 == 0 and weight.device.type == "cpu" and float32_bias:
            self.bf16_tiles = pack_bf16(weight)
            self.weight = None
        else:
            self.weight = nn.Parameter(weight.to(dtype), requires_grad=False)

    def store_weight_in_int8(self) -> None:
        """Keep the weight rounded to int8 per output and group of 64 inputs, for int8 products of int8-rounded
        activations (kernels/int8_matmul.c); the caller has checked the CPU runs them."""
        float32_bias = self.bias is None or self.bias.dtype == torch.float32
        if not (int8_packable(self.weight) and has_int8_dot_product() and self.weight.device.type == "cpu"
                and float32_bias):
            raise ValueError(f"quantization int8: a [{self.out_features}, {self.in_features}] linear cannot be "
                             "packed (outputs in 16s, inputs in 64s, a CPU with AVX512-VNNI)")
        self.int8_tiles = pack_int8(self.weight)
        self.weight = None

    def store_weight_in_block_tiles(self, input_bits: int) -> bool:
        """Multiply by the GGUF blocks regrouped for inputs rounded to `input_bits` (kernels/tiles_int16_matmul.c,
        q4_int8_matmul.c) at every row count, in place of the float weight; Q8_0 blocks take int16 inputs either way
        (with AVX2, int8 x int8 products cost as much). False (nothing changed) where the blocks are of another type
        or the shape does not fit."""
        if self.quantized is None or not (self.bias is None or self.bias.dtype == torch.float32):
            return False
        qtype = self.quantized.qtype
        bits = input_bits if tiles_packable(qtype, self.out_features, input_bits) else 16
        if not tiles_packable(qtype, self.out_features, bits):
            return False
        self.block_tiles = pack_block_tiles(qtype, self.quantized.blocks, bits)
        self.weight = None
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.numel() <= self.max_quantized_rows * x.shape[-1]:
            out = quant_matmul(self.quantized.qtype, x.reshape(-1, x.shape[-1]), self.quantized.blocks)
            out = out.view(*x.shape[:-1], out.shape[-1])
            return out if self.bias is None else out + self.bias
        if self.block_tiles is not None:
            out = block_tiles_matmul(x.reshape(-1, x.shape[-1]).float(), self.block_tiles, self.bias)
            return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)
        if self.int8_tiles is not None:
            out = int8_matmul(x.reshape(-1, x.shape[-1]).float(), self.int8_tiles, self.bias)
            return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)
        if self.bf16_tiles is not None:
            out = bf16_matmul(x.reshape(-1, x.shape[-1]).float(), self.bf16_tiles, self.bias)
            return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)
        if x.dtype != self.weight.dtype:  # bf16 weight, float32 activations (the bias stays with the activations)
            out = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)
