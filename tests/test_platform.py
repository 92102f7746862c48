"""dtype='auto' picks bf16 only where the CPU computes it natively."""

from __future__ import annotations

import pytest
import torch

from lmserve import platform
from lmserve.loader import parse_dtype


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "fma"}, torch.float32),
    ({"avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"amx_tile", "amx_bf16"}, torch.bfloat16),
])
def test_auto_dtype_follows_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(platform, "cpu_flags", lambda: frozenset(flags))
    assert parse_dtype("auto", torch.device("cpu")) == expected


def test_explicit_dtype_wins_and_bad_dtype_is_named():
    assert parse_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'int3'"):
        parse_dtype("int3", torch.device("cpu"))
