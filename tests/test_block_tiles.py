"""A GGUF's Q4_0/Q4_1/Q8_0 blocks regrouped eight outputs at a time, multiplied by inputs rounded per block of 32 to
int16 (kernels/tiles_int16_matmul.c: the default where the float weights stay float32) or, Q4 only, to int8
(kernels/q4_int8_matmul.c: --quantization int8 on a Q4 GGUF). The product equals that integer arithmetic, a Linear
keeps the tiles instead of its float weight, the C stack runs on them like the torch layers, and an engine serves
with them (the VNNI and native-bf16 paths are made unavailable, so these run on any AVX2 CPU)."""

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
from lmserve.kernels import native
from lmserve.kernels.block_tiles import block_tiles_matmul, pack_block_tiles
from lmserve.kernels.native import Epilogue, kernels_available, pack_blocks
from lmserve.layers.fused_layers import fused_llama_layers
from lmserve.layers.linear import Linear, QuantizedWeight
from lmserve.loader import load_model

needs_kernels = pytest.mark.skipif(not kernels_available(), reason="needs lmserve's CPU kernels (AVX2)")
Q4_1, Q4_0, Q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0


@pytest.fixture(params=["avx2", "avx512-vnni"])
def tile_width(request):
    """Each tile product on both of its paths where the CPU has AVX512-VNNI (column groups in pairs there)."""
    lib = native._required_library() if kernels_available() else None
    if lib is None or (request.param == "avx512-vnni" and not lib.block_tiles_vnni(-1)):
        pytest.skip(f"the {request.param} path of the int16 tiles does not run on this CPU")
    lib.block_tiles_vnni(int(request.param == "avx512-vnni"))
    yield request.param
    lib.block_tiles_vnni(1)  # back to the CPU's own choice


def gguf_blocks(qtype: gguf.GGMLQuantizationType, weight: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quantize(weight.numpy(), qtype)).view(weight.shape[0], -1)


def block_reference(x: torch.Tensor, qtype: gguf.GGMLQuantizationType, raw: torch.Tensor,
                    input_bits: int) -> torch.Tensor:
    """From the GGUF bytes: x rounded per block (times 127 or 32767 / max, to nearest even) by the weight's d * q +
    m, summed in float64; the mins go with the rounded inputs' sum (int8) or x's own (int16)."""
    rows, blocks = raw.shape[0], x.shape[1] // 32
    header, quant_bytes = {Q4_1: (4, 16), Q4_0: (2, 16), Q8_0: (2, 32)}[qtype]
    b = raw.view(rows, blocks, header + quant_bytes)
    d = b[..., 0:2].contiguous().view(torch.float16).double().squeeze(-1)
    m = {Q4_1: lambda: b[..., 2:4].contiguous().view(torch.float16).double().squeeze(-1), Q4_0: lambda: -8 * d,
         Q8_0: lambda: torch.zeros_like(d)}[qtype]()
    q = (b[..., header:].view(torch.int8) if qtype == Q8_0
         else torch.cat([b[..., header:] & 15, b[..., header:] >> 4], -1)).double()
    xb = x.reshape(x.shape[0], blocks, 32)
    scale = xb.abs().amax(-1) / (127 if input_bits == 8 else 32767)
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    xq = (xb * inverse[..., None]).round().double()
    dots = torch.einsum("mbk,nbk->mnb", xq, q) * scale.double()[:, None, :]
    sums = xq.sum(-1) * scale.double() if input_bits == 8 else xb.double().sum(-1)
    return (dots * d + m * sums[:, None, :]).sum(-1)


@needs_kernels
@pytest.mark.parametrize(("qtype", "input_bits"), [(Q4_1, 16), (Q4_0, 16), (Q8_0, 16), (Q4_1, 8), (Q4_0, 8)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 9, 33, 64, 131])
@pytest.mark.parametrize(("out_features", "in_features"), [(8, 32), (64, 256), (960, 576), (24, 1536)])
def test_tile_product_is_the_integer_arithmetic_of_the_rounded_input(qtype, input_bits, rows, out_features,
                                                                       in_features, tile_width):
    torch.manual_seed(rows + out_features)
    raw = gguf_blocks(qtype, torch.randn(out_features, in_features))
    x = torch.randn(rows, in_features) * torch.linspace(0.1, 3, in_features)
    x[:, 5] *= 40  # an outlier: its block's other inputs keep only a few levels
    out = block_tiles_matmul(x, pack_block_tiles(int(qtype), pack_blocks(int(qtype), raw), input_bits))
    expected = block_reference(x, qtype, raw, input_bits)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    dequantized = torch.from_numpy(gguf.dequantize(raw.numpy(), qtype)).reshape(out_features, in_features)
    error = ((out - x @ dequantized.T).norm() / (x @ dequantized.T).norm()).item()
    assert 0 < error < (0.03 if input_bits == 8 else 3e-4)  # close to the float product, not equal to it


@needs_kernels
@pytest.mark.parametrize(("qtype", "input_bits"), [(Q4_1, 16), (Q8_0, 16), (Q4_1, 8)])
def test_tile_product_adds_bias_and_into_a_residual_and_refuses_what_it_cannot_tile(qtype, input_bits, tile_width):
    raw = gguf_blocks(qtype, torch.randn(16, 64))
    tiles = pack_block_tiles(int(qtype), pack_blocks(int(qtype), raw), input_bits)
    x, bias, residual = torch.randn(6, 64), torch.randn(16), torch.randn(6, 16)
    plain = block_tiles_matmul(x, tiles)
    torch.testing.assert_close(block_tiles_matmul(x, tiles, bias), plain + bias)
    summed = block_tiles_matmul(x, tiles, bias, Epilogue.ACCUMULATE, residual.clone())
    torch.testing.assert_close(summed, residual + plain + bias)
    with pytest.raises(ValueError, match="ACCUMULATE needs `out`"):
        block_tiles_matmul(x, tiles, epilogue=Epilogue.ACCUMULATE)
    with pytest.raises(ValueError, match="16 outputs x 64 inputs is not supported with SILU_MUL"):
        block_tiles_matmul(x, tiles, epilogue=Epilogue.SILU_MUL)
    with pytest.raises(ValueError, match="x has 96 inputs, the weight 64"):
        block_tiles_matmul(torch.randn(2, 96), tiles)
    refusal = r"Q4_0/Q4_1 with 8 or 16 bits, Q8_0 with 16; outputs in 8s"
    with pytest.raises(ValueError, match=f"12 outputs and {input_bits}-bit inputs .{refusal}"):
        pack_block_tiles(int(qtype), pack_blocks(int(qtype), gguf_blocks(qtype, torch.randn(12, 64))), input_bits)
    with pytest.raises(ValueError, match=f"4-bit inputs .{refusal}"):
        pack_block_tiles(int(qtype), pack_blocks(int(qtype), raw), 4)
    if qtype == Q8_0:
        with pytest.raises(ValueError, match=f"8-bit inputs .{refusal}"):
            pack_block_tiles(int(qtype), pack_blocks(int(qtype), raw), 8)


@needs_kernels
@pytest.mark.parametrize(("qtype", "input_bits"), [(Q4_1, 16), (Q4_0, 16), (Q8_0, 16), (Q4_1, 8), (Q4_0, 8)])
@pytest.mark.parametrize("out_features", [8, 24, 64])  # one column group, a pair and one alone, pairs only
def test_tiles_give_the_same_bits_on_avx512_vnni_as_on_avx2(qtype, input_bits, out_features):
    lib = native._required_library()
    if not lib.block_tiles_vnni(-1):
        pytest.skip("needs AVX512-VNNI")
    raw = gguf_blocks(qtype, torch.randn(out_features, 96))
    tiles = pack_block_tiles(int(qtype), pack_blocks(int(qtype), raw), input_bits)
    x, bias = torch.randn(13, 96), torch.randn(out_features)
    wide = block_tiles_matmul(x, tiles, bias)
    try:
        lib.block_tiles_vnni(0)
        narrow = block_tiles_matmul(x, tiles, bias)
    finally:
        lib.block_tiles_vnni(1)
    assert torch.equal(wide, narrow)


@needs_kernels
@pytest.mark.parametrize("input_bits", [16, 8])
def test_linear_keeps_tiles_for_every_row_count_and_q8_blocks_take_int16_inputs(input_bits):
    layer = Linear(64, 24)
    raw = gguf_blocks(Q4_1, layer.weight.detach())
    layer.quantized = QuantizedWeight(int(Q4_1), pack_blocks(int(Q4_1), raw))
    assert layer.store_weight_in_block_tiles(input_bits)
    assert layer.weight is None and layer.weight_form == f"Q4_1 x int{input_bits} inputs"
    assert layer.max_quantized_rows == 0
    assert layer.runs_natively(1) and layer.runs_natively(1000, decode=False)
    x = torch.randn(2, 3, 64)
    expected = block_reference(x.reshape(6, 64), Q4_1, raw, input_bits).float() + layer.bias
    torch.testing.assert_close(layer(x).reshape(6, 24), expected, rtol=1e-5, atol=1e-5)
    q8 = Linear(64, 24)
    q8_raw = gguf_blocks(Q8_0, q8.weight.detach())
    q8.quantized = QuantizedWeight(int(Q8_0), pack_blocks(int(Q8_0), q8_raw))
    assert q8.store_weight_in_block_tiles(input_bits) and q8.weight is None
    assert q8.weight_form == "Q8_0 x int16 inputs"
    expected = block_reference(x.reshape(6, 64), Q8_0, q8_raw, 16).float() + q8.bias
    torch.testing.assert_close(q8(x).reshape(6, 24), expected, rtol=1e-5, atol=1e-5)
    q5 = Linear(64, 24)
    q5.quantized = QuantizedWeight(int(gguf.GGMLQuantizationType.Q5_0), torch.zeros(24, 44, dtype=torch.uint8))
    assert not q5.store_weight_in_block_tiles(input_bits) and q5.block_tiles is None and q5.weight is not None


@needs_kernels
@pytest.mark.parametrize("seqs", [1, 3, 20])
@pytest.mark.parametrize(("file_type", "quantization", "input_bits"),
                         [("Q4_1", "auto", 16), ("Q4_1", "int8", 8), ("Q8_0", "auto", 16)])
def test_fused_stack_on_tiles_matches_the_torch_layers(tmp_path, monkeypatch, seqs, file_type, quantization,
                                                       input_bits):
    monkeypatch.setattr(loader, "has_int8_dot_product", lambda: False)
    monkeypatch.setattr(loader, "has_fast_bf16", lambda device: False)
    make_tiny_model(ALL_CONFIGS["llama-gqa-tied"], tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "tiny.gguf", file_type)
    lm = load_model(str(tmp_path / "tiny.gguf"), quantization=quantization)
    model, c = lm.model, lm.config
    assert model.fused_stack is not None and ("int8" in lm.quantized_types) == (input_bits == 8)
    down = model.layers[0].mlp.down_proj
    assert down.block_tiles.input_bits == input_bits and down.int8_tiles is None and down.weight is None
    assert down.weight_form == f"{file_type} x int{input_bits} inputs"
    head = model.lm_head  # tied: on tiles too, the embedding keeps its float rows
    assert head.block_tiles is not None and head.weight is None and model.embed_tokens.weight is not None
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
        with pytest.raises(ValueError, match="int8 needs .* a GGUF whose linears hold Q4_0/Q4_1 blocks or a CPU "
                                             "with AVX512-VNNI"):
            load_model(str(path), quantization="int8")
