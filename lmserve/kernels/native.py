"""Compile the C kernels once per machine (cached by source hash) and call them on torch tensors.

Plain C files with no Python or torch headers build in about a second, so they are compiled at first use rather
than at install time; a machine without a C compiler, or a CPU without AVX2/FMA/F16C, keeps the torch path.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import gguf
import torch

from lmserve.platform import cpu_flags

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name)
           for name in ("quant_matmul.c", "bf16_matmul.c", "bf16_amx.c", "paged_attention.c", "prefill_attention.c",
                        "llama_layers.c", "argmax.c", "int8_matmul.c", "q4_int8_matmul.c",
                        "tiles_int16_matmul.c")]
HEADERS = [Path(__file__).with_name(name) for name in ("simd.h", "bf16_kernels.h")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
KERNEL_TYPES = (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0)
BLOCK_BYTES = {int(t): gguf.GGML_QUANT_SIZES[t][1] for t in KERNEL_TYPES}  # ggml type number -> bytes per block
QK = 32  # weights per block, for each of these types


def cache_dir() -> Path:
    return Path(os.environ.get("LMSERVE_CACHE_DIR", Path.home() / ".cache" / "lmserve")) / "kernels"


@cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with the reason logged once) where it cannot run or is turned off
    (LMSERVE_NATIVE_KERNELS=0, for A/B runs and as an escape hatch)."""
    if os.environ.get("LMSERVE_NATIVE_KERNELS", "1") == "0":
        return None
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma", "f16c"} <= cpu_flags():
        log.info("lmserve's CPU kernels need an x86-64 CPU with AVX2, FMA and F16C; using torch's path")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found (set CC): lmserve's CPU kernels are off, using torch's path")
        return None
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join([compiler, *FLAGS]).encode())
    target = cache_dir() / f"lmserve-kernels-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            command = [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("building the CPU kernels failed, using torch's path:\n%s", result.stderr)
                return None
            os.replace(built, target)  # atomic: concurrent first starts never load a half-written file
    lib = ctypes.CDLL(str(target))  # torch is imported, so its OpenMP runtime is the one this library binds to
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.quant_matmul.argtypes = [ctypes.c_int, pointer, size, size, pointer, size, pointer, pointer, pointer, pointer]
    lib.quant_matmul.restype = ctypes.c_int
    lib.bf16_matmul.argtypes = [pointer, size, size, pointer, size, pointer, pointer, size, pointer, ctypes.c_int,
                                ctypes.c_int]
    lib.bf16_matmul.restype = ctypes.c_int
    lib.bf16_scratch_values.argtypes = [size, size]
    lib.bf16_scratch_values.restype = size
    lib.amx_enable.restype = ctypes.c_int
    lib.paged_attention_by_row.argtypes = [pointer, pointer, pointer, pointer, size, pointer, size, size, size, size,
                                           size, ctypes.c_float, pointer, size, pointer, ctypes.c_int, ctypes.c_int]
    lib.paged_attention_by_row.restype = ctypes.c_int
    lib.attention_scratch_floats.argtypes = [size, size, size]
    lib.attention_scratch_floats.restype = size
    layer = ctypes.POINTER(LlamaLayerSpec)
    lib.llama_stack_scratch_bytes.argtypes = [layer, size, size, size]
    lib.llama_stack_scratch_bytes.restype = size
    lib.llama_layer_stack.argtypes = [layer, size, pointer, size, pointer, pointer, pointer, pointer, ctypes.c_int,
                                       size, pointer, pointer, size, pointer, size, pointer, pointer]
    lib.llama_layer_stack.restype = ctypes.c_int
    lib.llama_layer_ops.restype = ctypes.c_int
    lib.argmax_rows.argtypes = [pointer, size, size, pointer]
    lib.int8_matmul.argtypes = [pointer, size, size, pointer, pointer, pointer, size, pointer, pointer, size, pointer,
                                ctypes.c_int]
    lib.int8_matmul.restype = ctypes.c_int
    lib.int8_scratch_bytes.argtypes = [size, size]
    lib.int8_scratch_bytes.restype = size
    lib.q4_int8_matmul.argtypes = [pointer, size, size, pointer, pointer, pointer, size, pointer, pointer, pointer,
                                   ctypes.c_int]
    lib.q4_int8_matmul.restype = ctypes.c_int
    lib.q4_int8_scratch_bytes.argtypes = [size, size]
    lib.q4_int8_scratch_bytes.restype = size
    for product in (lib.q4_int16_matmul, lib.q8_int16_matmul):
        product.argtypes = lib.q4_int8_matmul.argtypes
        product.restype = ctypes.c_int
    lib.int16_tiles_scratch_bytes.argtypes = [size, size]
    lib.int16_tiles_scratch_bytes.restype = size
    lib.block_tiles_vnni.argtypes = [ctypes.c_int]
    lib.block_tiles_vnni.restype = ctypes.c_int
    return lib


class NativeLinearSpec(ctypes.Structure):
    """llama_layers.c's NativeLinear: blocks (with their ggml type), bf16, int8 or Q4 tiles, or blocks and tiles."""

    _fields_ = [("qtype", ctypes.c_int), ("blocks", ctypes.c_void_p), ("bf16_tiles", ctypes.c_void_p),
                ("max_block_rows", ctypes.c_int64), ("bias", ctypes.c_void_p), ("int8_tiles", ctypes.c_void_p),
                ("int8_scales", ctypes.c_void_p), ("int8_offsets", ctypes.c_void_p), ("tile_quants", ctypes.c_void_p),
                ("tile_scales", ctypes.c_void_p), ("tile_mins", ctypes.c_void_p), ("tile_input_bits", ctypes.c_int)]


class LlamaLayerSpec(ctypes.Structure):
    """llama_layers.c's LlamaLayer: shapes and pointers into a block's tensors (which must outlive it)."""

    _fields_ = [*((name, ctypes.c_int64) for name in ("hidden", "heads", "kv_heads", "head_dim", "rotary_dim",
                                                       "intermediate")),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("bf16_kernel", ctypes.c_int),
                ("input_norm", ctypes.c_void_p), ("post_attention_norm", ctypes.c_void_p),
                *((name, NativeLinearSpec) for name in ("qkv", "o", "gate_up", "down"))]


def kernels_available() -> bool:
    return _library() is not None


def _required_library() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("lmserve's CPU kernels are not available on this machine")
    return lib


def qtype_of(blocks: torch.Tensor, in_features: int) -> int | None:
    """The ggml type of a [rows, row_bytes] block tensor, read off its row length (each type's block size differs)."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or in_features % QK:
        return None
    per_block = blocks.shape[1] * QK / in_features
    return next((qtype for qtype, size in BLOCK_BYTES.items() if size == per_block), None)


def pack_blocks(qtype: int, blocks: torch.Tensor) -> torch.Tensor:
    """GGUF block rows -> the kernels' row layout (same bytes, regrouped per row): all f16 scales, then (Q4_1) all
    f16 offsets, then all quant bytes, so the kernels convert eight blocks' scales in one vector and read a row
    front to back."""
    rows = blocks.shape[0]
    per_block = blocks.view(rows, -1, BLOCK_BYTES[qtype])
    header = 4 if qtype == gguf.GGMLQuantizationType.Q4_1 else 2
    parts = [*(per_block[:, :, i:i + 2] for i in range(0, header, 2)), per_block[:, :, header:]]
    return torch.cat([part.reshape(rows, -1) for part in parts], dim=1)


class _Scratch(threading.local):
    """Per-thread scratch buffers, grown on demand: allocating them on every call costs more than small kernels."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[name] = torch.empty(max(numel, 1 << 16), dtype=dtype)
        return buffer


_scratch = _Scratch()


def quant_matmul(qtype: int, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 @ W.T, W being `blocks` ([N, K / 32 * block bytes], pack_blocks' layout): [M, N] float32."""
    lib = _required_library()
    x = x.contiguous()
    rows, in_features = x.shape
    out = torch.empty(rows, blocks.shape[0], dtype=torch.float32)
    x_int16 = _scratch.get("x_int16", rows * in_features, torch.int16).data_ptr()
    x_scale = _scratch.get("x_scale", 2 * rows * (in_features // QK), torch.float32).data_ptr()
    x_sum = x_scale + 4 * rows * (in_features // QK)
    status = lib.quant_matmul(qtype, x.data_ptr(), rows, in_features, blocks.data_ptr(), blocks.shape[0],
                              out.data_ptr(), x_int16, x_scale, x_sum)
    if status != 0:
        raise ValueError(f"quant_matmul: ggml type {qtype} with {in_features} input features is not supported")
    return out


def has_bf16_dot_product() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16); bf16_matmul widens to float32 elsewhere."""
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= cpu_flags()


class Bf16Kernel(enum.IntEnum):
    """bf16_matmul's arithmetic (bf16_matmul.c): float32 FMAs, AVX512-BF16 dot products, or AMX tiles (which leave
    products of few rows to the dot products)."""

    AVX2 = 0
    AVX512 = 1
    AMX = 2


@cache
def best_bf16_kernel() -> Bf16Kernel:
    """The fastest kernel this CPU runs; AMX only once Linux grants the process its tile state."""
    if not has_bf16_dot_product():
        return Bf16Kernel.AVX2
    if {"amx_tile", "amx_bf16"} <= cpu_flags() and _required_library().amx_enable():
        return Bf16Kernel.AMX
    return Bf16Kernel.AVX512


def _runnable(kernel: Bf16Kernel | None) -> Bf16Kernel:
    """kernel, or by default the CPU's best; one the CPU lacks is refused (it would die of an illegal instruction)."""
    best = best_bf16_kernel()
    if kernel is not None and kernel > best:
        raise ValueError(f"this CPU runs the bf16 kernels up to {best.name}, not {kernel.name}")
    return best if kernel is None else kernel


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """A [N, K] weight (N a multiple of 16, K even) in bf16_matmul's layout: tiles of 16 output columns, each
    [K / 2][16][2], so one 64-byte load holds a pair of inputs' weights for 16 columns."""
    rows, in_features = weight.shape
    tiles = weight.detach().to(torch.bfloat16).reshape(rows // 16, 16, in_features // 2, 2)
    return tiles.permute(0, 2, 1, 3).contiguous()


class Epilogue(enum.IntEnum):
    """What bf16_matmul does with its sums (bf16_kernels.h): store them, add them into `out` (a residual), or
    multiply silu of the first half's columns by the second half's (a gate/up product)."""

    STORE = 0
    ACCUMULATE = 1
    SILU_MUL = 2


def bf16_matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
                kernel: Bf16Kernel | None = None, epilogue: Epilogue = Epilogue.STORE,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 @ W.T (+ bias), W in pack_bf16's layout: [M, N] float32, summed in float32 (with SILU_MUL,
    [M, N / 2]; with ACCUMULATE, added into `out`, which is returned). With the AVX512 and AMX kernels x is rounded
    to bf16 first. kernel: by default the CPU's best."""
    lib = _required_library()
    x = x.contiguous()
    rows, in_features = x.shape
    out_features = packed.shape[0] * 16
    width = out_features // 2 if epilogue == Epilogue.SILU_MUL else out_features
    if epilogue == Epilogue.ACCUMULATE:
        if out is None or out.shape != (rows, width) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"bf16_matmul: ACCUMULATE needs `out`, a contiguous float32 [{rows}, {width}] tensor")
    else:
        out = torch.empty(rows, width, dtype=torch.float32)
    kernel = _runnable(kernel)
    x_bf16 = None if kernel == Bf16Kernel.AVX2 else _scratch.get(  # x in bf16 (the AVX2 kernel reads float32)
        "x_bf16", lib.bf16_scratch_values(rows, in_features), torch.int16).data_ptr()
    status = lib.bf16_matmul(x.data_ptr(), rows, in_features, packed.data_ptr(), out_features,
                             None if bias is None else bias.data_ptr(), out.data_ptr(), width, x_bf16, int(kernel),
                             int(epilogue))
    if status != 0:
        raise ValueError(f"bf16_matmul: {out_features} outputs x {in_features} inputs is not supported"
                         + (f" with {epilogue.name} on {kernel.name}" if epilogue != Epilogue.STORE else ""))
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row's first index of its largest value (x [M, N] float32 on the CPU): torch's x.max(-1).indices, but
    NaN never wins."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu":
        raise ValueError(f"argmax_rows takes [rows, n] float32 CPU tensors, not {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _required_library().argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


NATIVE_KV_DTYPES = (torch.float32, torch.float16)

LAYER_OPS = ("norms", "qkv", "rotary + KV store", "attention", "o + residual", "gate_up + silu * up", "down + residual")
"""The ops of llama_layers.c's layer, as it times them."""


@contextmanager
def timed_layer_ops() -> Iterator[torch.Tensor]:
    """Within the block, llama_layer_stack adds each op's wall seconds (LAYER_OPS order) to the yielded tensor."""
    global _op_seconds
    assert _required_library().llama_layer_ops() == len(LAYER_OPS)
    _op_seconds = torch.zeros(len(LAYER_OPS), dtype=torch.float64)
    try:
        yield _op_seconds
    finally:
        _op_seconds = None


_op_seconds: torch.Tensor | None = None


def _half(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    if k_cache.dtype not in NATIVE_KV_DTYPES or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"lmserve's kernels read a float32 or float16 KV cache, not {k_cache.dtype}")
    return k_cache.dtype == torch.float16


def paged_attention_by_row(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, scale: float,
                           kernel: Bf16Kernel | None = None) -> torch.Tensor:
    """Query rows (q [rows, heads, head_dim], float32) each against its own paged context (block_tables [rows,
    max_blocks], context_lens [rows]), read in place from k_cache / v_cache ([slots, kv_heads, head_dim], float32 or
    float16); returns [rows, heads * head_dim]. With kernel AVX512 or AMX (by default where the CPU has them), a
    prefill's runs of rows from a float16 cache are computed in bf16 (prefill_attention.c)."""
    lib = _required_library()
    kernel = _runnable(kernel)
    q = q.contiguous()
    rows, heads, head_dim = q.shape
    max_context = block_tables.shape[1] * block_size
    scores = _scratch.get("scores", lib.attention_scratch_floats(heads, head_dim, max_context), torch.float32)
    out = torch.empty(rows, heads * head_dim, dtype=torch.float32)
    status = lib.paged_attention_by_row(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                                        block_tables.shape[1], context_lens.data_ptr(), rows, heads,
                                        k_cache.shape[1], head_dim, block_size, scale, scores.data_ptr(), max_context,
                                        out.data_ptr(), _half(k_cache, v_cache),
                                        int(kernel))
    if status != 0:
        raise ValueError(f"paged_attention_by_row: {heads} heads over {k_cache.shape[1]} kv heads of size {head_dim} "
                         "is not supported (head size must be a multiple of 8)")
    return out


def llama_layer_stack(layers: ctypes.Array, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Every Llama decoder layer (`layers`, one LlamaLayerSpec each) for a step's token rows; x ([rows, hidden]
    float32, contiguous) is the residual stream, updated in place and returned. block_tables / context_lens: by row
    (AttentionMetadata.row_block_tables). k_cache / v_cache: [layers, slots, kv_heads, head_dim], float32 or
    float16, contiguous."""
    lib = _required_library()
    rows, max_blocks = x.shape[0], block_tables.shape[1]
    scratch_bytes = lib.llama_stack_scratch_bytes(layers, len(layers), rows, max_blocks * block_size)
    scratch = _scratch.get("layers", scratch_bytes, torch.uint8)
    status = lib.llama_layer_stack(layers, len(layers), x.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(),
                                   k_cache.data_ptr(), v_cache.data_ptr(), _half(k_cache, v_cache), k_cache[0].numel(),
                                   slot_mapping.data_ptr(), block_tables.data_ptr(), max_blocks,
                                   context_lens.data_ptr(), block_size, scratch.data_ptr(),
                                   None if _op_seconds is None else _op_seconds.data_ptr())
    if status != 0:
        raise ValueError("llama_layer_stack: a product or the attention refused its shapes")
    return x
