"""Single-stream latency on the in-process engine: TTFT, prefill tokens/s and TPOT of one request at a time."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from lmserve.bench.datasets import random_prompts
from lmserve.bench.metrics import format_mmm, median_min_max, tpot
from lmserve.bench.system import peak_memory
from lmserve.bench.throughput import vocab_for_random_prompts


@dataclass
class LatencyConfig:
    input_len: int = 128
    output_len: int = 128
    num_iters: int = 5
    num_warmup_iters: int = 1
    seed: int = 0


def time_one_request(engine: Any, request_id: str, prompt_ids: list[int], output_len: int) -> dict[str, float]:
    """Send one greedy request through `engine` (an LLMEngine) alone; its TTFT, E2EL and TPOT in seconds."""
    from lmserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(request_id, {"prompt_token_ids": prompt_ids}, params)
    first = None
    n_out = 0
    while True:
        outputs = engine.step()
        if not outputs:
            raise RuntimeError("the engine made no progress on the latency request")
        out = next((o for o in outputs if o.request_id == request_id), None)
        if out is None:
            continue
        n_out = len(out.outputs[0].token_ids)
        if first is None and n_out > 0:
            first = time.perf_counter()
        if out.finished:
            break
    end = time.perf_counter()
    ttft = (first or end) - start
    return {"ttft": ttft, "e2el": end - start, "tpot": tpot(ttft, end - start, n_out) or 0.0,
            "output_tokens": n_out}


def run_latency(llm: Any, cfg: LatencyConfig) -> dict[str, Any]:
    """Warm up, then time `num_iters` single requests (a fresh random prompt each, so no prefix-cache hits)."""
    if cfg.num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {cfg.num_iters}")
    vocab, special = vocab_for_random_prompts(llm)
    total = cfg.num_warmup_iters + cfg.num_iters
    prompts = random_prompts(total, cfg.input_len, cfg.output_len, vocab, special, cfg.seed)
    runs = []
    for i, p in enumerate(prompts):
        timing = time_one_request(llm.engine, f"latency-{i}", p.prompt, p.output_len)
        if i >= cfg.num_warmup_iters:
            runs.append(timing)
    ttft = [r["ttft"] for r in runs]
    tpots = [r["tpot"] for r in runs]
    e2el = [r["e2el"] for r in runs]
    result: dict[str, Any] = {
        "input_len": cfg.input_len,
        "output_len": cfg.output_len,
        "num_iters": cfg.num_iters,
        "ttft_ms": [t * 1000 for t in ttft],
        "tpot_ms": [t * 1000 for t in tpots],
        "e2el_ms": [t * 1000 for t in e2el],
        "prefill_tokens_per_s": [cfg.input_len / t for t in ttft],
        "decode_tokens_per_s": [1.0 / t if t > 0 else 0.0 for t in tpots],
    }
    for key in ("ttft_ms", "tpot_ms", "e2el_ms", "prefill_tokens_per_s", "decode_tokens_per_s"):
        med, lo, hi = median_min_max(result[key])
        result[f"median_{key}"], result[f"min_{key}"], result[f"max_{key}"] = med, lo, hi
    # vLLM's `bench latency` reports whole-request latency in seconds under this name.
    result["avg_latency"] = sum(e2el) / len(e2el)
    result.update(peak_memory())
    return result


def format_latency(result: dict[str, Any]) -> str:
    return "\n".join([
        f"Single stream, {result['input_len']} -> {result['output_len']} tokens, "
        f"median [min–max] of {result['num_iters']} runs:",
        f"  TTFT (ms):             {format_mmm(result['ttft_ms'])}",
        f"  prefill (tokens/s):    {format_mmm(result['prefill_tokens_per_s'])}",
        f"  TPOT (ms):             {format_mmm(result['tpot_ms'], 2)}",
        f"  decode (tokens/s):     {format_mmm(result['decode_tokens_per_s'])}",
        f"  E2EL (ms):             {format_mmm(result['e2el_ms'])}",
        f"  peak RSS (MiB):        {result['peak_rss_mib']:.0f}",
    ])
