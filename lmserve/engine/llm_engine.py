"""The synchronous engine: requests in, one scheduled model step at a time, RequestOutputs out."""

from __future__ import annotations

import time
from typing import Any

import torch

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.config import EngineConfig, choose_num_blocks, kv_cache_dtype
from lmserve.engine.output_processor import OutputProcessor
from lmserve.engine.scheduler import Scheduler, SchedulerConfig
from lmserve.engine.sequence import Request, Sequence, Status
from lmserve.engine.stats import EngineStats
from lmserve.loader import load_model
from lmserve.outputs import RequestMetrics, RequestOutput
from lmserve.runner.model_runner import ModelRunner
from lmserve.sampling_params import SamplingParams

PromptInput = str | list[int] | dict[str, Any]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        self.lm = load_model(config.model, config.tokenizer, config.dtype, config.device, config.quantization)
        model_len = self.lm.config.max_position_embeddings
        self.max_model_len = config.max_model_len or model_len
        if not 1 < self.max_model_len <= model_len:
            raise ValueError(f"max_model_len must be in [2, {model_len}] for this model, got {config.max_model_len}")
        kv_dtype = kv_cache_dtype(config, self.lm.dtype, self.lm.device)
        num_blocks = choose_num_blocks(config, self.lm.config, self.max_model_len, kv_dtype, self.lm.device)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.scheduling_policy, config.max_prefill_tokens_while_decoding),
                                   self.block_manager)
        self.runner = ModelRunner(self.lm, num_blocks, config.block_size, kv_dtype)
        self.output_processor = OutputProcessor(self.lm.tokenizer, self.lm.eos_token_ids, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams | None = None,
                    priority: int = 0, cache_salt: str | None = None, arrival_time: float | None = None) -> None:
        """Validate and queue a request; a bad one raises ValueError naming the parameter and changes nothing."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id '{request_id}' is already in use")
        text, token_ids = self._tokenize(prompt)
        params.check_vocab(self.lm.config.vocab_size)
        max_tokens = self._max_tokens(len(token_ids), params)
        request = Request(request_id, text, token_ids, params, RequestMetrics(arrival_time or time.monotonic()),
                          priority, cache_salt)
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(self.lm.device)
                generator.manual_seed(params.seed if index == 0 else hash((params.seed, index)) & (2**63 - 1))
            request.seqs.append(Sequence(request, index, max_tokens, generator))
        self.requests[request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks; False if it is unknown or already done."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if seq.status is not Status.FINISHED:
                seq.finish("abort")
            self.scheduler.finish(seq)
            self.output_processor.forget(seq)
        request.metrics.finished_time = time.monotonic()
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; outputs of every request that progressed (cumulative, as vLLM)."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        result = self.runner.execute(batch)
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            self.prompt_tokens += max(0, min(seq.num_computed_tokens + n, len(seq.prompt_token_ids))
                                      - seq.num_computed_tokens)
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
            chunk = result.prompt_logprobs.get(seq.seq_id)
            if chunk is not None:
                self.output_processor.add_prompt_logprobs(seq.request, chunk.first_position, chunk.entries)
            if seq.max_tokens == 0 and not seq.is_prefilling:
                seq.finish("length")
            touched[seq.request.request_id] = seq.request
        self._append_sampled(result, now)
        outputs = []
        for request in touched.values():
            for seq in request.seqs:
                if seq.status is Status.FINISHED:
                    self.scheduler.finish(seq)
            if request.finished:
                request.metrics.finished_time = now
                del self.requests[request.request_id]
            outputs.append(self.output_processor.make_output(request))
        return outputs

    def stats(self) -> EngineStats:
        bm = self.block_manager
        running = {seq.request.request_id for seq in self.scheduler.running}
        waiting = {seq.request.request_id for seq in self.scheduler.waiting} - running
        return EngineStats(len(running), len(waiting), bm.num_blocks, bm.num_blocks - bm.num_free_blocks,
                           bm.num_free_blocks, bm.num_cached_free_blocks, bm.prefix_cache_queries,
                           bm.prefix_cache_hits, self.scheduler.num_preemptions, self.prompt_tokens,
                           self.generation_tokens)

    def _append_sampled(self, result, now: float) -> None:
        sampled = result.sampled
        for i, seq in enumerate(result.sampled_seqs):
            token = sampled.token_ids[i]
            logprobs = None
            if seq.params.logprobs is not None:
                top = sampled.top_logprobs[i][: seq.params.logprobs]
                logprobs = self.output_processor.position_logprobs(token, sampled.logprobs[i], sampled.ranks[i], top)
            self.output_processor.append_token(seq, token, logprobs)
            self.generation_tokens += 1
            if seq.request.metrics.first_token_time is None:
                seq.request.metrics.first_token_time = now

    def _tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.lm.tokenizer.encode(prompt) if prompt else []
        else:
            text, token_ids = None, list(prompt)
        if not token_ids:
            raise ValueError("prompt is empty")
        vocab = self.lm.config.vocab_size
        bad = next((t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token id {bad!r} is outside the vocabulary [0, {vocab})")
        return text, token_ids

    def _max_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        limit = self.max_model_len
        if prompt_len > limit or (prompt_len == limit and params.max_tokens != 0):
            raise ValueError(f"prompt: this model's maximum context length is {limit} tokens, "
                             f"but the prompt has {prompt_len} tokens")
        max_tokens = limit - prompt_len if params.max_tokens is None else params.max_tokens
        if prompt_len + max_tokens > limit:
            raise ValueError(f"max_tokens={max_tokens} does not fit: the prompt has {prompt_len} tokens and the "
                             f"maximum context length is {limit} (at most {limit - prompt_len} new tokens)")
        blocks = self.block_manager.blocks_needed(prompt_len + max_tokens)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(f"max_tokens={max_tokens}: prompt + output need {blocks} KV blocks but the pool has "
                             f"{self.block_manager.num_blocks}; raise num_kv_blocks or kv_cache_memory_gb")
        return max_tokens
