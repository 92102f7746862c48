"""The side-by-side workloads (W1-W4), how each engine runs each one, and the figures kept from each run."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anchors import Anchors
from servers import ServerSpec

ENGINES = ("lmserve", "transformers", "llamacpp", "vllm")
VENV_BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
PORTS = {"lmserve": 8101, "lmserve-cache": 8102, "vllm": 8103, "llamacpp-q4_1": 8104, "llamacpp-f16": 8105,
         "lmserve-int8": 8106}
INT8_ARGS = ["--quantization", "int8"]  # the lmserve-int8 variant (side_by_side.py --lmserve-int8)
SLOT_CTX = 640  # llama-server context per slot: the longest workload (512 + 32 + 64) fits


@dataclass(frozen=True)
class Workload:
    name: str
    template: str          # the title, from the sizes below
    num_prompts: int
    input_len: int
    output_len: int
    concurrency: int
    prefix_len: int = 0
    warmup: int = 2
    figures: tuple[tuple[str, str, bool], ...] = ()   # (key, label, higher is better)
    headline: str = ""

    @property
    def title(self) -> str:
        return self.template.format(**self.__dict__)

    def smoke(self) -> Workload:
        small = dict(num_prompts=min(4, self.num_prompts), input_len=16, output_len=8 if self.name != "W3" else 16,
                     concurrency=min(4, self.concurrency), prefix_len=64 if self.prefix_len else 0, warmup=1)
        return Workload(**{**self.__dict__, **small})


THROUGHPUT = (("output_tok_s", "output tok/s", True), ("total_tok_s", "total tok/s", True))
WORKLOADS = {
    "W1": Workload("W1", "offline, {num_prompts} prompts x ({input_len} -> {output_len})", 64, 128, 128, 64,
                   figures=(*THROUGHPUT, ("wall_s", "wall s", False), ("peak_rss_mib", "peak RSS MiB", False)),
                   headline="output_tok_s"),
    "W2": Workload("W2", "online, {concurrency} concurrent streams x ({input_len} -> {output_len})", 32, 128, 128, 32,
                   figures=(THROUGHPUT[0], ("ttft_ms", "mean TTFT ms", False), ("tpot_ms", "mean TPOT ms", False),
                            ("itl_p99_ms", "p99 ITL ms", False)), headline="output_tok_s"),
    "W3": Workload("W3", "single stream, {input_len} -> {output_len} ({num_prompts} requests a repeat)",
                   3, 128, 256, 1, warmup=1,
                   figures=(("ttft_ms", "TTFT ms", False), ("tpot_ms", "TPOT ms", False),
                            ("decode_tok_s", "decode tok/s", True)), headline="tpot_ms"),
    "W4": Workload("W4", "shared prefix: {num_prompts} requests = {prefix_len}-token system prompt + {input_len} "
                   "own -> {output_len}, {concurrency} concurrent", 32, 32, 64, 32,
                   prefix_len=512, warmup=1,
                   figures=(("ttft_ms", "mean TTFT ms", False), ("ttft_median_ms", "median TTFT ms", False),
                            THROUGHPUT[0]), headline="ttft_ms"),
}


@dataclass
class Plan:
    """One measured run: a workload, an engine variant (label), a repeat."""

    workload: Workload
    engine: str
    label: str
    repeat: int
    kind: str              # offline | serve | latency
    how: str
    dtype: str
    anchors: Anchors
    args: Any
    server: ServerSpec | None = None

    @property
    def seed(self) -> int:
        return 1000 * (self.repeat + 1) + int(self.workload.name[1:])

    def write_prompts(self, directory: Path) -> Path:
        """The repeat's token-id prompts (the serve client makes the same ones from the same seed)."""
        from lmserve.bench.datasets import random_prompts, special_token_ids
        from lmserve.weights.tokenizer import load_tokenizer

        path = directory.parent / "prompts" / f"r{self.repeat}.json"
        if not path.is_file():
            tok = load_tokenizer(self.anchors.gguf_q4_1)
            w = self.workload
            prompts = random_prompts(w.num_prompts, w.input_len, w.output_len, tok.vocab_size,
                                     special_token_ids(tok), self.seed)
            warm = random_prompts(w.warmup, w.input_len, w.output_len, tok.vocab_size, special_token_ids(tok),
                                  self.seed + 500)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"prompts": [p.prompt for p in prompts], "warmup": [p.prompt for p in warm],
                                        "output_len": w.output_len}))
            path.with_suffix(".jsonl").write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in prompts))
        return path

    def command(self, prompts: Path, raw: Path, base_url: str | None) -> tuple[list[str], dict[str, str]]:
        w, a = self.workload, self.anchors
        if self.kind == "serve":
            argv = [str(VENV_BIN / "lmserve"), "bench", "serve", "--base-url", base_url, "--tokenizer",
                    str(a.gguf_q4_1), "--num-prompts", str(w.num_prompts), "--input-len", str(w.input_len),
                    "--output-len", str(w.output_len), "--max-concurrency", str(w.concurrency),
                    "--warmup-requests", str(w.warmup), "--seed", str(self.seed), "--disable-tqdm",
                    "--output-json", str(raw)]
            if w.prefix_len:
                argv += ["--dataset-name", "shared-prefix", "--prefix-len", str(w.prefix_len)]
            return argv, {}
        if self.engine == "lmserve":
            return [str(VENV_BIN / "lmserve"), "bench", "throughput", "--model", str(a.gguf_q4_1),
                    *shlex.split(self.args.lmserve_args), *(INT8_ARGS if self.label == "lmserve-int8" else []),
                    "--no-enable-prefix-caching",
                    "--dataset-path", str(prompts.with_suffix(".jsonl")), "--num-prompts", str(w.num_prompts),
                    "--output-len", str(w.output_len), "--disable-tqdm", "--output-json", str(raw)], {}
        mode = {"vllm": "vllm-throughput", "transformers": "hf-throughput" if self.kind == "offline" else "hf-latency"}
        env = VLLM_ENV if self.engine == "vllm" else {}
        return [str(a.python(self.engine)), str(HERE / "offline_anchor.py"), mode[self.engine], "--model",
                str(a.hf_dir), "--prompts", str(prompts), "--dtype", self.dtype, "--output-json", str(raw)], env


def _server(label: str, args: Any, anchors: Anchors, smoke: bool) -> ServerSpec:
    port = PORTS[label]
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if label.startswith("lmserve"):
        caching = [] if label == "lmserve-cache" else ["--no-enable-prefix-caching"]
        int8 = INT8_ARGS if label == "lmserve-int8" else []
        return ServerSpec(label, [str(VENV_BIN / "lmserve"), "serve", str(anchors.gguf_q4_1),
                                  *shlex.split(args.lmserve_args), *int8, *caching, *host], port)
    if label == "vllm":
        return ServerSpec(label, [str(anchors.python("vllm").parent / "vllm"), "serve", str(anchors.hf_dir),
                                  "--dtype", args.vllm_dtype, "--max-model-len", "2048",
                                  "--no-enable-prefix-caching", *host], port, dict(VLLM_ENV))
    slots = 8 if smoke else 64
    gguf = anchors.gguf_q4_1 if label.endswith("q4_1") else anchors.gguf_f16
    return ServerSpec(label, [str(anchors.llama_server), "-m", str(gguf), *host, "-np", str(slots), "-c",
                              str(slots * SLOT_CTX), "-cb", "--no-cache-prompt", "-cram", "0", "-t", "2",
                              *shlex.split(args.llamacpp_args)], port)


def lmserve_weights(model: str, lm_args: list[str]) -> str:
    """What lmserve will really run `model` in with these options on this machine (its `auto` choices resolved)."""
    import torch

    from lmserve.kernels.block_tiles import block_tiles_on_vnni
    from lmserve.kernels.native import best_bf16_kernel, kernels_available
    from lmserve.layers.linear import MAX_QUANTIZED_ROWS_OVER_TILES
    from lmserve.loader import has_q4_blocks, resolve_dtype
    from lmserve.platform import has_fast_bf16

    def option(name: str) -> str:
        return lm_args[lm_args.index(name) + 1] if name in lm_args[:-1] else "auto"

    quantization, dtype_option = option("--quantization"), option("--dtype")
    dtype = str(resolve_dtype(model, dtype_option, quantization=quantization)).removeprefix("torch.")
    vnni = ", AVX512-VNNI" if block_tiles_on_vnni() else ""
    if quantization == "int8" and not has_q4_blocks(model):
        return (f"float32; int8 products (VNNI, per 64 inputs) from 2 rows, blocks at 1, LM head "
                f"{'bf16 tiles' if has_fast_bf16(torch.device('cpu')) else 'Q8_0 blocks x int16'}; KV float16")
    if quantization == "int8":
        return (f"float32; Q4_1 blocks x int8 inputs (per 32{vnni}) at every row count, LM head Q8_0 blocks x "
                "int16; KV float16")
    if not (quantization == "auto" and dtype == "float32" and kernels_available()):
        return dtype
    kv = "float16" if option("--kv-cache-dtype") == "auto" and dtype_option == "auto" else "as asked"
    if dtype_option == "auto" and has_fast_bf16(torch.device("cpu")):
        tiles = f"bf16 tiles ({best_bf16_kernel().name})"
        return f"float32; Q4_1 blocks up to {MAX_QUANTIZED_ROWS_OVER_TILES} row, {tiles} above; KV {kv}"
    return (f"float32; Q4_1 blocks x int16 inputs (per 32{vnni}) at every row count, LM head Q8_0 blocks x int16; "
            f"KV {kv}")


def plan_runs(workload: Workload, args: Any, anchors: Anchors, failures: dict[str, str]) -> list[Plan]:
    """Every run of `workload` for the selected engines, repeats outermost (A B C A B C ...)."""
    w = workload.smoke() if args.smoke else workload
    variants: list[tuple[str, str, str, str, str]] = []   # engine, label, kind, how, dtype
    lm_dtype = lmserve_weights(str(anchors.gguf_q4_1), shlex.split(args.lmserve_args))
    for engine in args.engines:
        if engine != "lmserve":
            status = anchors.status(engine)
            if not status.get("ok"):
                failures.setdefault(engine, f"not set up: {status.get('reason')}")
                continue
        if engine == "lmserve":
            if w.name == "W1":
                variants.append((engine, "lmserve", "offline", "LLM.generate (bench throughput)", lm_dtype))
            elif w.name == "W4":
                variants.append((engine, "lmserve-cache", "serve", "lmserve serve, prefix cache on", lm_dtype))
                variants.append((engine, "lmserve", "serve", "lmserve serve, prefix cache off", lm_dtype))
            else:
                variants.append((engine, "lmserve", "serve", "lmserve serve, prefix cache off", lm_dtype))
            if args.lmserve_int8 and w.name != "W4":
                int8_dtype = lmserve_weights(str(anchors.gguf_q4_1), [*shlex.split(args.lmserve_args), *INT8_ARGS])
                how = "LLM.generate (bench throughput)" if w.name == "W1" else "lmserve serve, prefix cache off"
                variants.append((engine, "lmserve-int8", "offline" if w.name == "W1" else "serve",
                                 f"{how}, --quantization int8", int8_dtype))
        elif engine == "vllm":
            how = "LLM.generate" if w.name == "W1" else "vllm serve, prefix cache off"
            variants.append((engine, "vllm", "offline" if w.name == "W1" else "serve", how, args.vllm_dtype))
        elif engine == "transformers":
            if w.name in ("W1", "W3"):
                kind = "offline" if w.name == "W1" else "latency"
                how = "generate, one batch" if kind == "offline" else "generate, in process (no HTTP)"
                variants.append((engine, "transformers", kind, how, args.hf_dtype))
        else:
            for weights in [x.strip().lower() for x in args.llamacpp_weights.split(",") if x.strip()]:
                streams = f"{w.concurrency} stream" + ("s" if w.concurrency > 1 else "")
                how = f"llama-server, {streams}" + (" (no offline API)" if w.name == "W1" else "")
                variants.append((engine, f"llamacpp-{weights}", "serve", how, weights.upper()))
    plans = []
    for repeat in range(args.repeats):
        for engine, label, kind, how, dtype in variants:
            server = _server(label, args, anchors, args.smoke) if kind == "serve" else None
            plans.append(Plan(w, engine, label, repeat, kind, how, dtype, anchors, args, server))
    return plans


def normalise(kind: str, raw: dict[str, Any]) -> dict[str, float]:
    """The figures the report compares, from `bench throughput`, `bench serve` or anchor JSON."""
    if kind == "offline":
        return {"output_tok_s": raw["output_tokens_per_second"], "total_tok_s": raw["tokens_per_second"],
                "req_s": raw["requests_per_second"], "wall_s": raw["elapsed_time"],
                "peak_rss_mib": raw.get("peak_rss_mib")}
    if kind == "latency":
        tpot = raw["median_tpot_ms"]
        return {"ttft_ms": raw["median_ttft_ms"], "tpot_ms": tpot, "decode_tok_s": 1000.0 / tpot if tpot else 0.0,
                "prefill_tok_s": raw["median_prefill_tokens_per_s"]}
    tpot = raw["mean_tpot_ms"]
    return {"output_tok_s": raw["output_throughput"], "total_tok_s": raw["total_token_throughput"],
            "req_s": raw["request_throughput"], "ttft_ms": raw["mean_ttft_ms"], "ttft_median_ms": raw["median_ttft_ms"],
            "tpot_ms": tpot, "itl_p99_ms": raw["p99_itl_ms"], "e2el_ms": raw["mean_e2el_ms"],
            "decode_tok_s": 1000.0 / tpot if tpot else 0.0, "wall_s": raw["duration"], "failed": raw["failed"]}
