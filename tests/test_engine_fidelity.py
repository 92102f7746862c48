"""Greedy engine outputs equal transformers' one-prompt-at-a-time greedy outputs under every batch shape:
sequence caps, token budgets that force chunked prefill, prefix caching on and off, and a pool small enough
that preemption must happen. Every block is free afterwards."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import assert_all_blocks_free, mixed_prompts, reference_greedy
from tiny_models import LLAMA_GQA_TIED, NEOX_QUARTER_ROTARY, make_tiny_model

from lmserve.llm import LLM
from lmserve.sampling_params import SamplingParams

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])
def model_and_reference(request, tmp_path_factory):
    spec = LLAMA_GQA_TIED if request.param == "llama" else NEOX_QUARTER_ROTARY
    directory = tmp_path_factory.mktemp(request.param)
    model = make_tiny_model(spec, directory)
    prompts = mixed_prompts()
    return directory, prompts, reference_greedy(model, prompts, MAX_TOKENS)


SHAPES = {
    "one-seq": dict(max_num_seqs=1),
    "16-seqs": dict(max_num_seqs=16),
    "budget-8": dict(max_num_seqs=16, max_num_batched_tokens=8),
    "prefill-3-while-decoding": dict(max_num_batched_tokens=64, max_prefill_tokens_while_decoding=3),
    "budget-13-no-prefix-cache": dict(max_num_batched_tokens=13, enable_prefix_caching=False),
    "unlimited": dict(max_num_batched_tokens=100_000),
    "block-size-4": dict(block_size=4, max_num_batched_tokens=37),
    "preemption": dict(num_kv_blocks=12, block_size=8, max_num_batched_tokens=64),
    "preemption-no-prefix-cache": dict(num_kv_blocks=12, block_size=8, enable_prefix_caching=False),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_greedy_matches_transformers(model_and_reference, shape):
    directory, prompts, expected = model_and_reference
    llm = LLM(str(directory), dtype="float32", **SHAPES[shape])
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    stats = llm.engine.stats()
    if "preemption" in shape:
        assert stats.num_preemptions > 0
    if llm.engine.config.enable_prefix_caching and shape != "unlimited":  # else every prompt starts at once
        assert stats.prefix_cache_hits > 0
    assert_all_blocks_free(llm)


@pytest.mark.parametrize(("shape", "kv_dtype"), [("16-seqs", "float16"), ("budget-13-no-prefix-cache", "float16"),
                                                 ("preemption", "float16"), ("16-seqs", "bfloat16")])
def test_half_kv_cache_stays_with_transformers(model_and_reference, shape, kv_dtype):
    """A 16-bit KV cache under float32 activations (float16: lmserve's C attention; bfloat16: torch's path): K/V
    rounded as stored, so greedy outputs may part from float32's where two logits nearly tie, but no more."""
    directory, prompts, expected = model_and_reference
    llm = LLM(str(directory), dtype="float32", kv_cache_dtype=kv_dtype, **SHAPES[shape])
    assert llm.engine.runner.kv_cache.k.dtype == getattr(torch, kv_dtype)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    agreeing = [next((i for i, (a, b) in enumerate(zip(o.outputs[0].token_ids, e, strict=True)) if a != b), MAX_TOKENS)
                for o, e in zip(outputs, expected, strict=True)]
    assert sum(agreeing) >= 0.9 * MAX_TOKENS * len(prompts), agreeing
    assert_all_blocks_free(llm)
