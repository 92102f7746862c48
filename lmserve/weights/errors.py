"""Errors raised while finding or loading a model, always naming the file at fault."""


class ModelLoadError(ValueError):
    """A model, tokenizer or weight file that cannot be used as given."""
