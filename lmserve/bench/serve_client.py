"""A streaming load generator for any OpenAI-compatible /v1/completions server (ours or another engine's).

Requests go out at a fixed concurrency (`max_concurrency`) and/or as a seeded Poisson process (`request_rate`
requests/s); each response is read as server-sent events, timestamping every chunk that carries `choices` (as
vLLM's client does: TTFT is the first, ITL the gaps; output tokens come from the final usage chunk when the
server sends one, else one per chunk).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from tqdm import tqdm

from lmserve.bench.datasets import BenchPrompt
from lmserve.bench.metrics import RequestRecord


@dataclass
class ServeConfig:
    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    max_concurrency: int | None = None       # None: no cap
    request_rate: float = math.inf           # requests/s; inf: all at once
    seed: int = 0
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 3600.0
    disable_tqdm: bool = False

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint


def build_payload(cfg: ServeConfig, prompt: BenchPrompt) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": cfg.model,
        "prompt": prompt.prompt,
        "max_tokens": prompt.output_len,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        payload["ignore_eos"] = True  # an extra field, as vLLM's client sends it
    payload.update(cfg.extra_body)
    return payload


def _events(line: bytes) -> str | None:
    """The data of one SSE line, or None for blank lines, comments and other fields."""
    text = line.decode("utf-8").strip()
    if not text.startswith("data:"):
        return None
    return text[5:].strip()


async def send_request(session: aiohttp.ClientSession, cfg: ServeConfig, prompt: BenchPrompt) -> RequestRecord:
    """Stream one completion; the record says what came back and when (errors are recorded, not raised)."""
    record = RequestRecord(prompt_len=prompt.prompt_len)
    chunk_times: list[float] = []
    usage: dict[str, Any] | None = None
    start = end = record.start_time = time.perf_counter()
    try:
        async with session.post(cfg.url, json=build_payload(cfg, prompt)) as response:
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.text())[:500]}"
                return record
            async for line in response.content:
                data = _events(line)
                if data is None:
                    continue
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    record.error = f"server error in stream: {chunk['error']}"
                    return record
                choices = chunk.get("choices")
                if choices:  # as vLLM's client: every choices chunk, even with empty text (a special token) ...
                    end = time.perf_counter()
                    if choices[0].get("text") or choices[0].get("finish_reason") is None:
                        chunk_times.append(end)  # ... but a bare terminator (no text, a finish_reason) is no token
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return record
    if not chunk_times:
        if end == start:
            record.error = "the stream carried no choices"
            return record
        chunk_times = [end]  # only a terminator: every token was folded into it
    record.success = True
    record.ttft = chunk_times[0] - start
    record.latency = end - start
    record.itl = [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]
    record.output_tokens = len(chunk_times)
    if usage:
        record.output_tokens = int(usage.get("completion_tokens") or record.output_tokens)
        record.prompt_len = int(usage.get("prompt_tokens") or record.prompt_len)
    return record


async def _arrivals(prompts: list[BenchPrompt], rate: float, seed: int):
    """Yield prompts with exponential gaps of mean 1/rate (a Poisson process); all at once when rate is inf."""
    rng = random.Random(seed)
    for i, prompt in enumerate(prompts):
        if i and math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
        yield prompt


async def _run(cfg: ServeConfig, prompts: list[BenchPrompt], warmup: list[BenchPrompt],
               ) -> tuple[list[RequestRecord], float]:
    limit = cfg.max_concurrency or 0
    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                     read_bufsize=2**20) as session:
        semaphore = asyncio.Semaphore(limit) if limit else None

        async def one(p: BenchPrompt, bar: tqdm | None) -> RequestRecord:
            if semaphore is None:
                record = await send_request(session, cfg, p)
            else:
                async with semaphore:
                    record = await send_request(session, cfg, p)
            if bar is not None:
                bar.update(1)
            return record

        if warmup:
            done = await asyncio.gather(*(one(p, None) for p in warmup))
            failed = [r.error for r in done if not r.success]
            if failed:
                raise RuntimeError(f"warm-up request failed against {cfg.url}: {failed[0]}")
        with tqdm(total=len(prompts), desc="requests", disable=cfg.disable_tqdm) as bar:
            start = time.perf_counter()
            tasks = [asyncio.create_task(one(p, bar)) async for p in _arrivals(prompts, cfg.request_rate, cfg.seed)]
            records = await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
    return list(records), duration


def run_serve_benchmark(cfg: ServeConfig, prompts: list[BenchPrompt], warmup: list[BenchPrompt] | None = None,
                        ) -> tuple[list[RequestRecord], float]:
    """Send the warm-up requests (not timed), then every prompt; returns the records and the wall time (s)."""
    if cfg.max_concurrency is not None and cfg.max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {cfg.max_concurrency}")
    if not cfg.request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (or inf), got {cfg.request_rate}")
    return asyncio.run(_run(cfg, prompts, warmup or []))


async def _first_model(base_url: str, timeout_s: float) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s), trust_env=False) as session:
        async with session.get(base_url.rstrip("/") + "/v1/models") as response:
            response.raise_for_status()
            models = (await response.json()).get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]


def discover_model(base_url: str, timeout_s: float = 30.0) -> str:
    """The first model id that the server lists under /v1/models."""
    try:
        return asyncio.run(_first_model(base_url, timeout_s))
    except (TimeoutError, aiohttp.ClientError) as e:
        raise ValueError(f"cannot list models at {base_url}/v1/models ({e}); pass --model") from None
