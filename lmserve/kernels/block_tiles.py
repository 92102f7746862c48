"""A GGUF's Q4_0 / Q4_1 / Q8_0 blocks regrouped eight outputs at a time, for products with AVX2 only: the weights as
the file holds them, the inputs rounded per block of 32 to int16 (kernels/tiles_int16_matmul.c: float32's results
within ~1e-4, the default) or, for Q4 blocks, to int8 (kernels/q4_int8_matmul.c: --quantization int8, as llama.cpp
rounds them)."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch

from lmserve.kernels.native import QK, Epilogue, _required_library, _scratch, kernels_available

COLS = 8  # outputs per group (the kernels' COLS)
Q4_0, Q4_1, Q8_0 = (int(t) for t in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
                                      gguf.GGMLQuantizationType.Q8_0))
Q4_TYPES = (Q4_0, Q4_1)
INPUT_BITS = {Q4_0: (16, 8), Q4_1: (16, 8), Q8_0: (16,)}  # int8 x int8 has no cheaper AVX2 product than int16's


@dataclass
class BlockTiles:
    """quants uint8 [N / 8, K / 32, bytes] in the layout of `input_bits`' kernel (128 bytes a Q4 block group, 256 a
    Q8_0 one); scales and (Q4) mins float32 [N / 8, K / 32, 8]."""

    qtype: int
    quants: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None  # None for Q8_0
    input_bits: int  # 16 or 8: how the kernel rounds x

    @property
    def out_features(self) -> int:
        return self.quants.shape[0] * COLS


def block_tiles_on_vnni() -> bool:
    """Whether the tiles' products (int16 and int8 inputs) take their AVX512-VNNI path (column groups in pairs)."""
    return kernels_available() and bool(_required_library().block_tiles_vnni(-1))


def tiles_packable(qtype: int, out_features: int, input_bits: int) -> bool:
    return input_bits in INPUT_BITS.get(qtype, ()) and out_features % COLS == 0


def pack_block_tiles(qtype: int, blocks: torch.Tensor, input_bits: int) -> BlockTiles:
    """Rows in native.pack_blocks' layout ([N, K / 32 * block bytes]: f16 scales, (Q4_1) f16 mins, then the quant
    bytes of each block) -> BlockTiles for inputs of `input_bits`. A vector load holds, for each of eight outputs,
    a block's quant bytes in runs of 2 (int16 inputs: madd pairs) or 4 (int8 inputs: maddubs)."""
    rows = blocks.shape[0]
    if not tiles_packable(qtype, rows, input_bits):
        raise ValueError(f"pack_block_tiles: ggml type {qtype} with {rows} outputs and {input_bits}-bit inputs "
                         f"(Q4_0/Q4_1 with 8 or 16 bits, Q8_0 with 16; outputs in {COLS}s)")
    header, quant_bytes = {Q4_0: (2, 16), Q4_1: (4, 16), Q8_0: (2, 32)}[qtype]
    count = blocks.shape[1] // (header + quant_bytes)
    scales = blocks[:, :2 * count].contiguous().view(torch.float16).float()
    mins = {Q4_1: lambda: blocks[:, 2 * count:4 * count].contiguous().view(torch.float16).float(),
            Q4_0: lambda: -8 * scales, Q8_0: lambda: None}[qtype]()
    run = 2 if input_bits == 16 else 4
    quants = blocks[:, header * count:].reshape(rows // COLS, COLS, count, quant_bytes // run, run)

    def by_group(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(rows // COLS, COLS, count).permute(0, 2, 1).contiguous()

    return BlockTiles(qtype, quants.permute(0, 2, 3, 1, 4).reshape(rows // COLS, count, COLS * quant_bytes)
                      .contiguous(), by_group(scales), by_group(mins), input_bits)


def block_tiles_matmul(x: torch.Tensor, tiles: BlockTiles, bias: torch.Tensor | None = None,
                       epilogue: Epilogue = Epilogue.STORE, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 @ W.T (+ bias), x rounded to the tiles' input bits per row and block of 32: [M, N] float32
    (with ACCUMULATE, added into `out`, which is returned)."""
    lib = _required_library()
    x = x.contiguous()
    rows, in_features = x.shape
    if epilogue == Epilogue.ACCUMULATE:
        if out is None or out.shape != (rows, tiles.out_features) or out.dtype != torch.float32 \
                or not out.is_contiguous():
            raise ValueError(f"block_tiles_matmul: ACCUMULATE needs `out`, a contiguous float32 [{rows}, "
                             f"{tiles.out_features}] tensor")
    else:
        out = torch.empty(rows, tiles.out_features, dtype=torch.float32)
    if in_features != tiles.quants.shape[1] * QK:
        raise ValueError(f"block_tiles_matmul: x has {in_features} inputs, the weight {tiles.quants.shape[1] * QK}")
    scratch_bytes, product = ((lib.q4_int8_scratch_bytes, lib.q4_int8_matmul) if tiles.input_bits == 8
                              else (lib.int16_tiles_scratch_bytes,
                                    lib.q8_int16_matmul if tiles.qtype == Q8_0 else lib.q4_int16_matmul))
    scratch = _scratch.get("x_rounded", scratch_bytes(rows, in_features), torch.uint8)
    status = product(x.data_ptr(), rows, in_features, tiles.quants.data_ptr(), tiles.scales.data_ptr(),
                     None if tiles.mins is None else tiles.mins.data_ptr(), tiles.out_features,
                     None if bias is None else bias.data_ptr(), out.data_ptr(), scratch.data_ptr(), int(epilogue))
    if status != 0:
        raise ValueError(f"block_tiles_matmul: {tiles.out_features} outputs x {in_features} inputs is not supported"
                         + (f" with {epilogue.name}" if epilogue != Epilogue.STORE else ""))
    return out
