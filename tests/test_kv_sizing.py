"""The KV pool size: exact override, a GiB budget, or an automatic share of free memory, within sane bounds."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from lmserve.commands.engine_args import add_engine_args, engine_options
from lmserve.config import ModelConfig
from lmserve.engine import config as engine_config
from lmserve.engine.config import EngineConfig, choose_num_blocks, kv_bytes_per_token
from lmserve.kernels.native import kernels_available
from lmserve.layers.attention import KVCache

MODEL = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
                             "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "num_key_value_heads": 2}, "test")
CPU = torch.device("cpu")
BLOCK_BYTES = kv_bytes_per_token(MODEL, torch.float32) * 16  # 2 layers * 2 * 2 heads * 16 dims * 4 bytes * 16


def blocks(monkeypatch, free_bytes: int, **options) -> int:
    monkeypatch.setattr(engine_config, "available_memory", lambda device: free_bytes)
    return choose_num_blocks(EngineConfig(**options), MODEL, 256, torch.float32, CPU)


def test_override_and_budget(monkeypatch):
    assert blocks(monkeypatch, 1 << 30, num_kv_blocks=7) == 7
    assert blocks(monkeypatch, 1 << 30, kv_cache_memory_gb=0.001) == int(0.001 * (1 << 30)) // BLOCK_BYTES
    with pytest.raises(ValueError, match="kv_cache_memory_gb"):
        blocks(monkeypatch, 1 << 30, kv_cache_memory_gb=1e-7)


def test_auto_is_a_share_of_free_memory_capped_by_need_and_by_4_gib(monkeypatch):
    per_seq = 256 // 16
    assert blocks(monkeypatch, 1 << 40, max_num_seqs=4) == 4 * per_seq                 # no more than needed
    assert blocks(monkeypatch, 1 << 20, max_num_seqs=4) == (1 << 18) // BLOCK_BYTES     # a quarter of free memory
    assert blocks(monkeypatch, 1 << 10, max_num_seqs=4) == per_seq                      # always one full sequence
    huge = blocks(monkeypatch, 1 << 40, max_num_seqs=1 << 20)
    assert huge == (4 << 30) // BLOCK_BYTES                                             # CPU cap


def test_kv_cache_dtype_is_validated_and_sizes_the_pool(monkeypatch):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="int4")
    auto = torch.float16 if kernels_available() else torch.float32  # float16 where the C attention reads it
    assert engine_config.kv_cache_dtype(EngineConfig(), torch.float32, CPU) == auto
    assert engine_config.kv_cache_dtype(EngineConfig(), torch.bfloat16, CPU) == torch.bfloat16  # the activations'
    assert engine_config.kv_cache_dtype(EngineConfig(dtype="float32"), torch.float32, CPU) == torch.float32  # exact
    assert engine_config.kv_cache_dtype(EngineConfig(kv_cache_dtype="float16"), torch.float32, CPU) == torch.float16
    monkeypatch.setattr(engine_config, "kernels_available", lambda: False)
    assert engine_config.kv_cache_dtype(EngineConfig(), torch.float32, CPU) == torch.float32  # torch's attention
    budget = dict(kv_cache_memory_gb=0.001)
    half = choose_num_blocks(EngineConfig(**budget), MODEL, 256, torch.float16, CPU)
    assert half == 2 * blocks(monkeypatch, 1 << 30, **budget)  # half the bytes a block: twice the blocks


def test_kv_cache_dtype_on_the_command_line():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_options(parser.parse_args(["--kv-cache-dtype", "float16"]))["kv_cache_dtype"] == "float16"
    assert "kv_cache_dtype" not in engine_options(parser.parse_args([]))  # the engine's default stays
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int4"])


def test_step_token_budget_defaults_by_device_and_can_be_set():
    assert EngineConfig().max_num_batched_tokens == engine_config.CPU_BATCHED_TOKENS == 1024
    assert EngineConfig(device="cuda").max_num_batched_tokens == 2048
    assert EngineConfig(max_num_batched_tokens=4096).max_num_batched_tokens == 4096
    with pytest.raises(ValueError, match="max_num_batched_tokens must be at least 1"):
        EngineConfig(max_num_batched_tokens=0)


def test_prefill_tokens_while_decoding_default_by_device_and_can_be_set():
    assert EngineConfig().max_prefill_tokens_while_decoding == engine_config.CPU_PREFILL_TOKENS_WHILE_DECODING == 256
    assert EngineConfig(device="cuda").max_prefill_tokens_while_decoding == 2048  # the whole budget: no limit
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    options = engine_options(parser.parse_args(["--max-prefill-tokens-while-decoding", "64"]))
    assert EngineConfig(**options).max_prefill_tokens_while_decoding == 64
    with pytest.raises(ValueError, match="max_prefill_tokens_while_decoding must be at least 1"):
        EngineConfig(max_prefill_tokens_while_decoding=0)


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_pool_is_resident_only_where_written(dtype):
    """A 1 GiB pool (K and V) costs no resident memory until blocks are written, and reads as zeros."""
    before = resident_mib()
    cache = KVCache.allocate(2, (1 << 29) // (4 * 64 * dtype.itemsize * 16), 16, 4, 64, dtype, "cpu")
    assert cache.k.dtype == dtype and cache.k.shape == cache.v.shape and cache.k.is_contiguous()
    assert resident_mib() - before < 32
    cache.k[0, :16 * 1024] = 1.0  # 1024 blocks of layer 0's K
    written = 16 * 1024 * 4 * 64 * dtype.itemsize / (1 << 20)
    assert written - 8 < resident_mib() - before < written + 40
    assert cache.k[1].abs().max() == 0 and cache.v.abs().max() == 0
