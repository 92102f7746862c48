"""What every decoder-only family shares: embedding, a stack of blocks, final norm, LM head, flat-batch forward,
and loading checkpoint tensors (float weights, and GGUF quantized blocks for the linears) by the family's names."""

from __future__ import annotations

import torch
from torch import nn

from lmserve.config import ModelConfig
from lmserve.layers.attention import AttentionMetadata, KVCache
from lmserve.layers.linear import Linear
from lmserve.layers.rotary import RotaryEmbedding
from lmserve.models.weight_loading import Tensors, attach_quantized, load_into


class DecoderLM(nn.Module):
    """Subclasses build `layers` (blocks called as block(x, rotary, meta, kv_cache)) and `norm`, and say how
    checkpoint names map to parameters (`_map_name`) and how fused parameters are stacked (`_shard_rows`)."""

    layers: nn.ModuleList
    norm: nn.Module

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # a given weight skips nn.Embedding's random init, whose normal_ on the meta device imports torch._dynamo
        # (1.7 s of every start)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.rotary = RotaryEmbedding(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.weights_in_blocks: set[str] = set()  # parameter names whose float weight the block tiles replaced
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so (again after moving devices; undone by
        store_linear_weights_in)."""
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

    def store_linear_weights_in(self, dtype: torch.dtype) -> None:
        """Keep the linears' float weights (prefill and large batches multiply by them) in `dtype`; activations,
        biases, norms and the embedding stay as they are. A tied LM head gets its own copy (made by the cast)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = nn.Parameter(self.embed_tokens.weight.detach(), requires_grad=False)
        for module in self.modules():
            if isinstance(module, Linear):
                module.store_weight_in(dtype)

    def store_linear_weights_in_int8(self, lm_head_dtype: torch.dtype) -> None:
        """Round the decoder layers' linear weights to int8 (--quantization int8); the LM head stays near float32:
        its logits decide every sampled token, and it is a fifth of a step's arithmetic, not most of it. In float32
        it takes its GGUF blocks by int16 inputs where it has them (the default's LM head: float32's logits within
        ~1e-4, a quarter of the bytes), else `lm_head_dtype`."""
        for module in self.modules():
            if isinstance(module, Linear) and module is not self.lm_head:
                module.store_weight_in_int8()
        if lm_head_dtype == torch.float32 and self.lm_head.store_weight_in_block_tiles(16):
            return
        if self.config.tie_word_embeddings:
            self.lm_head.weight = nn.Parameter(self.embed_tokens.weight.detach(), requires_grad=False)
        self.lm_head.store_weight_in(lm_head_dtype)

    def store_linear_weights_in_block_tiles(self, input_bits: int) -> None:
        """Multiply the linears holding Q4_0/Q4_1/Q8_0 blocks, the LM head's included, by them at every row count,
        with inputs rounded to `input_bits` (16: float32's results within ~1e-4; 8: --quantization int8, Q4 blocks
        only); their float weights are dropped (a tied LM head's stays as the embedding), before or after loading."""
        for name, module in self.named_modules():
            if isinstance(module, Linear) and module.store_weight_in_block_tiles(input_bits):
                self.weights_in_blocks.add(f"{name}.weight")

    def wants_tensor(self, name: str) -> bool:
        """Whether load_weights uses the checkpoint tensor `name`: not one it skips, nor a weight that only its
        blocks multiply by, so a reader can skip dequantizing it (SmolLM2: 210 of its 272 tensors)."""
        target = self._map_name(name)
        return target is not None and target[0] not in self.weights_in_blocks

    def load_weights(self, weights: Tensors, source: str) -> None:
        load_into(self, self._checkpoint_tensors(weights), self._map_name, self._shard_rows, source)

    def attach_quantized(self, blocks: Tensors) -> None:
        """Hand GGUF blocks ([rows, row bytes] uint8, named like the float weights) to the linears they belong to."""
        attach_quantized(self, self._checkpoint_tensors(blocks), self._map_name, self._shard_rows)

    def _checkpoint_tensors(self, tensors: Tensors) -> Tensors:
        """Reshape checkpoint tensors whose layout differs from ours (row-wise, so blocks pass through too)."""
        return tensors

    def _map_name(self, name: str) -> tuple[str, int] | None:
        raise NotImplementedError

    def _shard_rows(self, param: str) -> list[int]:
        raise NotImplementedError
