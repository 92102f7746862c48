"""Token-budget continuous batching: each step decides how many tokens of which sequence run.

Running sequences go first (decodes, and prefills still in progress), then waiting ones, with prompts chunked to
fit the budget, all in one step. While any sequence decodes, a step takes at most max_prefill_tokens_while_decoding
prompt tokens besides the decodes, so that a burst of new prompts delays each running stream's next token by short
steps, not by a whole budget of prefill at a time (Sarathi-Serve's stall-free batching); a step with no decodes takes
the whole budget, which prefills fastest. When blocks run out, the lowest-priority, newest running sequence is
preempted: its blocks are freed and it is recomputed later (its full blocks may well still be in the prefix cache).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    policy: str = "fcfs"              # or "priority"
    max_prefill_tokens_while_decoding: int | None = None  # None: the whole budget


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens to compute per sequence this step

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        if config.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got '{config.policy}'")
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)
        if self.config.policy == "priority":
            self.waiting = deque(sorted(self.waiting, key=self._rank))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch, budget = ScheduledBatch(), self.config.max_num_batched_tokens
        prefill_budget = budget
        if self.config.max_prefill_tokens_while_decoding is not None and any(
                not seq.is_prefilling for seq in self.running):
            prefill_budget = self.config.max_prefill_tokens_while_decoding
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if seq.is_prefilling:
                n = min(n, prefill_budget)
                if n == 0:
                    continue
            while not self.blocks.allocate(seq, n):
                victim = max((s for s in self.running if s not in batch.seqs), key=self._rank)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                batch.seqs.append(seq)
                batch.num_tokens.append(n)
                budget -= n
                prefill_budget -= n if seq.is_prefilling else 0
        if not preempted:
            self._admit_waiting(batch, min(budget, prefill_budget))
        return batch

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self._start_from_shared_prompt(seq):
                if seq.index > 0 and self._leader_prefilling(seq):
                    return  # wait one step more and share the leader's prompt blocks instead of recomputing
                cached = self.blocks.find_cached_prefix(seq)
                seq.num_computed_tokens = len(cached) * self.blocks.block_size
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if not self.blocks.allocate(seq, n, cached):
                    seq.num_computed_tokens = 0
                    return
                self._count_prefix_lookup(seq, len(cached) * self.blocks.block_size)
            else:
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if not self.blocks.allocate(seq, n):
                    self.blocks.free(seq)
                    seq.num_computed_tokens = 0
                    return
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = time.monotonic()
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n

    def _leader_prefilling(self, seq: Sequence) -> bool:
        leader = seq.request.seqs[0]
        return leader.status is Status.RUNNING and leader.is_prefilling

    def _start_from_shared_prompt(self, seq: Sequence) -> bool:
        """A later completion of an n > 1 request reuses the prompt blocks its first completion computed."""
        leader = seq.request.seqs[0]
        if seq.index == 0 or seq.output_token_ids or leader.status is not Status.RUNNING or leader.is_prefilling:
            return False
        self.blocks.share_prefix(leader, seq, (len(seq.prompt_token_ids) - 1) // self.blocks.block_size)
        return True

    def _count_prefix_lookup(self, seq: Sequence, hit_tokens: int) -> None:
        if self.blocks.enable_prefix_caching and not seq.wants_prompt_logprobs:
            self.blocks.prefix_cache_queries += seq.num_tokens
            self.blocks.prefix_cache_hits += hit_tokens
            if not seq.output_token_ids:
                seq.request.metrics.num_cached_tokens = max(seq.request.metrics.num_cached_tokens, hit_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.add(seq, front=True)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Release a finished (or aborted) sequence wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def _rank(self, seq: Sequence) -> tuple:
        """Sort key: smaller runs first; the largest is preempted first."""
        r = seq.request
        if self.config.policy == "priority":
            return (r.priority, r.metrics.arrival_time, seq.seq_id)
        return (r.metrics.arrival_time, seq.seq_id)
