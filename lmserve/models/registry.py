"""Which module implements which architecture, and building one with its weights without a throwaway init."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lmserve.config import ModelConfig
from lmserve.models.base import DecoderLM
from lmserve.models.gpt_neox import GPTNeoXForCausalLM
from lmserve.models.llama import LlamaForCausalLM
from lmserve.weights.errors import ModelLoadError

MODEL_CLASSES: dict[str, type[DecoderLM]] = {"llama": LlamaForCausalLM, "gpt_neox": GPTNeoXForCausalLM}


def build_model(config: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]], source: str,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> DecoderLM:
    """Create the module on the meta device (no random init), materialise it on `device`, then load `weights`."""
    with torch.device("meta"):
        try:
            model = MODEL_CLASSES[config.family](config)
        except ValueError as e:
            raise ModelLoadError(f"{source}: {e}") from e
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.rotary.reset_parameters()
    with torch.no_grad():
        model.load_weights(weights, source)
    return model.eval().requires_grad_(False)
