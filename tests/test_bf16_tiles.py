"""lmserve's bf16 tiles (kernels/bf16_matmul.c): the product equals a float32 product of the bf16-rounded weight,
on AVX2 (float32 FMAs) and, where the CPU has them, AVX512-BF16 and AMX (x rounded to bf16 too); a Linear keeps its
weight in tiles when stored in bf16, and the C decode stack runs on them like the torch layers do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf_export import export_gguf
from model_helpers import assert_fused_stack_matches_torch_layers
from tiny_models import ALL_CONFIGS, make_tiny_model

import lmserve.loader as loader
import lmserve.models.llama as llama
from lmserve.kernels.native import (
    Bf16Kernel,
    Epilogue,
    best_bf16_kernel,
    bf16_matmul,
    has_bf16_dot_product,
    kernels_available,
    pack_bf16,
)
from lmserve.layers.fused_layers import fused_llama_layers
from lmserve.layers.linear import Linear
from lmserve.loader import load_model

pytestmark = pytest.mark.skipif(not kernels_available(), reason="needs an x86-64 CPU with AVX2 and a C compiler")
KERNELS = [kernel for kernel in Bf16Kernel if kernel <= best_bf16_kernel()] if kernels_available() else []


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 9, 17, 40, 70, 130])
@pytest.mark.parametrize(("out_features", "in_features"), [(16, 2), (48, 64), (80, 130), (208, 576), (96, 1536)])
def test_tiles_product_matches_float_product_of_the_bf16_weight(kernel, rows, out_features, in_features):
    gen = torch.Generator().manual_seed(rows * out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=gen)
    x, bias = torch.randn(rows, in_features, generator=gen), torch.randn(out_features, generator=gen)
    rounded = weight.to(torch.bfloat16).float()
    x_seen = x.to(torch.bfloat16).float() if kernel != Bf16Kernel.AVX2 else x
    for b in (None, bias):
        got = bf16_matmul(x, pack_bf16(weight), b, kernel=kernel)
        torch.testing.assert_close(got, F.linear(x_seen, rounded, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", [1, 2, 9, 17, 40, 70, 200])  # 200: each thread its own rows (AMX)
@pytest.mark.parametrize(("out_features", "in_features"), [(32, 64), (96, 576), (64, 1536)])
def test_tiles_add_into_a_residual_and_fuse_silu_times_up(kernel, rows, out_features, in_features):
    """The C stack's epilogues: ACCUMULATE adds the product into `out` (o and down into the residual stream), and
    SILU_MUL returns silu(first half) * second half of the columns (the MLP's gate/up), on the kernels that have
    them; the AVX2 kernel refuses SILU_MUL."""
    gen = torch.Generator().manual_seed(rows * out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    x, bias = torch.randn(rows, in_features, generator=gen), torch.randn(out_features, generator=gen)
    x_seen = x.to(torch.bfloat16).float() if kernel != Bf16Kernel.AVX2 else x
    product = F.linear(x_seen, weight.to(torch.bfloat16).float())
    packed = pack_bf16(weight)
    for b in (None, bias):
        residual = torch.randn(rows, out_features, generator=gen)
        got = bf16_matmul(x, packed, b, kernel=kernel, epilogue=Epilogue.ACCUMULATE, out=residual.clone())
        torch.testing.assert_close(got, residual + product + (0 if b is None else b), rtol=1e-4, atol=1e-4)
    if kernel == Bf16Kernel.AVX2:
        with pytest.raises(ValueError, match="SILU_MUL on AVX2"):
            bf16_matmul(x, packed, kernel=kernel, epilogue=Epilogue.SILU_MUL)
        return
    gate, up = product.chunk(2, dim=-1)
    got = bf16_matmul(x, packed, kernel=kernel, epilogue=Epilogue.SILU_MUL)
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=1e-4, atol=1e-5)


def test_tiles_product_refuses_shapes_it_cannot_tile():
    with pytest.raises(ValueError, match="32 outputs x 3 inputs"):
        bf16_matmul(torch.randn(2, 3), torch.zeros(2, 2, 16, 2, dtype=torch.bfloat16))


def test_linear_stored_in_bf16_keeps_tiles_and_runs_on_them():
    layer = Linear(64, 48)
    expected_weight = layer.weight.detach().to(torch.bfloat16).float()
    layer.store_weight_in(torch.bfloat16)
    assert layer.weight is None and layer.bf16_tiles is not None and layer.weight_form == "bfloat16 tiles"
    assert layer.runs_natively(1) and layer.runs_natively(1000)
    x = torch.randn(2, 3, 64)
    out = layer(x)
    assert out.shape == (2, 3, 48) and out.dtype == torch.float32
    reference = F.linear(x.to(torch.bfloat16).float() if has_bf16_dot_product() else x, expected_weight, layer.bias)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    odd = Linear(64, 40)  # 40 outputs: not whole tiles, so a plain bf16 weight
    odd.store_weight_in(torch.bfloat16)
    assert odd.bf16_tiles is None and odd.weight.dtype == torch.bfloat16 and not odd.runs_natively(2)


@pytest.mark.parametrize("source", ["gguf-q4_1", "safetensors"])
@pytest.mark.parametrize("seqs", [1, 3, 7, 20])
def test_fused_stack_on_tiles_matches_the_torch_layers(tmp_path, monkeypatch, source, seqs):
    """The C stack on tiles (and, for one row, the GGUF blocks) against the same model's torch layers, in a prefill
    and a decode step."""
    make_tiny_model(ALL_CONFIGS["llama-gqa-tied"], tmp_path / "hf")
    if source == "gguf-q4_1":  # the blocks and bf16 tiles that the default loads where the CPU has native bf16
        export_gguf(tmp_path / "hf", tmp_path / "tiny.gguf", "Q4_1")
        monkeypatch.setattr(loader, "has_fast_bf16", lambda device: True)
        model = load_model(str(tmp_path / "tiny.gguf")).model
    else:
        model = load_model(str(tmp_path / "hf"), dtype="float32").model
        model.store_linear_weights_in(torch.bfloat16)
    c = model.config
    assert model.fused_stack is not None and model.layers[0].mlp.down_proj.bf16_tiles is not None
    calls = []
    monkeypatch.setattr(llama, "fused_llama_layers", lambda *args: calls.append(1) or fused_llama_layers(*args))
    assert_fused_stack_matches_torch_layers(model, c, seqs)
    assert calls == [1, 1]  # the prefill and the decode took the C stack
