"""Load a model and its tokenizer from any supported source in one call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import torch
from torch import nn

from lmserve.config import ModelConfig
from lmserve.kernels.block_tiles import Q4_TYPES
from lmserve.kernels.int8_linear import has_int8_dot_product
from lmserve.kernels.native import BLOCK_BYTES, kernels_available
from lmserve.layers.linear import Linear
from lmserve.models.base import DecoderLM
from lmserve.models.registry import build_model
from lmserve.platform import auto_dtype, has_fast_bf16
from lmserve.weights import hf_dir
from lmserve.weights.resolve import resolve_model_path
from lmserve.weights.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf

if TYPE_CHECKING:
    from lmserve.weights.gguf_checkpoint import GGUFCheckpoint

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    config: ModelConfig
    model: nn.Module
    tokenizer: Tokenizer
    path: Path
    dtype: torch.dtype
    device: torch.device
    quantized_types: tuple[str, ...] = ()  # GGUF block types the decode kernels use, e.g. ("Q4_1", "Q8_0")

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids


def parse_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not supported; choose 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(model: str, tokenizer: str | None = None, dtype: str | torch.dtype = "auto",
               device: str = "cpu", quantization: str = "auto") -> LoadedModel:
    """`model`: directory, .gguf file or bundled name; `tokenizer`: optional separate tokenizer path;
    `quantization`: "auto" keeps a GGUF's quantized blocks for decode where the CPU kernels run, "none" does not;
    "int8" multiplies in int8: a GGUF's Q4_0/Q4_1 blocks as they are, by inputs rounded to int8 per block of 32
    (kernels/q4_int8_matmul.c, as llama.cpp; AVX2, VNNI where the CPU has it); a model without them, on CPUs with
    AVX512-VNNI, by its weights and inputs rounded to int8 per group of 64 (kernels/int8_matmul.c: on SmolLM2's
    Q4_1 weights +3.4% perplexity against the blocks' +1.0%, so a Q4 file keeps its blocks).
    With both on "auto", a GGUF whose linears the kernels can read runs in float32 (the kernels' activations), its
    linears' float weights (for prefill and large batches) in bf16 where the CPU computes bf16 natively; elsewhere
    its linears' Q4_0/Q4_1/Q8_0 blocks (the LM head's too) take every product, by inputs rounded to int16
    (kernels/tiles_int16_matmul.c), and their float copy is dropped."""
    path = resolve_model_path(model)
    torch_device = torch.device(device)
    torch_dtype = parse_dtype(dtype, torch_device)
    checkpoint = None
    if path.suffix == ".gguf":
        from lmserve.weights.gguf_checkpoint import GGUFCheckpoint  # the gguf reader is only needed here

        checkpoint = GGUFCheckpoint(path)
        torch_dtype = _gguf_dtype(checkpoint, dtype, quantization, torch_device, torch_dtype)
        config = ModelConfig.from_hf(checkpoint.hf_config, str(path))
        tok = load_tokenizer(Path(tokenizer).expanduser()) if tokenizer else tokenizer_from_gguf(checkpoint)
    else:
        torch_dtype = _int8_dtype(dtype, quantization, torch_device, torch_dtype, q4_blocks=False)
        config = ModelConfig.from_hf(hf_dir.read_config(path), str(path / "config.json"))
        tok = load_tokenizer(Path(tokenizer).expanduser() if tokenizer else path)
    module = build_model(config, str(path), torch_dtype, torch_device)
    quantized, bf16_weights = _attach_blocks(module, checkpoint, dtype, quantization, torch_dtype, torch_device)
    # the float weights after the blocks: those that block tiles replaced are never dequantized
    weights = (checkpoint.tensors(torch_dtype, module.wants_tensor) if checkpoint is not None
               else hf_dir.iter_tensors(hf_dir.safetensors_files(path), torch_dtype))
    module.load_weights(weights, str(path))
    if bf16_weights:
        module.store_linear_weights_in(torch.bfloat16)  # prefill and large batches: native bf16 GEMMs
    elif quantization == "int8" and "int8" not in quantized:
        module.store_linear_weights_in_int8(torch.bfloat16 if has_fast_bf16(torch_device) else torch.float32)
        quantized = (*quantized, "int8")
    return LoadedModel(config, module, tok, path, torch_dtype, torch_device, quantized)


def _attach_blocks(module: DecoderLM, checkpoint: GGUFCheckpoint | None, dtype: str | torch.dtype,
                   quantization: str, torch_dtype: torch.dtype, device: torch.device) -> tuple[tuple[str, ...], bool]:
    """Give the linears a GGUF's blocks where the kernels use them, and put those that multiply by the blocks
    alone into block tiles (before any float weight is loaded). Returns the block types in use (with "int8" for
    --quantization int8 on the file's Q4 blocks) and whether the float weights are then to be kept in bf16."""
    if checkpoint is None or quantization == "none" or not _kernels_apply(torch_dtype, device):
        return (), False
    module.attach_quantized(checkpoint.quantized_blocks(frozenset(BLOCK_BYTES)))
    quantized = tuple(sorted({gguf.GGMLQuantizationType(m.quantized.qtype).name for m in module.modules()
                              if isinstance(m, Linear) and m.quantized is not None}))
    if quantization == "int8" and checkpoint.has_blocks(frozenset(Q4_TYPES)):
        module.store_linear_weights_in_block_tiles(8)  # the file's 4-bit weights by int8 inputs
        return (*quantized, "int8"), False
    if not quantized or quantization != "auto":
        return quantized, False
    if dtype == "auto" and has_fast_bf16(device):
        return quantized, True
    module.store_linear_weights_in_block_tiles(16)  # W1 1.2x the blocks + float32 GEMMs
    return quantized, False


def resolve_dtype(model: str, dtype: str = "auto", device: str = "cpu", quantization: str = "auto") -> torch.dtype:
    """The dtype load_model runs `model` in with these options (its auto choices resolved), for reports."""
    path, torch_device = resolve_model_path(model), torch.device(device)
    torch_dtype = parse_dtype(dtype, torch_device)
    if path.suffix != ".gguf":
        return _int8_dtype(dtype, quantization, torch_device, torch_dtype, q4_blocks=False)
    from lmserve.weights.gguf_checkpoint import GGUFCheckpoint

    return _gguf_dtype(GGUFCheckpoint(path), dtype, quantization, torch_device, torch_dtype)


def has_q4_blocks(model: str) -> bool:
    """Whether `model` is a GGUF whose linears hold Q4_0/Q4_1 blocks (which --quantization int8 multiplies as
    they are), for reports."""
    path = resolve_model_path(model)
    if path.suffix != ".gguf":
        return False
    from lmserve.weights.gguf_checkpoint import GGUFCheckpoint

    return GGUFCheckpoint(path).has_blocks(frozenset(Q4_TYPES))


def _gguf_dtype(checkpoint: GGUFCheckpoint, dtype: str | torch.dtype, quantization: str, device: torch.device,
                parsed: torch.dtype) -> torch.dtype:
    if (dtype == "auto" and quantization == "auto" and _kernels_apply(torch.float32, device)
            and checkpoint.has_blocks(frozenset(BLOCK_BYTES))):
        return torch.float32  # decode on the blocks beats bf16 products, even where bf16 is native
    return _int8_dtype(dtype, quantization, device, parsed, checkpoint.has_blocks(frozenset(Q4_TYPES)))


def _int8_dtype(dtype: str | torch.dtype, quantization: str, device: torch.device, parsed: torch.dtype,
                q4_blocks: bool) -> torch.dtype:
    """int8 products take float32 activations, on CPUs that run them: for a GGUF holding Q4 blocks (`q4_blocks`),
    any with AVX2; else those with AVX512-VNNI."""
    if quantization != "int8":
        return parsed
    if not (device.type == "cpu" and kernels_available() and (has_int8_dot_product() or q4_blocks)):
        raise ValueError("quantization int8 needs lmserve's CPU kernels and either a GGUF whose linears hold "
                         "Q4_0/Q4_1 blocks or a CPU with AVX512-VNNI")
    if dtype not in ("auto", "float32", torch.float32):
        raise ValueError(f"quantization int8 runs float32 activations; dtype {dtype!r} is not supported with it")
    return torch.float32


def _kernels_apply(dtype: torch.dtype, device: torch.device) -> bool:
    """The quantized kernels take float32 activations on the CPU."""
    return device.type == "cpu" and dtype == torch.float32 and kernels_available()
