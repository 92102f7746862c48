"""Shared pieces of the engine tests: prompts of mixed lengths, transformers references, block accounting."""

from __future__ import annotations

import random

import torch

from lmserve.llm import LLM


def mixed_prompts(count: int = 20, seed: int = 0, vocab: int = 300) -> list[list[int]]:
    """Prompts from 1 to 70 tokens; a third of them share a 40-token prefix, some are exact repeats."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(40)]
    prompts = []
    for i in range(count):
        own = [rng.randrange(3, vocab) for _ in range(rng.choice([1, 2, 5, 13, 30]))]
        prompts.append(shared + own if i % 3 == 0 else own + [rng.randrange(3, vocab) for _ in range(i * 2)])
    prompts.append(list(prompts[0]))
    return prompts


def reference_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy generation, one prompt at a time, no EOS stop."""
    outputs = []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_free == stats.kv_blocks_total
    assert stats.num_requests_running == 0 and stats.num_requests_waiting == 0
    blocks = llm.engine.block_manager.blocks
    assert all(b.ref_count == 0 for b in blocks)
    # the running count of free blocks that hold a cached prefix agrees with a recount
    assert stats.kv_blocks_cached_free == sum(b.block_hash is not None for b in blocks)


def assert_int8_serves_close_to_float32(gguf_path: str) -> None:
    """An engine on `gguf_path` with --quantization int8 against one with float weights only: prompt log-probs
    close (int8 rounding, so not equal) and every KV block freed after each generate."""
    from lmserve.sampling_params import SamplingParams

    prompts = [{"prompt_token_ids": list(range(5 + i, 30 + 3 * i))} for i in range(6)]
    scored = SamplingParams(max_tokens=4, prompt_logprobs=0, temperature=0.0, ignore_eos=True)
    runs = {}
    for quantization in ("none", "int8"):
        llm = LLM(model=gguf_path, quantization=quantization, dtype="float32")
        outputs = llm.generate(prompts, scored, use_tqdm=False)
        assert_all_blocks_free(llm)
        runs[quantization] = [[next(iter(e.values())).logprob for e in o.prompt_logprobs[1:]] for o in outputs]
    reference, int8 = (torch.tensor(sum(runs[q], [])) for q in ("none", "int8"))
    assert not torch.equal(reference, int8)
    assert ((int8 - reference).norm() / reference.norm()).item() < 0.05
