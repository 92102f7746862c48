"""A GGUF's Q4_0 / Q4_1 blocks regrouped eight outputs at a time, for products with AVX2 only: the weights as the
file holds them, the inputs rounded per block of 32 to int16 (kernels/q4_int16_matmul.c: float32's results within
~1e-4, the default) or to int8 (kernels/q4_int8_matmul.c: --quantization int8, as llama.cpp rounds them)."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch

from lmserve.kernels.native import QK, Epilogue, _required_library, _scratch

COLS = 8  # outputs per group (q4_int8_matmul.c's COLS)
Q4_TYPES = (int(gguf.GGMLQuantizationType.Q4_0), int(gguf.GGMLQuantizationType.Q4_1))


@dataclass
class Q4Tiles:
    """quants uint8 [N / 8, K / 32, 128] in the layout of `input_bits`' kernel; scales and mins float32
    [N / 8, K / 32, 8]."""

    quants: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    input_bits: int  # 16 or 8: how the kernel rounds x

    @property
    def out_features(self) -> int:
        return self.quants.shape[0] * COLS


def q4_packable(qtype: int, out_features: int) -> bool:
    return qtype in Q4_TYPES and out_features % COLS == 0


def pack_q4_tiles(qtype: int, blocks: torch.Tensor, input_bits: int) -> Q4Tiles:
    """Q4_0 / Q4_1 rows in native.pack_blocks' layout ([N, K / 32 * block bytes]: f16 scales, (Q4_1) f16 mins,
    then 16 quant bytes a block) -> Q4Tiles for inputs of `input_bits` (16 or 8). A vector load holds, for each of
    eight outputs, a block's quant bytes in runs of 2 (int16 inputs: madd pairs) or 4 (int8 inputs: maddubs)."""
    rows = blocks.shape[0]
    if not q4_packable(qtype, rows) or input_bits not in (8, 16):
        raise ValueError(f"pack_q4_tiles: ggml type {qtype} with {rows} outputs and {input_bits}-bit inputs "
                         f"(Q4_0/Q4_1, outputs in {COLS}s, 8 or 16 bits)")
    header = 4 if qtype == gguf.GGMLQuantizationType.Q4_1 else 2
    count = blocks.shape[1] // (header + 16)
    scales = blocks[:, :2 * count].contiguous().view(torch.float16).float()
    mins = (blocks[:, 2 * count:4 * count].contiguous().view(torch.float16).float() if header == 4
            else -8 * scales)
    run = 2 if input_bits == 16 else 4
    quants = blocks[:, header * count:].reshape(rows // COLS, COLS, count, 16 // run, run).permute(0, 2, 3, 1, 4)

    def by_group(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(rows // COLS, COLS, count).permute(0, 2, 1).contiguous()

    return Q4Tiles(quants.reshape(rows // COLS, count, 128).contiguous(), by_group(scales), by_group(mins),
                   input_bits)


def q4_matmul(x: torch.Tensor, tiles: Q4Tiles, bias: torch.Tensor | None = None,
              epilogue: Epilogue = Epilogue.STORE, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 @ W.T (+ bias), x rounded to the tiles' input bits per row and block of 32: [M, N] float32
    (with ACCUMULATE, added into `out`, which is returned)."""
    lib = _required_library()
    x = x.contiguous()
    rows, in_features = x.shape
    if epilogue == Epilogue.ACCUMULATE:
        if out is None or out.shape != (rows, tiles.out_features) or out.dtype != torch.float32 \
                or not out.is_contiguous():
            raise ValueError(f"q4_matmul: ACCUMULATE needs `out`, a contiguous float32 [{rows}, "
                             f"{tiles.out_features}] tensor")
    else:
        out = torch.empty(rows, tiles.out_features, dtype=torch.float32)
    if in_features != tiles.quants.shape[1] * QK:
        raise ValueError(f"q4_matmul: x has {in_features} inputs, the weight {tiles.quants.shape[1] * QK}")
    scratch_bytes, product = ((lib.q4_int16_scratch_bytes, lib.q4_int16_matmul) if tiles.input_bits == 16
                              else (lib.q4_int8_scratch_bytes, lib.q4_int8_matmul))
    scratch = _scratch.get("x_rounded", scratch_bytes(rows, in_features), torch.uint8)
    status = product(x.data_ptr(), rows, in_features, tiles.quants.data_ptr(), tiles.scales.data_ptr(),
                     tiles.mins.data_ptr(), tiles.out_features, None if bias is None else bias.data_ptr(),
                     out.data_ptr(), scratch.data_ptr(), int(epilogue))
    if status != 0:
        raise ValueError(f"q4_matmul: {tiles.out_features} outputs x {in_features} inputs is not supported"
                         + (f" with {epilogue.name}" if epilogue != Epilogue.STORE else ""))
    return out
