"""SamplingParams rejects bad values with a message naming the field, and normalises what it accepts."""

from __future__ import annotations

import math

import pytest

from lmserve.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams


def test_defaults_are_vllms_and_normalised():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None and p.seed is None
    assert p.logprobs is None and p.prompt_logprobs is None
    assert not p.greedy and not p.ignore_eos and p.skip_special_tokens and not p.include_stop_str_in_output


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=(2, 3), top_k=-1, temperature=0, logit_bias={"123": 5, 7: -1.5})
    assert p.stop == ["###"] and p.stop_token_ids == [2, 3] and p.top_k == 0
    assert p.logit_bias == {123: 5.0, 7: -1.5} and isinstance(p.temperature, float)
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]


@pytest.mark.parametrize("temperature, greedy", [(0, True), (1e-6, True), (1e-5, False), (0.7, False)])
def test_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).greedy is greedy


def test_message_names_field_range_and_value():
    with pytest.raises(ValueError, match=r"^temperature must be in \[0, 100\], got -1.0$"):
        SamplingParams(temperature=-1.0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", MAX_N + 1),
        ("n", 1.5),
        ("n", True),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", 100.5),
        ("temperature", "0.5"),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_k", -2),
        ("top_k", 2.0),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 2.5),
        ("repetition_penalty", -1.0),
        ("presence_penalty", -2.1),
        ("presence_penalty", 2.1),
        ("frequency_penalty", -3),
        ("frequency_penalty", 2.01),
        ("seed", 1.5),
        ("seed", "42"),
        ("seed", 2**64),
        ("max_tokens", -1),
        ("max_tokens", 3.0),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", MAX_LOGPROBS + 1),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", 5),
        ("stop", [None]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", 5),
        ("stop_token_ids", ["x"]),
        ("ignore_eos", "false"),
        ("skip_special_tokens", 1),
        ("include_stop_str_in_output", None),
    ],
)
def test_bad_value_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "bias", [{"abc": 1.0}, {-1: 1.0}, {"-1": 1.0}, {1.5: 1.0}, {1: 100.5}, {1: -101}, {1: math.nan}, {1: "2"}, [1, 2]]
)
def test_bad_logit_bias(bias):
    with pytest.raises(ValueError, match=r"^logit_bias"):
        SamplingParams(logit_bias=bias)


def test_good_edge_values():
    SamplingParams(
        n=MAX_N,
        temperature=100,
        top_p=1e-9,
        top_k=1,
        min_p=1.0,
        repetition_penalty=2.0,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        seed=-(2**63),
        logprobs=0,
        prompt_logprobs=MAX_LOGPROBS,
        logit_bias={0: -100, 1: 100},
    )
    assert SamplingParams(max_tokens=0).max_tokens == 0  # only prompt log-probs wanted
    assert SamplingParams(max_tokens=None, min_tokens=10_000).min_tokens == 10_000


def test_min_tokens_bounded_by_max_tokens():
    SamplingParams(max_tokens=5, min_tokens=5)
    with pytest.raises(ValueError, match=r"^min_tokens must be in \[0, max_tokens=5\], got 6$"):
        SamplingParams(max_tokens=5, min_tokens=6)


def test_check_vocab():
    SamplingParams(logit_bias={99: 1.0}, stop_token_ids=[99]).check_vocab(100)
    with pytest.raises(ValueError, match=r"^logit_bias .* 100, got 100$"):
        SamplingParams(logit_bias={100: 1.0}).check_vocab(100)
    with pytest.raises(ValueError, match=r"^stop_token_ids .* 100, got 250$"):
        SamplingParams(stop_token_ids=[3, 250]).check_vocab(100)
