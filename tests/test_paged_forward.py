"""The model forward over a paged cache gives transformers' logits under every batch shape the engine can make:
chunked prefill after a cached prefix, prefills mixed with decodes, scattered block tables, tiny blocks."""

from __future__ import annotations

import random

import pytest
import torch

from lmserve.layers.attention import AttentionMetadata, KVCache
from lmserve.loader import load_model

PROMPTS = [list(range(3, 40)), [9, 8, 7, 6, 5], list(range(100, 123)), [42]]


def run_schedule(lm, prompts, chunk_sizes, block_size, seed):
    """Feed every prompt through in chunks (sizes cycled per sequence), several sequences per step."""
    c = lm.config
    num_blocks = sum(len(p) // block_size + 1 for p in prompts) + 3
    cache = KVCache.allocate(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, lm.dtype, "cpu")
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    tables = [[free.pop() for _ in range(len(p) // block_size + 1)] for p in prompts]
    done = [0] * len(prompts)
    logits = [[] for _ in prompts]
    step = 0
    while any(d < len(p) for d, p in zip(done, prompts, strict=True)):
        active = [i for i, p in enumerate(prompts) if done[i] < len(p)]
        query_lens = [min(chunk_sizes[(step + i) % len(chunk_sizes)], len(prompts[i]) - done[i]) for i in active]
        context_lens = [done[i] + q for i, q in zip(active, query_lens, strict=True)]
        ids = [t for i, q in zip(active, query_lens, strict=True) for t in prompts[i][done[i] : done[i] + q]]
        meta = AttentionMetadata.build(query_lens, context_lens, [tables[i] for i in active], block_size)
        with torch.no_grad():
            out = lm.model.compute_logits(lm.model(torch.tensor(ids), meta, cache)).split(query_lens)
        for i, q, rows in zip(active, query_lens, out, strict=True):
            logits[i].append(rows)
            done[i] += q
        step += 1
    return [torch.cat(chunks) for chunks in logits]


@pytest.mark.parametrize("chunk_sizes,block_size", [([1], 4), ([5, 3, 1], 4), ([7], 16), ([2, 64], 1)])
def test_chunked_paged_logits_match_transformers(tiny_model, chunk_sizes, block_size):
    directory, reference = tiny_model
    lm = load_model(str(directory), dtype="float32")
    ours = run_schedule(lm, PROMPTS, chunk_sizes, block_size, seed=len(chunk_sizes))
    for prompt, logits in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-4


def test_metadata_describes_mixed_step():
    """One decode (3 cached) and one chunk of 2 after 4 cached tokens, block size 2."""
    meta = AttentionMetadata.build([1, 2], [4, 6], [[5, 1], [0, 3, 2]], block_size=2)
    assert meta.positions.tolist() == [3, 4, 5]
    assert meta.slot_mapping.tolist() == [1 * 2 + 1, 2 * 2 + 0, 2 * 2 + 1]
    assert meta.block_tables.tolist() == [[5, 1, 0], [0, 3, 2]]
    assert meta.mask[0, 0, 0].tolist() == [True] * 4 + [False] * 2
    assert meta.mask[1, 0, 0].tolist() == [True] * 5 + [False]
    assert meta.mask[1, 0, 1].tolist() == [True] * 6
    assert meta.query_index.tolist() == [0, 2, 3]
