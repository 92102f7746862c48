"""Does a fast path change what the model says? Perplexity on a fixed text and greedy agreement, against float32.

The reference is the same model in float32 with float weights only (`quantization="none"`); the candidate is the
engine as configured (bf16, or a GGUF's quantized blocks in decode). Both score the text in chunks of
`chunk_tokens`, so a candidate whose fast path only serves small batches (the quantized kernels: at most 32 rows)
is measured on that path, and both generate greedy continuations of windows of the same text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TEXT = Path(__file__).with_name("texts") / "public_domain.txt"


@dataclass
class QualityConfig:
    text_path: str = str(DEFAULT_TEXT)
    max_text_tokens: int = 1024
    chunk_tokens: int = 16       # prefill chunk: the step shape the text is scored in
    num_prompts: int = 8         # greedy continuations, from evenly spaced windows of the text
    prompt_len: int = 32
    output_len: int = 32


def _score(llm: Any, text_ids: list[int], prompts: list[list[int]], output_len: int) -> tuple[float, list[list[int]]]:
    """(perplexity of text_ids, greedy continuations of prompts)."""
    from lmserve.sampling_params import SamplingParams

    scored = llm.generate([{"prompt_token_ids": text_ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                          use_tqdm=False)[0]
    logprobs = [entry[token].logprob for token, entry in zip(text_ids[1:], scored.prompt_logprobs[1:], strict=True)]
    greedy = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    return math.exp(-sum(logprobs) / len(logprobs)), [list(o.outputs[0].token_ids) for o in outputs]


def run_quality(engine_options: dict[str, Any], cfg: QualityConfig) -> dict[str, Any]:
    from lmserve.layers.linear import Linear
    from lmserve.llm import LLM

    shared = {**engine_options, "max_num_batched_tokens": cfg.chunk_tokens, "enable_prefix_caching": False}
    reference = LLM(**{**shared, "dtype": "float32", "quantization": "none", "kv_cache_dtype": "float32"})
    text_ids = reference.get_tokenizer().encode(Path(cfg.text_path).read_text(encoding="utf-8"))
    text_ids = text_ids[: cfg.max_text_tokens]
    if len(text_ids) < cfg.prompt_len + 2:
        raise ValueError(f"text_path: {cfg.text_path} has {len(text_ids)} tokens; need more than {cfg.prompt_len + 1}")
    stride = max(1, (len(text_ids) - cfg.prompt_len) // cfg.num_prompts)
    prompts = [text_ids[i * stride: i * stride + cfg.prompt_len] for i in range(cfg.num_prompts)]
    ref_ppl, ref_out = _score(reference, text_ids, prompts, cfg.output_len)
    del reference
    candidate = LLM(**shared)
    ppl, out = _score(candidate, text_ids, prompts, cfg.output_len)
    lm = candidate.engine.lm
    # a decoder layer's form, and the LM head's apart: int8 paths and tied embeddings may leave it in another
    linear_form = next(m.weight_form for m in lm.model.layers.modules() if isinstance(m, Linear))
    agreeing = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
                for x, y in zip(out, ref_out, strict=True)]
    return {
        "text_path": cfg.text_path, "text_tokens": len(text_ids), "chunk_tokens": cfg.chunk_tokens,
        "candidate": {"dtype": str(lm.dtype).removeprefix("torch."), "quantized_types": list(lm.quantized_types),
                      "linear_weights": linear_form, "lm_head_weights": lm.model.lm_head.weight_form,
                      "kv_cache": str(candidate.engine.runner.kv_cache.k.dtype).removeprefix("torch.")},
        "reference_perplexity": ref_ppl, "perplexity": ppl, "perplexity_delta_pct": 100 * (ppl / ref_ppl - 1),
        "greedy_identical": sum(n == cfg.output_len for n in agreeing) / len(agreeing),
        "greedy_agreeing_prefix": sum(agreeing) / (len(agreeing) * cfg.output_len),
        "num_prompts": cfg.num_prompts, "output_len": cfg.output_len,
    }


def format_quality(r: dict[str, Any]) -> str:
    c = r["candidate"]
    fast = c["dtype"]
    if c["linear_weights"] != c["dtype"]:
        fast += f", decoder linears on {c['linear_weights']}"
    if c.get("lm_head_weights", c["dtype"]) != c["dtype"]:
        fast += f", LM head on {c['lm_head_weights']}"
    fast += f" (GGUF blocks: {'/'.join(c['quantized_types'])})" if c["quantized_types"] else ""
    if c.get("kv_cache", c["dtype"]) != c["dtype"]:
        fast += f", {c['kv_cache']} KV cache"
    return "\n".join([
        f"Quality of {fast} against float32 ({r['text_tokens']} tokens scored in chunks of {r['chunk_tokens']}):",
        f"  perplexity:            {r['perplexity']:.4f} vs {r['reference_perplexity']:.4f} "
        f"({r['perplexity_delta_pct']:+.3f}%)",
        f"  greedy, identical:     {100 * r['greedy_identical']:.0f}% of {r['num_prompts']} continuations "
        f"of {r['output_len']} tokens",
        f"  greedy, agreeing part: {100 * r['greedy_agreeing_prefix']:.1f}% of tokens before the first difference",
    ])
