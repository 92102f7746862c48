"""The bundled SmolLM2-135M-Instruct GGUF, loaded by lmserve and by transformers' own GGUF loader, agrees:
fp32 logits, greedy continuations (through the engine, under chunked prefill), and a sensible chat reply."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import openai
import pytest
import torch
import transformers
from model_helpers import prompt_logits
from server_helpers import wait_healthy

from lmserve.kernels.native import kernels_available
from lmserve.llm import LLM
from lmserve.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a land far away,",
           "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                              dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m-instruct", dtype="float32", max_num_batched_tokens=7, num_kv_blocks=64)


@pytest.fixture(scope="module")
def prompt_ids(reference):
    _, tokenizer = reference
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def reference_greedy(reference, prompt_ids):
    model, _ = reference
    outputs = []
    for ids in prompt_ids:
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        outputs.append(out[0, len(ids):].tolist())
    return outputs


def test_logits_match_transformers_gguf_loader(reference, prompt_ids, llm):
    model, _ = reference
    ours = prompt_logits(llm.engine.lm, prompt_ids)
    for ids, logits in zip(prompt_ids, ours, strict=True):
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0]
        # Every product rounds its inputs to int16 per block of 32 (~6e-5 of a product's norm on these layers):
        # through 30 layers and over 49152 logits of magnitude ~15 that reaches ~0.02; a wrong product is off by
        # whole units.
        assert (logits - expected).abs().max().item() < 0.05


def test_engine_greedy_with_chunked_prefill_matches(llm, prompt_ids, reference_greedy):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference_greedy
    assert llm.engine.stats().kv_blocks_used == 0


def test_chat_reply_mentions_paris(llm):
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                     SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert "Paris" in reply.text and reply.finish_reason == "stop"


def test_readme_main_command_serves_the_default_model(tmp_path):
    """`lmserve serve` with no arguments: the default model behind the OpenAI API, answering, then a clean exit."""
    command = [sys.executable, "-m", "lmserve.cli", "serve", "--port", "0"]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            base_url = wait_for_listening(log, process)
            wait_healthy(base_url, 300, process)
            client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
            question = [{"role": "user", "content": "What is the capital of France?"}]
            reply = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=24,
                                                   messages=question)
            assert "Paris" in reply.choices[0].message.content
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0
        finally:
            if process.poll() is None:
                process.kill()


def wait_for_listening(log, process, timeout: float = 300.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", log.read_text(errors="replace"))
        if match:
            return match.group(1)
        time.sleep(0.2)
    raise AssertionError(f"lmserve serve did not start:\n{log.read_text(errors='replace')[-2000:]}")


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "float16"])
def test_bench_quality_shows_decode_kernels_keep_the_model_output(tmp_path, kv_cache_dtype):
    """`lmserve bench quality`: the GGUF's Q4_1/Q8_0 blocks in decode (and bf16 linear weights on bf16 CPUs, and a
    float16 KV cache when asked) against float32 weights and cache, end to end."""
    out = tmp_path / "quality.json"
    subprocess.run([sys.executable, "-m", "lmserve.cli", "bench", "quality", "--max-text-tokens", "256",
                    "--num-prompts", "4", "--output-len", "16", "--kv-cache-dtype", kv_cache_dtype,
                    "--output-json", str(out)], check=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["candidate"]["kv_cache"] == ("float16" if kv_cache_dtype == "float16" or kernels_available()
                                               else "float32")  # auto: float16 where the C attention reads it
    if kernels_available():
        assert result["candidate"]["quantized_types"] == ["Q4_1", "Q8_0"]
    assert result["text_tokens"] == 256
    # blocks by int16 inputs: float noise; with bf16 linear weights (bf16 CPUs): the bf16 bound
    bf16 = result["candidate"]["linear_weights"].startswith("bfloat16")
    assert abs(result["perplexity_delta_pct"]) < (1.0 if bf16 else 0.1)
    if kernels_available() and not bf16:  # the tied LM head's products on the embedding's Q8_0 blocks as tiles
        assert result["candidate"]["lm_head_weights"] == "Q8_0 x int16 inputs"
    assert result["greedy_agreeing_prefix"] >= 0.9
