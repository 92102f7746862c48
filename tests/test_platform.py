"""dtype='auto' picks bf16 only where the CPU computes it natively; for GGUF blocks the kernels read, float32
activations with bf16 float weights there."""

from __future__ import annotations

import pytest
import torch
from gguf_export import export_gguf
from tiny_models import ALL_CONFIGS, make_tiny_model

from lmserve import platform
from lmserve.kernels.native import kernels_available
from lmserve.layers.attention import AttentionMetadata, KVCache
from lmserve.layers.linear import Linear
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


@pytest.mark.skipif(not kernels_available(), reason="needs lmserve's CPU kernels")
def test_auto_on_a_bf16_cpu_multiplies_many_rows_in_bf16_and_few_on_the_blocks(monkeypatch, tmp_path):
    """`auto` on a bf16 CPU: float32 activations; the linears keep blocks (one row) and a bf16 weight in lmserve's
    tiles (prefill, batches); the embedding stays float32 (the tied LM head gets its own tiles). Logits stay near
    float32's."""
    monkeypatch.setattr(platform, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    make_tiny_model(ALL_CONFIGS["llama-gqa-tied"], tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "q.gguf", "Q8_0")
    mixed, reference = load_model(str(tmp_path / "q.gguf")), load_model(str(tmp_path / "q.gguf"), dtype="float32")
    linears = [m for m in mixed.model.modules() if isinstance(m, Linear)]
    assert mixed.dtype == torch.float32 and all(m.weight_form.startswith("bfloat16") for m in linears)
    assert all(m.quantized is not None and m.bf16_tiles is not None and m.weight is None for m in linears)
    assert mixed.model.embed_tokens.weight.dtype == torch.float32
    c = mixed.config
    for rows in (12, 1):  # the tiles, then the blocks
        logits = []
        for lm in (mixed, reference):
            cache = KVCache.allocate(c.num_layers, 4, 4, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
            meta = AttentionMetadata.build([rows], [rows], [[0, 1, 2, 3]], 4)
            with torch.inference_mode():
                hidden = lm.model(torch.arange(3, 3 + rows), meta, cache)
                logits.append(lm.model.compute_logits(hidden))
        assert logits[0].dtype == torch.float32
        assert ((logits[0] - logits[1]).norm() / logits[1].norm()).item() < 2e-2
