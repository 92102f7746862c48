"""Batched next-token choice: logits processors, then argmax or truncated sampling, plus log-probs.

Every stage is one tensor operation over the batch whatever mix of settings the rows carry, and runs only when some
row needs it. Top-k and top-p look at each row's best tokens through a top-k window rather than a sort of the
vocabulary (far cheaper on CPU), and the draw stays inside that window when every row's kept set fits in it. The one
per-row Python loop draws the noise of seeded rows from their own generators, so a seeded request gets the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from lmserve.kernels.native import argmax_rows, kernels_available
from lmserve.runner.sampling_batch import SamplingBatch


@dataclass
class SamplerOutput:
    """One sampled token per row; the log-prob fields are None when no row asked for log-probs."""

    token_ids: list[int]
    logprobs: list[float] | None  # of each sampled token under the raw model logits
    top_logprobs: list[list[tuple[int, float]]] | None  # per row its own `logprobs` best (token id, log-prob)
    ranks: list[int] | None  # of each sampled token under the raw logits; 1 = most likely


class TokenLogprob(NamedTuple):
    """What one prompt position reports: how likely the token that follows was, and the likeliest alternatives."""

    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]]  # the k most likely (token id, log-prob), best first


class _Window(NamedTuple):
    """Each row's best logits, descending, with their token ids."""

    values: torch.Tensor  # [B, K]
    token_ids: torch.Tensor  # [B, K]
    covered: bool  # every sampling row keeps only tokens inside the window


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The logits processors, in vLLM's order: min_tokens ban, logit_bias, repetition, frequency and presence.

    Returns a new tensor (the raw logits stay intact for log-probs), or `logits` itself when no row needs any.
    """
    updates = (batch.min_tokens_ban, batch.logit_bias, batch.repetition, batch.output_penalty)
    if all(u is None for u in updates):
        return logits
    logits = logits.clone()
    if batch.min_tokens_ban is not None:
        logits[batch.min_tokens_ban] = -torch.inf
    if batch.logit_bias is not None:
        rows, tokens, bias = batch.logit_bias
        logits[rows, tokens] += bias
    if batch.repetition is not None:
        rows, tokens, penalty = batch.repetition
        seen = logits[rows, tokens]
        logits[rows, tokens] = torch.where(seen > 0, seen / penalty, seen * penalty)
    if batch.output_penalty is not None:
        rows, tokens, amount = batch.output_penalty
        logits[rows, tokens] -= amount
    return logits


def _top_k_top_p(logits: torch.Tensor, batch: SamplingBatch, size: int) -> tuple[_Window, torch.Tensor]:
    """The window of each row's `size` best logits, and the per-row logit threshold of its top-k and top-p rules.

    Top-p applies after top-k, renormalised over the top k (as vLLM). A row's nucleus is the fewest best tokens
    whose probability reaches top_p; when one is wider than the window, this reruns with a 16 times wider one (a
    top-k is far cheaper than a sort on CPU), and over the sorted vocabulary at last.
    """
    vocab = logits.shape[-1]
    values, token_ids = logits.topk(size, dim=-1) if size < vocab else logits.sort(dim=-1, descending=True)
    threshold = values.new_full((len(values), 1), -torch.inf)
    covered = torch.full_like(threshold, size == vocab, dtype=torch.bool)
    if batch.greedy is not None:
        covered |= batch.greedy.unsqueeze(1)  # greedy rows ignore the window
    if batch.top_k is not None:
        has_k = batch.top_k > 0
        threshold = torch.where(has_k, values.gather(1, (batch.top_k - 1).clamp(min=0)), threshold)
        values = values.masked_fill(values < threshold, -torch.inf)
        covered |= has_k
    if batch.top_p is not None:
        norm = values.logsumexp(-1, keepdim=True)
        if batch.wide_top_p and size < vocab:  # a row without top-k normalises over the whole vocabulary
            full = logits.logsumexp(-1, keepdim=True)
            norm = full if batch.top_k is None else torch.where(batch.top_k > 0, norm, full)
        below = ((values - norm).exp().cumsum(-1) < batch.top_p).sum(-1, keepdim=True)
        inside = batch.top_p.isfinite() & (below < size)  # uses top-p, and the token that reaches it is in the window
        if size < vocab and bool((batch.top_p.isfinite() & ~inside & ~covered).any()):
            return _top_k_top_p(logits, batch, min(size * 16, vocab))
        threshold = torch.where(inside, torch.maximum(threshold, values.gather(1, below.clamp(max=size - 1))),
                                threshold)
        covered |= inside
    return _Window(values, token_ids, bool(covered.all())), threshold


def _cutoff(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor | None, _Window | None]:
    """Per-row logit threshold combining top-k, top-p and min-p (None when no row truncates), and its window.

    Each rule keeps the tokens at or above a per-row logit, so the three fold into one comparison.
    """
    threshold, window = None, None
    if batch.window is not None:
        window, threshold = _top_k_top_p(logits, batch, batch.window)
    if batch.min_p is not None:
        # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p)
        row_max = logits.amax(-1, keepdim=True) if window is None else window.values[:, :1]
        floor = row_max + batch.min_p.log()
        threshold = floor if threshold is None else torch.maximum(threshold, floor)
    return threshold, window


def truncate(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Set to -inf every token outside its row's top-k, top-p nucleus or min-p floor; ties at a cutoff are kept."""
    threshold, _ = _cutoff(logits, batch)
    return logits if threshold is None else logits.masked_fill(logits < threshold, -torch.inf)


def _race(logits: torch.Tensor, batch: SamplingBatch, token_ids: torch.Tensor | None) -> torch.Tensor:
    """Exponential race: argmax(p / q) with q = -log(U) ~ Exp(1) picks column i with probability p_i.

    Taken in log space, argmax(logits - log q), it needs no softmax. Seeded rows draw U for the whole vocabulary,
    in token order, from their own generator and keep their columns' share (`token_ids` maps columns to tokens when
    `logits` is a window), so their pick never depends on the batch.
    """
    uniform = torch.rand_like(logits) if batch.any_unseeded else torch.zeros_like(logits)  # 0: q = inf, never wins
    for row, generator in batch.generators:
        draw = torch.rand(batch.vocab_size, generator=generator, device=logits.device)
        uniform[row] = draw if token_ids is None else draw[token_ids[row]]
    return (logits - uniform.log_().neg_().log_()).max(-1).indices  # max, not argmax: 5x faster on CPU


def _sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.temperature is not None:
        logits = logits / batch.temperature
    threshold, window = _cutoff(logits, batch)
    if window is not None and window.covered:  # sample among the window's tokens only
        kept = window.values.masked_fill(window.values < threshold, -torch.inf)
        return window.token_ids.gather(1, _race(kept, batch, window.token_ids).unsqueeze(1)).squeeze(1)
    return _race(logits if threshold is None else logits.masked_fill(logits < threshold, -torch.inf), batch, None)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's most likely token: lmserve's kernel on CPU float32 logits (torch's max(-1) took a tenth of a
    64-sequence decode step), torch's max elsewhere (max, not argmax: 5x faster on CPU)."""
    if logits.dtype == torch.float32 and logits.device.type == "cpu" and kernels_available():
        return argmax_rows(logits)
    return logits.max(-1).indices


def _logprob_tensors(raw_logits: torch.Tensor, token_ids: torch.Tensor, k: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-prob [N], rank [N], top-k ids [N, k], top-k log-probs [N, k]) of `token_ids` under log_softmax."""
    logprobs = raw_logits.float().log_softmax(-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(-1) + 1
    top = logprobs.topk(k, dim=-1)
    return chosen.squeeze(1), ranks, top.indices, top.values


def prompt_logprobs(logits: torch.Tensor, next_token_ids: torch.Tensor, k: int) -> list[TokenLogprob]:
    """For each position of a prompt: the log-prob and rank of the token that actually follows, and the top k.

    `logits` [T, V] are the raw logits at positions 0..T-1 and `next_token_ids` [T] the prompt tokens 1..T.
    """
    chosen, ranks, top_ids, top_values = _logprob_tensors(logits, next_token_ids, k)
    return [TokenLogprob(lp, rank, list(zip(ids, values, strict=True))) for lp, rank, ids, values in
            zip(chosen.tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist(), strict=True)]


class Sampler:
    """Chooses one token per row from float32 logits [B, V] under the step's SamplingBatch."""

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.shape != (batch.num_rows, batch.vocab_size):
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match the sampling batch's "
                             f"{batch.num_rows} rows x {batch.vocab_size} tokens")
        processed = apply_penalties(logits, batch)
        if batch.all_greedy:
            token_ids = greedy(processed)
        else:
            token_ids = _sample(processed, batch)
            if batch.greedy is not None:
                token_ids = torch.where(batch.greedy, greedy(processed), token_ids)
        if batch.max_logprobs is None:
            return SamplerOutput(token_ids.tolist(), None, None, None)
        chosen, ranks, top_ids, top_values = _logprob_tensors(logits, token_ids, batch.max_logprobs)
        top = [list(zip(ids[:k or 0], values[:k or 0], strict=True)) for ids, values, k in
               zip(top_ids.tolist(), top_values.tolist(), batch.num_logprobs, strict=True)]
        return SamplerOutput(token_ids.tolist(), chosen.tolist(), top, ranks.tolist())
