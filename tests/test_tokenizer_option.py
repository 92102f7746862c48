"""A tokenizer named apart from the model (--tokenizer): the real Pythia tokenizer with a tiny GPT-NeoX."""

from __future__ import annotations

import subprocess
import sys

import pytest
import transformers
from conftest import PYTHIA_TOKENIZER
from tiny_models import NEOX_QUARTER_ROTARY, make_tiny_model

from lmserve.loader import load_model

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\n\nnewlines",
    "def f(x):\n    return x ** 2  # square",
    "naïve café — 日本語 🙂",
    "1234567890 3.14159",
    "<|endoftext|>after the special token",
]


@pytest.fixture(scope="module")
def pythia_tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pythia-tiny")
    make_tiny_model(NEOX_QUARTER_ROTARY, directory, vocab_size=50304)  # padded like the real 70M-2.8B models
    (directory / "tokenizer.json").unlink()  # the model must get its tokenizer from --tokenizer
    return directory


def test_pythia_tokenizer_matches_transformers_and_round_trips(pythia_tiny):
    lm = load_model(str(pythia_tiny), tokenizer=str(PYTHIA_TOKENIZER))
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(PYTHIA_TOKENIZER))
    for text in TEXTS:
        ids = lm.tokenizer.encode(text)
        assert ids == reference(text)["input_ids"]
        assert lm.tokenizer.decode(ids, skip_special_tokens=False) == text
        assert max(ids) < lm.config.vocab_size


def test_cli_generate_with_separate_tokenizer(pythia_tiny):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmserve.cli",
            "generate",
            "Hello",
            "--model",
            str(pythia_tiny),
            "--tokenizer",
            str(PYTHIA_TOKENIZER),
            "--max-tokens",
            "5",
            "--no-chat",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_model_without_tokenizer_says_how_to_name_one(pythia_tiny):
    with pytest.raises(ValueError, match="--tokenizer"):
        load_model(str(pythia_tiny))
