"""lmserve's C kernels against torch: products on GGUF blocks equal a float32 product of the dequantized weights
(to float rounding), the Linear layer picks them only for few rows, and decode attention read in place from the
paged cache equals torch's gather + matmul path, and the whole-layer decode equals the model's torch layers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf_export import export_gguf
from tiny_models import ALL_CONFIGS, make_tiny_model

import lmserve.models.llama as llama
from lmserve.engine.config import EngineConfig
from lmserve.kernels import native
from lmserve.kernels.native import (
    BLOCK_BYTES,
    Bf16Kernel,
    argmax_rows,
    best_bf16_kernel,
    kernels_available,
    pack_blocks,
    paged_attention_by_row,
    qtype_of,
    quant_matmul,
)
from lmserve.layers.attention import AttentionMetadata, KVCache, _decode_attention, _gather_context
from lmserve.layers.fused_layers import fused_llama_layers
from lmserve.layers.linear import MAX_QUANTIZED_ROWS, MAX_QUANTIZED_ROWS_WIDE, WIDE_OUTPUTS, Linear, QuantizedWeight
from lmserve.loader import load_model

needs_kernels = pytest.mark.skipif(not kernels_available(), reason="needs an x86-64 CPU with AVX2 and a C compiler")
TYPES = {name: int(gguf.GGMLQuantizationType[name]) for name in ("Q4_0", "Q4_1", "Q8_0")}


def quantized(name: str, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 blocks, float32 dequantized weight) of a random [rows, cols] matrix."""
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    blocks = gguf.quants.quantize(weight, gguf.GGMLQuantizationType[name])
    dequantized = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name]).reshape(rows, cols)
    return torch.from_numpy(blocks.copy()), torch.from_numpy(dequantized.copy())


@needs_kernels
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 17])
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (9, 352), (300, 576), (5, 32 * 257)])
def test_kernel_matches_float_product_of_dequantized_weights(name, rows, shape):
    out_features, in_features = shape
    blocks, weight = quantized(name, out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    if in_features > 32:
        x[0, :32] = 0.0  # an all-zero block of x has scale 0
    expected = F.linear(x, weight)
    got = quant_matmul(TYPES[name], x, pack_blocks(TYPES[name], blocks))
    assert got.shape == expected.shape
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())


@pytest.mark.parametrize("name", TYPES)
def test_block_type_is_read_off_the_row_length(name):
    blocks, _ = quantized(name, 4, 96)
    assert blocks.shape == (4, 3 * BLOCK_BYTES[TYPES[name]])
    assert qtype_of(blocks, 96) == TYPES[name]
    assert qtype_of(blocks.float(), 96) is None and qtype_of(blocks[:, :-1], 96) is None
    assert qtype_of(blocks, 95) is None


@needs_kernels
@pytest.mark.parametrize("float_dtype", [torch.float32, torch.bfloat16])
def test_linear_uses_blocks_for_few_rows_and_float_weight_for_many(float_dtype):
    blocks, weight = quantized("Q4_1", 48, 64)
    layer = Linear(64, 48)
    with torch.no_grad():
        layer.weight.copy_(weight)
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(float_dtype), requires_grad=False)
    layer.quantized = QuantizedWeight(TYPES["Q4_1"], pack_blocks(TYPES["Q4_1"], blocks))
    assert layer.max_quantized_rows == MAX_QUANTIZED_ROWS[float_dtype]
    many = torch.randn(layer.max_quantized_rows + 1, 64)
    if float_dtype == torch.float32:
        float_path = F.linear(many, layer.weight, layer.bias)
    else:  # products in bf16, the result and its bias in float32
        float_path = F.linear(many.to(float_dtype), layer.weight).float() + layer.bias
    assert torch.equal(layer(many), float_path)  # float path, bit for bit (float32 activations either way)
    few = many[:3]
    got, expected = layer(few), F.linear(few, weight, layer.bias)
    assert not torch.equal(got, expected)  # really the kernel (int16 activations round differently)...
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4  # ...and right


def test_a_wide_float32_linear_keeps_its_blocks_for_more_rows():
    """An LM head's ~50k outputs: torch's float32 GEMM is slow there, so the blocks take up to 128 rows."""
    head, narrow = Linear(64, WIDE_OUTPUTS, bias=False), Linear(64, 48)
    for layer in (head, narrow):
        layer.quantized = QuantizedWeight(TYPES["Q8_0"], torch.zeros(layer.out_features, 68, dtype=torch.uint8))
    assert head.max_quantized_rows == MAX_QUANTIZED_ROWS_WIDE > narrow.max_quantized_rows
    head.store_weight_in(torch.bfloat16)
    assert head.max_quantized_rows <= MAX_QUANTIZED_ROWS[torch.bfloat16]


@needs_kernels
def test_kernel_refuses_rows_that_are_not_whole_blocks():
    with pytest.raises(ValueError, match="ggml type 3 with 40 input features"):
        quant_matmul(TYPES["Q4_1"], torch.randn(1, 40), torch.zeros(2, 20, dtype=torch.uint8))


def test_quantization_option_is_validated():
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int3")


@needs_kernels
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"),
                         [(6, 2, 16), (4, 1, 8), (3, 3, 64), (9, 3, 64), (4, 2, 80), (2, 1, 128)])
@pytest.mark.parametrize("context_lens", [[1, 5, 17, 40, 8], [17, 3], [33, 100]])  # an item per sequence / kv head
@pytest.mark.parametrize("block_size", [4, 16])  # 16: eight tokens at a time within a block, then the block's tail
def test_decode_attention_reads_the_paged_cache_like_torch(heads, kv_heads, head_dim, context_lens, kv_dtype,
                                                            block_size):
    gen = torch.Generator().manual_seed(heads * head_dim)
    num_blocks = 200 // block_size + 10
    free = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, shuffled blocks
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in context_lens]
    meta = AttentionMetadata.build([1] * len(context_lens), context_lens, tables, block_size)
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to(kv_dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).to(kv_dtype)
    q = torch.randn(len(context_lens), heads, head_dim, generator=gen) * 3  # peaked softmaxes too
    scale = head_dim**-0.5
    keys, values = (_gather_context(cache, meta).float() for cache in (k_cache, v_cache))  # float16 widens exactly
    expected = _decode_attention(q, keys, values, meta.mask, scale)
    got = paged_attention_by_row(q, k_cache, v_cache, meta.block_tables, meta.context_lens, block_size, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [Bf16Kernel.AVX512, Bf16Kernel.AMX])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 2, 80), (2, 1, 128), (6, 2, 16)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_prefill_attention_in_bf16_matches_attention_of_the_bf16_rounded_inputs(kernel, heads, kv_heads, head_dim,
                                                                                block_size):
    """A step's runs of prefill rows go to bf16 products (prefill_attention.c: AMX tiles or AVX512-BF16 dot
    products), beside a decode row and a run too short for them: each row attends causally to its own sequence, as
    the float kernel has it, to bf16 rounding."""
    if not kernels_available() or best_bf16_kernel() < kernel:
        pytest.skip(f"needs {kernel.name}")
    gen = torch.Generator().manual_seed(heads * head_dim + block_size)
    query_lens, context_lens = [37, 1, 20, 5], [37, 20, 70, 5]  # a prompt, a decode, a chunk after 50 cached, 5 rows
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in context_lens]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size)
    k_cache, v_cache = (torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=gen).half() for _ in "kv")
    q = torch.randn(sum(query_lens), heads, head_dim, generator=gen) * 2
    scale = head_dim**-0.5

    def attend(kernel, q, k_cache, v_cache):
        return paged_attention_by_row(q, k_cache, v_cache, meta.row_block_tables, meta.row_context_lens, block_size,
                                      scale, kernel=kernel)

    tiles = attend(kernel, q, k_cache, v_cache)
    rounded = attend(Bf16Kernel.AVX2, *(t.to(torch.bfloat16).to(t.dtype) for t in (q, k_cache, v_cache)))
    exact = attend(Bf16Kernel.AVX2, q, k_cache, v_cache)
    runs, others = [*range(37), *range(38, 58)], [37, *range(58, 63)]  # the decode row, the short run: float kernel
    torch.testing.assert_close(tiles[runs], rounded[runs], rtol=1e-2, atol=1e-2)  # probabilities in bf16 too
    assert not torch.equal(tiles[runs], exact[runs])
    assert torch.equal(tiles[others], exact[others])


@needs_kernels
def test_decode_attention_refuses_head_sizes_it_cannot_vectorize():
    meta = AttentionMetadata.build([1], [3], [[0]], 4)
    cache = torch.zeros(4, 1, 12)
    with pytest.raises(ValueError, match="multiple of 8"):
        paged_attention_by_row(torch.zeros(1, 2, 12), cache, cache, meta.block_tables, meta.context_lens, 4, 1.0)


@needs_kernels
@pytest.mark.parametrize(("name", "kv_dtype"), [("llama-gqa-tied", torch.float32), ("qwen2-bias", torch.float32),
                                                ("llama-mha-untied", torch.float32), ("llama-gqa-tied", torch.float16)])
def test_fused_stack_matches_the_torch_layers_in_every_step_shape(tmp_path, name, kv_dtype, monkeypatch):
    """Whole-stack C layers against the same model's torch layers, step after step -- a prefill, a mixed step (a
    chunked prefill continuing beside decodes), a decode: hidden states and the K/V stored (in a float16 cache too,
    rounded the same way)."""
    make_tiny_model(ALL_CONFIGS[name], tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "tiny.gguf", "Q4_1")
    lm = load_model(str(tmp_path / "tiny.gguf"), dtype="float32")
    model, c = lm.model, lm.config
    stack = model.fused_stack
    assert stack is not None and len(stack) == c.num_layers
    calls = []
    monkeypatch.setattr(llama, "fused_llama_layers", lambda *args: calls.append(1) or fused_llama_layers(*args))
    block_size, tables = 4, [[0, 1, 2], [3, 4, 5, 6], [7, 8]]
    cache = KVCache.allocate(c.num_layers, 10, block_size, c.num_kv_heads, c.head_dim, kv_dtype, "cpu")
    steps = [  # (new tokens, query lens, context lens)
        ([5, 6, 7, 8, 9, *range(20, 28), 3, 4], [5, 8, 2], [5, 8, 2]),
        ([40, *range(28, 31), 41], [1, 3, 1], [6, 11, 3]),
        ([42, 43, 44], [1, 1, 1], [7, 12, 4]),
    ]
    for ids, query_lens, context_lens in steps:
        meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size)
        torch_cache = KVCache(cache.k.clone(), cache.v.clone(), block_size)
        with torch.inference_mode():
            model.fused_stack = stack
            fused = model(torch.tensor(ids), meta, cache)
            model.fused_stack = None
            expected = model(torch.tensor(ids), meta, torch_cache)
        # Both paths quantize each product's input to int16 (steps of max|x| / 32767), so float-rounding
        # differences in those inputs can move a value by one step: ~1e-4 of the norm is that noise; a wrong layer
        # is off by ~1.
        assert ((fused - expected).norm() / expected.norm()).item() < 1e-3
        assert cache.k.dtype == kv_dtype
        torch.testing.assert_close(cache.k.float(), torch_cache.k.float(), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(cache.v.float(), torch_cache.v.float(), rtol=1e-3, atol=1e-3)
    assert calls == [1, 1, 1]  # every step took the C stack


@needs_kernels
def test_fused_decode_stack_takes_batches_past_the_blocks_row_limit(tmp_path, monkeypatch):
    """More sequences than a Linear sends to the blocks (MAX_QUANTIZED_ROWS): the C stack still runs the step on
    them, and agrees with the torch layers (which multiply by the float weights there)."""
    make_tiny_model(ALL_CONFIGS["llama-gqa-tied"], tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "tiny.gguf", "Q8_0")
    monkeypatch.setattr(Linear, "store_weight_in_block_tiles", lambda self, input_bits: False)  # blocks + floats
    lm = load_model(str(tmp_path / "tiny.gguf"), dtype="float32")
    model, c = lm.model, lm.config
    seqs = MAX_QUANTIZED_ROWS[torch.float32] + 8
    assert model.layers[0].mlp.down_proj.runs_natively(seqs)
    assert not model.layers[0].mlp.down_proj.runs_natively(2 * seqs, decode=False)
    calls = []
    monkeypatch.setattr(llama, "fused_llama_layers", lambda *args: calls.append(1) or fused_llama_layers(*args))
    block_size, tables, lens = 4, [[s] for s in range(seqs)], [2] * seqs
    cache = KVCache.allocate(c.num_layers, seqs, block_size, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    with torch.inference_mode():
        prompts = torch.arange(2 * seqs) % 50 + 3
        model(prompts, AttentionMetadata.build(lens, lens, tables, block_size), cache)
        step = AttentionMetadata.build([1] * seqs, [3] * seqs, tables, block_size)
        ids = torch.arange(seqs) % 50 + 10
        fused = model(ids, step, KVCache(cache.k.clone(), cache.v.clone(), block_size))
        assert calls == [1]  # the decode; the prefill's rows past the blocks' limit keep torch's float products
        model.fused_stack = None
        expected = model(ids, step, cache)
    assert ((fused - expected).norm() / expected.norm()).item() < 1e-3


@needs_kernels
def test_fused_stack_times_each_op_only_when_asked(tmp_path):
    """benchmarks/step_profile.py's breakdown of the C stack: every op of a prefill gets wall time, and none is
    taken once the timing block is left."""
    make_tiny_model(ALL_CONFIGS["llama-gqa-tied"], tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "tiny.gguf", "Q4_1")
    model, c = (lm := load_model(str(tmp_path / "tiny.gguf"), dtype="float32")).model, lm.config
    cache = KVCache.allocate(c.num_layers, 4, 4, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    meta = AttentionMetadata.build([9], [9], [[0, 1, 2]], 4)
    with torch.inference_mode():
        with native.timed_layer_ops() as op_seconds:
            model(torch.arange(9) + 3, meta, cache)
            first = op_seconds.clone()
            model(torch.arange(9) + 3, meta, cache)
        assert first.shape == (len(native.LAYER_OPS),) and (first > 0).all() and (op_seconds > first).all()
        total = op_seconds.clone()
        model(torch.arange(9) + 3, meta, cache)
    assert torch.equal(op_seconds, total)


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 7), (3, 32), (5, 100), (64, 49152)])
def test_greedy_argmax_is_the_first_index_of_each_rows_maximum(shape):
    gen = torch.Generator().manual_seed(shape[1])
    x = torch.randn(*shape, generator=gen)
    x[0, -1] = x[0].max() + 1  # the last column wins (past the vector part when N is not a multiple of 32)
    if shape[0] > 2:
        x[1] = -torch.inf
        x[2, 1] = x[2, shape[1] - 2] = x[2].max() + 1  # a tie: the first index
    got = argmax_rows(x)
    assert torch.equal(got, x.max(-1).indices)
    if shape[0] > 2:
        assert got[1] == 0 and got[2] == 1
