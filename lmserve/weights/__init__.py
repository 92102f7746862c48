"""Loaders that turn model files (HF directories, GGUF) into configs, tensors and tokenizers."""
