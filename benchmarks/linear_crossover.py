#!/usr/bin/env python
"""Where the block kernels stop beating torch's GEMM: one linear of SmolLM2's shapes, x [rows, in] @ W.T, timed on
the GGUF blocks (quant_matmul.c, int16 inputs), the blocks regrouped for int16 inputs (kernels/
tiles_int16_matmul.c, the default where float weights stay float32) and, Q4_1 only, for int8 inputs
(kernels/q4_int8_matmul.c, --quantization int8 with AVX2 only), a float32 weight, a bf16 weight in torch
(float32 activations cast in and out) and a bf16 weight in lmserve's tiles (kernels/bf16_matmul.c).
The LM head's blocks are Q8_0, as in SmolLM2's GGUF. Sets MAX_QUANTIZED_ROWS, MAX_QUANTIZED_ROWS_OVER_TILES
and MAX_QUANTIZED_ROWS_WIDE in lmserve/layers/linear.py.

  .venv/bin/python benchmarks/linear_crossover.py --rows 1 4 8 16 32 64
  .venv/bin/python benchmarks/linear_crossover.py --only lm_head --rows 32 64 128 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from lmserve.kernels.block_tiles import block_tiles_matmul, pack_block_tiles, tiles_packable
from lmserve.kernels.native import bf16_matmul, pack_bf16, pack_blocks, quant_matmul

Q4_1, Q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
SHAPES = {"qkv": (960, 576, Q4_1), "o": (576, 576, Q4_1), "gate_up": (3072, 576, Q4_1), "down": (576, 1536, Q4_1),
          "lm_head": (49152, 576, Q8_0)}  # (out, in, blocks)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(weight.dtype), weight).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--only", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = p.parse_args()
    print("| linear | rows | blocks (int16 inputs) ms | tiles x int16 inputs ms | tiles x int8 inputs ms | "
          "float32 ms | bf16 (torch) ms | bf16 tiles ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.only:
        out_features, in_features, qtype = SHAPES[name]
        weight = np.random.default_rng(0).standard_normal((out_features, in_features)).astype(np.float32)
        blocks = pack_blocks(int(qtype), torch.from_numpy(gguf.quants.quantize(weight, qtype)))
        tiles_by_bits = [pack_block_tiles(int(qtype), blocks, bits) if tiles_packable(int(qtype), out_features, bits)
                         else None for bits in (16, 8)]
        w32 = torch.from_numpy(weight)
        w16, tiles = w32.bfloat16(), pack_bf16(w32)
        for rows in args.rows:
            x = torch.randn(rows, in_features)
            products = (partial(quant_matmul, int(qtype), x, blocks),
                        *(None if t is None else partial(block_tiles_matmul, x, t) for t in tiles_by_bits),
                        partial(F.linear, x, w32), partial(bf16_linear, x, w16), partial(bf16_matmul, x, tiles))
            timings = [None if fn is None else median_ms(fn, args.repeats) for fn in products]
            print(f"| {name} | {rows} | " + " | ".join("–" if t is None else f"{t:.3f}" for t in timings) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
