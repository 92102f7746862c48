"""Tiny models written as GGUF (F32, F16, Q8_0, Q4_0, Q4_1) load through lmserve and match transformers running the
same dequantized weights: fp32 logits and greedy tokens. Quantized files also run lmserve's kernels on their blocks
(Q8_0: up to 32 rows, so every decode step; Q4_0/Q4_1: every product, by inputs rounded to int16), so these tests
hold those kernels to the same bar, and `--quantization none` (float weights only) to float32's."""

from __future__ import annotations

import gguf
import pytest
import torch
import transformers
from engine_helpers import reference_greedy
from gguf_export import export_gguf
from model_helpers import prompt_logits, relative_error
from tiny_models import ALL_CONFIGS, make_tiny_model

from lmserve.kernels.native import kernels_available
from lmserve.layers.linear import Linear
from lmserve.llm import LLM
from lmserve.loader import load_model
from lmserve.sampling_params import SamplingParams
from lmserve.weights.gguf_checkpoint import GGUFCheckpoint

PROMPTS = [[5, 17, 33, 9, 100, 200, 3], [8, 9], list(range(10, 60))]
CONFIGS = ["llama-gqa-tied", "llama-mha-untied", "qwen2-bias", "neox-rotary-0.25", "neox-rotary-1.0-sequential"]


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("name", CONFIGS)
def test_gguf_model_matches_transformers(tmp_path, name, qtype):
    original = make_tiny_model(ALL_CONFIGS[name], tmp_path / "hf")
    path = tmp_path / f"tiny-{qtype}.gguf"
    export_gguf(tmp_path / "hf", path, qtype)
    reference = type(original)(original.config).eval()  # the same architecture on the GGUF's dequantized weights
    weights = dict(GGUFCheckpoint(path).tensors(torch.float32))
    if "embed_out.weight" in weights:  # saved files call GPT-NeoX's head embed_out, transformers 5 modules lm_head
        weights["lm_head.weight"] = weights.pop("embed_out.weight")
    missing, unexpected = reference.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert not missing or original.config.tie_word_embeddings
    reference.tie_weights()
    if qtype == "F32":
        assert all(torch.equal(weights[k], v) for k, v in original.state_dict().items() if k not in missing)

    loaded = load_model(str(path), dtype="float32")
    on_blocks = qtype.startswith("Q") and kernels_available()
    if on_blocks:
        assert loaded.quantized_types == (qtype,)
    expected = [reference(torch.tensor([prompt])).logits[0].detach() for prompt in PROMPTS]
    # int16 inputs round each product's x to 1 / 32767 of its block's largest value: ~1e-4 of the logits' scale
    for logits, reference_logits in zip(prompt_logits(loaded, PROMPTS), expected, strict=True):
        assert relative_error(logits, reference_logits) < (5e-4 if on_blocks else 1e-4)
    if on_blocks:
        exact = prompt_logits(load_model(str(path), dtype="float32", quantization="none"), PROMPTS)
        for logits, reference_logits in zip(exact, expected, strict=True):
            assert relative_error(logits, reference_logits) < 1e-5

    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = LLM(str(path), dtype="float32").generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference_greedy(reference, PROMPTS, 32)


def test_transformers_loads_our_exported_files_too(tmp_path):
    """The exporter writes what llama.cpp would: transformers' own GGUF reader agrees with ours on it."""
    make_tiny_model(ALL_CONFIGS["llama-gqa-tied"], tmp_path / "hf")
    path = tmp_path / "tiny.gguf"
    export_gguf(tmp_path / "hf", path, "Q8_0")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ours = prompt_logits(load_model(str(path), dtype="float32"), PROMPTS)
    for prompt, logits in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            expected = theirs(torch.tensor([prompt])).logits[0]
        assert relative_error(logits, expected) < 1e-4


LINEAR_KINDS = {"attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output"}


@pytest.mark.skipif(not kernels_available(), reason="block tiles need lmserve's CPU kernels")
@pytest.mark.parametrize("quantization", ["auto", "int8"])
@pytest.mark.parametrize("name", ["llama-gqa-tied", "llama-mha-untied", "neox-rotary-1.0-sequential"])
def test_linears_on_block_tiles_are_never_dequantized(tmp_path, monkeypatch, name, quantization):
    """Where block tiles take every product of a linear, its float weight would be thrown away: the loader does
    not dequantize it at all (SmolLM2: 210 of its 272 tensors). Everything else still is."""
    make_tiny_model(ALL_CONFIGS[name], tmp_path / "hf")
    path = tmp_path / "tiny.gguf"
    export_gguf(tmp_path / "hf", path, "Q4_1")
    dequantized: list[str] = []
    dequantize = GGUFCheckpoint._dequantize
    monkeypatch.setattr(GGUFCheckpoint, "_dequantize", lambda self, info: dequantized.append(info.name)
                        or dequantize(self, info))

    loaded = load_model(str(path), dtype="float32", quantization=quantization)
    linears = [m for m in loaded.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.block_tiles is not None and m.weight is None for m in linears)
    kinds = {n.split(".")[-2] for n in dequantized if n.endswith(".weight")}  # biases stay float
    assert not kinds & LINEAR_KINDS and "token_embd" in kinds and "attn_norm" in kinds

    dequantized.clear()
    load_model(str(path), dtype="float32", quantization="none")
    assert sorted(dequantized) == sorted(t.name for t in gguf.GGUFReader(path).tensors)
