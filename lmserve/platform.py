"""What the machine we run on can do: fast bf16 or not, and how much memory is free for the KV cache."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

GiB = 1 << 30


@cache
def cpu_flags() -> frozenset[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return frozenset()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_fast_bf16(device: torch.device) -> bool:
    """bf16 pays off on GPUs that support it and on CPUs with AVX512-BF16 or AMX; elsewhere it is emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def auto_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if has_fast_bf16(device) else torch.float32


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 * GiB
