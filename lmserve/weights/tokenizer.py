"""The tokenizer a model is served with: a `tokenizers` object, its special tokens and its chat template.

Loaded from an HF directory (tokenizer.json + tokenizer_config.json), a bare tokenizer.json, or a GGUF file's
metadata; `--tokenizer` may name any of these apart from the model, as in vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers

from lmserve.weights.chat_template import render_chat
from lmserve.weights.errors import ModelLoadError


@dataclass
class Tokenizer:
    backend: tokenizers.Tokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; pass a plain prompt instead of messages")
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token)


def load_tokenizer(path: Path) -> Tokenizer:
    """A tokenizer from an HF model directory, a tokenizer.json file, or a .gguf file."""
    if path.suffix == ".gguf":
        from lmserve.weights.gguf_checkpoint import GGUFCheckpoint

        return tokenizer_from_gguf(GGUFCheckpoint(path))
    if path.is_dir():
        return _from_hf_directory(path)
    if path.is_file():
        return Tokenizer(_read_tokenizer_json(path))
    raise ModelLoadError(f"{path}: no tokenizer here (expected a directory, a tokenizer.json or a .gguf file)")


def tokenizer_from_gguf(checkpoint: Any) -> Tokenizer:
    backend = checkpoint.tokenizer()

    def token(token_id: int | None) -> str | None:
        return None if token_id is None else backend.id_to_token(token_id)

    return Tokenizer(backend, checkpoint.chat_template, token(checkpoint.bos_token_id), token(checkpoint.eos_token_id))


def _read_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ModelLoadError(f"{path}: not a valid tokenizer.json ({e})") from e


def _from_hf_directory(directory: Path) -> Tokenizer:
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ModelLoadError(f"{directory}: no tokenizer.json (only fast tokenizers are supported; "
                             "or name one with --tokenizer)")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = config.get("chat_template")
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text()
    if isinstance(template, list):  # named templates: use the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return Tokenizer(_read_tokenizer_json(tokenizer_json), template,
                     _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))


def _token_text(token: str | dict | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token
