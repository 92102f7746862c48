"""Every architecture loaded from an HF directory equals transformers: fp32 logits and greedy tokens."""

from __future__ import annotations

import torch
from engine_helpers import reference_greedy
from model_helpers import prompt_logits, relative_error
from tiny_models import LLAMA_MHA_UNTIED, make_tiny_model

from lmserve.llm import LLM
from lmserve.loader import load_model
from lmserve.sampling_params import SamplingParams

PROMPTS = [[5, 17, 33, 9, 100, 200, 3], [8, 9], [44, 45] * 20, [7], list(range(10, 60))]
GREEDY_32 = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def reference_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0]


def test_batched_logits_match_transformers(tiny_model):
    directory, reference = tiny_model
    ours = prompt_logits(load_model(str(directory), dtype="float32"), PROMPTS)
    for prompt, logits in zip(PROMPTS, ours, strict=True):
        assert relative_error(logits, reference_logits(reference, prompt)) < 1e-4


def test_greedy_tokens_match_transformers(tiny_model):
    directory, reference = tiny_model
    outputs = LLM(str(directory), dtype="float32").generate(PROMPTS, GREEDY_32, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference_greedy(reference, PROMPTS, 32)


def test_bfloat16_stays_close_to_float32(tiny_model):
    directory, _ = tiny_model
    full = prompt_logits(load_model(str(directory), dtype="float32"), PROMPTS[:2])
    half = prompt_logits(load_model(str(directory), dtype="bfloat16"), PROMPTS[:2])
    for a, b in zip(full, half, strict=True):
        assert b.dtype == torch.float32 and relative_error(b, a) < 0.05


def test_sharded_safetensors_with_index(tmp_path):
    reference = make_tiny_model(LLAMA_MHA_UNTIED, tmp_path / "single")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / name).write_bytes((tmp_path / "single" / name).read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    ours = prompt_logits(load_model(str(tmp_path / "sharded"), dtype="float32"), PROMPTS[:1])[0]
    assert relative_error(ours, reference_logits(reference, PROMPTS[0])) < 1e-4
