"""In-process anchor measurements, run with an anchor's own Python (no lmserve import here).

  gguf-to-hf        --gguf F --out DIR            float32 HF directory from the GGUF (transformers venv)
  vllm-throughput   --model DIR --prompts P.json  vLLM LLM.generate over token-id prompts (vllm venv)
  hf-throughput     --model DIR --prompts P.json  transformers generate, one batch (transformers venv)
  hf-latency        --model DIR --prompts P.json  transformers generate, one prompt at a time: TTFT, TPOT

Prompt files: {"prompts": [[ids]...], "warmup": [[ids]...], "output_len": N}. Greedy, exactly N new tokens.
Results are written as JSON with the field names of `lmserve bench throughput` / `lmserve bench latency`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import threading
import time
from pathlib import Path


class TreeRSS(threading.Thread):
    """Samples the summed RSS of this process and its descendants (vLLM's engine core is a child), MiB."""

    def __init__(self, interval_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.peak_mib = interval_s, 0.0

    @staticmethod
    def _tree_rss_kib() -> int:
        parents: dict[int, int] = {}
        rss: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                pid = int(stat.parent.name)
                parents[pid], rss[pid] = int(fields[1]), int(fields[21]) * 4  # ppid; rss pages of 4 KiB
            except (OSError, IndexError, ValueError):
                continue
        tree, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            parent = frontier.pop()
            for pid, ppid in parents.items():
                if ppid == parent and pid not in tree:
                    tree.add(pid)
                    frontier.append(pid)
        return sum(rss.get(pid, 0) for pid in tree)

    def run(self) -> None:
        while True:
            self.peak_mib = max(self.peak_mib, self._tree_rss_kib() / 1024.0)
            time.sleep(self.interval_s)


def peak_rss_mib(tree: TreeRSS) -> float:
    """The larger of this process's RSS high-water mark and the sampled peak of its process tree, MiB."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, tree.peak_mib)


def throughput_result(elapsed: float, prompt_tokens: int, output_tokens: int, n: int) -> dict:
    return {"elapsed_time": elapsed, "num_requests": n, "total_prompt_tokens": prompt_tokens,
            "total_output_tokens": output_tokens, "total_num_tokens": prompt_tokens + output_tokens,
            "requests_per_second": n / elapsed, "output_tokens_per_second": output_tokens / elapsed,
            "tokens_per_second": (prompt_tokens + output_tokens) / elapsed}


def gguf_to_hf(args: argparse.Namespace) -> dict:
    """transformers loads the GGUF but refuses to save it: rebuild a plain model, copy the weights, re-tie, save."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(args.gguf)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(args.out)
    config_path = Path(args.out) / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)  # these are plain float32 weights now, not GGUF blocks
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(args.out)
    return {"out": args.out}


def vllm_throughput(args: argparse.Namespace, spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, enable_prefix_caching=False, seed=0,
              max_num_seqs=max(256, len(spec["prompts"])), max_model_len=args.max_model_len)
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)
    warm = [{"prompt_token_ids": p} for p in spec["warmup"]]
    if warm:
        llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = throughput_result(elapsed, sum(len(p) for p in spec["prompts"]), out_tokens, len(outputs))
    del llm
    return result


def _hf_model(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()


def _generate(model, prompts: list[list[int]], n: int, streamer=None):
    import torch

    ids = torch.tensor(prompts)
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, streamer=streamer, pad_token_id=0)


def hf_throughput(args: argparse.Namespace, spec: dict) -> dict:
    model = _hf_model(args)
    if spec["warmup"]:
        _generate(model, spec["warmup"], 4)
    prompts = spec["prompts"]
    if len({len(p) for p in prompts}) != 1:
        raise SystemExit("hf-throughput needs prompts of one length (no padding)")
    start = time.perf_counter()
    out = _generate(model, prompts, spec["output_len"])
    elapsed = time.perf_counter() - start
    new = (out.shape[1] - len(prompts[0])) * len(prompts)
    return throughput_result(elapsed, sum(len(p) for p in prompts), new, len(prompts))


class _Clock:
    """A transformers streamer that timestamps every put(): the first is the prompt, then one per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_latency(args: argparse.Namespace, spec: dict) -> dict:
    model = _hf_model(args)
    for p in spec["warmup"]:
        _generate(model, [p], spec["output_len"])
    ttft, tpot, e2el = [], [], []
    for p in spec["prompts"]:
        clock = _Clock()
        start = time.perf_counter()
        _generate(model, [p], spec["output_len"], streamer=clock)
        end = time.perf_counter()
        tokens = clock.times[1:]
        ttft.append((tokens[0] - start) * 1000)
        e2el.append((end - start) * 1000)
        tpot.append((tokens[-1] - tokens[0]) * 1000 / max(1, len(tokens) - 1))
    n_in = len(spec["prompts"][0])
    result = {"input_len": n_in, "output_len": spec["output_len"], "num_iters": len(ttft), "ttft_ms": ttft,
              "tpot_ms": tpot, "e2el_ms": e2el, "prefill_tokens_per_s": [n_in / (t / 1000) for t in ttft],
              "decode_tokens_per_s": [1000 / t for t in tpot]}
    for key in ("ttft_ms", "tpot_ms", "e2el_ms", "prefill_tokens_per_s", "decode_tokens_per_s"):
        result[f"median_{key}"] = statistics.median(result[key])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["gguf-to-hf", "vllm-throughput", "hf-throughput", "hf-latency"])
    parser.add_argument("--gguf")
    parser.add_argument("--out")
    parser.add_argument("--model")
    parser.add_argument("--prompts")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--output-json")
    args = parser.parse_args()
    if args.mode == "gguf-to-hf":
        print(json.dumps(gguf_to_hf(args)))
        return
    spec = json.loads(Path(args.prompts).read_text())
    run = {"vllm-throughput": vllm_throughput, "hf-throughput": hf_throughput, "hf-latency": hf_latency}[args.mode]
    tree = TreeRSS()
    tree.start()
    result = run(args, spec)
    result["peak_rss_mib"] = peak_rss_mib(tree)
    text = json.dumps(result, indent=2)
    if args.output_json:
        Path(args.output_json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
