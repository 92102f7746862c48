"""One request and its completions: tokens, progress through the KV cache, status, timings and outputs.

A request with n > 1 has n sequences; sequence 0 prefills the prompt and the others share its full blocks.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from lmserve.outputs import PositionLogprobs, RequestMetrics
from lmserve.sampling_params import SamplingParams

_seq_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    priority: int = 0                 # lower runs first when priority scheduling is on
    cache_salt: str | None = None     # isolates this request's prefix-cache entries from other tenants
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(seq.status is Status.FINISHED for seq in self.seqs)


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int                        # which of the request's n completions
    max_tokens: int
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0      # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the full blocks of all_token_ids
    num_registered_blocks: int = 0    # leading full blocks already offered to the prefix cache
    text: str = ""
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def all_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < len(self.request.prompt_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.index == 0 and self.request.params.prompt_logprobs is not None

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status, self.finish_reason, self.stop_reason = Status.FINISHED, reason, stop_reason
