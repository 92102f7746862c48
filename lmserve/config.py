"""One model description for every architecture, read from a Hugging Face config.json dict.

Old (rope_theta / rope_scaling / rotary_pct) and new (rope_parameters) spellings are both accepted, so
checkpoints from any transformers era load the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmserve.weights.errors import ModelLoadError

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "GPTNeoXForCausalLM": "gpt_neox",
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "gpt_neox": "GPTNeoXForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str            # the HF class name, e.g. "LlamaForCausalLM"
    family: str                  # "llama" or "gpt_neox": which module implements it
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rotary_dim: int              # leading dims of each head that are rotated (partial rotary for GPT-NeoX)
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    use_parallel_residual: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str) -> ModelConfig:
        """Validate and normalise a config.json dict; `source` names the file in every error."""
        arch = _architecture(d, source)
        family = ARCHITECTURES[arch]

        def need(key: str) -> Any:
            if key not in d:
                raise ModelLoadError(f"{source}: config is missing '{key}'")
            return d[key]

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        kv_heads = int(d.get("num_key_value_heads") or heads)
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            raise ModelLoadError(f"{source}: num_attention_heads={heads} is not a positive multiple of "
                                 f"num_key_value_heads={kv_heads}")
        head_dim = d.get("head_dim") or (hidden // heads)
        if not d.get("head_dim") and hidden % heads:
            raise ModelLoadError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        if d.get("use_sliding_window"):
            raise ModelLoadError(f"{source}: sliding-window attention (use_sliding_window) is not supported yet")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ROPE_TYPES:
            raise ModelLoadError(f"{source}: rope type '{rope_type}' is not supported (supported: {ROPE_TYPES})")
        rope["rope_type"] = rope_type
        theta = float(rope.get("rope_theta") or d.get("rope_theta") or d.get("rotary_emb_base") or 10000.0)
        partial = rope.get("partial_rotary_factor") or d.get("partial_rotary_factor") or d.get("rotary_pct") or 1.0
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        is_neox = family == "gpt_neox"
        return cls(
            architecture=arch,
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            norm_eps=float(d.get("layer_norm_eps", 1e-5) if is_neox else d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rope_theta=theta,
            rotary_dim=int(int(head_dim) * float(partial)),
            rope_scaling=rope if rope_type != "default" else {},
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(d.get("attention_bias", is_neox)),
            o_bias=bool(d.get("attention_bias", is_neox)),
            mlp_bias=is_neox or bool(d.get("mlp_bias", False)),
            hidden_act=str(d.get("hidden_act", "gelu" if is_neox else "silu")),
            use_parallel_residual=bool(d.get("use_parallel_residual", True)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _architecture(d: dict[str, Any], source: str) -> str:
    names = d.get("architectures") or ([MODEL_TYPES[d["model_type"]]] if d.get("model_type") in MODEL_TYPES else [])
    for name in names:
        if name in ARCHITECTURES:
            return name
    found = names or d.get("model_type") or "none given"
    raise ModelLoadError(f"{source}: unsupported architecture {found}; supported: {sorted(ARCHITECTURES)}")
