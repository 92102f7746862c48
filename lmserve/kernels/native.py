"""Compile quant_matmul.c once per machine (cached by source hash) and call it on torch tensors.

A plain C file with no Python or torch headers builds in about a second, so it is compiled at first use rather than
at install time; a machine without a C compiler, or a CPU without AVX2/FMA/F16C, simply keeps the float path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from lmserve.platform import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quant_matmul.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
BLOCK_BYTES = {2: 18, 3: 20, 8: 34}  # ggml type number (Q4_0, Q4_1, Q8_0) -> bytes per block of 32 weights
QTYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
QK = 32


def cache_dir() -> Path:
    return Path(os.environ.get("LMSERVE_CACHE_DIR", Path.home() / ".cache" / "lmserve")) / "kernels"


@cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with the reason logged once) where it cannot run."""
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma", "f16c"} <= cpu_flags():
        log.info("quantized CPU kernels need an x86-64 CPU with AVX2, FMA and F16C; using float weights")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found (set CC): quantized CPU kernels are off, using float weights")
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"quant_matmul-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("building quantized CPU kernels failed, using float weights:\n%s", result.stderr)
                return None
            os.replace(built, target)  # atomic: concurrent first starts never load a half-written file
    lib = ctypes.CDLL(str(target))  # torch is imported, so its OpenMP runtime is the one this library binds to
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.quant_matmul.argtypes = [ctypes.c_int, pointer, size, size, pointer, size, pointer, pointer, pointer, pointer]
    lib.quant_matmul.restype = ctypes.c_int
    return lib


def kernels_available() -> bool:
    return _library() is not None


def qtype_of(blocks: torch.Tensor, in_features: int) -> int | None:
    """The ggml type of a [rows, row_bytes] block tensor, read off its row length (each type's block size differs)."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or in_features % QK:
        return None
    per_block = blocks.shape[1] * QK / in_features
    return next((qtype for qtype, size in BLOCK_BYTES.items() if size == per_block), None)


def quant_matmul(qtype: int, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 @ W.T, W being `blocks` ([N, K / 32 * block bytes], GGUF layout): [M, N] float32."""
    lib = _library()
    if lib is None:
        raise RuntimeError("quantized CPU kernels are not available on this machine")
    x = x.contiguous()
    rows, in_features = x.shape
    out = torch.empty(rows, blocks.shape[0], dtype=torch.float32)
    x_int16 = torch.empty(rows, in_features, dtype=torch.int16)
    x_scale = torch.empty(2, rows, in_features // QK, dtype=torch.float32)
    status = lib.quant_matmul(qtype, x.data_ptr(), rows, in_features, blocks.data_ptr(), blocks.shape[0],
                              out.data_ptr(), x_int16.data_ptr(), x_scale[0].data_ptr(), x_scale[1].data_ptr())
    if status != 0:
        raise ValueError(f"quant_matmul: ggml type {qtype} with {in_features} input features is not supported")
    return out
