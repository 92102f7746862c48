"""Read a GGUF file (llama.cpp's format) as Hugging Face-named float tensors and a config.json-shaped dict.

Models and loaders downstream speak transformers' names and layouts; this is the one place that knows llama.cpp's:
its tensor names, its reversed dims, its quantized blocks, and the row reorders its converter
(convert_hf_to_gguf.py) applies -- Llama's q/k rows for interleaved RoPE and GPT-NeoX's fused qkv.
"""

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
import torch

from lmserve.weights.errors import ModelLoadError
from lmserve.weights.gguf_tokenizer import build_tokenizer

_LLAMA_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "model.layers.{}.input_layernorm",
    "attn_q": "model.layers.{}.self_attn.q_proj",
    "attn_k": "model.layers.{}.self_attn.k_proj",
    "attn_v": "model.layers.{}.self_attn.v_proj",
    "attn_output": "model.layers.{}.self_attn.o_proj",
    "ffn_norm": "model.layers.{}.post_attention_layernorm",
    "ffn_gate": "model.layers.{}.mlp.gate_proj",
    "ffn_up": "model.layers.{}.mlp.up_proj",
    "ffn_down": "model.layers.{}.mlp.down_proj",
}
_NEOX_NAMES = {
    "token_embd": "gpt_neox.embed_in",
    "output_norm": "gpt_neox.final_layer_norm",
    "output": "embed_out",
    "attn_norm": "gpt_neox.layers.{}.input_layernorm",
    "attn_qkv": "gpt_neox.layers.{}.attention.query_key_value",
    "attn_output": "gpt_neox.layers.{}.attention.dense",
    "ffn_norm": "gpt_neox.layers.{}.post_attention_layernorm",
    "ffn_up": "gpt_neox.layers.{}.mlp.dense_h_to_4h",
    "ffn_down": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
}
_TENSOR_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's form of Llama 3 rope scaling; folded into hf_config


@dataclass(frozen=True)
class _Arch:
    hf_class: str
    model_type: str
    names: dict[str, str]


_ARCHS = {
    "llama": _Arch("LlamaForCausalLM", "llama", _LLAMA_NAMES),
    "qwen2": _Arch("Qwen2ForCausalLM", "qwen2", _LLAMA_NAMES),
    "gptneox": _Arch("GPTNeoXForCausalLM", "gpt_neox", _NEOX_NAMES),
}


class _PlainArrayReader(gguf.GGUFReader):
    """gguf's reader over a plain ndarray view of its file mapping: it slices the mapping once per metadata part,
    and each slice of a np.memmap costs a subclass hook; for SmolLM2's 49k-token vocabulary that took `lmserve
    serve` from 7.9 to 5.9 s (benchmarks/startup.py, a Xeon; gguf-py's own fix, llama.cpp PR #13378, is unmerged)."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, mapping: np.ndarray) -> None:
        self._data = mapping.view(np.ndarray)  # the view holds the mapping open


class GGUFCheckpoint:
    """One GGUF file: its config as transformers would write it, its tensors as transformers names them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: no such GGUF file")
        try:
            self._reader = _PlainArrayReader(self.path)
        except Exception as exc:  # gguf reports malformed bytes with whatever numpy or struct raised
            raise ModelLoadError(f"{self.path} is not a readable GGUF file (corrupt or truncated?): {exc}") from exc
        arch = self._value("general.architecture")
        if arch not in _ARCHS:
            supported = ", ".join(_ARCHS)
            raise ModelLoadError(f"{self.path}: architecture {arch!r} is not supported (supported: {supported})")
        self._arch = arch
        self._spec = _ARCHS[arch]
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.bos_token_id: int | None = self._value("tokenizer.ggml.bos_token_id")
        self.eos_token_id: int | None = self._value("tokenizer.ggml.eos_token_id")
        self.chat_template: str | None = self._value("tokenizer.chat_template")
        self.hf_config: dict[str, Any] = self._build_config()

    def tokenizer(self) -> tokenizers.Tokenizer:
        """The tokenizer described by the file's metadata, as llama.cpp would run it."""
        return build_tokenizer(self._reader.fields, self.path)

    def tensors(self, dtype: torch.dtype = torch.float32,
                wanted: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF parameter name, tensor) pairs, one dequantized tensor at a time so memory stays at one tensor; only
        those whose name is `wanted` are dequantized."""
        for info in self._reader.tensors:
            if info.name == _ROPE_FREQS:
                continue
            name = self._hf_name(info.name)
            if wanted(name):
                yield name, self._restore_layout(info.name, self._dequantize(info)).to(dtype)

    def has_blocks(self, types: frozenset[int]) -> bool:
        """Whether any 2-D tensor is stored in one of the ggml `types`."""
        return any(int(t.tensor_type) in types and len(t.shape) == 2 for t in self._reader.tensors)

    def quantized_blocks(self, types: frozenset[int]) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF parameter name, uint8 [rows, row bytes]) for each 2-D tensor stored in one of the ggml `types`,
        the blocks untouched and only the rows reordered as `tensors` reorders them."""
        for info in self._reader.tensors:
            if int(info.tensor_type) in types and len(info.shape) == 2 and info.name != _ROPE_FREQS:
                blocks = torch.from_numpy(np.array(info.data, dtype=np.uint8))  # a copy: the memmap stays read-only
                yield self._hf_name(info.name), self._restore_layout(info.name, blocks)

    def _hf_name(self, gguf_name: str) -> str:
        match = _TENSOR_NAME.fullmatch(gguf_name)
        template = self._spec.names.get(match[2]) if match else None
        if template is None or (match[1] is None) != ("{}" not in template):
            raise ModelLoadError(f"{self.path}: unexpected tensor {gguf_name!r} for architecture {self._arch!r}")
        return f"{template.format(match[1])}.{match[3]}"

    def _restore_layout(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Undo the converter's row reorders so the tensor equals the original Hugging Face one."""
        kind = gguf_name.split(".")[-2]
        config = self.hf_config
        if self._arch == "llama" and kind == "attn_q":
            return _undo_rope_permute(tensor, config["num_attention_heads"])
        if self._arch == "llama" and kind == "attn_k":
            return _undo_rope_permute(tensor, config["num_key_value_heads"])
        if self._arch == "gptneox" and kind == "attn_qkv":
            return _undo_qkv_split(tensor, config["num_attention_heads"])
        return tensor

    def _dequantize(self, info: gguf.ReaderTensor) -> torch.Tensor:
        try:
            values = gguf.quants.dequantize(info.data, info.tensor_type)
        except NotImplementedError as exc:
            raise ModelLoadError(
                f"{self.path}: tensor {info.name!r} has ggml type {info.tensor_type.name}, which cannot be dequantized"
            ) from exc
        shape = tuple(int(d) for d in reversed(info.shape))  # ggml lists dims innermost first
        return torch.from_numpy(values if values.flags.writeable else values.copy()).reshape(shape)

    def _value(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        # GGUF floats are float32: 1e-5 reads back as 9.99999975e-06; take the shortest decimal that float32 rounds
        # to, which is what the original config.json said.
        return float(str(np.float32(value))) if isinstance(value, float) else value

    def _required(self, key: str) -> Any:
        value = self._value(key)
        if value is None:
            raise ModelLoadError(f"{self.path}: metadata key {key!r} is missing")
        return value

    def _build_config(self) -> dict[str, Any]:
        arch = self._arch
        hidden = self._required(f"{arch}.embedding_length")
        heads = self._required(f"{arch}.attention.head_count")
        head_dim = self._value(f"{arch}.attention.key_length") or hidden // heads  # llama.cpp's own default
        if "token_embd.weight" not in self._tensors:
            raise ModelLoadError(f"{self.path}: tensor 'token_embd.weight' is missing")
        theta = self._value(f"{arch}.rope.freq_base", 10000.0)
        config: dict[str, Any] = {
            "architectures": [self._spec.hf_class],
            "model_type": self._spec.model_type,
            "vocab_size": int(self._tensors["token_embd.weight"].shape[1]),
            "hidden_size": hidden,
            "intermediate_size": self._required(f"{arch}.feed_forward_length"),
            "num_hidden_layers": self._required(f"{arch}.block_count"),
            "num_attention_heads": heads,
            "max_position_embeddings": self._required(f"{arch}.context_length"),
            "head_dim": head_dim,
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self._value("tokenizer.ggml.padding_token_id"),
        }
        if arch == "gptneox":
            rotary_pct = self._value(f"{arch}.rope.dimension_count", head_dim) / head_dim
            config |= {
                "rotary_pct": rotary_pct,
                "rotary_emb_base": theta,
                "use_parallel_residual": self._value(f"{arch}.use_parallel_residual", True),
                "layer_norm_eps": self._required(f"{arch}.attention.layer_norm_epsilon"),
                "hidden_act": "gelu",
            }
            # transformers >= 5 writes rope settings here instead; keep both spellings so either reader works
            config["rope_parameters"] = {
                "rope_type": "default",
                "rope_theta": theta,
                "partial_rotary_factor": rotary_pct,
            }
            return config
        config |= {
            "num_key_value_heads": self._value(f"{arch}.attention.head_count_kv", heads),
            "rms_norm_eps": self._required(f"{arch}.attention.layer_norm_rms_epsilon"),
            "rope_theta": theta,
            "hidden_act": "silu",
        }
        if arch == "llama":
            config["attention_bias"] = "blk.0.attn_q.bias" in self._tensors
        scaling = self._rope_scaling(theta, head_dim)
        if scaling is not None:
            config["rope_scaling"] = scaling
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
        return config

    def _rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None:
        """Rope scaling in transformers' terms: linear and yarn from metadata, Llama 3 from `rope_freqs`."""
        kind = self._value(f"{self._arch}.rope.scaling.type")
        factor = self._value(f"{self._arch}.rope.scaling.factor") or self._value(f"{self._arch}.rope.scale_linear")
        if kind == "yarn":
            original = self._required(f"{self._arch}.rope.scaling.original_context_length")
            return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
        if kind in (None, "linear") and factor not in (None, 0.0, 1.0):  # llama.cpp reads no type as linear
            return {"rope_type": "linear", "factor": factor}
        if _ROPE_FREQS in self._tensors:
            return self._llama3_scaling(theta, head_dim)
        return None

    def _llama3_scaling(self, theta: float, head_dim: int) -> dict[str, Any]:
        """The file keeps only the per-frequency factors; assume Meta's other parameters (every Llama 3.x uses
        them, and they are llama.cpp's converter defaults) and refuse a file they do not reproduce."""
        factors = self._dequantize(self._tensors[_ROPE_FREQS])
        scaling = {
            "rope_type": "llama3",
            "factor": float(factors.max()),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        if not torch.allclose(factors, _llama3_rope_factors(theta, head_dim, scaling), rtol=1e-4):
            raise ModelLoadError(f"{self.path}: tensor {_ROPE_FREQS!r} does not match Llama 3 rope scaling")
        return scaling


def _llama3_rope_factors(theta: float, head_dim: int, scaling: dict[str, Any]) -> torch.Tensor:
    """Per-frequency divisors of Llama 3 rope scaling: 1 for short wavelengths, `factor` for long, smooth between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi * theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    smooth = (context / wavelength - low) / (high - low)
    middle = 1 / ((1 - smooth) / factor + smooth)
    scaled = torch.where(wavelength > context / low, torch.full_like(middle, factor), middle)
    return torch.where(wavelength < context / high, torch.ones_like(middle), scaled).float()


def _undo_rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp orders each head's rows [head_dim/2, 2] for interleaved RoPE; transformers' rotate-half wants
    [2, head_dim/2]. Works for weights and biases alike."""
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _undo_qkv_split(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp regroups GPT-NeoX's per-head [q, k, v] rows as [all q | all k | all v]; put them back per head."""
    return rows.reshape(3, n_head, rows.shape[0] // 3 // n_head, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)
