"""What every decoder-only family shares: embedding, a stack of blocks, final norm, LM head, flat-batch forward."""

from __future__ import annotations

import torch
from torch import nn

from lmserve.config import ModelConfig
from lmserve.layers.attention import AttentionMetadata, KVCache
from lmserve.layers.rotary import RotaryEmbedding


class DecoderLM(nn.Module):
    """Subclasses build `layers` (blocks called as block(x, rotary, meta, kv_cache)) and `norm`."""

    layers: nn.ModuleList
    norm: nn.Module

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so (again after moving devices)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        """Final hidden states [tokens, hidden] for a flat batch of tokens described by `meta`."""
        x = self.embed_tokens(input_ids)
        rotary = self.rotary(meta.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rotary, meta, kv_cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits, computed only for the rows the caller needs."""
        return self.lm_head(hidden).float()
