"""Run a loaded model directly, without the engine: every position's logits for a batch of prompts."""

from __future__ import annotations

import torch

from lmserve.config import ModelConfig
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


def assert_fused_stack_matches_torch_layers(model: torch.nn.Module, c: ModelConfig, seqs: int,
                                            tolerance: float = 1e-3) -> None:
    """A prefill and a decode step of `seqs` sequences through the C stack (model.fused_stack) and through the same
    model's torch layers: hidden states and the K/V stored agree to `tolerance` by norms (x is rounded before each
    product, so a float-rounding difference upstream may move one rounding: no per-element bound holds)."""
    block_size = 4
    prompts = [list(range(3 + s, 8 + 2 * s)) for s in range(seqs)]
    lens = [len(p) for p in prompts]
    per_seq = max(lens) // block_size + 1  # blocks for the prompt and the decoded token
    tables = [list(range(s * per_seq, (s + 1) * per_seq)) for s in range(seqs)]
    cache = KVCache.allocate(c.num_layers, per_seq * seqs, block_size, c.num_kv_heads, c.head_dim, torch.float32,
                             "cpu")
    prefill = (torch.tensor(sum(prompts, [])), AttentionMetadata.build(lens, lens, tables, block_size))
    decode = (torch.arange(40, 40 + seqs), AttentionMetadata.build([1] * seqs, [n + 1 for n in lens], tables,
                                                                    block_size))
    stack, torch_cache = model.fused_stack, KVCache(cache.k.clone(), cache.v.clone(), block_size)
    for ids, meta in (prefill, decode):
        with torch.inference_mode():
            model.fused_stack = stack
            fused = model(ids, meta, cache)
            model.fused_stack = None
            expected = model(ids, meta, torch_cache)
        for ours, theirs in ((fused, expected), (cache.k, torch_cache.k), (cache.v, torch_cache.v)):
            assert ((ours - theirs).norm() / theirs.norm()).item() < tolerance
    model.fused_stack = stack
