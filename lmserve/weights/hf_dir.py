"""Hugging Face model directories: config.json plus memory-mapped *.safetensors (single or sharded)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lmserve.weights.errors import ModelLoadError


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{directory}: no config.json in this model directory")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e


def safetensors_files(directory: Path) -> list[Path]:
    """The shards listed by model.safetensors.index.json, else every *.safetensors in the directory."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from e
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{index}: lists shard {f.name}, which is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        found = ", ".join(p.name for p in directory.glob("*.bin")) or "none"
        raise ModelLoadError(f"{directory}: no *.safetensors weights (pickled .bin weights are not loaded: {found})")
    return files


def iter_tensors(files: list[Path], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of every shard, one at a time, cast to dtype."""
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({e})") from e
