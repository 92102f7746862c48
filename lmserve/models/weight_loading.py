"""Copy checkpoint tensors into a model's (possibly fused) parameters, checking that every row is filled once."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lmserve.weights.errors import ModelLoadError

# A checkpoint name maps to (parameter name, shard index) or None to skip it; shards are stacked along dim 0.
NameMapper = Callable[[str], tuple[str, int] | None]


def load_into(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], mapper: NameMapper,
              shard_rows: Callable[[str], list[int]], source: str) -> None:
    """`shard_rows(param)` gives the row count of each shard of a fused parameter (one entry when unfused)."""
    params = dict(model.named_parameters())
    filled: dict[str, set[int]] = {name: set() for name in params}
    for ckpt_name, tensor in weights:
        target = mapper(ckpt_name)
        if target is None:
            continue
        name, shard = target
        if name not in params:
            raise ModelLoadError(f"{source}: unexpected tensor '{ckpt_name}' for this architecture")
        rows = shard_rows(name)
        start = sum(rows[:shard])
        dest = params[name].data.narrow(0, start, rows[shard])
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"{source}: tensor '{ckpt_name}' has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)} from the config")
        dest.copy_(tensor)
        filled[name].add(shard)
    missing = [name for name, shards in filled.items() if len(shards) != len(shard_rows(name))]
    if missing:
        raise ModelLoadError(f"{source}: missing weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
