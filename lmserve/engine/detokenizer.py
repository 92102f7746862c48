"""Incremental detokenization and stop strings, matched on the decoded text across token boundaries."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from lmserve.weights.tokenizer import Tokenizer

_PROMPT_CONTEXT = 6  # prompt tokens fed first so that the first output token decodes with its leading space


class IncrementalDetokenizer:
    """Appends each new token's text, holding back bytes that do not yet form whole characters."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.stream = DecodeStream(ids=prompt_token_ids[-_PROMPT_CONTEXT:], skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self.stream.step(self.tokenizer.backend, token_id) or ""


def find_stop_string(text: str, num_new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends inside the last num_new_chars characters: (its start, the string)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
        if start != -1 and (best is None or start < best[0]):
            best = (start, stop)
    return best


def partial_stop_suffix(text: str, stops: list[str]) -> int:
    """How many trailing characters could be the start of a stop string (held back from streaming)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
