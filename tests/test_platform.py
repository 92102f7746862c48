"""dtype='auto' picks bf16 only where the CPU computes it natively, and not for GGUF blocks the kernels read."""

from __future__ import annotations

import pytest
import torch
from gguf_export import export_gguf
from tiny_models import ALL_CONFIGS, make_tiny_model

from lmserve import platform
from lmserve.kernels.native import kernels_available
from lmserve.loader import load_model, parse_dtype, resolve_dtype


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


@pytest.mark.skipif(not kernels_available(), reason="needs lmserve's CPU kernels")
def test_auto_dtype_keeps_float32_where_the_kernels_read_a_ggufs_blocks(monkeypatch, tmp_path):
    """On a bf16 CPU, `auto` still runs a Q8_0/Q4 GGUF in float32: its decode kernels beat bf16 products there."""
    monkeypatch.setattr(platform, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    make_tiny_model(ALL_CONFIGS["llama-gqa-tied"], tmp_path / "hf")
    for qtype in ("Q8_0", "F16"):
        export_gguf(tmp_path / "hf", tmp_path / f"{qtype}.gguf", qtype)
    quantized = load_model(str(tmp_path / "Q8_0.gguf"))
    assert quantized.dtype == torch.float32 and quantized.quantized_types == ("Q8_0",)
    assert load_model(str(tmp_path / "Q8_0.gguf"), quantization="none").dtype == torch.bfloat16
    assert load_model(str(tmp_path / "F16.gguf")).dtype == torch.bfloat16
    # resolve_dtype (what reports print) agrees without loading the weights
    assert resolve_dtype(str(tmp_path / "Q8_0.gguf")) == torch.float32
    assert resolve_dtype(str(tmp_path / "Q8_0.gguf"), quantization="none") == torch.bfloat16
    assert resolve_dtype(str(tmp_path / "F16.gguf")) == torch.bfloat16
    assert resolve_dtype(str(tmp_path / "hf")) == torch.bfloat16
