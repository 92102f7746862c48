#!/usr/bin/env python
"""Where the time of one decode step goes, by part: the layer stack run in one C call (fused), linear layers and
attention (KV store included) run from torch, the other layer ops, the LM head, sampling, and the engine's host
work (scheduling, metadata, detokenizing); then, for the fused layers, each op of a layer (summed over layers).

  .venv/bin/python benchmarks/step_profile.py --batch 1 32             # lmserve as it runs by default
  .venv/bin/python benchmarks/step_profile.py --batch 8 --prefill      # steps that prefill 8 prompts at once
  LMSERVE_NATIVE_KERNELS=0 .venv/bin/python benchmarks/step_profile.py --quantization none   # torch-only path

Steady state: `batch` requests with 128-token prompts are prefilled first, then `--steps` decode steps are timed;
the median step and the median of each part over those steps are printed as a markdown table row. With --prefill,
each timed step prefills `batch` new prompts (removed again after it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import lmserve.layers.self_attention as self_attention
import lmserve.models.llama as llama
from lmserve.kernels import native
from lmserve.layers.linear import Linear
from lmserve.llm import LLM
from lmserve.sampling_params import SamplingParams

PARTS = ("fused layers", "linears", "attention", "other layer ops", "LM head", "sampling", "host")


def timed(spent: dict[str, float], part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - start
    return wrapper


def instrument_layers(spent: dict[str, float]) -> None:
    Linear.forward = timed(spent, "linears", Linear.forward)
    self_attention.paged_attention = timed(spent, "attention", self_attention.paged_attention)
    llama.fused_llama_layers = timed(spent, "fused layers", llama.fused_llama_layers)


def add_prompts(llm: LLM, names: list[str], max_tokens: int) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for name in names:
        seed = sum(map(ord, name))
        llm.engine.add_request(name, {"prompt_token_ids": [1000 + (seed * 7 + j) % 30000 for j in range(128)]}, params)


def profile(llm: LLM, spent: dict[str, float], batch: int, steps: int, prefill: bool) -> dict[str, float]:
    runner = llm.engine.runner
    runner.sampler = timed(spent, "sampling", runner.sampler)
    runner.lm.model.forward = timed(spent, "forward", runner.lm.model.forward)
    runner.lm.model.compute_logits = timed(spent, "lm head", runner.lm.model.compute_logits)
    head = runner.lm.model.lm_head
    head.forward = timed(spent, "head linear", head.forward)  # Linear.forward counts it too: taken out again
    if not prefill:
        add_prompts(llm, [f"r{i}" for i in range(batch)], steps + 16)
        while llm.engine.scheduler.waiting or any(s.num_computed_tokens < len(s.prompt_token_ids)
                                                      for s in llm.engine.scheduler.running):
            llm.engine.step()
    rows: list[dict[str, float]] = []
    with native.timed_layer_ops() if native.kernels_available() else nullcontext() as op_seconds:
        for step in range(steps):
            names = [f"p{step}-{i}" for i in range(batch)]
            if prefill:
                add_prompts(llm, names, 1)
            spent.clear()
            if op_seconds is not None:
                op_seconds.zero_()
            start = time.perf_counter()
            llm.engine.step()
            total = time.perf_counter() - start
            if prefill:
                for name in names:
                    llm.engine.abort_request(name)
            layer_linears = spent["linears"] - spent["head linear"]
            layer_ops = spent["forward"] - spent["fused layers"] - layer_linears - spent["attention"]
            ops = {} if op_seconds is None else {f"op {op}": t for op, t in zip(native.LAYER_OPS, op_seconds.tolist(),
                                                                                    strict=True)}
            rows.append({"step": total, "fused layers": spent["fused layers"], "linears": layer_linears,
                         "attention": spent["attention"], "other layer ops": layer_ops, "LM head": spent["lm head"],
                         "sampling": spent["sampling"],
                         "host": total - spent["forward"] - spent["lm head"] - spent["sampling"], **ops})
    return {key: statistics.median(r[key] for r in rows) * 1000 for key in rows[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--quantization", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--label", default="lmserve")
    p.add_argument("--prefill", action="store_true", help="time steps that prefill `batch` new 128-token prompts")
    args = p.parse_args()
    results = []
    spent: dict[str, float] = defaultdict(float)
    instrument_layers(spent)
    for batch in args.batch:
        llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                  kv_cache_memory_gb=1, enable_prefix_caching=False)
        results.append((batch, profile(llm, spent, batch, args.steps, args.prefill)))
        del llm
    seqs = "prompts" if args.prefill else "seqs"
    print(f"| path | {seqs} | step ms | " + " | ".join(f"{part} ms" for part in PARTS) + " |")
    print("|---|---|---|" + "---|" * len(PARTS))
    for batch, r in results:
        parts = " | ".join(f"{r[part]:.1f} ({100 * r[part] / r['step']:.0f}%)" for part in PARTS)
        print(f"| {args.label} | {batch} | {r['step']:.1f} | {parts} |")
    if any(f"op {native.LAYER_OPS[0]}" in r for _, r in results):
        print(f"\n| fused layers, by op | {seqs} | " + " | ".join(f"{op} ms" for op in native.LAYER_OPS) + " |")
        print("|---|---|" + "---|" * len(native.LAYER_OPS))
        for batch, r in results:
            print(f"| {args.label} | {batch} | " + " | ".join(f"{r['op ' + op]:.1f}" for op in native.LAYER_OPS) + " |")


if __name__ == "__main__":
    main()
