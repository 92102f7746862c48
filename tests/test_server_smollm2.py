"""The server on the bundled SmolLM2-135M-Instruct, through the official `openai` SDK: a real chat answer,
streamed text equal to non-streamed text for the same seed, and scoring with echo + logprobs."""

from __future__ import annotations

import openai
import pytest
from server_helpers import API_KEY, ServerThread, wait_idle

from lmserve.engine.config import EngineConfig

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    server = ServerThread(EngineConfig(model=MODEL, num_kv_blocks=64, max_model_len=1024), None, API_KEY)
    server.start(timeout=300)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def test_capital_of_france(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                 "content": "What is the capital of France?"}],
                                         temperature=0, max_completion_tokens=24)
    assert "Paris" in out.choices[0].message.content
    assert out.usage.completion_tokens <= 24


def test_streamed_chat_equals_non_streamed_for_the_same_seed(client, server):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], temperature=0.8, seed=42,
                  max_tokens=10)
    full = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.finish_reason]
    wait_idle(server.base_url)


def test_scoring_with_echo_and_logprobs(client):
    """What lm-evaluation-harness sends for loglikelihood: echo the prompt with max_tokens=0."""
    good = client.completions.create(model=MODEL, prompt="The capital of France is Paris", max_tokens=0, echo=True,
                                     logprobs=1, temperature=0)
    bad = client.completions.create(model=MODEL, prompt="The capital of France is Tokyo", max_tokens=0, echo=True,
                                    logprobs=1, temperature=0)
    good_lp, bad_lp = good.choices[0].logprobs, bad.choices[0].logprobs
    assert good_lp.token_logprobs[0] is None and good.choices[0].text == "The capital of France is Paris"
    assert good_lp.token_logprobs[-1] > bad_lp.token_logprobs[-1]
