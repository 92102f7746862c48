"""lmserve: an efficient LLM inference and serving engine on PyTorch."""

__version__ = "0.1.0"
