"""Many clients at once: concurrent streams complete with the right usage, clients that leave free their KV
blocks, and a full waiting queue answers 503 at once."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest
from server_helpers import API_KEY, ServerThread, assert_error, make_tiny_llama, metrics, slow_steps, wait_idle

from lmserve.engine.config import EngineConfig

MODEL = "tiny"
HEADERS = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def server(model_dir):
    server = ServerThread(EngineConfig(model=str(model_dir), num_kv_blocks=160), MODEL, API_KEY).start()
    yield server
    server.stop()


def test_32_concurrent_streams_complete_with_correct_usage(server):
    prompts = [f"Client {i} says hello to the quick brown fox." for i in range(32)]
    counts = [len(httpx.post(f"{server.base_url}/tokenize", json={"prompt": p}, headers=HEADERS).json()["tokens"])
              for p in prompts]

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, object, str]:
        text, usage, finish = "", None, None
        stream = await client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=12 + i % 5,
                                                 temperature=0.9, seed=i, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
        return text, usage, finish

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(main())
    for i, (_, usage, finish) in enumerate(results):
        assert finish == "length"
        assert usage.completion_tokens == 12 + i % 5
        assert usage.prompt_tokens == counts[i]
    wait_idle(server.base_url)


def test_clients_that_disconnect_mid_stream_free_every_block(server):
    # 200 tokens take 10 s at this pace: freeing everything sooner than that means the requests were aborted.
    slow_steps(server, 0.05)
    errors: list[BaseException] = []
    started = threading.Barrier(21, timeout=120)

    def client(i: int) -> None:
        try:
            body = {"model": MODEL, "prompt": f"Stream {i} that will be cut", "max_tokens": 200, "stream": True,
                    "ignore_eos": True}
            chat = {"model": MODEL, "messages": [{"role": "user", "content": f"Chat {i}"}], "max_tokens": 200,
                    "stream": True, "ignore_eos": True}
            path, payload = ("/v1/completions", body) if i % 2 else ("/v1/chat/completions", chat)
            with httpx.stream("POST", f"{server.base_url}{path}", json=payload, headers=HEADERS, timeout=120) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                for _ in range(3):
                    next(lines)
                started.wait()   # all 20 are running mid-stream
                started.wait()   # the main thread has looked at the KV usage
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            started.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    started.wait()
    busy = metrics(server.base_url)
    started.wait()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    assert busy["lmserve:kv_cache_usage_perc"] > 0 and busy["lmserve:num_requests_running"] > 0
    wait_idle(server.base_url, timeout=6)
    stats = server.async_engine.stats
    assert stats.kv_blocks_used == 0 and stats.num_requests_running == 0 and stats.num_requests_waiting == 0
    # Non-streaming clients that give up are aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", headers=HEADERS, timeout=0.5,
                   json={"model": MODEL, "prompt": "long", "max_tokens": 200, "ignore_eos": True})
    wait_idle(server.base_url, timeout=6)
    slow_steps(server, 0)


def test_full_queue_answers_503_at_once(model_dir):
    server = ServerThread(EngineConfig(model=str(model_dir), num_kv_blocks=64, max_num_seqs=1), MODEL, API_KEY,
                          max_waiting_requests=1).start()
    slow_steps(server, 0.05)
    body = {"model": MODEL, "prompt": "Occupy", "max_tokens": 240, "stream": True, "ignore_eos": True}
    try:
        with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as running:
                lines = running.iter_lines()  # (kept: dropping the iterator would close the connection)
                next(lines)  # running: the only sequence slot is taken
                with http.stream("POST", "/v1/completions", json=body) as waiting:
                    assert waiting.status_code == 200
                    deadline = time.monotonic() + 30
                    while metrics(server.base_url)["lmserve:num_requests_waiting"] < 1:
                        assert time.monotonic() < deadline
                        time.sleep(0.05)
                    start = time.monotonic()
                    full = http.post("/v1/completions", json={**body, "stream": False})
                    assert time.monotonic() - start < 2.0
                    error = assert_error(full, 503, code="queue_full")
                    assert "max_waiting_requests=1" in error["message"] and full.headers["retry-after"] == "1"
                    assert_error(http.post("/v1/chat/completions", json={
                        "model": MODEL, "messages": [{"role": "user", "content": "hi"}]}), 503)
            wait_idle(server.base_url)
            ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "Now", "max_tokens": 3})
            assert ok.status_code == 200
    finally:
        server.stop()
