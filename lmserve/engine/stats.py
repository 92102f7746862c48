"""A point-in-time snapshot of the engine, read by the server's metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    num_requests_running: int
    num_requests_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int          # held by requests
    kv_blocks_free: int          # includes cached_free
    kv_blocks_cached_free: int   # free, but still holding a reusable prefix
    prefix_cache_queries: int    # tokens looked up
    prefix_cache_hits: int       # tokens found
    num_preemptions: int
    prompt_tokens: int           # prompt tokens computed (prefix-cache hits excluded, recomputation included)
    generation_tokens: int       # tokens sampled

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
