"""Attention over a paged KV cache for a flat batch of tokens from many sequences.

A step may mix prefills, chunked prefills after a cached prefix, and decodes. The runner describes the step once in
`AttentionMetadata`; every layer then writes its new K/V into the cache and attends with one batched call, so the
Python work per layer does not grow with the number of sequences. In float32 on the CPU lmserve's C kernel reads
K/V in place from the blocks, one query row at a time (a prefill token attends up to its own position); other
steps gather the blocks and call torch. The cache may hold K/V in a narrower dtype than the activations (float16
under float32: half the bytes a decode step reads); values are rounded as they are stored and widened as they are
read.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from lmserve.kernels.native import NATIVE_KV_DTYPES, kernels_available, paged_attention_by_row


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
        return cls(_zeros(shape, dtype, device), _zeros(shape, dtype, device), block_size)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros; on the CPU from calloc (numpy), whose pages the OS maps only when first written, so a server's resident
    memory grows with the blocks in use instead of the whole pool at start (torch.zeros writes every page)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    same_width = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[dtype.itemsize]
    return torch.from_numpy(np.zeros(shape, dtype=same_width)).view(dtype)


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each of them may attend to."""

    positions: torch.Tensor      # [tokens] position of each new token in its sequence
    slot_mapping: torch.Tensor   # [tokens] cache slot each new token's K/V is written to
    block_tables: torch.Tensor   # [seqs, max_blocks] blocks each sequence reads, padded with block 0
    context_lens: torch.Tensor   # [seqs] cached + new tokens of each sequence
    query_lens: torch.Tensor     # [seqs] new tokens of each sequence
    max_query_len: int
    block_size: int

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device | str = "cpu") -> AttentionMetadata:
        """query_lens: new tokens per sequence; context_lens: cached + new tokens per sequence. Computed on Python
        lists: a decode step's metadata is a few dozen numbers, where each of ~20 torch ops would cost more than
        its arithmetic."""
        width = -(-max(context_lens) // block_size)  # blocks of the longest context
        positions, slots = [], []
        for q, c, table in zip(query_lens, context_lens, block_tables, strict=True):
            for p in range(c - q, c):
                positions.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
        tables = [table[:width] + [0] * (width - len(table[:width])) for table in block_tables]

        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(tensor(positions), tensor(slots), tensor(tables), tensor(context_lens), tensor(query_lens),
                   max(query_lens), block_size)

    @cached_property
    def seq_of_token(self) -> torch.Tensor:
        """[tokens] the sequence each new token belongs to."""
        q_lens = self.query_lens
        return torch.repeat_interleave(torch.arange(len(q_lens), device=q_lens.device), q_lens)

    @cached_property
    def row_block_tables(self) -> torch.Tensor:
        """[tokens, max_blocks] each token's sequence's block table (lmserve's C attention reads by row)."""
        return self.block_tables if self.max_query_len == 1 else self.block_tables[self.seq_of_token]

    @cached_property
    def row_context_lens(self) -> torch.Tensor:
        """[tokens] what each token attends to: its sequence up to itself (causal within this step's tokens too)."""
        return self.context_lens if self.max_query_len == 1 else self.positions + 1

    @cached_property
    def query_index(self) -> torch.Tensor:
        """[tokens] row of each token in the padded [seqs * max_query] layout (torch's attention path only)."""
        offset_in_query = self.positions - (self.context_lens - self.query_lens)[self.seq_of_token]
        return self.seq_of_token * self.max_query_len + offset_in_query

    @cached_property
    def mask(self) -> torch.Tensor:
        """[seqs, 1, max_query, max_blocks * block_size] True where attention is allowed (torch's path only)."""
        ctx_lens, q_lens, device = self.context_lens, self.query_lens, self.context_lens.device
        key_pos = torch.arange(self.block_tables.shape[1] * self.block_size, device=device)
        key_valid = key_pos[None, :] < ctx_lens[:, None]
        query_offset = torch.arange(self.max_query_len, device=device)[None, :]
        query_pos = (ctx_lens - q_lens)[:, None] + query_offset
        mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & key_valid[:, None, :]
        mask = torch.where((query_offset < q_lens[:, None])[:, :, None], mask, key_pos[None, None, :] == 0)
        return mask[:, None]  # padding rows (past a sequence's queries) see key 0 only: no NaNs


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Store this step's k/v ([tokens, kv_heads, head_dim]) and attend; returns [tokens, heads * head_dim]."""
    k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    if _native_attention_applies(q, k_cache):
        return paged_attention_by_row(q, k_cache, v_cache, meta.row_block_tables, meta.row_context_lens,
                                      meta.block_size, scale)
    keys, values = _gather_context(k_cache, meta).to(q.dtype), _gather_context(v_cache, meta).to(q.dtype)
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


def _native_attention_applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """lmserve's C kernel reads the cache in place: float32 queries on the CPU, a float32 or float16 cache, head size
    a multiple of 8."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[-1] % 8 == 0
            and k_cache.dtype in NATIVE_KV_DTYPES and k_cache.is_contiguous() and kernels_available())


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
