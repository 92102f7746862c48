"""Attention over a paged KV cache for a flat batch of tokens from many sequences.

A step may mix prefills, chunked prefills after a cached prefix, and decodes. The runner describes the step once in
`AttentionMetadata`; every layer then writes its new K/V into the cache and attends with one batched call, so the
Python work per layer does not grow with the number of sequences. Pure-decode steps in float32 on the CPU use
lmserve's C kernel, which reads K/V in place from the blocks; other steps gather the blocks and call torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmserve.kernels.native import kernels_available, paged_decode_attention


@dataclass
class KVCache:
    """K and V for every layer; slot s of a layer holds token (block s // block_size, offset s % block_size)."""

    k: torch.Tensor  # [layers, num_blocks * block_size, kv_heads, head_dim]
    v: torch.Tensor
    block_size: int

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> KVCache:
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   block_size)


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each of them may attend to."""

    positions: torch.Tensor      # [tokens] position of each new token in its sequence
    slot_mapping: torch.Tensor   # [tokens] cache slot each new token's K/V is written to
    block_tables: torch.Tensor   # [seqs, max_blocks] blocks each sequence reads, padded with block 0
    context_lens: torch.Tensor   # [seqs] cached + new tokens of each sequence
    mask: torch.Tensor           # [seqs, 1, max_query, max_blocks * block_size] True where attention is allowed
    query_index: torch.Tensor    # [tokens] row of each token in the padded [seqs * max_query] layout
    max_query_len: int
    block_size: int

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device | str = "cpu") -> AttentionMetadata:
        """query_lens: new tokens per sequence; context_lens: cached + new tokens per sequence."""
        q_lens = torch.tensor(query_lens, dtype=torch.long)
        ctx_lens = torch.tensor(context_lens, dtype=torch.long)
        num_seqs, max_q, max_ctx = len(query_lens), max(query_lens), max(context_lens)
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.zeros(num_seqs, max_blocks, dtype=torch.long)
        for i, table in enumerate(block_tables):
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.long)

        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), q_lens)
        starts = torch.cumsum(q_lens, 0) - q_lens
        offset_in_query = torch.arange(int(q_lens.sum())) - starts[seq_of_token]
        positions = (ctx_lens - q_lens)[seq_of_token] + offset_in_query
        slot_mapping = tables[seq_of_token, positions // block_size] * block_size + positions % block_size

        tables = tables[:, : -(-max_ctx // block_size)]
        key_pos = torch.arange(tables.shape[1] * block_size)
        key_valid = key_pos[None, :] < ctx_lens[:, None]

        query_pos = (ctx_lens - q_lens)[:, None] + torch.arange(max_q)[None, :]
        query_valid = torch.arange(max_q)[None, :] < q_lens[:, None]
        mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & key_valid[:, None, :]
        mask = torch.where(query_valid[:, :, None], mask, key_pos[None, None, :] == 0)  # padding rows: no NaNs
        return cls(
            positions=positions.to(device),
            slot_mapping=slot_mapping.to(device),
            block_tables=tables.contiguous().to(device),
            context_lens=ctx_lens.to(device),
            mask=mask[:, None].to(device),
            query_index=(seq_of_token * max_q + offset_in_query).to(device),
            max_query_len=max_q,
            block_size=block_size,
        )


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Store this step's k/v ([tokens, kv_heads, head_dim]) and attend; returns [tokens, heads * head_dim]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    if meta.max_query_len == 1 and _native_decode_applies(q, k_cache):
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.block_size,
                                      scale)
    keys, values = _gather_context(k_cache, meta), _gather_context(v_cache, meta)
    if meta.max_query_len == 1:
        return _decode_attention(q, keys, values, meta.mask, scale)
    num_seqs, max_q = meta.block_tables.shape[0], meta.max_query_len
    tokens, heads, head_dim = q.shape
    if tokens == num_seqs * max_q:  # every sequence has the same query length: no padding needed
        padded_q = q.view(num_seqs, max_q, heads, head_dim)
    else:
        padded_q = q.new_zeros(num_seqs * max_q, heads, head_dim).index_copy_(0, meta.query_index, q)
        padded_q = padded_q.view(num_seqs, max_q, heads, head_dim)
    out = F.scaled_dot_product_attention(padded_q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=meta.mask, scale=scale, enable_gqa=True)
    out = out.transpose(1, 2).reshape(num_seqs * max_q, heads * head_dim)
    return out if tokens == num_seqs * max_q else out[meta.query_index]


def _native_decode_applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """lmserve's C kernel reads the cache in place: float32 on the CPU, head size a multiple of 8."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[-1] % 8 == 0
            and k_cache.is_contiguous() and kernels_available())


def _gather_context(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """[seqs, max_blocks * block_size, kv_heads, head_dim]: whole blocks copied, not single slots."""
    _, kv_heads, head_dim = cache.shape
    blocks = cache.view(-1, meta.block_size * kv_heads * head_dim).index_select(0, meta.block_tables.flatten())
    return blocks.view(meta.block_tables.shape[0], -1, kv_heads, head_dim)


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """One query per sequence: grouped heads share their kv head in a batched matmul (no repeat of K/V)."""
    num_seqs, heads, head_dim = q.shape
    kv_heads = keys.shape[2]
    grouped_q = q.view(num_seqs, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped_q, keys.permute(0, 2, 3, 1)) * scale        # [seqs, kv_heads, group, context]
    scores = scores.masked_fill(~mask, float("-inf"))                          # mask: [seqs, 1, 1, context]
    out = torch.matmul(torch.softmax(scores, dim=-1), values.transpose(1, 2))  # [seqs, kv_heads, group, head_dim]
    return out.reshape(num_seqs, heads * head_dim)
