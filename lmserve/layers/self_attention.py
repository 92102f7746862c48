"""Multi-head self-attention with GQA/MQA, shared by every family: fused q/k/v product, rotary, paged attention."""

from __future__ import annotations

import torch
from torch import nn

from lmserve.config import ModelConfig
from lmserve.layers.attention import AttentionMetadata, KVCache, paged_attention
from lmserve.layers.linear import Linear
from lmserve.layers.rotary import apply_rotary


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        qkv = self.qkv_proj(x).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q_and_k = apply_rotary(qkv[:, : self.num_heads + self.num_kv_heads], *rotary)  # one rotation for both
        q, k = q_and_k.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.num_heads + self.num_kv_heads:]
        layer = self.layer_index
        out = paged_attention(q, k, v, kv_cache.k[layer], kv_cache.v[layer], meta, self.scale)
        return self.o_proj(out)
