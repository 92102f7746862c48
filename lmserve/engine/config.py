"""Engine options (vLLM's names) and sizing the KV block pool from a memory budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.config import ModelConfig
from lmserve.kernels.native import kernels_available
from lmserve.platform import GiB, available_memory

QUANTIZATION_CHOICES = ("auto", "none", "int8")
# A step's token budget on the CPU: prefill steps of 1024 tokens run faster per token than 2048 (their activations
# stay in cache), so against 2048 both offline throughput (W1: 869 / 904 against 822 / 852 tok/s) and serving (W2:
# mean TTFT 773 against 1171 ms, 739 against 672 tok/s) gained (Xeon with AMX, benchmarks/side_by_side.py with
# --lmserve-args "--max-num-batched-tokens N"). 512 gave W2 a slightly lower TTFT (741 ms) but less throughput (697).
CPU_BATCHED_TOKENS = 1024
# Prompt tokens a CPU step takes while sequences decode (Sarathi-Serve's stall-free batching): against the whole
# budget (1024), W2's p99 inter-token latency fell 1387 -> 437 ms and mean TTFT 3894 -> 3269 ms, and W1 gained (256 ->
# 284 tok/s): the decodes riding in a prefill step cost less than in steps of their own (AVX2 EPYC, side_by_side.py
# --only lmserve with --lmserve-args "--max-prefill-tokens-while-decoding N", alternated). 128 cut the p99 further
# (246 ms) with W4's prefix-cache TTFT less steady; a faster CPU pays a small step's fixed costs more often.
CPU_PREFILL_TOKENS_WHILE_DECODING = 256
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")
AUTO_KV_FRACTION = 0.25   # of available memory, when no budget is given
AUTO_KV_CPU_CAP = 4 * GiB  # vLLM's CPU default too: beyond it, RAM is better left to the OS and other processes


@dataclass
class EngineConfig:
    model: str = "smollm2-135m-instruct"
    tokenizer: str | None = None
    dtype: str = "auto"                        # bf16 where the hardware runs it fast, else fp32
    quantization: str = "auto"                 # auto: a GGUF's blocks for decode where kernels run; none; int8
    kv_cache_dtype: str = "auto"               # auto: the activations' dtype
    device: str = "cpu"
    max_model_len: int | None = None          # default: the model's context
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # default: 1024 on the CPU (see CPU_BATCHED_TOKENS), 2048 elsewhere
    max_prefill_tokens_while_decoding: int | None = None  # default: 256 on the CPU, the whole budget elsewhere
    enable_prefix_caching: bool = True
    block_size: int = 16
    num_kv_blocks: int | None = None           # exact override, like vLLM's num_gpu_blocks_override
    kv_cache_memory_gb: float | None = None    # KV cache budget; default: 1/4 of free memory (CPU: <= 4 GiB)
    scheduling_policy: str = "fcfs"            # or "priority"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = CPU_BATCHED_TOKENS if self.device == "cpu" else 2048
        if self.max_prefill_tokens_while_decoding is None:
            self.max_prefill_tokens_while_decoding = (CPU_PREFILL_TOKENS_WHILE_DECODING if self.device == "cpu"
                                                      else self.max_num_batched_tokens)
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_CHOICES}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_tokens_while_decoding", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")


def kv_cache_dtype(config: EngineConfig, activations: torch.dtype, device: torch.device) -> torch.dtype:
    """`auto`: float16 where lmserve's C attention reads the cache (float32 activations on a CPU with the kernels,
    and the dtype left to the engine too), as llama.cpp does: half the bytes decode attention reads, which bound a
    batched step there (perplexity moved by -0.05% on SmolLM2, `lmserve bench quality`). Else the activations'
    dtype, like vLLM; an explicit `dtype` keeps its cache in that dtype, so float32 runs stay exact."""
    if config.kv_cache_dtype != "auto":
        return getattr(torch, config.kv_cache_dtype)
    if config.dtype == "auto" and activations == torch.float32 and device.type == "cpu" and kernels_available():
        return torch.float16
    return activations


def kv_bytes_per_token(model: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * dtype.itemsize


def choose_num_blocks(config: EngineConfig, model: ModelConfig, max_model_len: int, dtype: torch.dtype,
                      device: torch.device) -> int:
    """The pool size: the exact override, else the budget in GiB, else a share of free memory, never more than
    max_num_seqs full-length sequences need and never less than one full-length sequence."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    block_bytes = kv_bytes_per_token(model, dtype) * config.block_size
    blocks_per_seq = -(-max_model_len // config.block_size)
    if config.kv_cache_memory_gb is not None:
        blocks = int(config.kv_cache_memory_gb * GiB // block_bytes)
        if blocks < blocks_per_seq:
            raise ValueError(f"kv_cache_memory_gb={config.kv_cache_memory_gb} holds {blocks} blocks, fewer than one "
                             f"sequence of max_model_len={max_model_len} needs ({blocks_per_seq})")
        return blocks
    budget = int(available_memory(device) * AUTO_KV_FRACTION)
    if device.type == "cpu":
        budget = min(budget, AUTO_KV_CPU_CAP)
    budget //= block_bytes
    return max(blocks_per_seq, min(budget, blocks_per_seq * config.max_num_seqs))
