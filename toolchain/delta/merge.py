"""A delta merged into a PyTorch model for the duration of a block (validation loss, benchmarks,
parity references): linear layers get U·Vᵀ added, changed parameters their dense difference."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from edgepack.runtime.delta_file import Delta
from edgepack.toolchain.delta.extract import linear_layers


@contextlib.contextmanager
def merged(model: torch.nn.Module, delta: Delta) -> Iterator[torch.nn.Module]:
    """``model`` with ``delta`` added to its weights; the original weights are restored on exit."""
    layers = linear_layers(model)
    params = dict(model.named_parameters())
    targets = {f"{name}.weight": torch.from_numpy(layer.matrix()) for name, layer in delta.layers.items()}
    targets.update({name: torch.from_numpy(change) for name, change in delta.dense.items()})
    missing = [n for n in targets if n not in params]
    if missing or any(n not in layers for n in delta.layers):
        raise ValueError(f"the delta names parameters this model lacks: {(missing or list(delta.layers))[:3]}")
    saved = {name: params[name].detach().clone() for name in targets}
    try:
        with torch.no_grad():
            for name, change in targets.items():
                params[name].add_(change.to(params[name].dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                params[name].copy_(weight)
