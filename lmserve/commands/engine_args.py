"""Engine options on the command line, in vLLM's spelling, shared by every command that runs a model."""

from __future__ import annotations

import argparse
from typing import Any

from lmserve.engine.config import KV_CACHE_DTYPES
from lmserve.weights.resolve import DEFAULT_MODEL


def add_engine_args(parser: argparse.ArgumentParser, positional_model: bool = False) -> None:
    if positional_model:
        parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                            help=f"directory, .gguf file or bundled model name (default: {DEFAULT_MODEL})")
    else:
        parser.add_argument("--model", default=DEFAULT_MODEL, help="directory, .gguf file or bundled model name")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path, when not the model's own")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on hardware with fast bf16 (AVX512-BF16, AMX, recent GPUs), else float32 "
                             "(and float32 for a GGUF whose Q4_0/Q4_1/Q8_0 blocks the CPU kernels read)")
    parser.add_argument("--quantization", default=None, choices=["auto", "none", "int8"],
                        help="auto (default): a GGUF's Q4_0/Q4_1/Q8_0 blocks through lmserve's AVX2 kernels, "
                             "inputs rounded to int16 (float32 within ~1e-4): Q4 blocks for every product where "
                             "the float weights stay float32, else for decode; none: float weights only; int8: "
                             "the decoder layers' products in int8 (a GGUF's Q4_0/Q4_1 blocks as they are, inputs "
                             "rounded per block of 32, like llama.cpp; other models on CPUs with AVX512-VNNI: "
                             "weights and inputs rounded per group of 64; lossy, see `lmserve bench quality "
                             "--quantization int8`)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=list(KV_CACHE_DTYPES),
                        help="dtype the KV cache stores (default auto: the activations'); float16 under float32 "
                             "activations halves the cache's memory and what decode attention reads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-prefill-tokens-while-decoding", type=int, default=None,
                        help="prompt tokens a step takes while other sequences decode, which bounds how long a burst "
                             "of new prompts delays each stream's next token (default 256 on the CPU; the whole "
                             "--max-num-batched-tokens turns it off)")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="exact KV pool size in blocks")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=None, help="KV cache budget in GiB")
    parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                        default=None)
    parser.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default=None)


_OPTIONS = ["model", "tokenizer", "dtype", "quantization", "kv_cache_dtype", "device", "max_model_len", "max_num_seqs",
            "max_num_batched_tokens", "max_prefill_tokens_while_decoding", "block_size", "num_kv_blocks",
            "kv_cache_memory_gb", "enable_prefix_caching", "scheduling_policy"]


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig keyword arguments the user actually gave (the rest keep the engine's defaults)."""
    return {name: getattr(args, name) for name in _OPTIONS if getattr(args, name, None) is not None}
