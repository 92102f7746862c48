#!/usr/bin/env python
"""Where the block kernels stop beating torch's GEMM: one linear of SmolLM2's shapes, x [rows, in] @ W.T, timed on
the Q4_1 blocks (lmserve's kernel), a float32 weight, a bf16 weight in torch (float32 activations cast in and out)
and a bf16 weight in lmserve's tiles (kernels/bf16_matmul.c, which lmserve's Linear uses for bf16). Sets
MAX_QUANTIZED_ROWS and MAX_QUANTIZED_ROWS_OVER_TILES in lmserve/layers/linear.py.

  .venv/bin/python benchmarks/linear_crossover.py --rows 1 4 8 16 32 64
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

from lmserve.kernels.native import bf16_matmul, pack_bf16, pack_blocks, quant_matmul

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # (out, in)


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
    args = p.parse_args()
    q4_1 = int(gguf.GGMLQuantizationType.Q4_1)
    print("| linear | rows | Q4_1 blocks ms | float32 ms | bf16 (torch) ms | bf16 tiles ms |")
    print("|---|---|---|---|---|---|")
    for name, (out_features, in_features) in SHAPES.items():
        weight = np.random.default_rng(0).standard_normal((out_features, in_features)).astype(np.float32)
        blocks = pack_blocks(q4_1, torch.from_numpy(gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_1)))
        w32 = torch.from_numpy(weight)
        w16, tiles = w32.bfloat16(), pack_bf16(w32)
        for rows in args.rows:
            x = torch.randn(rows, in_features)
            products = (partial(quant_matmul, q4_1, x, blocks), partial(F.linear, x, w32),
                        partial(bf16_linear, x, w16), partial(bf16_matmul, x, tiles))
            timings = [median_ms(fn, args.repeats) for fn in products]
            print(f"| {name} | {rows} | " + " | ".join(f"{t:.3f}" for t in timings) + " |", flush=True)


if __name__ == "__main__":
    main()
