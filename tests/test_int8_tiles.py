"""lmserve's int8 products (kernels/int8_matmul.c, --quantization int8): the product equals the integer arithmetic
of the int8-rounded weight and input (per group of 64 inputs), its epilogues match the bf16 tiles', a Linear keeps
int8 tiles, the C stack runs on them like the torch layers, and an engine serves with them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import assert_int8_serves_close_to_float32
from gguf_export import export_gguf
from model_helpers import assert_fused_stack_matches_torch_layers
from tiny_models import ALL_CONFIGS, make_tiny_model

import lmserve.models.llama as llama
from lmserve.kernels.int8_linear import GROUP, has_int8_dot_product, int8_matmul, pack_int8
from lmserve.kernels.native import Epilogue, kernels_available
from lmserve.layers.fused_layers import fused_llama_layers
from lmserve.layers.linear import Linear
from lmserve.loader import load_model
from lmserve.platform import has_fast_bf16

needs_vnni = pytest.mark.skipif(not (kernels_available() and has_int8_dot_product()),
                                reason="needs lmserve's kernels on a CPU with AVX512-VNNI")


def _rounded(t: torch.Tensor, float32_inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, scales) of t's rows per group of 64, max-abs scaled: x as the kernel rounds it (times 127 / max
    in float32), the weight as pack_int8 does (divided by max / 127)."""
    groups = t.reshape(t.shape[0], -1, GROUP)
    top = groups.abs().amax(-1, keepdim=True)
    if float32_inverse:
        inverse = torch.full_like(top, 127) / top  # a true division (127 / top is reciprocal(top) * 127)
        q = (groups * torch.where(top > 0, inverse, torch.zeros_like(top))).round()
    else:
        q = (groups / torch.where(top > 0, top / 127, torch.ones_like(top))).round().clamp(-127, 127)
    return q.double(), (top / 127).double()


def int8_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    xq, xs = _rounded(x, float32_inverse=True)
    wq, ws = _rounded(weight, float32_inverse=False)
    return torch.einsum("mgk,ngk,mg,ng->mn", xq, wq, xs[..., 0], ws[..., 0])


@needs_vnni
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 40, 70, 130])
@pytest.mark.parametrize(("out_features", "in_features"), [(16, 64), (48, 128), (80, 576), (208, 576), (96, 1536)])
def test_int8_product_is_the_integer_arithmetic_of_the_rounded_operands(rows, out_features, in_features):
    gen = torch.Generator().manual_seed(rows * out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    x, bias = torch.randn(rows, in_features, generator=gen), torch.randn(out_features, generator=gen)
    if rows > 1:
        x[0, :GROUP] = 0  # a zero group: scale 0, no division by it
    expected = int8_reference(x, weight)
    packed = pack_int8(weight)
    for b in (None, bias):
        got = int8_matmul(x, packed, b).double()
        torch.testing.assert_close(got, expected + (0 if b is None else b.double()), rtol=1e-5, atol=1e-5)
    assert (expected - F.linear(x, weight).double()).abs().max() > 1e-4  # the rounding is real


@needs_vnni
@pytest.mark.parametrize("rows", [1, 5, 17, 70])
@pytest.mark.parametrize(("out_features", "in_features"), [(32, 64), (96, 576), (64, 1536)])
def test_int8_product_adds_into_a_residual_and_fuses_silu_times_up(rows, out_features, in_features):
    gen = torch.Generator().manual_seed(rows + out_features * in_features)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    x, bias = torch.randn(rows, in_features, generator=gen), torch.randn(out_features, generator=gen)
    product, packed = int8_reference(x, weight).float(), pack_int8(weight)
    residual = torch.randn(rows, out_features, generator=gen)
    got = int8_matmul(x, packed, bias, epilogue=Epilogue.ACCUMULATE, out=residual.clone())
    torch.testing.assert_close(got, residual + product + bias, rtol=1e-5, atol=1e-5)
    half = out_features // 2
    fused = int8_matmul(x, packed, epilogue=Epilogue.SILU_MUL)
    torch.testing.assert_close(fused, F.silu(product[:, :half]) * product[:, half:], rtol=1e-5, atol=1e-5)


@needs_vnni
def test_int8_product_refuses_what_it_cannot_tile():
    with pytest.raises(ValueError, match="inputs in 64s"):
        pack_int8(torch.randn(16, 96))
    with pytest.raises(ValueError, match="ACCUMULATE needs `out`"):
        int8_matmul(torch.randn(2, 64), pack_int8(torch.randn(16, 64)), epilogue=Epilogue.ACCUMULATE)
    with pytest.raises(ValueError, match="48 outputs x 64 inputs is not supported with SILU_MUL"):
        int8_matmul(torch.randn(2, 64), pack_int8(torch.randn(48, 64)), epilogue=Epilogue.SILU_MUL)


@needs_vnni
def test_linear_stored_in_int8_keeps_tiles_and_runs_on_them():
    layer = Linear(128, 48)
    weight = layer.weight.detach().clone()
    layer.store_weight_in_int8()
    assert layer.weight is None and layer.weight_form == "int8 tiles" and layer.runs_natively(1000)
    x = torch.randn(2, 3, 128)
    out = layer(x)
    assert out.shape == (2, 3, 48)
    expected = int8_reference(x.reshape(6, 128), weight).float() + layer.bias
    torch.testing.assert_close(out.reshape(6, 48), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"a \[48, 96\] linear cannot be packed"):
        Linear(96, 48).store_weight_in_int8()


@needs_vnni
@pytest.mark.parametrize("seqs", [1, 3, 20])
def test_fused_stack_on_int8_tiles_matches_the_torch_layers(tmp_path, monkeypatch, seqs):
    """The C stack on int8 tiles (and, for one row, the GGUF blocks) against the same model's torch layers (which
    call the same kernel one product at a time), in a prefill and a decode step. Q8_0: a Q4 file keeps its blocks."""
    make_tiny_model(ALL_CONFIGS["llama-gqa-tied"], tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "tiny.gguf", "Q8_0")
    lm = load_model(str(tmp_path / "tiny.gguf"), quantization="int8")
    model, c = lm.model, lm.config
    assert model.fused_stack is not None and "int8" in lm.quantized_types
    assert model.layers[0].mlp.down_proj.int8_tiles is not None and model.lm_head.int8_tiles is None
    assert (model.lm_head.block_tiles is None) == has_fast_bf16(torch.device("cpu"))  # else bf16 tiles
    calls = []
    monkeypatch.setattr(llama, "fused_llama_layers", lambda *args: calls.append(1) or fused_llama_layers(*args))
    assert_fused_stack_matches_torch_layers(model, c, seqs)
    assert calls == [1, 1]


@needs_vnni
def test_a_q4_gguf_keeps_its_blocks_for_int8_products_even_with_vnni(tmp_path):
    """int8 weights per 64 from SmolLM2's Q4_1 ones gave +3.4% perplexity, its blocks by int8 inputs +1.0%."""
    make_tiny_model(ALL_CONFIGS["llama-gqa-tied"], tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "tiny.gguf", "Q4_1")
    model = load_model(str(tmp_path / "tiny.gguf"), quantization="int8").model
    down = model.layers[0].mlp.down_proj
    assert down.int8_tiles is None and down.weight_form == "Q4_1 x int8 inputs"


@needs_vnni
def test_engine_serves_int8_close_to_float32_and_frees_its_blocks(tmp_path):
    make_tiny_model(ALL_CONFIGS["llama-gqa-tied"], tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "tiny.gguf", "Q8_0")
    assert_int8_serves_close_to_float32(str(tmp_path / "tiny.gguf"))
