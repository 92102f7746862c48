"""What a benchmark records about where it ran: peak memory, the CPU and its relevant flags, library versions."""

from __future__ import annotations

import os
import platform
import resource
import sys
from importlib import metadata
from typing import Any

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def peak_memory() -> dict[str, float | None]:
    """RSS high-water mark of this process (MiB), and CUDA's max allocated (MiB) when CUDA is in use."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out: dict[str, float | None] = {"peak_rss_mib": rss_kib / 1024.0, "cuda_max_allocated_mib": None}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def cpu_info(cpuinfo_path: str = "/proc/cpuinfo") -> dict[str, Any]:
    """CPU model name, logical cores and which of the flags that matter for matmuls it has."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open(cpuinfo_path, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("unknown", "", platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "logical_cores": os.cpu_count(),
            "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of `packages` (None when one is missing)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
