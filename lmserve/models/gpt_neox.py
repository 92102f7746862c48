"""GPT-NeoX (the Pythia suite): LayerNorms with bias, parallel residual, partial rotary, per-head fused QKV, GELU."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.config import ModelConfig
from lmserve.layers.attention import AttentionMetadata, KVCache
from lmserve.layers.linear import Linear
from lmserve.layers.self_attention import SelfAttention
from lmserve.models.base import DecoderLM
from lmserve.models.weight_loading import Tensors

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
_RENAMES = {
    "embed_in": "embed_tokens",
    "final_layer_norm": "norm",
    "attention.dense": "self_attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.up",
    "mlp.dense_4h_to_h": "mlp.down",
}
_IGNORED = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")


class NeoXMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act '{config.hidden_act}' is not supported for GPT-NeoX models")
        self.act = _ACTIVATIONS[config.hidden_act]
        self.up = Linear(config.hidden_size, config.intermediate_size)
        self.down = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class NeoXBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.parallel = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.self_attn = SelfAttention(config, layer_index)
        self.mlp = NeoXMLP(config)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), rotary, meta, kv_cache)
        if self.parallel:
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoXForCausalLM(DecoderLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(NeoXBlock(config, i) for i in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def _checkpoint_tensors(self, weights: Tensors) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint fuses q, k, v per head ([heads, 3, head_dim, ...]); split it into three tensors."""
        c = self.config
        for name, tensor in weights:
            if ".attention.query_key_value." not in name:
                yield name, tensor
                continue
            per_head = tensor.reshape(c.num_heads, 3, c.head_dim, *tensor.shape[1:])
            for i, part in enumerate(("q", "k", "v")):
                yield name.replace("query_key_value", part), per_head[:, i].reshape(-1, *tensor.shape[1:])

    def wants_tensor(self, name: str) -> bool:
        return super().wants_tensor(name.replace("query_key_value", "q"))  # its q, k and v fill one parameter

    def _map_name(self, name: str) -> tuple[str, int] | None:
        if name.endswith(_IGNORED) or (name == "embed_out.weight" and self.config.tie_word_embeddings):
            return None
        if name == "embed_out.weight":
            return "lm_head.weight", 0
        name = name.removeprefix("gpt_neox.")
        for old, new in _RENAMES.items():
            name = name.replace(old, new)
        for shard, part in enumerate(("q", "k", "v")):
            if f".attention.{part}." in name:
                return name.replace(f"attention.{part}", "self_attn.qkv_proj"), shard
        return name, 0

    def _shard_rows(self, param: str) -> list[int]:
        if ".qkv_proj." in param:
            return [self.config.num_heads * self.config.head_dim] * 3
        return [self.get_parameter(param).shape[0]]
