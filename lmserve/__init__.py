"""lmserve: an efficient LLM inference and serving engine on PyTorch."""

from lmserve.llm import LLM
from lmserve.outputs import CompletionOutput, RequestOutput
from lmserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
