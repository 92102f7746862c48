"""Per-request sampling settings with vLLM's names and defaults.

Everything is checked once, when the request arrives, so a bad value becomes a clear error naming the field instead
of a NaN or a crash deep inside a batched step that other requests share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

MAX_N = 128
MAX_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
# Below this temperature, logits / T overflows float32; such requests take the argmax instead.
GREEDY_TEMPERATURE = 1e-5
# The seeds torch.Generator.manual_seed accepts.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _error(name: str, allowed: str, value: object) -> ValueError:
    return ValueError(f"{name} must be {allowed}, got {value!r}")


def _float(name: str, value: object, ok: Callable[[float], bool], allowed: str) -> float:
    """`value` as a float if it is a finite real number that passes `ok` (bools and strings are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
        raise _error(name, allowed, value)
    return float(value)


def _int(name: str, value: object, ok: Callable[[int], bool], allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise _error(name, allowed, value)
    return value


def _optional_int(name: str, value: object, ok: Callable[[int], bool], allowed: str) -> int | None:
    return None if value is None else _int(name, value, ok, f"None or {allowed}")


def _token_id(name: str, value: object) -> int:
    """A token id given as an int, or as a decimal string (the OpenAI API sends logit_bias keys as strings)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return _int(name, value, lambda v: v >= 0, "token ids (integers >= 0)")


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop; see vLLM's SamplingParams for the meaning of each field."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off (normalised to 0)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    stop: str | list[str] | None = None  # normalised to a list
    stop_token_ids: list[int] | None = None  # normalised to a list
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self.n = _int("n", self.n, lambda v: 1 <= v <= MAX_N, f"in [1, {MAX_N}]")
        self.temperature = _float("temperature", self.temperature, lambda v: 0 <= v <= MAX_TEMPERATURE,
                                  f"in [0, {MAX_TEMPERATURE:g}]")
        self.top_p = _float("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        self.top_k = max(0, _int("top_k", self.top_k, lambda v: v >= -1, "-1 or 0 (off) or a positive integer"))
        self.min_p = _float("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1]")
        self.repetition_penalty = _float("repetition_penalty", self.repetition_penalty, lambda v: 0 < v <= 2,
                                         "in (0, 2]")
        self.presence_penalty = _float("presence_penalty", self.presence_penalty, lambda v: -2 <= v <= 2, "in [-2, 2]")
        self.frequency_penalty = _float("frequency_penalty", self.frequency_penalty, lambda v: -2 <= v <= 2,
                                        "in [-2, 2]")
        self.seed = _optional_int("seed", self.seed, lambda v: SEED_RANGE[0] <= v <= SEED_RANGE[1],
                                  "an integer in [-2**63, 2**64 - 1]")
        self.max_tokens = _optional_int("max_tokens", self.max_tokens, lambda v: v >= 0, ">= 0")
        limit = math.inf if self.max_tokens is None else self.max_tokens
        self.min_tokens = _int("min_tokens", self.min_tokens, lambda v: 0 <= v <= limit,
                               f"in [0, max_tokens={self.max_tokens}]")
        for name in ("logprobs", "prompt_logprobs"):
            setattr(self, name, _optional_int(name, getattr(self, name), lambda v: 0 <= v <= MAX_LOGPROBS,
                                              f"in [0, {MAX_LOGPROBS}]"))
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise _error(name, "true or false", getattr(self, name))
        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)
        self.logit_bias = self._normalise_logit_bias(self.logit_bias)

    @staticmethod
    def _normalise_stop(stop: object) -> list[str]:
        strings = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(strings, list | tuple) or not all(isinstance(s, str) and s for s in strings):
            raise _error("stop", "a non-empty string or a list of non-empty strings", stop)
        return list(strings)

    @staticmethod
    def _normalise_stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, list | tuple):
            raise _error("stop_token_ids", "a list of token ids", ids)
        return [_token_id("stop_token_ids", i) for i in ids]

    @staticmethod
    def _normalise_logit_bias(bias: object) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise _error("logit_bias", "a mapping from token id to bias", bias)
        return {_token_id("logit_bias keys", k): _float("logit_bias values", v, lambda b: -100 <= b <= 100,
                                                        "in [-100, 100]")
                for k, v in bias.items()}

    def check_vocab(self, vocab_size: int) -> None:
        """Reject token ids the model does not have; needs the model, so the engine calls it on admission."""
        for name, ids in (("logit_bias", self.logit_bias or {}), ("stop_token_ids", self.stop_token_ids)):
            bad = [i for i in ids if i >= vocab_size]
            if bad:
                raise ValueError(f"{name} token ids must be < the vocabulary size {vocab_size}, got {bad[0]}")

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax rather than sampling."""
        return self.temperature < GREEDY_TEMPERATURE
