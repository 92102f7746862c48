"""Which module implements which architecture, and building one without a throwaway init."""

from __future__ import annotations

import torch

from lmserve.config import ModelConfig
from lmserve.models.base import DecoderLM
from lmserve.models.gpt_neox import GPTNeoXForCausalLM
from lmserve.models.llama import LlamaForCausalLM
from lmserve.weights.errors import ModelLoadError

MODEL_CLASSES: dict[str, type[DecoderLM]] = {"llama": LlamaForCausalLM, "gpt_neox": GPTNeoXForCausalLM}


def build_model(config: ModelConfig, source: str, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> DecoderLM:
    """The module with uninitialised storage on `device` (built on the meta device: no random init); the caller
    loads its weights once it has decided which linears keep only GGUF blocks, so that those are never
    dequantized."""
    with torch.device("meta"):
        try:
            model = MODEL_CLASSES[config.family](config)
        except ValueError as e:
            raise ModelLoadError(f"{source}: {e}") from e
    # torch.empty, not to_empty's empty_like: empty_like of a meta tensor runs torch's reference implementation,
    # whose import (torch._refs, symbolic shapes) took 0.4 s of every start
    model._apply(lambda t: torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device))
    model.tie_weights()
    model.rotary.reset_parameters()
    return model.eval().requires_grad_(False)
