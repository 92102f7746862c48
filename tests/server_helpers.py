"""A real lmserve server for tests: uvicorn in a thread (or `lmserve serve` in a subprocess) on a free loopback
port, plus small readers for /metrics and for the OpenAI error shape."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from lmserve.server import build_app

API_KEY = "test-key-123"


class ServerThread:
    """build_app(...) served by uvicorn in a daemon thread; the model loads in the engine's step thread."""

    def __init__(self, *args, **kwargs) -> None:
        self.app = build_app(*args, **kwargs)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, http="h11", log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def async_engine(self):
        return self.app.state.server.engine

    def start(self, timeout: float = 120.0) -> ServerThread:
        self.thread.start()
        wait_healthy(self.base_url, timeout)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def wait_healthy(base_url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} did not become healthy in {timeout}s")


def metrics(base_url: str, api_key: str | None = API_KEY) -> dict[str, float]:
    """Every sample of /metrics by name (labels dropped; one model per server)."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10)
    response.raise_for_status()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    return samples


def wait_idle(base_url: str, timeout: float = 30.0, api_key: str | None = API_KEY) -> dict[str, float]:
    """Wait until no request runs or waits and no KV block is held; the last /metrics reading."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base_url, api_key)
        if (m["lmserve:num_requests_running"] == 0 and m["lmserve:num_requests_waiting"] == 0
                and m["lmserve:kv_cache_usage_perc"] == 0):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout}s: {m}")
        time.sleep(0.1)


def assert_error(response: httpx.Response, status: int, param: str | None = "", code: str | None = "") -> dict:
    """The response is an OpenAI-shaped error with this status (and param / code when given); its error object."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert len(response.content) < 2000, "error bodies stay small"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param != "":
        assert error["param"] == param, error
    if code != "":
        assert error["code"] == code, error
    return error


class ServeProcess:
    """`lmserve serve MODEL --port 0 ...` in a subprocess; the port is read from its log."""

    def __init__(self, model: Path | str, *args: str, log: Path) -> None:
        self.log = log
        self.log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "lmserve.cli", "serve", str(model), "--port", "0", "--log-level", "warning",
                   *args]
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.base_url = ""

    def wait_ready(self, timeout: float = 120.0) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while not self.base_url:
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", self.log.read_text(errors="replace"))
            if match:
                self.base_url = match.group(1)
            elif self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lmserve serve did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            else:
                time.sleep(0.1)
        wait_healthy(self.base_url, deadline - time.monotonic(), self.process)
        return self

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log_file.close()


def make_tiny_llama(directory: Path) -> Path:
    """The tiny random Llama (GQA, tied embeddings) with its byte-level tokenizer and ChatML template."""
    from tiny_models import LLAMA_GQA_TIED, make_tiny_model

    make_tiny_model(LLAMA_GQA_TIED, directory)
    return directory


def slow_steps(server: ServerThread, seconds: float) -> None:
    """Make each engine step take at least `seconds`, so that requests are surely still running when a test looks
    (0: back to full speed)."""
    engine = server.async_engine.engine
    step = type(engine).step
    if not seconds:
        engine.__dict__.pop("step", None)
        return

    def slow_step():
        time.sleep(seconds)
        return step(engine)

    engine.step = slow_step
