"""Benchmark prompts: random token ids of exact lengths, a shared prefix + own tokens, or a prompt file.

Random prompts are token ids, so every engine with the same tokenizer sees exactly `input_len` tokens; for a
server that only takes text they can be decoded (`as_text`), and the lengths then come from re-encoding.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class BenchPrompt:
    prompt: str | list[int]  # text, or token ids
    prompt_len: int
    output_len: int


def _sampler(vocab_size: int, exclude: Iterable[int], seed: int):
    excluded = set(exclude)
    if vocab_size <= len(excluded):
        raise ValueError(f"vocab_size {vocab_size} leaves no token ids to sample")
    rng = random.Random(seed)

    def draw(n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            t = rng.randrange(vocab_size)
            if t not in excluded:
                out.append(t)
        return out

    return draw


def _check(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def random_prompts(num_prompts: int, input_len: int, output_len: int, vocab_size: int,
                   exclude_ids: Iterable[int] = (), seed: int = 0) -> list[BenchPrompt]:
    """`num_prompts` prompts of `input_len` random token ids (none from `exclude_ids`, e.g. special tokens)."""
    _check("num_prompts", num_prompts, 1)
    _check("input_len", input_len, 1)
    _check("output_len", output_len, 1)
    draw = _sampler(vocab_size, exclude_ids, seed)
    return [BenchPrompt(draw(input_len), input_len, output_len) for _ in range(num_prompts)]


def shared_prefix_prompts(num_prompts: int, prefix_len: int, input_len: int, output_len: int, vocab_size: int,
                          exclude_ids: Iterable[int] = (), seed: int = 0) -> list[BenchPrompt]:
    """One common prefix of `prefix_len` random tokens, then `input_len` tokens of each prompt's own."""
    _check("prefix_len", prefix_len, 1)
    _check("num_prompts", num_prompts, 1)
    _check("input_len", input_len, 0)
    _check("output_len", output_len, 1)
    draw = _sampler(vocab_size, exclude_ids, seed)
    prefix = draw(prefix_len)
    return [BenchPrompt(prefix + draw(input_len), prefix_len + input_len, output_len) for _ in range(num_prompts)]


def file_prompts(path: str | Path, num_prompts: int, output_len: int, tokenizer: Any) -> list[BenchPrompt]:
    """Prompts from a text file (one a line) or JSONL ({"prompt": text or token ids}), cycled to `num_prompts`."""
    _check("num_prompts", num_prompts, 1)
    _check("output_len", output_len, 1)
    texts: list[str | list[int]] = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                line = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                line = None
            if not (isinstance(line, str) or (isinstance(line, list) and line
                                              and all(isinstance(t, int) for t in line))):
                raise ValueError(f"{path}:{lineno}: a JSON line needs a \"prompt\": a string or token ids")
        texts.append(line)
    if not texts:
        raise ValueError(f"{path}: no prompts in the file")
    chosen = [texts[i % len(texts)] for i in range(num_prompts)]
    return [BenchPrompt(t, len(t) if isinstance(t, list) else len(tokenizer.encode(t)), output_len) for t in chosen]


def as_text(prompts: list[BenchPrompt], tokenizer: Any) -> list[BenchPrompt]:
    """Token-id prompts decoded to text for servers that take only text; lengths re-measured by encoding."""
    out = []
    for p in prompts:
        if isinstance(p.prompt, str):
            out.append(p)
            continue
        text = tokenizer.decode(p.prompt)
        out.append(BenchPrompt(text, len(tokenizer.encode(text, add_special_tokens=False)), p.output_len))
    return out


def special_token_ids(tokenizer: Any) -> set[int]:
    """The ids of a tokenizer's added/special tokens (best effort), so random prompts avoid them."""
    backend = getattr(tokenizer, "backend", tokenizer)
    try:
        return {int(i) for i in backend.get_added_tokens_decoder()}
    except AttributeError:
        return set()
