"""Every bad request gets its documented status in OpenAI's error shape, stays small, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest
from server_helpers import API_KEY, ServerThread, assert_error, make_tiny_llama, wait_idle

from lmserve.engine.config import EngineConfig

MODEL = "tiny"
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    server = ServerThread(EngineConfig(model=str(directory), num_kv_blocks=64), MODEL, API_KEY,
                          max_request_bytes=LIMIT).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def completion(http, **fields) -> httpx.Response:
    return http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, **fields})


def chat(http, **fields) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, **fields}
    return http.post("/v1/chat/completions", json=body)


@pytest.fixture(autouse=True)
def still_serving(http, server):
    """After each error test, a good request still works and every KV block is free again."""
    yield
    response = completion(http)
    assert response.status_code == 200, response.text
    wait_idle(server.base_url)


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"n": 0}, "n"),
    ({"n": 10_000}, "n"),
    ({"n": True}, "n"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 2}, "min_p"),
    ({"logprobs": 50}, "logprobs"),
    ({"seed": 2**70}, "seed"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"stop": ""}, "stop"),
    ({"stop": [1, 2]}, "stop"),
])
def test_bad_sampling_parameters(http, fields, param):
    assert_error(completion(http, **fields), 400, param)


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages.0.content.0.type"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}, "messages.0.tool_calls"),
    ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ({"wat": 1}, "wat"),
])
def test_bad_or_unsupported_chat_parameters(http, fields, param):
    error = assert_error(chat(http, **fields), 400)
    if param is not None:
        assert error["param"] == param, error
    if "wat" in fields:
        assert error["message"] == "Unrecognized request argument supplied: wat"


def test_unsupported_completion_parameters(http):
    assert_error(completion(http, suffix="x"), 400, "suffix", "unsupported")
    assert_error(completion(http, best_of=3), 400, "best_of")
    assert completion(http, best_of=1, user="someone").status_code == 200


def test_prompt_too_long_and_max_tokens_too_big(http):
    error = assert_error(completion(http, prompt=[5] * 300), 400, "prompt", "context_length_exceeded")
    assert error["message"].startswith("This model's maximum context length is 256 tokens. However, you requested")
    error = assert_error(completion(http, prompt=[5] * 10, max_tokens=1000), 400, "max_tokens",
                         "context_length_exceeded")
    assert "you requested 1010 tokens (10 in the messages, 1000 in the completion)" in error["message"]
    assert_error(chat(http, max_completion_tokens=5000), 400, "max_completion_tokens", "context_length_exceeded")
    # Without max_tokens the completion is clamped to what fits.
    response = completion(http, prompt=[5] * 250, max_tokens=None, ignore_eos=True)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 6


def test_bad_prompts(http):
    assert_error(completion(http, prompt=""), 400, "prompt")
    assert_error(completion(http, prompt=[]), 400, "prompt")
    assert_error(completion(http, prompt=[1, "a"]), 400, "prompt")
    assert_error(completion(http, prompt=[99_999]), 400, "prompt")
    assert_error(completion(http, prompt=[-1]), 400, "prompt")
    assert_error(completion(http, prompt=[[1, 2], []]), 400, "prompt")
    assert_error(completion(http, prompt=None), 400, "prompt")
    body = {"model": MODEL, "max_tokens": 2}
    assert_error(http.post("/v1/completions", json=body), 400, "prompt")


def test_unknown_model(http):
    assert_error(completion(http, model="gpt-4"), 404, "model", "model_not_found")
    assert_error(chat(http, model="gpt-4"), 404, "model", "model_not_found")
    assert_error(http.get("/v1/models/gpt-4"), 404, "model")


def test_api_key(server):
    url = f"{server.base_url}/v1/completions"
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    assert_error(httpx.post(url, json=body), 401, code="invalid_api_key")
    assert_error(httpx.post(url, json=body, headers={"authorization": "Bearer wrong"}), 401, code="invalid_api_key")
    assert_error(httpx.post(url, json=body, headers={"authorization": f"Basic {API_KEY}"}), 401)
    assert_error(httpx.post(url, json=body, headers={"authorization": f"Bearer {API_KEY}x"}), 401)
    for path in ("/v1/models", "/metrics", "/version"):
        assert_error(httpx.get(f"{server.base_url}{path}"), 401)
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.post(url, json=body, headers={"authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_oversized_bodies(http):
    big = "x" * (LIMIT + 10)
    error = assert_error(completion(http, prompt=big), 413, code="request_too_large")
    assert "x" * 50 not in error["message"]

    def chunked():
        for _ in range(LIMIT // 1000 + 2):
            yield b" " * 1000

    # No Content-Length: the streamed body is counted as it arrives.
    assert_error(http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}), 413)


def test_malformed_json_is_400_without_echo(http):
    junk = '{"prompt": "' + "secret " * 1000
    response = http.post("/v1/completions", content=junk, headers={"content-type": "application/json"})
    assert "secret" not in assert_error(response, 400)["message"]
    assert_error(http.post("/v1/completions", content=b"\xff\xfe"), 400)
    assert_error(http.post("/v1/completions", content="[1, 2]"), 400)
    assert_error(http.post("/v1/completions", content="[" * 20_000 + "]" * 20_000), 400)
    assert_error(completion(http, temperature="a" * 10_000), 400, "temperature")
    error = assert_error(completion(http, stop=["a" * 20_000, 5]), 400, "stop")
    assert "aaaaaaaaaa" not in error["message"]


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)
