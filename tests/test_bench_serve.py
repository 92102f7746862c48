"""`lmserve bench serve` against a fake OpenAI-compatible streaming server with known chunk timings."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from aiohttp import web

from lmserve.bench.datasets import BenchPrompt
from lmserve.bench.metrics import compute_metrics
from lmserve.bench.serve_client import ServeConfig, discover_model, run_serve_benchmark
from lmserve.cli import main

TTFT_S = 0.10   # the fake server's delay before the first chunk
GAP_S = 0.02    # and between chunks
SLACK_S = 0.15  # scheduling noise allowed on a busy 2-core machine


class FakeServer:
    """Streams `max_tokens` chunks ("t0 ", "t1 ", ...) after known delays; records requests and peak in-flight."""

    def __init__(self, tokens_per_chunk: int = 1, send_usage: bool = True, fail: bool = False,
                 terminator: bool = False) -> None:
        self.tokens_per_chunk, self.send_usage, self.fail = tokens_per_chunk, send_usage, fail
        self.terminator = terminator  # finish_reason in a last chunk of its own, without text (as llama-server)
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.fail:
            return web.json_response({"error": {"message": "bad request", "type": "invalid_request_error"}},
                                     status=400)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        n = body["max_tokens"]
        chunks = [list(range(i, min(n, i + self.tokens_per_chunk))) for i in range(0, n, self.tokens_per_chunk)]
        for i, ids in enumerate(chunks):
            await asyncio.sleep(TTFT_S if i == 0 else GAP_S)
            text = "" if ids[0] == 1 else "".join(f"t{t} " for t in ids)  # a token without text counts too
            data = {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                    "choices": [{"index": 0, "text": text,
                                 "finish_reason": "length" if i == len(chunks) - 1 and not self.terminator else None}]}
            await response.write(f"data: {json.dumps(data)}\n\n".encode())
        if self.terminator:
            await asyncio.sleep(GAP_S)
            final = {"id": "cmpl-1", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
            await response.write(f"data: {json.dumps(final)}\n\n".encode())
        if self.send_usage and body.get("stream_options", {}).get("include_usage"):
            prompt_len = len(body["prompt"]) if isinstance(body["prompt"], list) else 7
            usage = {"id": "cmpl-1", "choices": [],
                     "usage": {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}}
            await response.write(f"data: {json.dumps(usage)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        self.in_flight -= 1
        return response

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> FakeServer:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def prompts(n: int, input_len: int = 6, output_len: int = 5) -> list[BenchPrompt]:
    return [BenchPrompt(list(range(10 + i, 10 + i + input_len)), input_len, output_len) for i in range(n)]


def test_metrics_end_to_end_match_known_timings():
    with FakeServer() as server:
        cfg = ServeConfig(server.url, "fake-model", max_concurrency=2, disable_tqdm=True)
        records, duration = run_serve_benchmark(cfg, prompts(4), warmup=prompts(1))
    assert len(server.bodies) == 5 and server.max_in_flight == 2
    body = server.bodies[-1]
    assert body["prompt"] == prompts(4)[3].prompt and body["max_tokens"] == 5 and body["stream"] is True
    assert body["ignore_eos"] is True and body["temperature"] == 0.0
    assert body["stream_options"] == {"include_usage": True}
    for r in records:
        assert r.success, r.error
        assert r.output_tokens == 5 and r.prompt_len == 6
        assert TTFT_S <= r.ttft < TTFT_S + SLACK_S
        assert len(r.itl) == 4 and all(GAP_S * 0.9 <= gap < GAP_S + SLACK_S for gap in r.itl)
        assert GAP_S * 0.9 <= r.tpot < GAP_S + SLACK_S
    m = compute_metrics(records, duration)
    assert m["completed"] == 4 and m["total_output_tokens"] == 20
    # Two waves of two requests, each about TTFT + 4 gaps long.
    assert 2 * (TTFT_S + 4 * GAP_S) <= duration < 2 * (TTFT_S + 4 * GAP_S) + 2 * SLACK_S
    assert m["output_throughput"] == pytest.approx(20 / duration)


def test_output_tokens_from_usage_or_chunk_count():
    with FakeServer(tokens_per_chunk=2) as server:
        records, _ = run_serve_benchmark(ServeConfig(server.url, "m", disable_tqdm=True), prompts(2, output_len=6))
    assert all(r.output_tokens == 6 and len(r.itl) == 2 for r in records)  # usage wins over 3 chunks
    with FakeServer(tokens_per_chunk=2, send_usage=False) as server:
        records, _ = run_serve_benchmark(ServeConfig(server.url, "m", disable_tqdm=True), prompts(2, output_len=6))
    assert all(r.success and r.output_tokens == 3 and r.prompt_len == 6 for r in records)
    with FakeServer(send_usage=False, terminator=True) as server:
        records, _ = run_serve_benchmark(ServeConfig(server.url, "m", disable_tqdm=True), prompts(2, output_len=4))
    for r in records:  # the bare terminator is no token, but the request ends with it
        assert r.output_tokens == 4 and len(r.itl) == 3
        assert r.latency >= r.ttft + 4 * GAP_S * 0.9


def test_poisson_arrivals_and_no_ignore_eos():
    with FakeServer() as server:
        cfg = ServeConfig(server.url, "m", request_rate=200.0, ignore_eos=False, disable_tqdm=True)
        records, _ = run_serve_benchmark(cfg, prompts(5, output_len=2))
    assert all(r.success for r in records) and all("ignore_eos" not in b for b in server.bodies)
    starts = [r.start_time for r in records]
    assert starts == sorted(starts) and starts[-1] > starts[0]


def test_errors_are_recorded_and_fail_the_command(tmp_path, capsys):
    with FakeServer(fail=True) as server:
        records, _ = run_serve_benchmark(ServeConfig(server.url, "m", disable_tqdm=True), prompts(2))
        assert not any(r.success for r in records) and "HTTP 400" in records[0].error
        code = main(["bench", "serve", "--base-url", server.url, "--vocab-size", "100", "--num-prompts", "2",
                     "--input-len", "4", "--output-len", "3", "--warmup-requests", "0", "--disable-tqdm",
                     "--output-json", str(tmp_path / "r.json")])
    assert code == 1
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["failed"] == 2 and "HTTP 400" in result["errors"][0]


def test_cli_several_concurrencies_json_plot_goodput(tmp_path, capsys):
    out, plot = tmp_path / "serve.json", tmp_path / "serve.png"
    with FakeServer() as server:
        assert discover_model(server.url) == "fake-model"
        code = main(["bench", "serve", "--base-url", server.url, "--vocab-size", "100",
                     "--dataset-name", "shared-prefix", "--prefix-len", "8", "--input-len", "3", "--output-len", "4",
                     "--num-prompts", "4", "--max-concurrency", "1", "4", "--percentiles", "50", "90",
                     "--goodput", "ttft:10000", "tpot:1", "--disable-tqdm", "--output-json", str(out),
                     "--plot", str(plot)])
    assert code == 0
    text = capsys.readouterr().out
    assert "Serving Benchmark Result" in text and "P90 TPOT (ms)" in text and "Request goodput" in text
    runs = json.loads(out.read_text())["runs"]
    assert [r["max_concurrency"] for r in runs] == [1, 4]
    for r in runs:
        assert r["completed"] == 4 and r["total_input_tokens"] == 4 * 11 and r["model_id"] == "fake-model"
        for key in ("request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms",
                    "median_tpot_ms", "p90_itl_ms", "p50_e2el_ms", "request_goodput"):
            assert key in r
        assert r["request_goodput"] == 0.0  # a 1 ms TPOT SLO cannot be met with 20 ms gaps
    # Concurrency 1 serialises the four requests; concurrency 4 overlaps them.
    assert runs[0]["duration"] > runs[1]["duration"] * 1.8
    bodies = server.bodies[:5]  # the warm-up request shares the system prompt too
    assert all(b["prompt"][:8] == bodies[0]["prompt"][:8] and len(b["prompt"]) == 11 for b in bodies)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_against_a_real_lmserve_server(tmp_path):
    """The client end to end against `lmserve serve` on a tiny model (once the server exists)."""
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("lmserve.server.app")
    pytest.importorskip("uvicorn")
    from tiny_models import LLAMA_GQA_TIED, make_tiny_model

    model = tmp_path / "tiny"
    make_tiny_model(LLAMA_GQA_TIED, model)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lmserve.cli", "serve", str(model), "--port", str(port),
                             "--max-num-seqs", "4", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"lmserve serve exited: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "lmserve serve did not become healthy in 120 s"
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.3)
        out = tmp_path / "real.json"
        code = main(["bench", "serve", "--base-url", url, "--num-prompts", "4", "--input-len", "8",
                     "--output-len", "6", "--max-concurrency", "2", "--warmup-requests", "1", "--disable-tqdm",
                     "--output-json", str(out)])
        assert code == 0
        r = json.loads(out.read_text())
        assert r["model_id"] == str(model)  # found through /v1/models; its tokenizer through the same name
        assert r["completed"] == 4 and r["failed"] == 0
        assert r["total_input_tokens"] == 4 * 8 and r["total_output_tokens"] == 4 * 6  # from the server's usage
        # A random tiny model emits tokens without text, which the server folds into later chunks: <= 6 chunks.
        assert all(n == 6 for n in r["output_lens"]) and all(len(gaps) <= 5 for gaps in r["itls"])
        assert 0 < r["mean_ttft_ms"] <= r["mean_e2el_ms"] and r["mean_tpot_ms"] >= 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_text_prompts_through_a_local_tokenizer(tmp_path):
    from tiny_models import save_tiny_tokenizer

    save_tiny_tokenizer(tmp_path)
    out = tmp_path / "text.json"
    with FakeServer() as server:
        code = main(["bench", "serve", "--base-url", server.url, "--model", "m", "--tokenizer", str(tmp_path),
                     "--prompt-format", "text", "--num-prompts", "2", "--input-len", "5", "--output-len", "3",
                     "--warmup-requests", "0", "--disable-tqdm", "--output-json", str(out)])
    assert code == 0
    assert all(isinstance(b["prompt"], str) and b["prompt"] for b in server.bodies)
    assert json.loads(out.read_text())["completed"] == 2


def test_unknown_model_without_tokenizer_says_what_to_pass(capsys):
    with FakeServer() as server:
        code = main(["bench", "serve", "--base-url", server.url, "--num-prompts", "1", "--disable-tqdm"])
        assert code == 2 and "--tokenizer" in capsys.readouterr().err and not server.bodies
        code = main(["bench", "serve", "--base-url", server.url, "--vocab-size", "50", "--percentiles", "120"])
        assert code == 2 and "--percentiles" in capsys.readouterr().err and not server.bodies
