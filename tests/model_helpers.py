"""Run a loaded model directly, without the engine: every position's logits for a batch of prompts."""

from __future__ import annotations

import torch

from lmserve.layers.attention import AttentionMetadata, KVCache
from lmserve.loader import LoadedModel


@torch.inference_mode()
def prompt_logits(lm: LoadedModel, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits at every position of every prompt, computed as one flat batch (one block per prompt)."""
    c, lens = lm.config, [len(p) for p in prompts]
    cache = KVCache.allocate(c.num_layers, len(prompts), max(lens), c.num_kv_heads, c.head_dim, lm.dtype, lm.device)
    meta = AttentionMetadata.build(lens, lens, [[i] for i in range(len(prompts))], max(lens), lm.device)
    ids = torch.tensor([t for p in prompts for t in p], device=lm.device)
    return list(lm.model.compute_logits(lm.model(ids, meta, cache)).split(lens))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Max abs difference relative to the reference's logit scale."""
    return ((ours - reference).abs().max() / reference.abs().max()).item()
