"""Paged KV blocks: a fixed pool with ref counts, and a prefix cache over full blocks.

A full block is keyed by a chained hash of (parent hash, its tokens, extra keys) under a per-process random salt,
so equal prefixes find each other and nobody outside the process can aim a collision; a hit is also checked token
for token. Freed blocks keep their cached contents and are reused least-recently-freed first.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from lmserve.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None        # set while the block is in the prefix cache
    token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self.cached: dict[bytes, int] = {}
        self.num_cached_free_blocks = 0    # free blocks holding a cached prefix (counted as they change: read per step)
        self.salt = os.urandom(16)
        self.prefix_cache_queries = 0      # prompt tokens looked up
        self.prefix_cache_hits = 0         # of which found in the cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of seq's tokens, leaving at least one token to compute."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, max_blocks)
        tokens, hits = seq.all_token_ids, []
        for i in range(max_blocks):
            block_id = self.cached.get(seq.block_hashes[i])
            chunk = tuple(tokens[i * self.block_size: (i + 1) * self.block_size])
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give seq blocks for num_new_tokens more tokens (after taking cached_blocks); all or nothing."""
        reused_free = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        have = len(seq.block_table) + len(cached_blocks)
        need = max(0, self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - have)
        if need + reused_free > len(self.free_blocks):
            return False
        for block_id in cached_blocks:
            self._take(block_id)
        if cached_blocks:  # only at admission, into an empty table
            seq.block_table.extend(cached_blocks)
            seq.num_registered_blocks = len(seq.block_table)
        seq.block_table.extend(self._take_fresh() for _ in range(need))
        return True

    def share_prefix(self, source: Sequence, seq: Sequence, num_blocks: int) -> None:
        """Let seq start from source's first num_blocks full blocks (n > 1 completions of one prompt)."""
        for block_id in source.block_table[:num_blocks]:
            self._take(block_id)
        seq.block_table = source.block_table[:num_blocks]
        seq.num_registered_blocks = num_blocks
        seq.num_computed_tokens = num_blocks * self.block_size

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks, tail first, so that a prefix's later blocks are evicted before its head."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
                self.num_cached_free_blocks += block.block_hash is not None
        seq.block_table, seq.num_registered_blocks = [], 0

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Offer seq's newly computed full blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        self._extend_hashes(seq, num_full)
        tokens = seq.all_token_ids
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and seq.block_hashes[i] not in self.cached:
                block.block_hash = seq.block_hashes[i]
                block.token_ids = tuple(tokens[i * self.block_size: (i + 1) * self.block_size])
                self.cached[block.block_hash] = block.block_id
        seq.num_registered_blocks = num_full

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.block_hash, block.token_ids = None, ()
        self.cached.clear()
        self.num_cached_free_blocks = 0

    def _take(self, block_id: int) -> int:
        """One more user of a block whose contents are wanted (a prefix hit or a shared prompt block)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
            self.num_cached_free_blocks -= block.block_hash is not None
        block.ref_count += 1
        return block_id

    def _take_fresh(self) -> int:
        """The least recently freed block, its cached contents evicted because they are about to be overwritten."""
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            self.num_cached_free_blocks -= 1
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        tokens, size = seq.all_token_ids, self.block_size
        for i in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[i - 1] if i else self.salt + (seq.request.cache_salt or "").encode()
            chunk = tokens[i * size: (i + 1) * size]
            seq.block_hashes.append(hashlib.blake2b(parent + array("q", chunk).tobytes(), digest_size=16).digest())
