"""Rebuild the tokenizer a GGUF file describes as a `tokenizers.Tokenizer`.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges and token types, and names the
pre-tokenizer only by a key (`tokenizer.ggml.pre`) that selects a fixed list of split regexes inside llama.cpp
(src/llama-vocab.cpp, `llm_tokenizer_bpe`). We rebuild that chain from the tokenizers library's parts, so ids
match what llama.cpp itself produces for the file.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import ReaderField, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from lmserve.weights.errors import ModelLoadError

# llama.cpp's regexes, written as it runs them: its engine has no `(?i:...)`, hence the spelled-out contractions.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class _PreTokenizer:
    """One llama.cpp pre-tokenizer: regexes applied in turn, each to the pieces the previous one left."""

    splits: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself a vocabulary entry is taken whole (Llama 3)
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_DEFAULT = _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
_GPT2_STYLE = _PreTokenizer((_GPT2,))
_DIGITS_THEN_GPT2 = _PreTokenizer((r"\p{N}", _GPT2))
_LLAMA3_STYLE = _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_QWEN2_STYLE = _PreTokenizer((_QWEN2,))

# `tokenizer.ggml.pre` name -> pre-tokenizer, grouped as llama.cpp's llama-vocab.cpp groups them.
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "exaone4"), _GPT2_STYLE),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _DIGITS_THEN_GPT2
    ),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), _LLAMA3_STYLE),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizer((_LLAMA3,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2_STYLE),
}

_MODEL_NAMES = {"llama": "SentencePiece", "bert": "WordPiece", "t5": "Unigram", "rwkv": "RWKV"}


def build_tokenizer(fields: Mapping[str, ReaderField], path: Path) -> Tokenizer:
    """The byte-level BPE tokenizer in a GGUF's `tokenizer.ggml.*` metadata, as llama.cpp would run it."""
    model = _value(fields, "tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in fields:
        raise ModelLoadError(f"{path} has no tokenizer in its metadata (tokenizer.ggml.model / tokens missing)")
    if model != "gpt2":
        kind = f" ({_MODEL_NAMES[model]})" if model in _MODEL_NAMES else ""
        raise ModelLoadError(f"tokenizer type {model!r}{kind} in {path} is not supported yet")
    pre_name = _value(fields, "tokenizer.ggml.pre") or "default"  # llama.cpp falls back the same way
    if pre_name not in _PRE_TOKENIZERS:
        raise ModelLoadError(
            f"pre-tokenizer {pre_name!r} in {path} is not supported; known: {', '.join(sorted(_PRE_TOKENIZERS))}"
        )
    pre = _PRE_TOKENIZERS[pre_name]
    tokens: list[str] = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(merge.split(" ", 1)) for merge in _value(fields, "tokenizer.ggml.merges") or ()]

    tokenizer = Tokenizer(
        BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=pre.ignore_merges)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    token_types = _value(fields, "tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    if len(token_types) != len(tokens):
        raise ModelLoadError(f"{path}: {len(token_types)} token types for {len(tokens)} tokens")
    _add_whole_tokens(tokenizer, tokens, token_types)
    post = _post_processor(tokens, fields, pre)
    if post is not None:
        tokenizer.post_processor = post
    return tokenizer


def _add_whole_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control and user-defined tokens match whole in raw text, as llama.cpp matches them before splitting.

    Control tokens become special (skipped by `decode(skip_special_tokens=True)`, split like text under
    `encode_special_tokens`, which is llama.cpp's parse_special=false); user-defined ones stay plain added tokens.
    Their text is stored raw, not byte-encoded, so each keeps its own id rather than getting a new one.
    """
    control = [t for t, kind in zip(tokens, token_types, strict=True) if kind == TokenType.CONTROL]
    user = [t for t, kind in zip(tokens, token_types, strict=True) if kind == TokenType.USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _post_processor(
    tokens: list[str], fields: Mapping[str, ReaderField], pre: _PreTokenizer
) -> processors.TemplateProcessing | None:
    """BOS/EOS around each sequence when the file (or llama.cpp's default for its pre-tokenizer) asks."""
    add_bos = _value(fields, "tokenizer.ggml.add_bos_token")
    bos_id = _value(fields, "tokenizer.ggml.bos_token_id")
    eos_id = _value(fields, "tokenizer.ggml.eos_token_id")
    head = [bos_id] if (pre.add_bos if add_bos is None else add_bos) and bos_id is not None else []
    tail = [eos_id] if _value(fields, "tokenizer.ggml.add_eos_token") and eos_id is not None else []
    if not head and not tail:
        return None
    first = [tokens[i] for i in head] + ["$A"] + [tokens[i] for i in tail]
    second = [f"{tokens[i]}:1" for i in head] + ["$B:1"] + [f"{tokens[i]}:1" for i in tail]
    return processors.TemplateProcessing(
        single=first, pair=first + second, special_tokens=[(tokens[i], i) for i in {*head, *tail}]
    )


def _value(fields: Mapping[str, ReaderField], key: str) -> Any:
    """A metadata value as Python data, or None when the key is absent."""
    field = fields.get(key)
    return None if field is None else field.contents()
