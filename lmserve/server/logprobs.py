"""Log-probs in the two OpenAI shapes: the legacy completions one (tokens, token_logprobs, top_logprobs,
text_offset) and the chat one (content: [{token, logprob, bytes, top_logprobs}])."""

from __future__ import annotations

import math
from typing import Any

from lmserve.outputs import PositionLogprobs
from lmserve.weights.tokenizer import Tokenizer

FLOOR = -9999.0  # JSON has no -inf; vLLM reports impossible tokens with this value too


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


class TokenText:
    """Each token's own text (decoded alone, special tokens kept), cached per server."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 1 << 16) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}
        self.cache_size = cache_size

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self.cache) < self.cache_size:
                self.cache[token_id] = text
        return text


def _ranked(position: PositionLogprobs, k: int) -> list[tuple[int, float]]:
    """The top-k alternatives, best first."""
    entries = sorted(((lp.rank, token_id, lp.logprob) for token_id, lp in position.items() if lp.rank <= k))
    return [(token_id, logprob) for _, token_id, logprob in entries]


class CompletionLogprobs:
    """Accumulates the legacy format; text_offset counts characters from the start of the choice's text."""

    def __init__(self, token_text: TokenText, k: int, offset: int = 0) -> None:
        self.token_text = token_text
        self.k = k
        self.offset = offset

    def build(self, token_ids: list[int], positions: list[PositionLogprobs | None]) -> dict[str, Any]:
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for token_id, position in zip(token_ids, positions, strict=True):
            text = self.token_text(token_id)
            tokens.append(text)
            text_offset.append(self.offset)
            self.offset += len(text)
            if position is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(_value(position[token_id].logprob))
            top = {self.token_text(t): _value(lp) for t, lp in _ranked(position, self.k)}
            top.setdefault(text, _value(position[token_id].logprob))
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}


def chat_logprobs(token_text: TokenText, token_ids: list[int], positions: list[PositionLogprobs],
                  k: int) -> dict[str, Any]:
    content = []
    for token_id, position in zip(token_ids, positions, strict=True):
        text = token_text(token_id)
        top = [{"token": token_text(t), "logprob": _value(lp), "bytes": list(token_text(t).encode())}
               for t, lp in _ranked(position, k)]
        content.append({"token": text, "logprob": _value(position[token_id].logprob), "bytes": list(text.encode()),
                        "top_logprobs": top})
    return {"content": content}


def vllm_prompt_logprobs(positions: list[PositionLogprobs | None] | None) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs` choice field: per position {token_id: {logprob, rank, decoded_token}}."""
    if positions is None:
        return None
    return [None if p is None else {str(t): {"logprob": _value(lp.logprob), "rank": lp.rank,
                                             "decoded_token": lp.decoded_token} for t, lp in p.items()}
            for p in positions]
