"""`lmserve bench throughput | serve | latency | quality`: offline throughput, online serving load, single-stream
latency, and whether a fast path (bf16, quantized kernels) changes the model's output."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from lmserve.commands.engine_args import add_engine_args, engine_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmark throughput, serving latency or single-stream latency")
    kinds = parser.add_subparsers(dest="bench_command", required=True)

    p = kinds.add_parser("throughput", help="offline: N prompts at once on the in-process engine")
    add_engine_args(p)
    _workload_args(p, num_prompts=64)
    p.add_argument("--dataset-path", default=None, help="prompt file (one a line, or JSONL with \"prompt\")")
    p.add_argument("--num-warmup-prompts", type=int, default=4, help="short untimed batch first (default 4)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    _common_args(p)

    p = kinds.add_parser("latency", help="one stream at a time on the in-process engine: TTFT, prefill, TPOT")
    add_engine_args(p)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters", type=int, default=5, help="timed requests (default 5)")
    p.add_argument("--num-iters-warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)

    p = kinds.add_parser("quality", help="perplexity and greedy agreement of the configured engine vs float32")
    add_engine_args(p)
    p.add_argument("--text-path", default=None, help="text to score (default: a bundled public-domain text)")
    p.add_argument("--max-text-tokens", type=int, default=1024)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--output-json", default=None)

    p = kinds.add_parser("serve", help="load-test an OpenAI-compatible /v1/completions server (streaming)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--tokenizer", default=None,
                   help="local tokenizer for random prompts (default: --model, if it names a local model)")
    p.add_argument("--vocab-size", type=int, default=None, help="sample random ids below this, without a tokenizer")
    p.add_argument("--dataset-name", choices=["random", "shared-prefix"], default="random")
    _workload_args(p, num_prompts=32)
    p.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens of the common prefix")
    p.add_argument("--prompt-format", choices=["ids", "text"], default="ids",
                   help="send token ids (default, exact lengths) or their decoded text")
    p.add_argument("--max-concurrency", type=int, nargs="+", default=None,
                   help="cap on requests in flight; several values run one benchmark each")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default inf)")
    p.add_argument("--warmup-requests", type=int, default=1, help="untimed requests first (default 1)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--percentiles", type=float, nargs="+", default=[99.0], help="extra percentiles (default 99)")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--plot", default=None, help="write a PNG of latency distributions (and throughput)")
    _common_args(p)


def _workload_args(p: argparse.ArgumentParser, num_prompts: int) -> None:
    p.add_argument("--num-prompts", type=int, default=num_prompts)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --output-len tokens (default on)")
    p.add_argument("--seed", type=int, default=0)


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-json", default=None, help="write the results here")
    p.add_argument("--disable-tqdm", action="store_true")


def run(args: argparse.Namespace) -> int:
    commands = {"throughput": _throughput, "latency": _latency, "serve": _serve, "quality": _quality}
    return commands[args.bench_command](args)


def _write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {path}")


def _throughput(args: argparse.Namespace) -> int:
    from lmserve.bench.throughput import ThroughputConfig, format_throughput, run_throughput
    from lmserve.llm import LLM

    cfg = ThroughputConfig(args.num_prompts, args.input_len, args.output_len, args.dataset_path,
                           args.num_warmup_prompts, args.temperature, args.ignore_eos, args.seed)
    options = engine_options(args)
    llm = LLM(**options)
    result = run_throughput(llm, cfg, use_tqdm=not args.disable_tqdm)
    result["config"] = {**vars(cfg), "engine": options}
    print(format_throughput(result))
    _write_json(args.output_json, result)
    return 0


def _latency(args: argparse.Namespace) -> int:
    from lmserve.bench.latency import LatencyConfig, format_latency, run_latency
    from lmserve.llm import LLM

    cfg = LatencyConfig(args.input_len, args.output_len, args.num_iters, args.num_iters_warmup, args.seed)
    options = engine_options(args)
    llm = LLM(**options)
    result = run_latency(llm, cfg)
    result["config"] = {**vars(cfg), "engine": options}
    print(format_latency(result))
    _write_json(args.output_json, result)
    return 0


def _quality(args: argparse.Namespace) -> int:
    from lmserve.bench.quality import QualityConfig, format_quality, run_quality

    cfg = QualityConfig(max_text_tokens=args.max_text_tokens, num_prompts=args.num_prompts,
                        output_len=args.output_len)
    if args.text_path:
        cfg.text_path = args.text_path
    result = run_quality(engine_options(args), cfg)
    print(format_quality(result))
    _write_json(args.output_json, result)
    return 0


def _serve_tokenizer(args: argparse.Namespace):
    from lmserve.weights.errors import ModelLoadError
    from lmserve.weights.resolve import resolve_model_path
    from lmserve.weights.tokenizer import load_tokenizer

    name = args.tokenizer or args.model
    if name is None:
        return None
    try:
        return load_tokenizer(resolve_model_path(name))
    except ModelLoadError as e:
        if args.tokenizer or args.prompt_format == "text" or args.vocab_size is None:
            raise ModelLoadError(f"bench serve needs a local tokenizer for its prompts ({e}); pass --tokenizer "
                                 "PATH (a model directory, tokenizer.json or .gguf), or --vocab-size N for token ids",
                                 ) from None
        return None


def _serve_prompts(args: argparse.Namespace, tokenizer: Any, seed: int, num: int):
    from lmserve.bench import datasets

    if tokenizer is not None:
        vocab = args.vocab_size or tokenizer.vocab_size
        special = datasets.special_token_ids(tokenizer)
    elif args.vocab_size:
        vocab, special = args.vocab_size, set()
    else:
        raise ValueError("random prompts need a vocabulary: pass --tokenizer (or a local --model) or --vocab-size")
    if args.dataset_name == "shared-prefix":
        prompts = datasets.shared_prefix_prompts(num, args.prefix_len, args.input_len, args.output_len, vocab,
                                                 special, seed)
    else:
        prompts = datasets.random_prompts(num, args.input_len, args.output_len, vocab, special, seed)
    if args.prompt_format == "text":
        prompts = datasets.as_text(prompts, tokenizer)
    return prompts


def _serve(args: argparse.Namespace) -> int:
    from lmserve.bench import metrics, plots
    from lmserve.bench.serve_client import ServeConfig, discover_model, run_serve_benchmark

    slos = metrics.parse_goodput(args.goodput)
    bad = [q for q in args.percentiles if not 0 <= q <= 100]
    if bad:
        raise ValueError(f"--percentiles must be in [0, 100], got {bad[0]:g}")
    model = args.model or discover_model(args.base_url)
    args.model = model
    tokenizer = _serve_tokenizer(args)
    runs = []
    for i, concurrency in enumerate(args.max_concurrency or [None]):
        # Fresh prompts for every run, so a server's prefix cache cannot carry one run over into the next.
        seed = args.seed + 1000 * i
        if args.dataset_name == "shared-prefix":  # the warm-up shares the system prompt, as in a real service
            every = _serve_prompts(args, tokenizer, seed, args.warmup_requests + args.num_prompts)
            warmup, prompts = every[: args.warmup_requests], every[args.warmup_requests:]
        else:
            prompts = _serve_prompts(args, tokenizer, seed, args.num_prompts)
            warmup = _serve_prompts(args, tokenizer, seed + 500, args.warmup_requests) if args.warmup_requests else []
        cfg = ServeConfig(args.base_url, model, args.endpoint, concurrency, args.request_rate, seed, args.ignore_eos,
                          args.temperature, timeout_s=args.timeout, disable_tqdm=args.disable_tqdm)
        records, duration = run_serve_benchmark(cfg, prompts, warmup)
        result = metrics.compute_metrics(records, duration, args.percentiles, slos)
        result.update({
            "backend": "openai-completions", "base_url": args.base_url, "model_id": model,
            "dataset_name": args.dataset_name, "num_prompts": args.num_prompts, "input_len": args.input_len,
            "output_len": args.output_len, "prefix_len": args.prefix_len if args.dataset_name != "random" else 0,
            "max_concurrency": concurrency, "request_rate": "inf" if math.isinf(args.request_rate)
            else args.request_rate, "goodput_slos_ms": slos or None,
            "input_lens": [r.prompt_len for r in records], "output_lens": [r.output_tokens for r in records],
            "ttfts": [r.ttft for r in records], "tpots": [r.tpot for r in records],
            "itls": [r.itl for r in records], "e2els": [r.latency for r in records],
            "errors": [r.error for r in records],
        })
        print(format_serve(result, args.percentiles))
        runs.append(result)
        failed = next((r.error for r in records if not r.success), None)
        if failed:
            print(f"first error: {failed}", file=sys.stderr)
    _write_json(args.output_json, runs[0] if len(runs) == 1 else {"runs": runs})
    if args.plot:
        print(f"plot written to {plots.plot_serve(runs, args.plot, title=f'{model} @ {args.base_url}')}")
    return 0 if all(r["completed"] for r in runs) else 1


def format_serve(result: dict[str, Any], percentiles: list[float]) -> str:
    from lmserve.bench.metrics import percentile_name

    conc = result["max_concurrency"]
    lines = [f"{' Serving Benchmark Result ':=^50}",
             f"{'Maximum request concurrency:':<40}{conc if conc else 'unlimited'}",
             f"{'Successful requests:':<40}{result['completed']}",
             f"{'Failed requests:':<40}{result['failed']}",
             f"{'Benchmark duration (s):':<40}{result['duration']:.2f}",
             f"{'Total input tokens:':<40}{result['total_input_tokens']}",
             f"{'Total generated tokens:':<40}{result['total_output_tokens']}",
             f"{'Request throughput (req/s):':<40}{result['request_throughput']:.2f}"]
    if "request_goodput" in result:
        lines.append(f"{'Request goodput (req/s):':<40}{result['request_goodput']:.2f}")
    lines += [f"{'Output token throughput (tok/s):':<40}{result['output_throughput']:.2f}",
              f"{'Total Token throughput (tok/s):':<40}{result['total_token_throughput']:.2f}"]
    for key, name in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                      ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{name:-^50}")
        label = key.upper()
        lines.append(f"{f'Mean {label} (ms):':<40}{result[f'mean_{key}_ms']:.2f}")
        lines.append(f"{f'Median {label} (ms):':<40}{result[f'median_{key}_ms']:.2f}")
        for q in percentiles:
            p = percentile_name(q)
            lines.append(f"{f'{p.upper()} {label} (ms):':<40}{result[f'{p}_{key}_ms']:.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)
