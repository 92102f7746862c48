"""Llama family (Llama 2/3, SmolLM2, Mistral-style GQA, Qwen2 with q/k/v bias): pre-norm blocks, RMSNorm, SwiGLU."""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.config import ModelConfig
from lmserve.layers.attention import AttentionMetadata, KVCache
from lmserve.layers.fused_layers import fused_layers_apply, fused_llama_layers, llama_stack_spec
from lmserve.layers.linear import Linear
from lmserve.layers.norms import RMSNorm
from lmserve.layers.self_attention import SelfAttention
from lmserve.models.base import DecoderLM
from lmserve.models.weight_loading import Tensors

_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_GATE_UP = {"gate_proj": 0, "up_proj": 1}


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index, self.hidden_size, self.rotary_dim = layer_index, config.hidden_size, config.rotary_dim
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = SelfAttention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(DecoderLM):
    def __init__(self, config: ModelConfig) -> None:
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act '{config.hidden_act}' is not supported for Llama-family models")
        super().__init__(config)
        self.layers = nn.ModuleList(LlamaBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.fused_stack: ctypes.Array | None = None  # set once the linears hold native weights (blocks or tiles)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        if self.fused_stack is None or not fused_layers_apply(input_ids, meta, self.layers[0], kv_cache):
            return super().forward(input_ids, meta, kv_cache)
        x = self.embed_tokens(input_ids)
        return self.norm(fused_llama_layers(self.fused_stack, x, self.rotary(meta.positions, x.dtype), meta, kv_cache))

    def attach_quantized(self, blocks: Tensors) -> None:
        super().attach_quantized(blocks)
        self.fused_stack = llama_stack_spec(list(self.layers))

    def store_linear_weights_in(self, dtype: torch.dtype) -> None:
        super().store_linear_weights_in(dtype)
        self.fused_stack = llama_stack_spec(list(self.layers))  # the tiles replace the float weights

    def store_linear_weights_in_int8(self, lm_head_dtype: torch.dtype) -> None:
        super().store_linear_weights_in_int8(lm_head_dtype)
        self.fused_stack = llama_stack_spec(list(self.layers))

    def store_linear_weights_in_block_tiles(self, input_bits: int) -> None:
        super().store_linear_weights_in_block_tiles(input_bits)
        self.fused_stack = llama_stack_spec(list(self.layers))

    def _map_name(self, name: str) -> tuple[str, int] | None:
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.config.tie_word_embeddings):
            return None
        name = name.removeprefix("model.")
        parts = name.split(".")
        if len(parts) == 5 and parts[3] in _QKV:
            return f"layers.{parts[1]}.self_attn.qkv_proj.{parts[4]}", _QKV[parts[3]]
        if len(parts) == 5 and parts[3] in _GATE_UP:
            return f"layers.{parts[1]}.mlp.gate_up_proj.{parts[4]}", _GATE_UP[parts[3]]
        return name, 0

    def _shard_rows(self, param: str) -> list[int]:
        c = self.config
        if ".qkv_proj." in param:
            return [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
        if ".gate_up_proj." in param:
            return [c.intermediate_size, c.intermediate_size]
        return [self.get_parameter(param).shape[0]]
