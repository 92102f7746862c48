"""Linear products in int8 (kernels/int8_matmul.c): weights and activations rounded to int8 per group of 64
inputs, for CPUs whose fastest arithmetic is AVX512-VNNI's int8 dot product (--quantization int8)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.kernels.native import Epilogue, _required_library, _scratch
from lmserve.platform import cpu_flags

GROUP = 64  # inputs per scale (int8_matmul.c's GROUP)


@dataclass
class Int8Tiles:
    """A [N, K] weight in int8_matmul's layout: `tiles` int8 [N / 16, K / 4, 16, 4]; `scales` (float32) and `offsets`
    (int32, 128 x each group's sum of int8 weights) [N / 16, K / 64, 16]."""

    tiles: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.tiles.shape[0] * 16


def has_int8_dot_product() -> bool:
    """Whether the CPU runs int8_matmul (AVX512-VNNI with AVX512BW)."""
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= cpu_flags()


def int8_packable(weight: torch.Tensor) -> bool:
    rows, in_features = weight.shape
    return rows % 16 == 0 and in_features % GROUP == 0


def pack_int8(weight: torch.Tensor) -> Int8Tiles:
    """Round a float [N, K] weight (N a multiple of 16, K of 64) to int8 with a max-abs scale per output and group of
    64 inputs, in int8_matmul's layout."""
    rows, in_features = weight.shape
    if not int8_packable(weight):
        raise ValueError(f"pack_int8: a [{rows}, {in_features}] weight needs rows in 16s and inputs in {GROUP}s")
    groups = weight.detach().float().reshape(rows, in_features // GROUP, GROUP)
    scales = groups.abs().amax(-1) / 127
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = (groups / divisor[..., None]).round().clamp(-127, 127).to(torch.int8)
    offsets = 128 * q.sum(-1, dtype=torch.int32)
    by_tile = (rows // 16, 16, in_features // GROUP)
    return Int8Tiles(q.reshape(rows // 16, 16, in_features // 4, 4).permute(0, 2, 1, 3).contiguous(),
                     scales.reshape(by_tile).permute(0, 2, 1).contiguous(),
                     offsets.reshape(by_tile).permute(0, 2, 1).contiguous())


def int8_matmul(x: torch.Tensor, packed: Int8Tiles, bias: torch.Tensor | None = None,
                epilogue: Epilogue = Epilogue.STORE, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 @ W.T (+ bias) with x rounded to int8 per row and group of 64 inputs: [M, N] float32 (with
    SILU_MUL, [M, N / 2]; with ACCUMULATE, added into `out`, which is returned)."""
    if not has_int8_dot_product():
        raise ValueError("int8 products need a CPU with AVX512-VNNI")
    lib = _required_library()
    x = x.contiguous()
    rows, in_features = x.shape
    width = packed.out_features // 2 if epilogue == Epilogue.SILU_MUL else packed.out_features
    if epilogue == Epilogue.ACCUMULATE:
        if out is None or out.shape != (rows, width) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"int8_matmul: ACCUMULATE needs `out`, a contiguous float32 [{rows}, {width}] tensor")
    else:
        out = torch.empty(rows, width, dtype=torch.float32)
    scratch = _scratch.get("x_int8", lib.int8_scratch_bytes(rows, in_features), torch.uint8)
    status = lib.int8_matmul(x.data_ptr(), rows, in_features, packed.tiles.data_ptr(), packed.scales.data_ptr(),
                             packed.offsets.data_ptr(), packed.out_features, None if bias is None else bias.data_ptr(),
                             out.data_ptr(), width, scratch.data_ptr(), int(epilogue))
    if status != 0:
        raise ValueError(f"int8_matmul: {packed.out_features} outputs x {in_features} inputs is not supported"
                         + (f" with {epilogue.name}" if epilogue != Epilogue.STORE else ""))
    return out
