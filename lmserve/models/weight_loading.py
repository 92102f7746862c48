"""Copy checkpoint tensors into a model's (possibly fused) parameters, checking that every row is filled once;
hand quantized blocks to the linears whose weights they encode."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lmserve.kernels.native import pack_blocks, qtype_of
from lmserve.layers.linear import Linear, QuantizedWeight
from lmserve.weights.errors import ModelLoadError

# A checkpoint name maps to (parameter name, shard index) or None to skip it; shards are stacked along dim 0.
NameMapper = Callable[[str], tuple[str, int] | None]
Tensors = Iterable[tuple[str, torch.Tensor]]


def load_into(model: nn.Module, weights: Tensors, mapper: NameMapper,
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


def attach_quantized(model: nn.Module, blocks: Tensors, mapper: NameMapper,
                     shard_rows: Callable[[str], list[int]]) -> None:
    """Give each Linear whose weight arrived entirely as blocks of one type those blocks, stacked like its shards.
    A linear with a missing shard or mixed types keeps only its float weight."""
    shards: dict[str, dict[int, torch.Tensor]] = {}
    for ckpt_name, tensor in blocks:
        target = mapper(ckpt_name)
        if target is not None:
            shards.setdefault(target[0], {})[target[1]] = tensor
    params = dict(model.named_parameters(remove_duplicate=False))
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        # a tied LM head finds its blocks under the embedding's name
        name = next((n for n, p in params.items() if p is module.weight and n in shards), None)
        if name is None or len(shards[name]) != len(shard_rows(name)):
            continue
        stacked = torch.cat([shards[name][i] for i in range(len(shards[name]))])
        qtype = qtype_of(stacked, module.in_features)
        if qtype is not None and stacked.shape[0] == module.out_features:
            module.quantized = QuantizedWeight(qtype, pack_blocks(qtype, stacked))
