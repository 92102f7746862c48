"""The whole layer stack in one C call, for Llama models whose every layer's four linears hold GGUF blocks or bf16
tiles.

A decode step at batch 1 spends more time dispatching a layer's ~25 small torch ops, and the Python between
layers, than computing them; at a prefill's thousands of rows torch's elementwise ops each take a pass over
memory. The C stack (kernels/llama_layers.c) does the same arithmetic in one call, for decode, prefill and mixed
steps alike. bf16 activations, and models with a linear lacking native weights keep the torch path.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from lmserve.kernels.native import (
    NATIVE_KV_DTYPES,
    LlamaLayerSpec,
    NativeLinearSpec,
    best_bf16_kernel,
    kernels_available,
    llama_layer_stack,
)
from lmserve.layers.attention import AttentionMetadata, KVCache
from lmserve.layers.linear import Linear

if TYPE_CHECKING:
    from lmserve.models.llama import LlamaBlock


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _linear_spec(linear: Linear) -> NativeLinearSpec:
    blocks, int8, tiles = linear.quantized, linear.int8_tiles, linear.block_tiles
    int8_parts = (None, None, None) if int8 is None else (int8.tiles, int8.scales, int8.offsets)
    tile_parts = (None, None, None) if tiles is None else (tiles.quants, tiles.scales, tiles.mins)
    return NativeLinearSpec(0 if blocks is None else blocks.qtype, _pointer(blocks and blocks.blocks),
                            _pointer(linear.bf16_tiles), linear.max_quantized_rows, _pointer(linear.bias),
                            *map(_pointer, int8_parts), *map(_pointer, tile_parts),
                            0 if tiles is None else tiles.input_bits)


def llama_layer_spec(block: LlamaBlock) -> LlamaLayerSpec | None:
    """The C description of `block`, or None when the fused path cannot run it."""
    attn, mlp = block.self_attn, block.mlp
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    read_by_c = [block.input_layernorm.weight, block.post_attention_layernorm.weight,
                 *(linear.bias for linear in linears if linear.bias is not None)]  # float weights: blocks instead
    if (any(linear.quantized is None and linear.bf16_tiles is None and linear.int8_tiles is None
            for linear in linears) or attn.head_dim % 8
            or not kernels_available()
            or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in read_by_c)):
        return None
    return LlamaLayerSpec(
        block.hidden_size, attn.num_heads, attn.num_kv_heads, attn.head_dim, block.rotary_dim, mlp.intermediate_size,
        block.input_layernorm.eps, attn.scale, best_bf16_kernel(), block.input_layernorm.weight.data_ptr(),
        block.post_attention_layernorm.weight.data_ptr(), *map(_linear_spec, linears))


def llama_stack_spec(blocks: list[LlamaBlock]) -> ctypes.Array | None:
    """The C description of every layer (the tensors it points into must outlive it), or None when one layer
    cannot run fused."""
    specs = [llama_layer_spec(block) for block in blocks]
    return None if not specs or None in specs else (LlamaLayerSpec * len(specs))(*specs)


def fused_layers_apply(x: torch.Tensor, meta: AttentionMetadata, block: LlamaBlock, kv_cache: KVCache) -> bool:
    """A step whose products `block`'s (any layer's) linears run with lmserve's kernels, on a cache they read."""
    return (block.mlp.down_proj.runs_natively(x.shape[0], decode=meta.max_query_len == 1) and x.is_contiguous()
            and kv_cache.k.dtype in NATIVE_KV_DTYPES)


def fused_llama_layers(stack: ctypes.Array, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                       meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
    """The last layer's output; x (the embeddings, owned by the forward pass) is updated in place."""
    cos, sin = (t.contiguous() for t in rotary)
    return llama_layer_stack(stack, x, cos, sin, kv_cache.k, kv_cache.v, meta.slot_mapping, meta.row_block_tables,
                             meta.row_context_lens, meta.block_size)
