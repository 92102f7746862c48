"""Stopgap greedy generation over a simple contiguous cache (one block per sequence); the engine replaces it."""

from __future__ import annotations

import torch

from lmserve.layers.attention import AttentionMetadata, KVCache
from lmserve.loader import LoadedModel, load_model


def _contiguous_cache(lm: LoadedModel, num_seqs: int, max_len: int) -> KVCache:
    c = lm.config
    return KVCache.allocate(c.num_layers, num_seqs, max_len, c.num_kv_heads, c.head_dim, lm.dtype, lm.device)


def _check_prompts(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int) -> None:
    limit = lm.config.max_position_embeddings
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        if len(ids) + max_new_tokens > limit:
            raise ValueError(f"prompt {i}: {len(ids)} tokens + max_tokens {max_new_tokens} exceeds the model's "
                             f"context of {limit} tokens")
        if min(ids) < 0 or max(ids) >= lm.config.vocab_size:
            raise ValueError(f"prompt {i}: token ids must be in [0, {lm.config.vocab_size})")


@torch.inference_mode()
def prompt_logits(lm: LoadedModel, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Float32 logits at every position of every prompt, computed as one flat batch."""
    _check_prompts(lm, prompts, 0)
    lens = [len(p) for p in prompts]
    cache = _contiguous_cache(lm, len(prompts), max(lens))
    meta = AttentionMetadata.build(lens, lens, [[i] for i in range(len(prompts))], max(lens), lm.device)
    ids = torch.tensor([t for p in prompts for t in p], device=lm.device)
    logits = lm.model.compute_logits(lm.model(ids, meta, cache))
    return list(logits.split(lens))


@torch.inference_mode()
def greedy_generate(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int,
                    stop_token_ids: set[int] | None = None) -> list[list[int]]:
    """Greedy continuations: one prefill step for all prompts, then one batched decode step per token."""
    _check_prompts(lm, prompts, max_new_tokens)
    stop = lm.eos_token_ids if stop_token_ids is None else stop_token_ids
    lens = [len(p) for p in prompts]
    max_len = max(lens) + max_new_tokens
    cache = _contiguous_cache(lm, len(prompts), max_len)
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    query_lens, step_ids = lens, [t for p in prompts for t in p]
    while active and max_new_tokens > 0:
        context_lens = [lens[i] + len(outputs[i]) for i in active]
        meta = AttentionMetadata.build(query_lens, context_lens, [[i] for i in active], max_len, lm.device)
        hidden = lm.model(torch.tensor(step_ids, device=lm.device), meta, cache)
        last_rows = torch.tensor(query_lens, device=lm.device).cumsum(0) - 1
        next_ids = lm.model.compute_logits(hidden[last_rows]).argmax(-1).tolist()
        for i, token in zip(active, next_ids, strict=True):
            outputs[i].append(token)
        active = [i for i in active if outputs[i][-1] not in stop and len(outputs[i]) < max_new_tokens]
        query_lens, step_ids = [1] * len(active), [outputs[i][-1] for i in active]
    return outputs


def generate_text(prompt: str, model: str = "smollm2-135m-instruct", max_tokens: int = 64, chat: bool = True,
                  dtype: str = "float32", tokenizer: str | None = None) -> str:
    """One greedy reply to `prompt` (through the chat template when `chat` and the model has one)."""
    lm = load_model(model, tokenizer=tokenizer, dtype=dtype)
    if chat and lm.tokenizer.chat_template:
        prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ids = lm.tokenizer.encode(prompt)
    return lm.tokenizer.decode(greedy_generate(lm, [ids], max_tokens)[0])
