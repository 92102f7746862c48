"""The OpenAI-compatible server on a tiny random Llama, driven by the official `openai` SDK: completions and chat,
streamed and not, n > 1, log-probs, echo, usage, tokenize, metrics."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from server_helpers import API_KEY, ServerThread, make_tiny_llama, metrics, wait_idle

from lmserve.engine.config import EngineConfig

MODEL = "tiny"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    server = ServerThread(EngineConfig(model=str(directory), num_kv_blocks=96), [MODEL, "alias"], API_KEY).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def tokenize(http, text: str) -> list[int]:
    return http.post("/tokenize", json={"model": MODEL, "prompt": text}).json()["tokens"]


def test_models_version_health(client, http, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "alias"]
    assert models.data[0].model_extra["max_model_len"] == 256
    assert client.models.retrieve("alias").id == "alias"
    assert http.get("/version").json()["version"]
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # no key needed


def test_completion_counts_tokens_and_stops_at_length(client, http):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenize(http, PROMPT))
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8
    again = client.completions.create(model="alias", prompt=PROMPT, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == out.choices[0].text and again.model == "alias"


def test_batched_prompts_and_n(client, http):
    ids = tokenize(http, "Paris is")
    out = client.completions.create(model=MODEL, prompt=[PROMPT, "Paris is"], n=2, max_tokens=4, temperature=1.0,
                                    seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 16
    by_ids = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert len(by_ids.choices) == 2 and by_ids.choices[0].text == by_ids.choices[1].text
    assert by_ids.usage.prompt_tokens == 2 * len(ids)
    single = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert single.choices[0].text == by_ids.choices[0].text


def test_streamed_batch_with_n_matches_non_streamed(client):
    kwargs = dict(model=MODEL, prompt=[PROMPT, "Paris is"], n=2, max_tokens=6, temperature=1.0, seed=9)
    full = client.completions.create(**kwargs)
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in full.choices}
    assert finishes == {c.index: c.finish_reason for c in full.choices}


def test_legacy_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for i, (token, logprob, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True)):
        assert logprob <= 0 and 1 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(logprob, abs=1e-5)  # greedy picks the most likely token
        if i + 1 < len(lp.tokens):
            assert lp.text_offset[i + 1] - lp.text_offset[i] == len(token)


def test_echo_with_zero_max_tokens_gives_prompt_logprobs(client, http):
    ids = tokenize(http, PROMPT)
    generated = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=1)
    next_id_logprob = generated.choices[0].logprobs.token_logprobs[0]
    next_token = generated.choices[0].logprobs.tokens[0]
    out = client.completions.create(model=MODEL, prompt=ids + [tokenize(http, PROMPT + generated.choices[0].text)
                                                              [len(ids)]],
                                    max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.tokens[-1] == next_token
    assert lp.token_logprobs[-1] == pytest.approx(next_id_logprob, abs=1e-4)
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True)
    assert text.choices[0].text == PROMPT


def _streamed_completion(client, **kwargs) -> tuple[str, str | None, list]:
    text, finish, chunks = "", None, []
    for chunk in client.completions.create(stream=True, **kwargs):
        chunks.append(chunk)
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return text, finish, chunks


def test_streamed_text_equals_non_streamed_text(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=11)
    full = client.completions.create(**kwargs)
    text, finish, _ = _streamed_completion(client, **kwargs)
    assert text == full.choices[0].text and finish == full.choices[0].finish_reason
    messages = [{"role": "user", "content": "Tell me about Paris."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=1.0, seed=5)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=1.0, seed=5, stream=True) if c.choices)
    assert streamed == chat.choices[0].message.content


def test_stream_never_shows_part_of_a_stop_string(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    start = next((i for i in range(8, len(base) - 3) if base.find(base[i:i + 3]) == i and base[i:i + 3].strip()),
                 None)
    if start is None:
        pytest.skip("the tiny model's text has no usable stop string")
    stop = base[start:start + 3]
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0]
    assert full.text == base[:start] and full.finish_reason == "stop"
    text, finish, chunks = _streamed_completion(client, **kwargs)
    assert text == full.text and finish == "stop"
    shown = ""
    for chunk in chunks:
        for choice in chunk.choices:
            shown += choice.text
            assert full.text.startswith(shown)  # never a character past the final text


def test_stream_include_usage_and_streamed_logprobs(client, http):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens == len(tokenize(http, PROMPT))
    assert all(c.usage is None for c in chunks[:-1])
    tokens = [t for c in chunks[:-1] for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    assert len(tokens) == 5
    chat_chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert chat_chunks[-1].choices == [] and chat_chunks[-1].usage.completion_tokens == 4
    assert chat_chunks[-2].choices[0].finish_reason == "length"


def test_chat_with_history_n_and_logprobs(client, http):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": [{"type": "text",
                                                                                        "text": "Capital?"}]}]
    out = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_completion_tokens=6,
                                         temperature=0.8, seed=1, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True})
    assert out.object == "chat.completion" and [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        assert choice.message.role == "assistant" and choice.finish_reason == "length"
        content = choice.logprobs.content
        assert len(content) == 6
        for entry in content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
            assert bytes(entry.bytes).decode(errors="replace") == entry.token
    tokenized = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert out.usage.prompt_tokens == tokenized["count"] and out.usage.completion_tokens == 12


def test_streamed_chat_with_n(client):
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                                max_tokens=5, temperature=1.0, seed=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=5, temperature=1.0, seed=2)
    assert texts == {c.index: c.message.content for c in full.choices}
    assert set(finishes) == {0, 1}


def test_tokenize_and_detokenize(http):
    out = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT, "return_token_strs": True}).json()
    assert out["count"] == len(out["tokens"]) == len(out["token_strs"]) and out["max_model_len"] == 256
    assert http.post("/detokenize", json={"model": MODEL, "tokens": out["tokens"]}).json() == {"prompt": PROMPT}


def test_metrics_parse_and_counters_move(client, server):
    before = metrics(server.base_url)
    for name in ("lmserve:num_requests_running", "lmserve:num_requests_waiting", "lmserve:kv_cache_usage_perc",
                 "lmserve:prefix_cache_queries_total", "lmserve:prefix_cache_hits_total",
                 "lmserve:num_preemptions_total", "lmserve:prompt_tokens_total", "lmserve:generation_tokens_total",
                 "lmserve:time_to_first_token_seconds_count", "lmserve:inter_token_latency_seconds_count",
                 "lmserve:e2e_request_latency_seconds_count"):
        assert name in before, name
    prompt = "A fresh prompt for the metrics test, long enough to fill a block or two of the cache."
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, extra_body={"ignore_eos": True})
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, extra_body={"ignore_eos": True})
    after = wait_idle(server.base_url)
    assert after["lmserve:generation_tokens_total"] == before["lmserve:generation_tokens_total"] + 10
    assert after["lmserve:prompt_tokens_total"] > before["lmserve:prompt_tokens_total"]
    assert after["lmserve:prefix_cache_hits_total"] > before["lmserve:prefix_cache_hits_total"]
    assert after["lmserve:prefix_cache_queries_total"] > before["lmserve:prefix_cache_queries_total"]
    assert after["lmserve:time_to_first_token_seconds_count"] == before["lmserve:time_to_first_token_seconds_count"] + 2
    assert after["lmserve:e2e_request_latency_seconds_count"] == before["lmserve:e2e_request_latency_seconds_count"] + 2
    assert after["lmserve:inter_token_latency_seconds_count"] == before["lmserve:inter_token_latency_seconds_count"] + 8
    assert math.isfinite(after["lmserve:e2e_request_latency_seconds_sum"])
