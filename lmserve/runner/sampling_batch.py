"""The per-step tensors the sampler reads, built once per step from the rows that sample.

A field is None when no row in the step needs that stage, so the sampler skips it: an all-greedy batch with default
settings costs one argmax. Token lists become one flat tensor per field (never one tensor per row), and penalties are
kept as (row, token) pairs rather than [B, V] masks, so the work grows with the tokens seen, not with the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple, Protocol

import torch

from lmserve.sampling_params import SamplingParams

# Rows using top-p without top-k look for their nucleus among their best TOP_P_WINDOW tokens (a top-k, much cheaper
# than sorting the vocabulary on CPU); the sampler sorts the whole vocabulary only when a nucleus is wider.
TOP_P_WINDOW = 1024


class SamplingRow(Protocol):
    """What the sampler reads from one sequence that samples this step; the engine's Sequence satisfies it."""

    @property
    def params(self) -> SamplingParams: ...

    @property
    def prompt_token_ids(self) -> list[int]: ...

    @property
    def output_token_ids(self) -> list[int]: ...

    @property
    def generator(self) -> torch.Generator | None:
        """Set when params.seed is given, created on the logits' device; the engine keeps it across steps."""


class TokenValues(NamedTuple):
    """A sparse [B, V] update: values[i] applies to token token_ids[i] of row rows[i]."""

    rows: torch.Tensor
    token_ids: torch.Tensor
    values: torch.Tensor


@dataclass
class SamplingBatch:
    """Sampling settings of B rows as tensors; [B, 1] columns broadcast against [B, V] logits."""

    num_rows: int
    vocab_size: int
    all_greedy: bool
    greedy: torch.Tensor | None  # [B] bool; None when every row or no row is greedy
    temperature: torch.Tensor | None  # [B, 1]; 1.0 on greedy rows
    top_k: torch.Tensor | None  # [B, 1] int64; 0 where off
    top_p: torch.Tensor | None  # [B, 1]; inf where off
    min_p: torch.Tensor | None  # [B, 1]; 0 where off
    window: int | None  # best tokens per row searched for top-k / top-p sets; None when no row uses either
    wide_top_p: bool  # some row uses top-p without top-k: its nucleus is normalised over the whole vocabulary
    generators: list[tuple[int, torch.Generator]]  # (row, generator) of the seeded rows that sample
    any_unseeded: bool  # some row samples without a seed: its noise comes from one batched draw
    min_tokens_ban: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids): eos and stop ids not yet allowed
    logit_bias: TokenValues | None  # added
    repetition: TokenValues | None  # penalty, for each distinct token of the prompt and output
    output_penalty: TokenValues | None  # frequency_penalty * count + presence_penalty, per distinct output token
    num_logprobs: list[int | None]  # per row: top alternatives wanted; None when the row wants no log-probs
    max_logprobs: int | None  # the largest of num_logprobs; None when no row wants log-probs

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], vocab_size: int, eos_token_ids: Iterable[int],
              device: torch.device | str) -> SamplingBatch:
        params = [r.params for r in rows]
        greedy = [p.greedy for p in params]
        sampling = [p for p, g in zip(params, greedy, strict=True) if not g]
        for row, p, g in zip(rows, params, greedy, strict=True):
            if not g and p.seed is not None and row.generator is None:
                raise ValueError(f"a row has seed {p.seed} but no generator; the engine must create one")

        def sampling_column(values: list[float], off: float, fill: float) -> torch.Tensor | None:
            """[B, 1] of a setting that greedy rows ignore, `fill` where off; None when no sampling row uses it."""
            values = [fill if g or v == off else v for g, v in zip(greedy, values, strict=True)]
            return _column(values, device) if any(v != fill for v in values) else None

        top_k = sampling_column([min(p.top_k, vocab_size) for p in params], 0, 0)
        wide_top_p = any(p.top_p < 1 and not p.top_k for p in sampling)
        window = max([p.top_k for p in sampling if p.top_k] + [TOP_P_WINDOW if wide_top_p else 0])
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            num_rows=len(rows),
            vocab_size=vocab_size,
            all_greedy=not sampling,
            greedy=torch.tensor(greedy, device=device) if 0 < len(sampling) < len(rows) else None,
            temperature=sampling_column([p.temperature for p in params], 1.0, 1.0),
            top_k=None if top_k is None else top_k.long(),
            top_p=sampling_column([p.top_p for p in params], 1.0, float("inf")),
            min_p=sampling_column([p.min_p for p in params], 0.0, 0.0),
            window=min(window, vocab_size) or None,
            wide_top_p=wide_top_p,
            generators=[(i, r.generator) for i, r in enumerate(rows) if not greedy[i] and r.generator is not None],
            any_unseeded=any(not g and r.generator is None for r, g in zip(rows, greedy, strict=True)),
            min_tokens_ban=_min_tokens_ban(rows, set(eos_token_ids), device),
            logit_bias=_logit_bias(params, device),
            repetition=_repetition(rows, vocab_size, device),
            output_penalty=_output_penalty(rows, vocab_size, device),
            num_logprobs=[p.logprobs for p in params],
            max_logprobs=max(wanted) if wanted else None,
        )


def _column(values: list[float], device: torch.device | str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _flat(rows: list[int], token_lists: list[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs of all `token_lists`, list j belonging to row rows[j], as two flat CPU tensors."""
    lengths = torch.tensor([len(t) for t in token_lists])
    row_ids = torch.tensor(rows, dtype=torch.long).repeat_interleave(lengths)
    return row_ids, torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long)


def _distinct(rows: list[int], token_lists: list[Sequence[int]], vocab_size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, token ids, occurrence counts) of the distinct (row, token) pairs in `token_lists`."""
    row_ids, token_ids = _flat(rows, token_lists)
    pairs, counts = (row_ids * vocab_size + token_ids).unique(return_counts=True)
    return pairs // vocab_size, pairs % vocab_size, counts


def _min_tokens_ban(rows: Sequence[SamplingRow], eos_token_ids: set[int], device: torch.device | str
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows short of min_tokens may not end yet: ban eos (even with ignore_eos, as vLLM) and their stop ids."""
    short = [i for i, r in enumerate(rows) if len(r.output_token_ids) < r.params.min_tokens]
    if not short:
        return None
    row_ids, token_ids = _flat(short, [sorted(eos_token_ids.union(rows[i].params.stop_token_ids)) for i in short])
    return row_ids.to(device), token_ids.to(device)


def _logit_bias(params: list[SamplingParams], device: torch.device | str) -> TokenValues | None:
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if not biased:
        return None
    row_ids, token_ids = _flat(biased, [list(params[i].logit_bias) for i in biased])
    bias = torch.tensor(list(chain.from_iterable(params[i].logit_bias.values() for i in biased)))
    return TokenValues(row_ids.to(device), token_ids.to(device), bias.to(device))


def _repetition(rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str) -> TokenValues | None:
    penalties = [r.params.repetition_penalty for r in rows]
    repeating = [i for i, p in enumerate(penalties) if p != 1.0]
    if not repeating:
        return None
    row_ids, token_ids, _ = _distinct(repeating * 2, [rows[i].prompt_token_ids for i in repeating]
                                      + [rows[i].output_token_ids for i in repeating], vocab_size)
    return TokenValues(row_ids.to(device), token_ids.to(device), torch.tensor(penalties)[row_ids].to(device))


def _output_penalty(rows: Sequence[SamplingRow], vocab_size: int, device: torch.device | str) -> TokenValues | None:
    params = [r.params for r in rows]
    counted = [i for i, p in enumerate(params)
               if (p.frequency_penalty or p.presence_penalty) and rows[i].output_token_ids]
    if not counted:
        return None
    row_ids, token_ids, counts = _distinct(counted, [rows[i].output_token_ids for i in counted], vocab_size)
    frequency = torch.tensor([p.frequency_penalty for p in params])[row_ids]
    presence = torch.tensor([p.presence_penalty for p in params])[row_ids]
    return TokenValues(row_ids.to(device), token_ids.to(device), (frequency * counts + presence).to(device))
