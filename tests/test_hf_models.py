"""Every architecture loaded from an HF directory equals transformers: fp32 logits and greedy tokens."""

from __future__ import annotations

import torch

from lmserve.generate import greedy_generate, prompt_logits
from lmserve.loader import load_model

PROMPTS = [[5, 17, 33, 9, 100, 200, 3], [8, 9], [44, 45] * 20, [7], list(range(10, 60))]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def test_batched_logits_match_transformers(tiny_model):
    directory, reference = tiny_model
    lm = load_model(str(directory))
    ours = prompt_logits(lm, PROMPTS)
    for prompt, logits in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        assert relative_error(logits, expected) < 1e-4


def test_greedy_tokens_match_transformers(tiny_model):
    directory, reference = tiny_model
    lm = load_model(str(directory))
    ours = greedy_generate(lm, PROMPTS, 32, stop_token_ids=set())
    for prompt, tokens in zip(PROMPTS, ours, strict=True):
        expected = reference.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert tokens == expected[0, len(prompt) :].tolist()


def test_bfloat16_stays_close_to_float32(tiny_model):
    directory, _ = tiny_model
    full = prompt_logits(load_model(str(directory)), PROMPTS[:2])
    half = prompt_logits(load_model(str(directory), dtype="bfloat16"), PROMPTS[:2])
    for a, b in zip(full, half, strict=True):
        assert half[0].dtype == torch.float32 and relative_error(b, a) < 0.05
