"""`lmserve serve` and `lmserve chat` as a user runs them: subprocesses, SIGTERM, piped stdin."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_helpers import ServeProcess, make_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_sigterm_exits_cleanly_with_a_request_in_flight(model_dir, tmp_path):
    serve = ServeProcess(model_dir, "--num-kv-blocks", "64", "--shutdown-timeout", "1", "--api-key", "k",
                         log=tmp_path / "serve.log")
    try:
        serve.wait_ready()
        headers = {"authorization": "Bearer k"}
        lines: list[str] = []
        first = threading.Event()

        def stream() -> None:
            body = {"prompt": "Hello", "max_tokens": 240, "stream": True, "ignore_eos": True}
            try:
                with httpx.stream("POST", f"{serve.base_url}/v1/completions", json=body, headers=headers,
                                  timeout=60) as r:
                    for line in r.iter_lines():
                        if line:
                            lines.append(line)
                            first.set()
            except httpx.HTTPError:
                pass
            first.set()

        client = threading.Thread(target=stream)
        client.start()
        assert first.wait(60)
        start = time.monotonic()
        serve.terminate()
        assert serve.process.wait(30) == 0, serve.log.read_text()[-3000:]
        assert time.monotonic() - start < 15
        client.join(30)
        assert not client.is_alive()
        assert lines and lines[-1] == "data: [DONE]"  # the stream ended properly, finished or aborted
        assert "Traceback" not in serve.log.read_text()
    finally:
        serve.stop()


def test_serve_refuses_a_missing_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lmserve.cli", "serve", str(tmp_path / "nothing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not found" in result.stderr


def chat(model_dir, stdin: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lmserve.cli", "chat", str(model_dir), "--temperature", "0", "--max-tokens",
               "6", "--num-kv-blocks", "64", *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=180)


def test_chat_over_piped_stdin(model_dir):
    # /reset makes the second answer the same as the first; /exit stops reading (the last line is never answered).
    result = chat(model_dir, "hello\n/reset\nhello\n/exit\nnever answered\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out and len(out) % 2 == 0 and out[: len(out) // 2] == out[len(out) // 2:]
    assert "conversation cleared" in result.stderr
    # Without /reset the conversation is kept: it grows until it no longer fits the context; EOF exits cleanly.
    result = chat(model_dir, "hello there, how are you today?\n" * 12, "--max-model-len", "96")
    assert result.returncode == 0, result.stderr
    assert "too long for the context" in result.stderr
