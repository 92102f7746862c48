"""Write a transformers model directory as a GGUF file the way llama.cpp's convert_hf_to_gguf.py does.

Test helper: it gives the GGUF reader files whose every tensor is known, with no GGUF download. It follows the
converter's conventions (checked against llama.cpp's convert_hf_to_gguf.py): arch names 'llama' / 'qwen2' /
'gptneox'; its metadata keys; gguf's own HF->GGUF tensor name map; Llama q/k rows permuted for interleaved RoPE;
GPT-NeoX's per-head qkv regrouped as [all q | all k | all v]; 1-D tensors and norms kept F32, other tensors in
the requested type (falling back to F16 where a row does not fill whole quant blocks); Llama 3 rope scaling as
a `rope_freqs` tensor; a byte-level BPE tokenizer as 'gpt2' metadata via gguf's SpecialVocab.
"""

import json
import math
from pathlib import Path

import gguf
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

_ARCHS = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "GPTNeoXForCausalLM": gguf.MODEL_ARCH.GPTNEOX,
}


def export_gguf(
    hf_model_dir: Path,
    out_path: Path,
    qtype: str = "F32",
    *,
    tokenizer_pre: str = "gpt-2",
    tokenizer_model: str = "gpt2",
) -> None:
    """Convert `hf_model_dir` (config.json + model.safetensors) to `out_path`; `qtype` names a ggml type.

    `tokenizer_pre` is the name the converter would pick by hashing the tokenizer's output; `tokenizer_model` other
    than 'gpt2' only relabels the vocabulary, to test how readers refuse tokenizers they lack."""
    config = json.loads((hf_model_dir / "config.json").read_text())
    arch = _ARCHS[config["architectures"][0]]
    ggml_type = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(hf_model_dir.name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(writer, arch, config, qtype)
    _add_tokenizer(writer, hf_model_dir, config["vocab_size"], tokenizer_pre, tokenizer_model)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    for hf_name, tensor in load_file(hf_model_dir / "model.safetensors").items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        _add_tensor(writer, gguf_name, _converter_layout(arch, hf_name, tensor, config), ggml_type)
    if (rope_freqs := _llama3_rope_freqs(config)) is not None:
        _add_tensor(writer, "rope_freqs.weight", rope_freqs, ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rope(config: dict) -> dict:
    """Rope settings whether config.json spells them the transformers 5 way or the older one."""
    return config.get("rope_parameters") or {
        **(config.get("rope_scaling") or {}),
        "rope_theta": config.get("rope_theta", config.get("rotary_emb_base", 10000.0)),
        "partial_rotary_factor": config.get("rotary_pct", 1.0),
    }


def _add_hparams(writer: gguf.GGUFWriter, arch: gguf.MODEL_ARCH, config: dict, qtype: str) -> None:
    rope = _rope(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    if arch == gguf.MODEL_ARCH.GPTNEOX:  # GPTNeoXModel.set_gguf_parameters: no rope base, no file type
        writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
        writer.add_parallel_residual(config.get("use_parallel_residual", True))
        writer.add_layer_norm_eps(config["layer_norm_eps"])
        return
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])


def _converter_layout(arch: gguf.MODEL_ARCH, hf_name: str, tensor: torch.Tensor, config: dict) -> torch.Tensor:
    """The row reorders the converter applies (LlamaModel.permute, GPTNeoXModel.modify_tensors)."""
    heads = config["num_attention_heads"]
    if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith(
        ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")
    ):
        n = heads if ".q_proj." in hf_name else config["num_key_value_heads"]
        return tensor.reshape(n, 2, tensor.shape[0] // n // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)
    if arch == gguf.MODEL_ARCH.GPTNEOX and ".query_key_value." in hf_name:
        per_head = tensor.reshape(heads, 3, tensor.shape[0] // heads // 3, *tensor.shape[1:])
        return torch.cat([per_head[:, i].reshape(-1, *tensor.shape[1:]) for i in range(3)])
    return tensor


def _add_tensor(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, ggml_type: gguf.GGMLQuantizationType):
    data = tensor.float().numpy()
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        ggml_type = gguf.GGMLQuantizationType.F32
    try:
        packed = gguf.quants.quantize(data, ggml_type)
    except gguf.QuantError:  # rows that do not fill whole blocks: the converter falls back to F16
        ggml_type = gguf.GGMLQuantizationType.F16
        packed = gguf.quants.quantize(data, ggml_type)
    writer.add_tensor(name, packed, raw_dtype=ggml_type)


def _llama3_rope_freqs(config: dict) -> torch.Tensor | None:
    """LlamaModel.generate_extra_tensors: Llama 3 rope scaling stored as one divisor per rotary frequency."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    old_context = rope.get("original_max_position_embeddings", 8192)
    low, high, factor = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0), rope.get("factor", 8.0)
    divisors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * rope["rope_theta"] ** (i / dim)
        if wavelength < old_context / high:
            divisors.append(1.0)
        elif wavelength > old_context / low:
            divisors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(divisors)


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, pre: str, model: str) -> None:
    """TextModel._set_vocab_gpt2: tokens by id (padding ids as [PADn]), token types, merges and special ids."""
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    if (model_dir / "tokenizer.json").is_file():
        tokens, types = _vocab_from_tokenizer_json(model_dir / "tokenizer.json", vocab_size)
    else:  # no tokenizer: the 256 byte symbols and one control token, enough for a complete, loadable file
        tokens = [*bytes_to_unicode().values(), "<|endoftext|>"][:vocab_size]
        types = ([gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL])[: len(tokens)]
        tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
        types += [gguf.TokenType.UNUSED] * (vocab_size - len(types))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges from tokenizer.json; bos/eos/pad ids, add_bos_token and chat template from the *config.json files
    has_merges = (model_dir / "tokenizer.json").is_file()
    gguf.SpecialVocab(model_dir, load_merges=has_merges, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _vocab_from_tokenizer_json(path: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Added tokens keep their raw text: control when special or spelled like `<|...|>`, else user-defined."""
    tokenizer = Tokenizer.from_file(str(path))
    by_id = {i: token for token, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i, f"[PAD{i}]")
        if i not in by_id:
            kind = gguf.TokenType.UNUSED
        elif i not in added:
            kind = gguf.TokenType.NORMAL
        elif added[i].special or (token.startswith("<|") and token.endswith("|>")):
            kind = gguf.TokenType.CONTROL
        else:
            kind = gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    return tokens, types
