"""A GGUF's Q4_0/Q4_1 blocks regrouped eight outputs at a time, multiplied by inputs rounded per block of 32 to int16
(kernels/q4_int16_matmul.c: the default where the float weights stay float32) or to int8 (kernels/q4_int8_matmul.c:
--quantization int8 with AVX2 only). The product equals that integer arithmetic, a Linear keeps the tiles instead
of its float weight, the C stack runs on them like the torch layers, and an engine serves with them (the VNNI and
native-bf16 paths are made unavailable, so these run on any AVX2 CPU)."""

from __future__ import annotations

import gguf
import pytest
import torch
from engine_helpers import assert_int8_serves_close_to_float32
from gguf_export import export_gguf
from model_helpers import assert_fused_stack_matches_torch_layers
from tiny_models import ALL_CONFIGS, make_tiny_model

import lmserve.loader as loader
import lmserve.models.llama as llama
from lmserve.kernels.native import Epilogue, kernels_available, pack_blocks
from lmserve.kernels.q4_tiles import pack_q4_tiles, q4_matmul
from lmserve.layers.fused_layers import fused_llama_layers
from lmserve.layers.linear import Linear, QuantizedWeight
from lmserve.loader import load_model

needs_kernels = pytest.mark.skipif(not kernels_available(), reason="needs lmserve's CPU kernels (AVX2)")
Q4_1, Q4_0, Q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0


def gguf_blocks(qtype: gguf.GGMLQuantizationType, weight: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quantize(weight.numpy(), qtype)).view(weight.shape[0], -1)


def q4_reference(x: torch.Tensor, qtype: gguf.GGMLQuantizationType, raw: torch.Tensor, input_bits: int) -> torch.Tensor:
    """From the GGUF bytes: x rounded per block (times 127 or 32767 / max, to nearest even) by the weight's d * q +
    m, summed in float64; the mins go with the rounded inputs' sum (int8) or x's own (int16)."""
    rows, blocks = raw.shape[0], x.shape[1] // 32
    header = 4 if qtype == Q4_1 else 2
    b = raw.view(rows, blocks, header + 16)
    d = b[..., 0:2].contiguous().view(torch.float16).double().squeeze(-1)
    m = b[..., 2:4].contiguous().view(torch.float16).double().squeeze(-1) if qtype == Q4_1 else -8 * d
    q = torch.cat([b[..., header:] & 15, b[..., header:] >> 4], -1).double()
    xb = x.reshape(x.shape[0], blocks, 32)
    scale = xb.abs().amax(-1) / (127 if input_bits == 8 else 32767)
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    xq = (xb * inverse[..., None]).round().double()
    dots = torch.einsum("mbk,nbk->mnb", xq, q) * scale.double()[:, None, :]
    sums = xq.sum(-1) * scale.double() if input_bits == 8 else xb.double().sum(-1)
    return (dots * d + m * sums[:, None, :]).sum(-1)


@needs_kernels
@pytest.mark.parametrize("input_bits", [16, 8])
@pytest.mark.parametrize("qtype", [Q4_1, Q4_0])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 9, 33, 64, 131])
@pytest.mark.parametrize(("out_features", "in_features"), [(8, 32), (64, 256), (960, 576), (24, 1536)])
def test_q4_product_is_the_integer_arithmetic_of_the_rounded_input(input_bits, qtype, rows, out_features,
                                                                     in_features):
    torch.manual_seed(rows + out_features)
    raw = gguf_blocks(qtype, torch.randn(out_features, in_features))
    x = torch.randn(rows, in_features) * torch.linspace(0.1, 3, in_features)
    x[:, 5] *= 40  # an outlier: its block's other inputs keep only a few levels
    out = q4_matmul(x, pack_q4_tiles(int(qtype), pack_blocks(int(qtype), raw), input_bits))
    expected = q4_reference(x, qtype, raw, input_bits)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    dequantized = torch.from_numpy(gguf.dequantize(raw.numpy(), qtype)).reshape(out_features, in_features)
    error = ((out - x @ dequantized.T).norm() / (x @ dequantized.T).norm()).item()
    assert 0 < error < (0.03 if input_bits == 8 else 3e-4)  # close to the float product, not equal to it


@needs_kernels
@pytest.mark.parametrize("input_bits", [16, 8])
def test_q4_product_adds_bias_and_into_a_residual_and_refuses_what_it_cannot_tile(input_bits):
    raw = gguf_blocks(Q4_1, torch.randn(16, 64))
    tiles = pack_q4_tiles(int(Q4_1), pack_blocks(int(Q4_1), raw), input_bits)
    x, bias, residual = torch.randn(6, 64), torch.randn(16), torch.randn(6, 16)
    plain = q4_matmul(x, tiles)
    torch.testing.assert_close(q4_matmul(x, tiles, bias), plain + bias)
    summed = q4_matmul(x, tiles, bias, Epilogue.ACCUMULATE, residual.clone())
    torch.testing.assert_close(summed, residual + plain + bias)
    with pytest.raises(ValueError, match="ACCUMULATE needs `out`"):
        q4_matmul(x, tiles, epilogue=Epilogue.ACCUMULATE)
    with pytest.raises(ValueError, match="16 outputs x 64 inputs is not supported with SILU_MUL"):
        q4_matmul(x, tiles, epilogue=Epilogue.SILU_MUL)
    with pytest.raises(ValueError, match="x has 96 inputs, the weight 64"):
        q4_matmul(torch.randn(2, 96), tiles)
    with pytest.raises(ValueError, match="Q4_0/Q4_1, outputs in 8s, 8 or 16 bits"):
        pack_q4_tiles(int(Q4_1), pack_blocks(int(Q4_1), gguf_blocks(Q4_1, torch.randn(12, 64))), input_bits)
    with pytest.raises(ValueError, match="Q4_0/Q4_1, outputs in 8s, 8 or 16 bits"):
        pack_q4_tiles(int(Q4_1), pack_blocks(int(Q4_1), raw), 4)


@needs_kernels
@pytest.mark.parametrize("input_bits", [16, 8])
def test_linear_keeps_q4_tiles_for_every_row_count_and_q8_blocks_stay(input_bits):
    layer = Linear(64, 24)
    raw = gguf_blocks(Q4_1, layer.weight.detach())
    layer.quantized = QuantizedWeight(int(Q4_1), pack_blocks(int(Q4_1), raw))
    assert layer.store_weight_in_q4_tiles(input_bits)
    assert layer.weight is None and layer.weight_form == f"Q4_1 x int{input_bits} inputs"
    assert layer.max_quantized_rows == 0
    assert layer.runs_natively(1) and layer.runs_natively(1000, decode=False)
    x = torch.randn(2, 3, 64)
    expected = q4_reference(x.reshape(6, 64), Q4_1, raw, input_bits).float() + layer.bias
    torch.testing.assert_close(layer(x).reshape(6, 24), expected, rtol=1e-5, atol=1e-5)
    q8 = Linear(64, 24)
    q8.quantized = QuantizedWeight(int(Q8_0), pack_blocks(int(Q8_0), gguf_blocks(Q8_0, q8.weight.detach())))
    assert not q8.store_weight_in_q4_tiles(input_bits) and q8.q4_tiles is None and q8.weight is not None


@needs_kernels
@pytest.mark.parametrize("seqs", [1, 3, 20])
@pytest.mark.parametrize(("quantization", "input_bits"), [("auto", 16), ("int8", 8)])
def test_fused_stack_on_q4_tiles_matches_the_torch_layers(tmp_path, monkeypatch, seqs, quantization, input_bits):
    monkeypatch.setattr(loader, "has_int8_dot_product", lambda: False)
    monkeypatch.setattr(loader, "has_fast_bf16", lambda device: False)
    make_tiny_model(ALL_CONFIGS["llama-gqa-tied"], tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "tiny.gguf", "Q4_1")
    lm = load_model(str(tmp_path / "tiny.gguf"), quantization=quantization)
    model, c = lm.model, lm.config
    assert model.fused_stack is not None and ("int8" in lm.quantized_types) == (input_bits == 8)
    down = model.layers[0].mlp.down_proj
    assert down.q4_tiles.input_bits == input_bits and down.int8_tiles is None and down.weight is None
    assert model.lm_head.q4_tiles is None and model.lm_head.weight is not None  # the head keeps its path
    calls = []
    monkeypatch.setattr(llama, "fused_llama_layers", lambda *args: calls.append(1) or fused_llama_layers(*args))
    # An int8 step is 1/127 of a block's largest input (32 of them in this tiny model's 64-wide rows): one input
    # rounded the other way after a float-rounding difference upstream moves the output by ~1e-3 (a wrong layer: ~1).
    assert_fused_stack_matches_torch_layers(model, c, seqs, tolerance=5e-3 if input_bits == 8 else 1e-3)
    assert calls == [1, 1]


@needs_kernels
def test_engine_serves_q4_int8_close_to_float32_and_frees_its_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "has_int8_dot_product", lambda: False)
    make_tiny_model(ALL_CONFIGS["llama-gqa-tied"], tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "tiny.gguf", "Q4_1")
    assert_int8_serves_close_to_float32(str(tmp_path / "tiny.gguf"))


def test_int8_without_vnni_is_refused_for_weights_without_q4_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "has_int8_dot_product", lambda: False)
    make_tiny_model(ALL_CONFIGS["llama-gqa-tied"], tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "q8.gguf", "Q8_0")
    for path in (tmp_path / "hf", tmp_path / "q8.gguf"):
        with pytest.raises(ValueError, match="quantization int8 needs .* AVX512-VNNI or, with AVX2 only, a GGUF"):
            load_model(str(path), quantization="int8")
