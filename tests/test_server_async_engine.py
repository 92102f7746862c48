"""The async engine behind the server: one step thread, asyncio streams, aborts, admission limits, idling without
spinning, and what happens when the engine dies (also as the HTTP server sees it)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import httpx
import pytest
from server_helpers import API_KEY, ServerThread, assert_error, make_tiny_llama

from lmserve.engine.async_engine import AsyncEngine
from lmserve.engine.config import EngineConfig
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.request_stream import EngineDeadError, QueueFullError, RequestAbortedError
from lmserve.sampling_params import SamplingParams

LONG = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def llm_engine(model_dir):
    return LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64, max_num_seqs=1))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def _cpu_ticks(thread: threading.Thread) -> int:
    fields = open(f"/proc/self/task/{thread.native_id}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_streams_outputs_and_frees_blocks_after_abort(llm_engine):
    async def main():
        engine = AsyncEngine(engine=llm_engine)
        engine.start()
        try:
            short = engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
            await short.accepted()
            outputs = [o async for o in short]
            assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 4
            long = engine.add_request("b", [5, 6, 7], LONG)
            async for output in long:
                if len(output.outputs[0].token_ids) >= 2:
                    break
            engine.abort("b")
            engine.abort("b")  # twice is harmless
            with pytest.raises(RequestAbortedError):
                await long.result()
            deadline = time.monotonic() + 30
            while engine.stats.kv_blocks_used or engine.stats.num_requests_running:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            bad = engine.add_request("c", [5], SamplingParams(logit_bias={10_000: 1.0}))
            with pytest.raises(ValueError, match="logit_bias"):
                await bad.accepted()
        finally:
            await asyncio.to_thread(engine.shutdown)

    run(main())
    assert llm_engine.stats().kv_blocks_used == 0


def test_idle_step_thread_does_not_spin(llm_engine):
    async def main():
        engine = AsyncEngine(engine=llm_engine)
        engine.start()
        try:
            await engine.add_request("a", [5, 6], SamplingParams(max_tokens=2)).result()
            await asyncio.sleep(0.2)
            before = _cpu_ticks(engine._thread)
            await asyncio.sleep(1.0)
            assert _cpu_ticks(engine._thread) - before <= 2  # clock ticks are 10 ms: idle means ~0
            # and it wakes up at once for new work
            start = time.monotonic()
            await engine.add_request("b", [5, 6], SamplingParams(max_tokens=1)).result()
            assert time.monotonic() - start < 5
        finally:
            await asyncio.to_thread(engine.shutdown)

    run(main())


def test_admission_limit(llm_engine):
    async def main():
        engine = AsyncEngine(engine=llm_engine, max_waiting_requests=1)
        engine.start()
        try:
            running = engine.add_request("a", [5, 6], LONG)
            async for _ in running:
                break  # it runs: the only sequence slot is taken
            waiting = engine.add_request("b", [5, 6], LONG)
            await waiting.accepted()
            with pytest.raises(QueueFullError):
                engine.add_request("c", [5, 6], LONG)
            with pytest.raises(QueueFullError):
                engine.add_requests([("d", [5], LONG, 0, None), ("e", [5], LONG, 0, None)])
        finally:
            await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError, match="shutting down"):
            await waiting.result()
        assert engine.dead

    run(main())
    stats = llm_engine.stats()
    assert stats.kv_blocks_used == 0 and stats.num_requests_running == stats.num_requests_waiting == 0


def test_engine_death_fails_every_request(llm_engine):
    async def main():
        engine = AsyncEngine(engine=llm_engine)
        engine.start()
        steps = 0
        real_step = llm_engine.step

        def failing_step():
            nonlocal steps
            steps += 1
            if steps > 3:
                raise RuntimeError("device lost")
            return real_step()

        llm_engine.step = failing_step
        try:
            stream = engine.add_request("a", [5, 6], LONG)
            with pytest.raises(EngineDeadError, match="device lost"):
                await stream.result()
            assert engine.dead and isinstance(engine.error, RuntimeError)
            with pytest.raises(EngineDeadError):
                engine.add_request("b", [5], LONG)
        finally:
            await asyncio.to_thread(engine.shutdown)

    run(main())


def test_server_reports_a_dead_engine(model_dir):
    server = ServerThread(EngineConfig(model=str(model_dir), num_kv_blocks=64), "tiny", API_KEY).start()
    headers = {"authorization": f"Bearer {API_KEY}"}
    try:
        engine = server.async_engine.engine

        def broken_step():
            raise RuntimeError("device lost")

        engine.step = broken_step
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 5}
        response = httpx.post(f"{server.base_url}/v1/completions", json=body, headers=headers, timeout=30)
        assert_error(response, 503, code="engine_dead")
        assert httpx.get(f"{server.base_url}/health").status_code == 503
        assert_error(httpx.post(f"{server.base_url}/v1/completions", json={**body, "stream": True}, headers=headers,
                                timeout=30), 503, code="engine_dead")
    finally:
        server.stop()


def test_load_failure_is_reported(tmp_path):
    failures = []
    missing = tmp_path / "no-such-model"
    os.makedirs(missing)
    server = ServerThread(EngineConfig(model=str(missing)), "x", None, on_load_failure=failures.append)
    server.thread.start()
    deadline = time.monotonic() + 30
    while not failures:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        response = httpx.get(f"{server.base_url}/health", timeout=10)
        assert_error(response, 503, code="engine_dead")
        assert_error(httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x"}, timeout=10), 503)
    finally:
        server.stop()
