"""Tiny random transformers models, saved with save_pretrained, that lmserve must reproduce exactly."""

from __future__ import annotations

from pathlib import Path

import tokenizers
import torch
import transformers

VOCAB = 320
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "def main():\n    return 42\n",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "héllo wörld ☃ 你好",
]

LLAMA_GQA_TIED = dict(kind="llama", num_key_value_heads=2, tie_word_embeddings=True)
LLAMA_MHA_UNTIED = dict(kind="llama", num_key_value_heads=4, tie_word_embeddings=False)
LLAMA3_SCALED = dict(
    kind="llama",
    num_key_value_heads=1,
    tie_word_embeddings=False,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
)
LLAMA_LINEAR_SCALED = dict(kind="llama", num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})
QWEN2 = dict(kind="qwen2", num_key_value_heads=2, tie_word_embeddings=False)
NEOX_QUARTER_ROTARY = dict(kind="gpt_neox", rotary_pct=0.25, use_parallel_residual=True)
NEOX_FULL_ROTARY_SEQUENTIAL = dict(kind="gpt_neox", rotary_pct=1.0, use_parallel_residual=False)

ALL_CONFIGS = {
    "llama-gqa-tied": LLAMA_GQA_TIED,
    "llama-mha-untied": LLAMA_MHA_UNTIED,
    "llama3-rope-mqa": LLAMA3_SCALED,
    "llama-linear-rope": LLAMA_LINEAR_SCALED,
    "qwen2-bias": QWEN2,
    "neox-rotary-0.25": NEOX_QUARTER_ROTARY,
    "neox-rotary-1.0-sequential": NEOX_FULL_ROTARY_SEQUENTIAL,
}


def make_tiny_model(
    spec: dict, directory: Path, seed: int = 0, vocab_size: int = VOCAB
) -> transformers.PreTrainedModel:
    """Build, randomly initialise (seeded) and save a tiny model; returns the transformers model in fp32 eval mode."""
    spec = dict(spec)
    kind = spec.pop("kind")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "gpt_neox":
        rotary_pct = spec.pop("rotary_pct")
        config = transformers.GPTNeoXConfig(**common, rotary_pct=rotary_pct, hidden_act="gelu", **spec)
        config.rope_parameters["partial_rotary_factor"] = rotary_pct
        cls = transformers.GPTNeoXForCausalLM
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**common, **spec)
        cls = transformers.Qwen2ForCausalLM
    else:
        rope = spec.pop("rope_scaling", None)
        config = transformers.LlamaConfig(**common, **spec)
        if rope:
            config.rope_parameters.update(rope)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # larger weights than the default init, so mistakes show up in the logits
        for p in model.parameters():
            p.normal_(0.0, 0.08 if p.dim() > 1 else 0.3)
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    model.save_pretrained(directory)
    save_tiny_tokenizer(directory, vocab_size)
    return model


def save_tiny_tokenizer(directory: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE trained on a few sentences, with ChatML specials, so tiny models take text prompts."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
