"""Offline throughput, like `vllm bench throughput`: every prompt queued at once on the in-process engine."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from lmserve.bench.datasets import BenchPrompt, file_prompts, random_prompts, special_token_ids
from lmserve.bench.system import peak_memory


@dataclass
class ThroughputConfig:
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 128
    dataset_path: str | None = None     # a prompt file instead of random token ids
    num_warmup_prompts: int = 4          # a short batch first, so one-time costs stay out of the timing
    temperature: float = 0.0             # greedy by default
    ignore_eos: bool = True
    seed: int = 0


def vocab_for_random_prompts(llm: Any) -> tuple[int, set[int]]:
    """(vocab size usable for random ids, special ids to avoid) of an in-process LLM."""
    tokenizer = llm.get_tokenizer()
    vocab = min(tokenizer.vocab_size, llm.engine.lm.config.vocab_size)
    return vocab, special_token_ids(tokenizer)


def make_prompts(llm: Any, cfg: ThroughputConfig) -> list[BenchPrompt]:
    if cfg.dataset_path:
        return file_prompts(cfg.dataset_path, cfg.num_prompts, cfg.output_len, llm.get_tokenizer())
    vocab, special = vocab_for_random_prompts(llm)
    return random_prompts(cfg.num_prompts, cfg.input_len, cfg.output_len, vocab, special, cfg.seed)


def _as_inputs(prompts: list[BenchPrompt]) -> list[Any]:
    return [p.prompt if isinstance(p.prompt, str) else {"prompt_token_ids": p.prompt} for p in prompts]


def run_throughput(llm: Any, cfg: ThroughputConfig, use_tqdm: bool = True) -> dict[str, Any]:
    """Run the workload on `llm` (an lmserve.LLM) and return vLLM's throughput fields plus ours."""
    from lmserve.sampling_params import SamplingParams

    prompts = make_prompts(llm, cfg)
    params = [SamplingParams(temperature=cfg.temperature, max_tokens=p.output_len, ignore_eos=cfg.ignore_eos,
                             seed=cfg.seed if cfg.temperature > 0 else None) for p in prompts]
    if cfg.num_warmup_prompts > 0:
        warm = prompts[: cfg.num_warmup_prompts]
        llm.generate(_as_inputs(warm), [SamplingParams(temperature=cfg.temperature, max_tokens=min(8, p.output_len),
                                                       ignore_eos=True) for p in warm], use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(_as_inputs(prompts), params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    result: dict[str, Any] = {
        "elapsed_time": elapsed,
        "num_requests": len(outputs),
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "total_num_tokens": prompt_tokens + output_tokens,
        "requests_per_second": len(outputs) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
    }
    result.update(peak_memory())
    return result


def format_throughput(result: dict[str, Any]) -> str:
    lines = [
        f"Throughput: {result['requests_per_second']:.2f} requests/s, "
        f"{result['tokens_per_second']:.2f} total tokens/s, {result['output_tokens_per_second']:.2f} output tokens/s",
        f"Requests: {result['num_requests']}  prompt tokens: {result['total_prompt_tokens']}  "
        f"output tokens: {result['total_output_tokens']}  wall time: {result['elapsed_time']:.2f} s",
        f"Peak memory: RSS {result['peak_rss_mib']:.0f} MiB"
        + (f", CUDA max allocated {result['cuda_max_allocated_mib']:.0f} MiB"
           if result.get("cuda_max_allocated_mib") is not None else ""),
    ]
    return "\n".join(lines)
